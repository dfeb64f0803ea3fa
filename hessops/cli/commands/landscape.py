"""``hessops landscape``: the loss (and accuracy) on a line or a plane through the parameters."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from hessops.cli import options, output, setup
from hessops.cli.values import count, existing_file, number
from hessops.constants import LANDSCAPE_DIRECTIONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, the directions, the slice's dimension, span and points."""
    options.common(parser)
    parser.add_argument(
        "--directions",
        choices=LANDSCAPE_DIRECTIONS,
        default=LANDSCAPE_DIRECTIONS[0],
        help="random filter-normalized directions (Li et al. 2018), or eigenvectors of --operator",
    )
    parser.add_argument(
        "--vectors",
        type=existing_file,
        metavar="PATH",
        help="--directions eigen: the eigenvectors `hessops eigs --save-vectors PATH` wrote, the first --dims of them "
        "(default: the --dims largest eigenvalues' vectors, computed here by eigs)",
    )
    parser.add_argument("--dims", type=count(1, 3), default=2, help="1: a line, 2: a plane")
    parser.add_argument(
        "--span",
        type=number(above=0),
        default=1.0,
        help="each axis runs from -span to span (eigenvectors: a distance in parameter space; random: relative to "
        "each filter's norm)",
    )
    parser.add_argument("--points", type=count(2), default=21, help="points per axis (odd: the parameters are one)")


def check(args: argparse.Namespace) -> str | None:
    """``--vectors`` only with eigenvector directions; one process."""
    if args.vectors is not None and args.directions != "eigen":
        return "--vectors gives eigenvector directions: pass --directions eigen too (or leave out --vectors)"
    if args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "`hessops landscape` runs in one process: run it without torchrun and --distributed"
    return None


def run(args: argparse.Namespace) -> None:
    """The surface's range printed; the eigenvectors computed first for ``--directions eigen`` without
    ``--vectors``."""
    import hessops
    from hessops.plot import plot_landscape

    s = setup.load(args)
    directions: Any = "random"
    if args.directions == "eigen" and args.vectors is not None:
        directions = hessops.load_eigenvectors(args.vectors)
    elif args.directions == "eigen":
        directions = hessops.eigs(s.op, args.dims, "LA", seed=args.seed, progress=not args.no_progress)
        values = ", ".join(f"{v:.6g}" for v in directions.values.tolist())
        print(f"eigenvectors of the {args.dims} largest eigenvalues ({values}): {directions.n_matvecs} products")
    surface = hessops.loss_landscape(
        s.model,
        s.loss_fn,
        s.loader,
        directions,
        dims=args.dims,
        span=args.span,
        points=args.points,
        seed=args.seed,
        progress=not args.no_progress,
    )
    finite = surface.loss[surface.loss.isfinite()]
    accuracy = "" if surface.accuracy is None else f", accuracy {surface.center_accuracy:.4f}"
    print(
        f"loss at the parameters {surface.center_loss:.6g}{accuracy}; on the {args.dims}-D slice (span ±{args.span:g}) "
        f"from {float(finite.min()):.6g} to {float(finite.max()):.6g}; {surface.n_points} points × "
        f"{surface.n_examples:,} examples ({surface.n_passes} passes over the data) in {surface.seconds:.2f} s"
    )

    def draw() -> Figure:
        fig, ax = output.new_figure(size=(7.5, 4.5) if args.dims == 1 else (8, 6))
        what = output.title(f"Loss landscape ({args.directions} directions)", s.settings)
        plot_landscape(surface, ax=ax, title=what)
        return fig

    output.emit(args, output.settings(args, s.settings), surface.to_dict(), s.op.device, draw)
