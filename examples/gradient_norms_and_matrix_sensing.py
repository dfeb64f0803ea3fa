"""Per-layer gradient norms under SGD, and the implicit low-rank bias of gradient descent in matrix sensing.

Two studies of what gradient descent does beyond lowering the loss: (a) how the gradient is spread over the
layers while SGD trains an MLP; (b) how a small initialization steers over-parameterized matrix sensing to
the low-rank solution, and the rank-deficient Hessian it ends at.

(a) The bias-free 784-128-128-128-10 ReLU MLP (the zoo's ``mlp-mnist``) on MNIST, torch.optim.SGD with lr 0.01
for 40 epochs: each weight matrix's gradient Frobenius norm ‖∂L_B/∂W_l‖_F, averaged over each epoch's steps
by ``hessops.GradNormTracker``, beside the train and test loss after every epoch.

(b) Matrix sensing: a rank-r ground truth X* = U*U*ᵀ (U* ∈ R^{d×r} with N(0, 1/d) entries), m = 10·d·r
measurements y_i = ⟨A_i, X*⟩ with A_i ∈ R^{d×d} of N(0, 1) entries, and gradient descent (full-batch SGD,
lr 0.02) on F(U) = (1/m) Σ_i (⟨A_i, UUᵀ⟩ − y_i)², for U ∈ R^{d×r} (from 0.01·W[:, :r]) and for the
over-parameterized U ∈ R^{d×d} from U₀ = α·W, α ∈ {1e-4, 1e-3, 1e-2, 1e-1, 1} (W with N(0, 1/d) entries).
Over t: ‖U_tU_tᵀ − X*‖_F and the top-10 singular values of U_t. At the end: the whole spectrum of ∇²F(U),
through ``hessops.Hessian`` of a module holding U whose output on a batch of A_i is ⟨A_i, UUᵀ⟩, with
``nn.MSELoss``: the mean over the m measurements of the squared residual is F exactly.

Where UUᵀ = X* (rank r) the residuals vanish and ΔᵀHΔ = (2/m) Σ_i ⟨A_i, ΔUᵀ + UΔᵀ⟩², so H is singular on
{Δ : ΔUᵀ + UΔᵀ = 0} (when the measurements are injective on the tangent space of the rank-r matrices, whose
dimension dr − r(r−1)/2 ≤ m). Its rank is dr − r(r−1)/2 for U ∈ R^{d×r} (null space: the r(r−1)/2
rotations U ↦ UR, Δ = UΩ with Ω skew) and also for U ∈ R^{d×d} of rank r (null space of dimension
d² − dr + r(r−1)/2). Small α ends near such a point: U_t keeps d − r tiny singular values and the Hessian
has that rank up to eigenvalues of their size. Larger α ends at a U of full rank, away from X* (with
m < d(d+1)/2 measurements, other matrices fit them too), whose Hessian has many more non-negligible eigenvalues.

    python examples/gradient_norms_and_matrix_sensing.py --data-dir data   # MNIST (hessops download mnist), d = 100
    python examples/gradient_norms_and_matrix_sensing.py --quick            # offline (its time: docs/examples.md)

The full mode's d×d Hessians have n = 10⁴ (10⁴ products each, then a dense eigendecomposition): seconds on
a GPU, long on a CPU. --quick substitutes for (a) scikit-learn's bundled 8×8 digits, standardized and
upsampled to 28×28 (1,437 training and 360 test images), for 20 epochs with batches of 32 (900 steps: the
loss leaves its plateau at chance, ln 10, after about 5 epochs and ends near 0.17; after 6 it was still at
1.4, halfway down); and for (b) d = 20, r = 3 (m = 600) and 600 steps instead of d = 100, r = 5 (m = 5,000)
and 1,500 steps. Its numbers are not the study's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

import hessops  # noqa: E402
from hessops.zoo.data import load_dataset, make_loader, on_device  # noqa: E402
from hessops.zoo.models import build_model, make_loss  # noqa: E402

MODEL = "mlp-mnist"
LR = 0.01
DIGITS_MEAN, DIGITS_STD = (0.3049,), (0.3758,)  # the digits' pixel mean and std: standardized as MNIST's are

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
EXACT_ALPHA = 1e-2  # U₀ = EXACT_ALPHA · W[:, :r] for the exactly parameterized U ∈ R^{d×r}
SENSING_LR = 0.02  # below 2/λ_max(∇²F(U₀)) for every U₀ here (λ_max ≈ 62 at α = 1, d = 100)
TOP_SINGULAR = 10
RANK_RTOL = 1e-4  # numerical rank: eigenvalues with |λ| > RANK_RTOL · max |λ|


# -- (a) per-layer gradient norms ----------------------------------------------------------------------------
def digits_28(train: bool) -> TensorDataset:
    """The embedded digits, standardized, upsampled bilinearly to MNIST's 1×28×28."""
    digits = load_dataset("digits", train=train, mean=DIGITS_MEAN, std=DIGITS_STD)
    x = F.interpolate(torch.stack([digits[i][0] for i in range(len(digits))]), size=(28, 28), mode="bilinear")
    return TensorDataset(x, digits.labels)


def mnist_data(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """(train, test): MNIST's 60,000 / 10,000, or (--quick) the upsampled digits' 1,437 / 360."""
    if args.quick:
        return digits_28(True), digits_28(False)
    return tuple(load_dataset("mnist", data_dir=args.data_dir, train=split) for split in (True, False))


def gradient_norms(args: argparse.Namespace) -> dict:
    """SGD on ``mlp-mnist``, each layer's gradient norm tracked per step (mean per epoch), the train and test
    loss evaluated after every epoch (and before the first)."""
    train_set, test_set = mnist_data(args)
    model, loss_fn = build_model(MODEL, seed=args.seed).to(args.device), make_loss(MODEL)
    shuffled = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )  # reshuffled every epoch
    batches = on_device(shuffled, args.device)
    fixed = {
        name: on_device(make_loader(d, batch_size=1000), args.device)
        for name, d in (("train", train_set), ("test", test_set))
    }
    tracker = hessops.GradNormTracker(model)
    began = time.perf_counter()

    def losses(epoch: int, _record: dict | None = None) -> None:
        curves.append({"epoch": epoch, **{name: hessops.evaluate(model, loss_fn, d) for name, d in fixed.items()}})

    curves: list[dict] = []
    losses(0)
    hessops.train(
        model, loss_fn, batches, epochs=args.epochs, lr=LR, grad_norms=tracker, progress=False, on_epoch_end=losses
    )
    return {
        "model": MODEL,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": len(train_set),
        "n_test": len(test_set),
        "lr": LR,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "curves": curves,
        "grad_norms": tracker.history,
        "seconds": time.perf_counter() - began,
    }


def plot_gradient_norms(result: dict, path: Path, data: str) -> None:
    """Per-layer gradient norms per epoch (left) beside the train and test loss (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in result["grad_norms"]]
    for name in result["grad_norms"][0]["norms"]:
        left.plot(epochs, [h["norms"][name] for h in result["grad_norms"]], "o-", ms=3, label=name)
    left.set(
        xlabel="epoch",
        ylabel=r"$\|\partial L_B / \partial W\|_F$, mean over the epoch's steps",
        yscale="log",
        title="Per-layer gradient norms",
    )
    left.legend(title="weight", fontsize=8)
    for split in ("train", "test"):
        right.plot(
            [c["epoch"] for c in result["curves"]],
            [c[split]["loss"] for c in result["curves"]],
            "o-",
            ms=3,
            label=split,
        )
    right.set(xlabel="epoch", ylabel="cross-entropy (after the epoch)", yscale="log", title="Loss")
    right.legend()
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{MODEL} (bias-free 784-128-128-128-10) on {data}, N = {result['n_train']:,}, SGD lr {LR:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- (b) matrix sensing ------------------------------------------------------------------------------------
@dataclass
class Sensing:
    """Measurements ``A`` (m, d, d) and ``y`` (m,) of ``x_star`` (d, d) = U*U*ᵀ of rank ``r``; ``W`` (d, d) the
    initialization's direction."""

    A: Tensor
    y: Tensor
    x_star: Tensor
    W: Tensor
    r: int

    @property
    def d(self) -> int:
        return self.x_star.shape[0]


def sensing_problem(d: int, r: int, *, seed: int, device: torch.device | str = "cpu") -> Sensing:
    """m = 10·d·r Gaussian measurements of a random rank-r X* = U*U*ᵀ, in float64."""
    generator = torch.Generator().manual_seed(seed)
    u_star = torch.randn(d, r, generator=generator, dtype=torch.float64) / d**0.5
    A = torch.randn(10 * d * r, d, d, generator=generator, dtype=torch.float64)
    W = torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5
    x_star = u_star @ u_star.T
    y = A.flatten(1) @ x_star.flatten()
    return Sensing(A.to(device), y.to(device), x_star.to(device), W.to(device), r)


class Factorized(nn.Module):
    """Holds U ∈ R^{d×k}; maps a batch of measurement matrices A (b, d, d) to ⟨A_i, UUᵀ⟩ (b,)."""

    def __init__(self, U: Tensor) -> None:
        super().__init__()
        self.U = nn.Parameter(U.clone())

    def forward(self, A: Tensor) -> Tensor:
        return A.flatten(1) @ (self.U @ self.U.T).flatten()


def predicted_rank(d: int, r: int) -> int:
    """Rank of ∇²F at a U of rank r with UUᵀ = X*: the dimension of the rank-r tangent space."""
    return d * r - r * (r - 1) // 2


def descend(problem: Sensing, U0: Tensor, *, steps: int, record_every: int) -> tuple[Factorized, dict]:
    """Gradient descent on F from ``U0``; every ``record_every`` steps (and at the end) ‖UUᵀ − X*‖_F, F(U)
    and the top singular values of U."""
    model, loss_fn = Factorized(U0), nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=SENSING_LR)
    record: dict[str, list] = {"t": [], "error": [], "loss": [], "singular_values": []}
    for t in range(steps + 1):
        optimizer.zero_grad()
        loss = loss_fn(model(problem.A), problem.y)
        if t % record_every == 0 or t == steps:
            with torch.no_grad():
                U = model.U.detach()
                record["t"].append(t)
                record["error"].append(float(torch.linalg.matrix_norm(U @ U.T - problem.x_star)))
                record["loss"].append(float(loss.detach()))
                record["singular_values"].append(torch.linalg.svdvals(U)[:TOP_SINGULAR].tolist())
        if t < steps:
            loss.backward()
            optimizer.step()
    return model.eval(), record


def hessian_spectrum(model: Factorized, problem: Sensing) -> dict:
    """All eigenvalues of ∇²F(U) from the dense matrix of ``hessops.Hessian`` (n products), its numerical
    rank at ``RANK_RTOL`` and the rank a rank-r global minimum would have."""
    began = time.perf_counter()
    H = hessops.Hessian(model, nn.MSELoss(), [(problem.A, problem.y)], chunk_size=64)
    values = torch.linalg.eigvalsh(H.to_dense()).cpu()
    n = H.shape[0]
    rank = int((values.abs() > RANK_RTOL * values.abs().max()).sum())
    return {
        "n": n,
        "eigenvalues": values.tolist(),
        "rank": rank,
        "null_dim": n - rank,
        "predicted_rank": predicted_rank(problem.d, problem.r),
        "predicted_null_dim": n - predicted_rank(problem.d, problem.r),
        "rank_rtol": RANK_RTOL,
        "n_matvecs": n,
        "seconds": time.perf_counter() - began,
    }


def matrix_sensing(args: argparse.Namespace) -> dict:
    """The d×r run and the d×d runs for every α: their trajectories and final Hessian spectra."""
    problem = sensing_problem(args.d, args.r, seed=args.seed, device=args.device)
    starts = [("d x r", EXACT_ALPHA, EXACT_ALPHA * problem.W[:, : args.r])]
    starts += [("d x d", alpha, alpha * problem.W) for alpha in ALPHAS]
    runs = []
    for shape, alpha, U0 in starts:
        began = time.perf_counter()
        model, record = descend(problem, U0, steps=args.steps, record_every=args.record_every)
        runs.append(
            {
                "shape": shape,
                "alpha": alpha,
                **record,
                "seconds": time.perf_counter() - began,
                "hessian": hessian_spectrum(model, problem),
            }
        )
    eigenvalues = torch.linalg.eigvalsh(problem.x_star)[-args.r :].flip(0)
    return {
        "d": args.d,
        "r": args.r,
        "m": problem.A.shape[0],
        "lr": SENSING_LR,
        "steps": args.steps,
        "record_every": args.record_every,
        "x_star_norm": float(torch.linalg.matrix_norm(problem.x_star)),
        "x_star_eigenvalues": eigenvalues.tolist(),
        "runs": runs,
    }


def label(run: dict) -> str:
    """``U ∈ R^(d×d), α = 0.01``, say."""
    return f"U ∈ R^({run['shape'].replace(' x ', '×')}), α = {run['alpha']:g}"


def plot_sensing(result: dict, out: Path) -> list[Path]:
    """Recovery error over t; top singular values over t, a panel per run; the final Hessian spectra."""
    colors = dict(zip(ALPHAS, plt.cm.viridis(np.linspace(0, 0.9, len(ALPHAS)))))

    def style(run: dict) -> dict:
        exact = run["shape"] == "d x r"
        return {"ls": "--" if exact else "-", "color": "k" if exact else colors[run["alpha"]], "label": label(run)}

    paths = [out / "sensing_error.png", out / "sensing_singular_values.png", out / "sensing_hessian.png"]
    what = f"d = {result['d']}, r = {result['r']}, m = {result['m']}"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in result["runs"]:
        ax.semilogy(run["t"], run["error"], **style(run))
    ax.set(xlabel="gradient step t", ylabel=r"$\|U_t U_t^\top - X^*\|_F$", title=f"Recovery error, {what}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True, sharey=True)
    for ax, run in zip(axes.flat, result["runs"]):
        ax.semilogy(run["t"], run["singular_values"])
        for value in result["x_star_eigenvalues"]:
            ax.axhline(value**0.5, color="k", lw=0.6, ls=":")
        ax.set_title(label(run), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("gradient step t")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"top-{TOP_SINGULAR} singular values of $U_t$")
    fig.suptitle(
        rf"Singular values of $U_t$ ({what}; dotted: $\sqrt{{\lambda_i(X^*)}}$, the values of a factor of $X^*$)"
    )
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in result["runs"]:
        values = np.sort(np.abs(run["hessian"]["eigenvalues"]))[::-1]
        ax.semilogy(
            np.arange(1, len(values) + 1),
            np.maximum(values, 1e-20),
            **{**style(run), "label": f"{label(run)}: rank {run['hessian']['rank']}"},
        )
    rank = result["runs"][0]["hessian"]["predicted_rank"]
    ax.axvline(rank, color="tab:red", lw=0.8, ls=":", label=f"dr − r(r−1)/2 = {rank}")
    ax.set_xscale("log")
    ax.set(
        xlabel="index (by decreasing |λ|)",
        ylabel=r"$|\lambda|$ of $\nabla^2 F(U)$ at the end",
        title=f"Hessian spectrum at the end, {what}",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="offline: digits for MNIST, d = 20 for matrix sensing")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("results/gradient_norms_and_matrix_sensing"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="initialization, batch order and the sensing problem")
    args = parser.parse_args()
    # (a) epochs, batch size; (b) d, r, gradient steps, recording interval
    quick, full = (20, 32, 20, 3, 600, 10), (40, 128, 100, 5, 1500, 10)
    args.epochs, args.batch_size, args.d, args.r, args.steps, args.record_every = quick if args.quick else full
    args.device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    norms = gradient_norms(args)
    data = "digits upsampled to 28×28 (quick)" if args.quick else "MNIST"
    plot_gradient_norms(norms, args.out / "grad_norms_and_loss.png", data)
    last = norms["curves"][-1]
    print(
        f"(a) {MODEL} on {data}, {args.epochs} epochs: train loss {last['train']['loss']:.4f}, "
        f"test loss {last['test']['loss']:.4f}, test accuracy {last['test']['accuracy']:.3f}"
    )
    for name, value in norms["grad_norms"][-1]["norms"].items():
        print(f"    last epoch's mean ‖∂L/∂{name}‖_F = {value:.4g}")

    sensing = matrix_sensing(args)
    figures = plot_sensing(sensing, args.out)
    print(
        f"(b) matrix sensing d = {args.d}, r = {args.r}, m = {sensing['m']}, {args.steps} steps; "
        f"rank of ∇²F at a rank-r minimum: dr − r(r−1)/2 = {predicted_rank(args.d, args.r)}"
    )
    for run in sensing["runs"]:
        s, h = run["singular_values"][-1], run["hessian"]
        gap = f", σ_{args.r + 1}/σ_{args.r} = {s[args.r] / s[args.r - 1]:.1e}" if len(s) > args.r else ""
        print(
            f"    {label(run)}: ‖UUᵀ − X*‖_F = {run['error'][-1]:.2e}{gap}; "
            f"Hessian n = {h['n']}, rank {h['rank']} (null space {h['null_dim']})"
        )

    summary = {
        "mode": "quick" if args.quick else "full",
        "device": str(args.device),
        "seed": args.seed,
        "grad_norms": norms,
        "matrix_sensing": sensing,
        "seconds": time.perf_counter() - began,
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"wrote {args.out / 'result.json'}, {args.out / 'grad_norms_and_loss.png'} and "
        f"{', '.join(p.name for p in figures)}"
    )


if __name__ == "__main__":
    main()
