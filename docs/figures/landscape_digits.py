"""Draws docs/figures/landscape_digits_eigen.png and landscape_digits_random.png (docs/analysis.md): mlp-digits
trained as `hessops demo` trains it (30 epochs of SGD, lr 0.1, momentum 0.9), then the command line itself:
`hessops eigs --save-vectors` and `hessops landscape` along the two top Hessian eigenvectors and along two
random filter-normalized directions. Run from the repository root: `python docs/figures/landscape_digits.py`."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

import hessops
from hessops.cli import main
from hessops.zoo.data import load_dataset, make_loader
from hessops.zoo.models import build_model, make_loss, model_spec

FIGURES = Path(__file__).resolve().parent
RISE = 2.0  # the eigenvector plane spans ±a with ½λ₁a² = RISE nats: the top curvature's rise at the edge


def run(argv: list[str]) -> None:
    """One `hessops` command line, in this process; a failure stops the script."""
    print("$ hessops " + " ".join(argv))
    status = main(argv)
    if status != 0:
        raise SystemExit(status)


def draw() -> None:
    """Train, save the checkpoint and the top two eigenvectors, and draw both planes."""
    model = build_model("mlp-digits", seed=0)
    loss_fn = make_loss(model_spec("mlp-digits"))
    loader = make_loader(load_dataset("digits", train=True), batch_size=128)
    hessops.train(model, loss_fn, loader, epochs=30, lr=0.1, momentum=0.9, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, vectors = Path(folder) / "mlp-digits.pt", Path(folder) / "top2.pt"
        torch.save(model.state_dict(), checkpoint)
        common = ["--model", "mlp-digits", "--checkpoint", str(checkpoint), "--no-progress"]
        run(["eigs", *common, "--k", "2", "--which", "LA", "--dtype", "float64", "--save-vectors", str(vectors)])
        span = math.sqrt(2 * RISE / float(hessops.load_eigenvectors(vectors).values[0]))
        points = ["--points", "25", "--dims", "2"]
        run(
            ["landscape", *common, "--directions", "eigen", "--vectors", str(vectors), "--span", f"{span:.3g}", *points]
            + ["--plot", str(FIGURES / "landscape_digits_eigen.png")]
        )
        run(
            ["landscape", *common, "--directions", "random", "--span", "1", *points]
            + ["--plot", str(FIGURES / "landscape_digits_random.png")]
        )


if __name__ == "__main__":
    draw()
