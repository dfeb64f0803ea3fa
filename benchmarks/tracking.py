"""What sharpness tracking costs during training: a measurement's wall time as a fraction of a training epoch's.

For each model (the digits MLP; the zoo's 5,100-parameter CIFAR CNN and ``vit-micro-cifar`` on the embedded
digits upsampled to 3×32×32, as the examples' quick modes train them), in one process: ``--epochs`` epochs of
plain SGD (``hessops.train``) over ``--train`` examples in batches of ``--batch``, with a
:class:`hessops.SharpnessTracker` on a fixed subset of ``--subset`` training examples measuring before training
and after every epoch. Reported: the median epoch's training time (the trackers' time excluded), the median
measurement's time and products, and their ratio, for each tracker setting in ``--settings``.

    python -m benchmarks.tracking                       # every model, every setting
    python -m benchmarks.tracking --models mlp-digits --settings default
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import hessops
from hessops.zoo.data import load_dataset
from hessops.zoo.models import build_model, make_loss, model_spec

MODELS = ("mlp-digits", "cnn-cifar-5k", "vit-micro-cifar")
# Tracker settings compared: keyword arguments of SharpnessTracker.
SETTINGS: dict[str, dict] = {
    "default": {},
    "loose": {"value_tol": 1e-2},
    "loose-nocheck": {"value_tol": 1e-2, "check": False},
    # not the sharpness: the curvature along the update (a lower bound on it), one product per epoch
    "update-curvature": {},
}


def digits_as(name: str, count: int) -> TensorDataset:
    """``count`` training digits as ``name`` takes them: 8×8 for the MLP, else upsampled to 3×32×32."""
    dataset = load_dataset("digits", num_examples=count, seed=0)
    inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    if name != "mlp-digits":
        inputs = F.interpolate(inputs, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return TensorDataset(inputs, targets)


def random_as(name: str, count: int) -> TensorDataset:
    """``count`` random inputs of ``name``'s shape with random labels (seeded): for the cost of tracking on a
    training set larger than the embedded digits; what is learned does not matter here."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 8, 8) if name == "mlp-digits" else (3, 32, 32)
    return TensorDataset(torch.randn(count, *shape, generator=g), torch.randint(0, 10, (count,), generator=g))


def run(name: str, setting: str, args: argparse.Namespace) -> dict:
    """One training run of ``name`` with the tracker ``setting``; its timings."""
    data = (digits_as if args.data == "digits" else random_as)(name, args.train)
    data = TensorDataset(*(t.to(args.device) for t in data.tensors))
    model = build_model(name, seed=0).to(args.device).train()
    loss_fn = make_loss(model_spec(name))
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    subset = DataLoader(Subset(data, range(args.subset)), batch_size=args.batch)
    if setting == "update-curvature":
        tracker = hessops.UpdateCurvatureTracker(model, loss_fn, subset, every=len(loader))
        trackers = {"update_curvature": tracker}
    else:
        tracker = hessops.SharpnessTracker(model, loss_fn, subset, unit="epoch", **SETTINGS[setting])
        trackers = {"sharpness": tracker}
    began = time.perf_counter()
    history = hessops.train(
        model, loss_fn, loader, epochs=args.epochs, lr=args.lr, momentum=0.9, progress=False, **trackers
    )
    total = time.perf_counter() - began
    measured = [r.seconds for r in tracker.history]
    epoch = (total - sum(measured)) / args.epochs
    values = [r.values[0] if hasattr(r, "values") else r.value for r in tracker.history]
    return {
        "model": name,
        "setting": setting,
        "n_params": sum(p.numel() for p in model.parameters()),
        "epoch_seconds": epoch,
        "measurement_seconds": statistics.median(measured[1:]),
        "first_measurement_seconds": measured[0],
        "products": statistics.median(r.n_matvecs for r in tracker.history[1:]),
        "fraction": statistics.median(measured[1:]) / epoch,
        "sharpness": values,
        "final_loss": history[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--data", choices=("digits", "random"), default="digits")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--subset", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="cpu", help="the model and the (whole) training set live there")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        for setting in args.settings:
            row = run(name, setting, args)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sharpness"}), file=sys.stderr)
    print(
        "| model | setting | epoch (s) | measurement (s) | products | fraction |\n| --- | --- | ---: | ---: | ---: | ---: |"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['setting']} | {r['epoch_seconds']:.3f} | {r['measurement_seconds']:.3f} | "
            f"{r['products']:.0f} | {100 * r['fraction']:.1f} % |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
