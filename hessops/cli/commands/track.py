"""``hessops track``: SGD, measuring the sharpness every ``--every`` epochs and the gradient norms."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import TYPE_CHECKING

from hessops.cli import options, output, setup
from hessops.cli.values import count, number
from hessops.constants import is_language_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, SGD's epochs and hyperparameters, when and on what the sharpness is
    measured."""
    options.common(parser)
    parser.add_argument("--epochs", type=count(), default=5, help="epochs of SGD")
    parser.add_argument("--lr", type=number(above=0), default=0.05, help="the learning rate")
    parser.add_argument("--momentum", type=number(minimum=0, below=1), default=0.0, help="heavy-ball momentum")
    parser.add_argument("--weight-decay", type=number(minimum=0), default=0.0, help="L2 penalty")
    parser.add_argument(
        "--every", type=count(), default=1, help="measure the sharpness every this many epochs (and before training)"
    )
    parser.add_argument(
        "--sharpness-examples",
        type=count(),
        default=256,
        help="the sharpness is measured on the first this many examples",
    )
    parser.add_argument(
        "--value-tol",
        type=number(above=0),
        default=None,
        help=(
            "stop each measurement once the top eigenvalue's verified bound is within this (relative); fewer "
            "products (default: none, Lanczos' --tol 1e-4 alone)"
        ),
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="no check run in each measurement (fewer products; a repeated top eigenvalue may go unseen)",
    )


def check(args: argparse.Namespace) -> str | None:
    """Image classifiers only."""
    if is_language_model(args.model):
        return f"`hessops track` trains image classifiers; --model {args.model} is a language model"
    return None


def run(args: argparse.Namespace) -> None:
    """Training; the sharpness printed at each measurement."""
    import torch

    from hessops.analysis.tracking import GradNormTracker, SharpnessTracker, train
    from hessops.zoo.data import make_loader, on_device

    s = setup.load(args)
    subset = torch.utils.data.Subset(s.dataset, range(min(args.sharpness_examples, len(s.dataset))))
    fixed = on_device(make_loader(subset, batch_size=args.batch_size), s.op.device)
    sharpness = SharpnessTracker(
        s.model, s.loss_fn, fixed, unit="epoch", value_tol=args.value_tol, check=not args.no_check, dtype=s.op.dtype
    )
    grad_norms = GradNormTracker(s.model)
    history = train(
        s.model,
        s.loss_fn,
        s.loader,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        sharpness=sharpness,
        grad_norms=grad_norms,
        every=args.every,
        progress=not args.no_progress,
    )
    for record in sharpness.history:
        print(f"epoch {record.step:3d}: sharpness {record.values[0]:.6g}")

    def draw() -> Figure:
        fig, (left, right) = output.new_figure(1, 2, (13, 4.5))
        sharpness.plot(ax=left, title="Sharpness (top Hessian eigenvalue)")
        grad_norms.plot(ax=right, title="Per-layer gradient norms")
        fig.suptitle(output.title("Training with SGD", s.settings))
        return fig

    settings = output.settings(args, s.settings, sharpness_examples=len(subset))
    result = {
        "training": history,
        "sharpness": [asdict(r) for r in sharpness.history],
        "grad_norms": grad_norms.history,
    }
    output.emit(args, settings, result, s.op.device, draw)
