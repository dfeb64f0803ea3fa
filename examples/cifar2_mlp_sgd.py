"""How momentum and weight decay change the curvature of the minimum SGD finds, on CIFAR-10 airplane/bird.

The 3072-512-128-32-2 ReLU MLP (the zoo's ``mlp-cifar2``) on CIFAR-10's airplanes and birds, trained with
torch.optim.SGD (lr 0.01, 15 epochs) for each (momentum, weight decay) in {(0, 0), (0, 0.01), (0.9, 0.001),
(0.8, 0.01)} from the same initialization and the same batch order; then, at each solution, the accuracies,
the top eigenvalue λ_max of the Hessian of the mean training loss (Lanczos, with its residual) and its trace
(Hutch++, with its standard error).

    python examples/cifar2_mlp_sgd.py --data-dir data        # CIFAR-10 (hessops download cifar2 first), GPU if any
    python examples/cifar2_mlp_sgd.py --quick                 # offline (its time: docs/examples.md)

The training images (10,000 airplanes and birds) are split 0.9 / 0.1 into train and validation with
``random_split(generator=torch.Generator().manual_seed(123))``; the test split's 2,000 are reported too.
The Hessian is that of the cross-entropy alone, L(θ) = (1/N) Σ ℓ(f(x_n; θ), y_n) over the N training
examples; SGD's weight decay w minimizes L(θ) + (w/2)‖θ‖², whose Hessian is H + w·I, so its λ_max and trace
are shifted by w and w·n (both are in the JSON).

--quick substitutes two classes of scikit-learn's bundled 8×8 digits (3 and 8, relabelled 0 and 1, standardized:
283 training images, split 255 / 28 in the same way, and 74 test images) for CIFAR, and the five-layer ReLU
MLP 64-32-16-8-2 (2,762 parameters) for the 1,643,234-parameter one: small enough that the Lanczos λ_max and
the Hutch++ trace are also checked against the exact float64 spectrum. Its batches of 4 give 960 SGD steps in
the 15 epochs, about the study's 1,055 (with batches of 8, the runs without momentum stopped at a training loss
of 0.54, near chance's ln 2 = 0.69, far from a minimum). Its numbers are not the study's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, random_split  # noqa: E402

import hessops  # noqa: E402
from hessops.zoo.data import ImageDataset, load_dataset, make_loader, on_device  # noqa: E402
from hessops.zoo.models import build_model, make_loss  # noqa: E402

GRID = ((0.0, 0.0), (0.0, 0.01), (0.9, 0.001), (0.8, 0.01))  # (momentum, weight decay)
LR = 0.01
SPLIT, SPLIT_SEED = (0.9, 0.1), 123
MODEL = "mlp-cifar2"
QUICK_DIGITS = (3, 8)  # the two digit classes that stand in for airplane and bird
DIGITS_MEAN, DIGITS_STD = (0.3049,), (0.3758,)  # the digits' pixel mean and std: inputs standardized as CIFAR's are
DENSE_LIMIT = 3000  # up to this many parameters the exact spectrum is computed as a check


def two_digits(digits: ImageDataset) -> ImageDataset:
    """The images of ``QUICK_DIGITS`` among the embedded digits, relabelled 0 and 1."""
    keep = torch.isin(digits.labels, torch.tensor(QUICK_DIGITS))
    labels = (digits.labels[keep] == QUICK_DIGITS[1]).to(torch.int64)
    return ImageDataset(
        digits.images[keep],
        labels,
        scale=digits.scale,
        mean=digits.mean,
        std=digits.std,
        classes=[str(c) for c in QUICK_DIGITS],
    )


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, Dataset]:
    """(train, validation, test): the 0.9 / 0.1 split (seed 123) of the training images, and the test split."""
    if args.quick:
        images, test = (
            two_digits(load_dataset("digits", train=split, mean=DIGITS_MEAN, std=DIGITS_STD)) for split in (True, False)
        )
    else:
        images, test = (load_dataset("cifar2", data_dir=args.data_dir, train=split) for split in (True, False))
    train_set, val_set = random_split(images, SPLIT, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return train_set, val_set, test


def make_model(args: argparse.Namespace) -> nn.Module:
    """The study's MLP from the zoo, or (--quick) its 64-32-16-8-2 stand-in, both initialized from ``seed``."""
    if not args.quick:
        return build_model(MODEL, seed=args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 8),
            nn.ReLU(),
            nn.Linear(8, 2),
        ).eval()


def curvature(model: nn.Module, loss_fn: nn.Module, loader, args: argparse.Namespace) -> dict:
    """λ_max of the Hessian of the mean loss over ``loader`` (Lanczos, relative residual tolerance
    ``args.tol``) and its trace (Hutch++, ``args.probes`` products); when the model has at most
    ``DENSE_LIMIT`` parameters, also the exact λ_max and trace from the float64 ``dense_hessian``."""
    H = hessops.Hessian(model, loss_fn, loader)
    top = hessops.eigs(H, k=1, which="LA", tol=args.tol, seed=args.seed)
    tr = hessops.trace(H, probes=args.probes, seed=args.seed)
    n = H.shape[0]
    result = {
        "n_params": n,
        "top_eigenvalue": float(top.values[0]),
        "residual": float(top.residuals[0]),
        "converged": top.converged,
        "lanczos_steps": top.steps,
        "eigs_n_matvecs": top.n_matvecs,
        "eigs_seconds": top.seconds,
        "trace": tr.estimate,
        "trace_std_error": tr.std_error,
        "trace_n_matvecs": tr.n_matvecs,
        "trace_seconds": tr.seconds,
    }
    if n <= DENSE_LIMIT:
        began = time.perf_counter()
        exact = torch.linalg.eigvalsh(hessops.dense_hessian(model, loss_fn, loader, dtype=torch.float64))
        result["dense"] = {
            "top_eigenvalue": float(exact[-1]),
            "second_eigenvalue": float(exact[-2]),
            "trace": float(exact.sum()),
            "seconds": time.perf_counter() - began,
        }
    return result


def study(args: argparse.Namespace, momentum: float, weight_decay: float, data: tuple[Dataset, ...]) -> dict:
    """Train from the seeded initialization with one (momentum, weight decay), then measure at the solution."""
    train_set, val_set, test_set = data
    model, loss_fn = make_model(args).to(args.device), make_loss(MODEL)
    batches = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )  # the same order for every run
    began = time.perf_counter()
    history = hessops.train(
        model,
        loss_fn,
        on_device(batches, args.device),
        epochs=args.epochs,
        lr=LR,
        momentum=momentum,
        weight_decay=weight_decay,
        progress=False,
    )
    train_seconds = time.perf_counter() - began
    model.eval()
    fixed = {
        name: on_device(make_loader(d, batch_size=args.eval_batch_size), args.device)
        for name, d in (("train", train_set), ("val", val_set), ("test", test_set))
    }
    result = {
        "momentum": momentum,
        "weight_decay": weight_decay,
        "history": history,
        "train_seconds": train_seconds,
        **{name: hessops.evaluate(model, loss_fn, loader) for name, loader in fixed.items()},
        **curvature(model, loss_fn, fixed["train"], args),
    }
    result["regularized"] = {  # the Hessian of L(θ) + (w/2)‖θ‖², the objective SGD with weight decay w follows
        "top_eigenvalue": result["top_eigenvalue"] + weight_decay,
        "trace": result["trace"] + weight_decay * result["n_params"],
    }
    return result


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Training loss per epoch; train/val/test accuracy, λ_max and trace (± 2 standard errors) per run."""
    labels = [f"m={r['momentum']:g}\nwd={r['weight_decay']:g}" for r in runs]
    x = torch.arange(len(runs)).numpy()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for r, label in zip(runs, labels):
        axes[0, 0].plot(
            [h["epoch"] for h in r["history"]],
            [h["loss"] for h in r["history"]],
            "o-",
            ms=3,
            label=label.replace("\n", ", "),
        )
    axes[0, 0].set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log", title="Training")
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=8)
    for i, split in enumerate(("train", "val", "test")):
        axes[0, 1].bar(x + (i - 1) * 0.27, [r[split]["accuracy"] for r in runs], 0.27, label=split)
    lowest = min(r[split]["accuracy"] for r in runs for split in ("train", "val", "test"))
    axes[0, 1].set(ylabel="accuracy", title="Accuracy at the solution", ylim=(min(0.5, lowest - 0.05), 1.0))
    axes[0, 1].legend(fontsize=8, loc="lower right")
    axes[1, 0].bar(x, [r["top_eigenvalue"] for r in runs], color="tab:red")
    axes[1, 0].set(ylabel=r"$\lambda_{\max}$ of the Hessian", title="Top eigenvalue (Lanczos)")
    axes[1, 1].bar(
        x, [r["trace"] for r in runs], yerr=[2 * r["trace_std_error"] for r in runs], capsize=4, color="tab:purple"
    )
    axes[1, 1].set(ylabel=r"$\mathrm{tr}\,H$", title="Trace (Hutch++, ± 2 standard errors)")
    for ax in axes.flat[1:]:
        ax.set_xticks(x, labels, fontsize=8)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict]) -> None:
    print(f"{'momentum':>8} {'wd':>6} {'train':>6} {'val':>6} {'test':>6} {'λ_max':>10} {'trace':>22}")
    for r in runs:
        print(
            f"{r['momentum']:8g} {r['weight_decay']:6g} {r['train']['accuracy']:6.3f} {r['val']['accuracy']:6.3f} "
            f"{r['test']['accuracy']:6.3f} {r['top_eigenvalue']:10.4g} "
            f"{r['trace']:12.5g} ± {r['trace_std_error']:<7.2g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="offline: two classes of the embedded digits, a small MLP")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("results/cifar2_mlp_sgd"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="initialization, batch order and probe vectors")
    args = parser.parse_args()
    # epochs, batch size, operator batch size, trace probes, Lanczos residual tolerance (relative to max |θ|)
    quick, full = (15, 4, 512, 60, 1e-4), (15, 128, 1000, 200, 1e-4)
    args.epochs, args.batch_size, args.eval_batch_size, args.probes, args.tol = quick if args.quick else full
    args.device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data = datasets(args)
    runs = [study(args, momentum, weight_decay, data) for momentum, weight_decay in GRID]
    report(runs)
    what = "MLP 64-32-16-8-2 on digits 3 vs 8 (quick)" if args.quick else "MLP 3072-512-128-32-2 on CIFAR airplane/bird"
    what += f", N = {len(data[0]):,}"
    plot(runs, args.out / "curvature.png", f"SGD lr {LR:g}, {args.epochs} epochs: {what}")
    summary = {
        "mode": "quick" if args.quick else "full",
        "data": "digits 3 vs 8" if args.quick else "cifar2",
        "model": "mlp 64-32-16-8-2" if args.quick else MODEL,
        "n_train": len(data[0]),
        "n_val": len(data[1]),
        "n_test": len(data[2]),
        "split": {"fractions": list(SPLIT), "seed": SPLIT_SEED},
        "lr": LR,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": str(args.device),
        "seed": args.seed,
        "curvature_data": "train",
        "eigs_settings": {"which": "LA", "tol": args.tol},
        "trace_settings": {"method": "hutch++", "probes": args.probes},
        "runs": runs,
        "seconds": time.perf_counter() - began,
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'result.json'} and {args.out / 'curvature.png'}")


if __name__ == "__main__":
    main()
