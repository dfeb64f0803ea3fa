"""``hessops logdet``: log det(op + c·I), exact or by SLQ."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hessops.cli import options, output, setup

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, the log-determinant's options (``--c`` 1e-3), long runs."""
    options.common(parser)
    options.log_determinant(parser, c=1e-3)
    options.long_runs(parser)


def run(args: argparse.Namespace) -> None:
    """The log-determinant, its standard error and interval printed."""
    import hessops
    from hessops.plot import plot_log_volume

    s = setup.load(args)
    method, deflate = setup.deflation(args)
    estimate = hessops.logdet(
        hessops.Regularized(s.op, args.c),
        method=method,
        probes=args.probes,
        lanczos_steps=args.lanczos_steps,
        seed=args.seed,
        progress=not args.no_progress,
        **setup.long_run_options(args),
        deflate=deflate,
        confidence=args.confidence,
        eigs_max_iters=args.eigs_max_iters,
    )
    result = estimate.to_dict()
    print(
        f"log det({args.operator} + {args.c:g}·I) = {result['logdet']:.8g} ± {result['std_error']:.2g} "
        f"({result['method']}, {result['n_matvecs']} products, {result['seconds']:.2f} s)"
        + output.interval_text(result)
    )

    def draw() -> Figure:
        what = output.title(f"log det({type(s.op).__name__} + {args.c:g}·I)", s.settings)
        return plot_log_volume(estimate, title=what)

    settings = output.settings(args, s.settings, method=method, deflate=deflate)
    output.emit(args, settings, result, s.op.device, draw)
