"""``hessops demo``: :func:`hessops.demo.run_demo`, its result at ``--out`` and its figure at ``--plot``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hessops.cli import output
from hessops.cli.values import FIGURE_FORMATS, SEED_LIMIT, count, output_path
from hessops.demo import DEMO_MODEL
from hessops.zoo.registry import MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the result and the figure go, how many eigenvalues, the seed."""
    parser.add_argument(
        "--out", type=output_path(), default=Path("demo/result.json"), help="write the result here as JSON"
    )
    parser.add_argument(
        "--plot",
        type=output_path(*FIGURE_FORMATS),
        default=Path("demo/demo.png"),
        help="draw the four panels into this file",
    )
    parser.add_argument("--k", type=count(), default=10, help="how many top eigenvalues")
    parser.add_argument(
        "--seed", type=count(0, SEED_LIMIT), default=0, help="the model's initial parameters and the probe vectors"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check(args: argparse.Namespace) -> str | None:
    """``--k`` within the demo model's size."""
    n = MODELS[DEMO_MODEL].n_params
    if args.k > n:
        return f"--k {args.k}: the demo's {DEMO_MODEL} has {n:,} parameters, so at most {n} eigenvalues"
    return None


def run(args: argparse.Namespace) -> None:
    """The demo, then its outputs."""
    import torch

    from hessops.demo import run_demo

    result = run_demo(k=args.k, seed=args.seed, progress=not args.no_progress)
    output.emit(args, result.settings, result.to_dict(), torch.device("cpu"), result.figure)
