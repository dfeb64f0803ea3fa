"""The MNIST basin-volume study with hessops: train the 1,710-parameter CNN twice (without and with weight
decay), then at each solution the Hessian spectrum (how negative is the smallest eigenvalue?) and the log
volume of the basin {δ : ½ δᵀ(H + cI)δ ≤ 2}, exact and by stochastic Lanczos quadrature, term by term.

    python examples/mnist_basin_volume.py --data-dir data          # MNIST (hessops download mnist first)
    python examples/mnist_basin_volume.py --quick                   # offline (its time: docs/examples.md)

The full mode follows the study: 1,500 random MNIST training examples, batches of 100, Adadelta (lr 1.0) with
StepLR (γ 0.7 per epoch) for 10 epochs. --quick uses 150 of scikit-learn's bundled 8×8 digits, standardized
as MNIST's pixels are and upsampled to 28×28, in batches of 15, and trains at a constant learning rate
(γ 1.0) for 30 epochs: with 10 steps per epoch the study's decay stops Adadelta, whose steps start small,
long before it has learned (5 epochs ended at a training loss of 3.0, above chance's ln 10 = 2.3).

The dense Hessian (n = 1,710: 1,710 products) is computed once per run, from one batch of all the training
examples, and gives the spectrum, the exact log-determinant and the density; SLQ's log-determinant runs
matrix-free on the operator (probes × Lanczos steps products).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cola
import torch
import torch.nn.functional as F
from torch import nn

import hessops
from hessops.plot import plot_density
from hessops.zoo.data import load_dataset, make_loader
from hessops.zoo.models import build_model, make_loss

THRESHOLD = 2.0
INIT_STD = 0.5
DIGITS_MEAN, DIGITS_STD = (0.3049,), (0.3758,)  # the digits' pixel mean and std: standardized as MNIST's are
STUDY = {"log_unit_ball": -3942.74, "log_threshold_term": 1185.28, "half_logdet": 1190.60, "log_volume": -3948.06}


def training_data(args: argparse.Namespace) -> torch.utils.data.Dataset:
    """MNIST's deterministic subset (standardized with MNIST's mean and std), or (--quick) the embedded digits,
    standardized with theirs and upsampled to MNIST's 28×28."""
    if not args.quick:
        return load_dataset("mnist", data_dir=args.data_dir, num_examples=args.num_examples, seed=args.seed)
    digits = load_dataset("digits", num_examples=args.num_examples, seed=args.seed, mean=DIGITS_MEAN, std=DIGITS_STD)
    x = torch.stack([digits[i][0] for i in range(len(digits))])
    y = torch.stack([digits[i][1] for i in range(len(digits))])
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return torch.utils.data.TensorDataset(x, y)


def train(model: nn.Module, loader, *, epochs: int, gamma: float, weight_decay: float) -> list[float]:
    """Adadelta (lr 1.0) with StepLR(``gamma``) per epoch, as in the study; returns the mean loss per epoch."""
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
    loss_fn, losses = make_loss("cnn-mnist-1710"), []
    for _ in range(epochs):
        model.train()
        total, seen = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(y), seen + len(y)
        scheduler.step()
        losses.append(total / seen)
    return losses


def study(args: argparse.Namespace, weight_decay: float, loader, whole) -> dict:
    """Train from the seeded N(0, 0.5²) init on ``loader``, then, over ``whole`` (the same examples in one
    batch), the loss, the spectrum and the basin volume at the solution."""
    model = build_model("cnn-mnist-1710", seed=args.seed)
    losses = train(model, loader, epochs=args.epochs, gamma=args.gamma, weight_decay=weight_decay)
    model.eval()
    loss_fn = make_loss("cnn-mnist-1710")
    final = hessops.evaluate(model, loss_fn, whole)
    H = hessops.Hessian(model, loss_fn, whole, dtype=torch.float64)
    c = weight_decay + 1 / INIT_STD**2  # weight decay plus the Gaussian prior's precision
    began = time.perf_counter()
    dense = cola.SelfAdjoint(cola.ops.Dense(H.to_dense()))  # n = 1,710: the exact Hessian, once
    spectrum = torch.linalg.eigvalsh(dense.to_dense())
    try:
        exact = hessops.basin_volume(dense, threshold=THRESHOLD, c=c, method="dense").to_dict()
        slq = hessops.basin_volume(  # matrix-free, on the operator
            H,
            threshold=THRESHOLD,
            c=c,
            method="slq",
            probes=args.probes,
            lanczos_steps=args.lanczos_steps,
            seed=args.seed,
        ).to_dict()
    except hessops.NotPositiveDefiniteError as error:  # not at a minimum: the quadratic basin is unbounded
        exact = slq = {"undefined": str(error)}
    density = hessops.spectral_density(dense, num_probes=10, lanczos_steps=args.lanczos_steps, seed=args.seed)
    tag = "wd" if weight_decay else "plain"
    plot_density(
        density.grid.tolist(),
        density.density.tolist(),
        args.out / f"density_{tag}.png",
        top=spectrum[-3:].tolist(),
        title=f"Hessian density (SLQ), MNIST CNN ({H.shape[0]:,} parameters)\n"
        f"{args.data}, N = {args.num_examples}, weight decay {weight_decay:g}",
    )
    return {
        "weight_decay": weight_decay,
        "c": c,
        "train_loss": losses,
        "final": final,
        "n_params": H.shape[0],
        "smallest_eigenvalue": float(spectrum[0]),
        "largest_eigenvalue": float(spectrum[-1]),
        "negative_eigenvalues": int((spectrum < 0).sum()),
        "exact": exact,
        "slq": slq,
        "seconds": time.perf_counter() - began,
    }


def report(result: dict) -> None:
    e, s = result["exact"], result["slq"]
    print(
        f"weight decay {result['weight_decay']:g}: training loss {result['final']['loss']:.4f}, accuracy "
        f"{result['final']['accuracy']:.3f} at the solution (chance: ln 10 = 2.3026)"
    )
    print(
        f"  spectrum: λmin = {result['smallest_eigenvalue']:.3e} ({result['negative_eigenvalues']} negative), "
        f"λmax = {result['largest_eigenvalue']:.4g}"
    )
    if "undefined" in e:
        print(
            f"  no basin volume: λmin + c = {result['smallest_eigenvalue'] + result['c']:.3g} < 0, the model is not "
            "at a minimum of the loss + prior (train longer)"
        )
        return
    print(f"  log unit ball   {e['log_unit_ball']:10.2f}   (study, by Stirling: {STUDY['log_unit_ball']})")
    print(f"  threshold term  {e['log_threshold_term']:10.2f}   (study: {STUDY['log_threshold_term']})")
    print(
        f"  ½ logdet(H+cI)  {e['half_logdet']:10.2f}   exact; SLQ {s['half_logdet']:.2f} ± "
        f"{0.5 * s['logdet_std_error']:.2f}   (study: {STUDY['half_logdet']})"
    )
    print(
        f"  log volume      {e['log_volume']:10.2f}   exact; SLQ {s['log_volume']:.2f}   (study: {STUDY['log_volume']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="offline: digits upsampled to 28×28, small sizes")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("results/mnist_basin_volume"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # training examples, epochs, batch size, StepLR's γ per epoch; SLQ probes and Lanczos steps
    quick, full = (150, 30, 15, 1.0, 10, 30), (1500, 10, 100, 0.7, 30, 80)
    args.num_examples, args.epochs, batch_size, args.gamma, args.probes, args.lanczos_steps = (
        quick if args.quick else full
    )
    args.data = "digits upsampled to 28x28" if args.quick else "MNIST"
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data = training_data(args)
    loader, whole = make_loader(data, batch_size=batch_size), make_loader(data, batch_size=len(data))
    results = [study(args, weight_decay, loader, whole) for weight_decay in (0.0, 1e-5)]
    for result in results:
        report(result)
    n = results[0]["n_params"]
    print(
        f"The unit-ball term is exact here: log V_n = (n/2)·log π − lgamma(n/2 + 1) = "
        f"{hessops.log_unit_ball_volume(n):.4f} for n = {n}; Stirling's series, which the study used, agrees "
        f"to within its first correction 1/(6n) = {1 / (6 * n):.1e}."
    )
    summary = {
        "mode": "quick" if args.quick else "full",
        "data": args.data,
        "num_examples": args.num_examples,
        "epochs": args.epochs,
        "batch_size": batch_size,
        "gamma": args.gamma,
        "probes": args.probes,
        "lanczos_steps": args.lanczos_steps,
        "threshold": THRESHOLD,
        "study": STUDY,
        "runs": results,
        "seconds": time.perf_counter() - began,
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
