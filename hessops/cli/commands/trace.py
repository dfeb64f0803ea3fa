"""``hessops trace``: the trace by Hutch++ or Hutchinson."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hessops.cli import options, output, setup
from hessops.cli.values import count
from hessops.constants import TRACE_METHODS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, the probes and the estimator, resuming."""
    options.common(parser)
    parser.add_argument(
        "--probes",
        type=count(2),
        default=100,
        help="products with random vectors (at least 4 for hutch++, 2 for hutchinson)",
    )
    parser.add_argument("--method", choices=TRACE_METHODS, default=TRACE_METHODS[0], help="the estimator")
    options.long_runs(parser, basis=False)


def check(args: argparse.Namespace) -> str | None:
    """Hutch++'s four probes at least."""
    if args.method == "hutch++" and args.probes < 4:
        return (
            f"--probes {args.probes}: hutch++ needs at least 4 (a third sketch the range, the rest probe the remainder)"
        )
    return None


def run(args: argparse.Namespace) -> None:
    """The estimate and its standard error printed."""
    import hessops
    from hessops.plot import plot_trace

    s = setup.load(args)
    estimate = hessops.trace(
        s.op, probes=args.probes, method=args.method, seed=args.seed, **setup.long_run_options(args)
    )
    result = estimate.to_dict()
    print(
        f"trace = {result['trace']:.8g} ± {result['std_error']:.2g} ({result['method']}, {result['n_matvecs']} "
        f"products, {result['seconds']:.2f} s)"
    )

    def draw() -> Figure:
        fig, ax = output.new_figure()
        what = output.title(f"{type(s.op).__name__} trace against probes", s.settings)
        plot_trace(estimate, ax=ax, title=what)
        return fig

    output.emit(args, output.settings(args, s.settings), result, s.op.device, draw)
