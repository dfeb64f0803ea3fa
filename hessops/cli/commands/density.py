"""``hessops density``: the SLQ spectral density, broadened on a grid."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hessops.cli import options, output, setup
from hessops.cli.values import count, number

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, SLQ's probes and steps, the broadening and its grid, long runs."""
    options.common(parser)
    parser.add_argument("--num-probes", type=count(), default=10, help="random start vectors (one Lanczos run each)")
    parser.add_argument("--lanczos-steps", type=count(), default=80, help="Lanczos steps per probe")
    parser.add_argument(
        "--sigma", type=number(above=0), help="Gaussian broadening (default: 1%% of the spectrum's span)"
    )
    parser.add_argument("--grid", type=count(2), default=1000, help="number of points the density is evaluated at")
    options.long_runs(parser)


def run(args: argparse.Namespace) -> None:
    """The density, its range and mean eigenvalue printed."""
    import hessops
    from hessops.plot import plot_density

    s = setup.load(args)
    d = hessops.spectral_density(
        s.op,
        num_probes=args.num_probes,
        lanczos_steps=args.lanczos_steps,
        grid=args.grid,
        sigma=args.sigma,
        seed=args.seed,
        progress=not args.no_progress,
        **setup.long_run_options(args),
    )
    result = d.to_dict()
    grid = result["grid"]
    print(
        f"density on [{grid[0]:.4g}, {grid[-1]:.4g}], σ = {result['sigma']:.3g}; mean eigenvalue "
        f"{result['moments']['mean']:.6g}; {result['n_matvecs']} products in {result['seconds']:.2f} s"
    )
    top = sum(max(nodes) for nodes in result["nodes"]) / len(result["nodes"])  # the largest Ritz value, on average

    def draw() -> Figure:
        fig, ax = output.new_figure()
        what = output.title(f"{type(s.op).__name__} spectral density", s.settings)
        plot_density(grid, result["density"], ax=ax, top=[top], title=what)
        return fig

    output.emit(args, output.settings(args, s.settings), result, s.op.device, draw)
