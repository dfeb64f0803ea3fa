"""The CIFAR-10 CNN spectrum study with hessops: exact and Lanczos extreme eigenvalues of one batch's Hessian,
the top eigenvalue of the whole training set's Hessian by Lanczos and by stochastic power iteration, and the
sharpness of a torchvision ResNet-50 over training.

1. The 5,100-parameter CNN (the zoo's ``cnn-cifar-5k``) is trained on CIFAR-10 with torch.optim.SGD (lr 0.01,
   momentum 0.9), batches of 100, random crop (4-pixel padding, black) and horizontal flip, 2 epochs.
2. On one batch of 100 training images (un-augmented, model in eval mode): the exact Hessian of the batch's
   mean loss (``hessops.dense_hessian``, float64) and its 5 smallest and 5 largest eigenvalues
   (``torch.linalg.eigvalsh``), against the same ten from ``hessops.eigs(which="both")`` with Lanczos.
3. Over the whole training set, L(θ) = (1/N) Σ_n ℓ(f(x_n; θ), y_n): the top eigenvalue by ``hessops.eigs``
   (Lanczos, which="LA") and by the notebook's stochastic power iteration, v ← H_b v / ‖H_b v‖ with H_b the
   Hessian of batch b's mean loss and b cycling over the batches, whose estimate is the mean of vᵀH_b v over
   its last pass. vᵀHv ≤ λ_max for any unit v, so the Rayleigh quotient of its final vector over the whole
   set (one more product) is a lower bound that Lanczos must meet.
4. A torchvision ResNet-50 (``weights=None``, 1,000 outputs as torchvision builds it, CIFAR-10's labels
   0-9) trained the same way for 100 epochs; ``hessops.SharpnessTracker`` measures its top Hessian eigenvalue
   on 1,000 fixed, un-augmented training images (model in eval mode) before training and every 10 epochs.
   The study measured about 59,950 → 99.8 → 5.35 at epochs 0, 10 and 100; which images it measured on is
   not recorded.

    python examples/cifar_cnn_spectrum.py --data-dir data      # CIFAR-10 (hessops download cifar10 first), GPU if any
    python examples/cifar_cnn_spectrum.py --quick               # offline (its time: docs/examples.md)

--quick substitutes 500 of scikit-learn's bundled 8×8 digits, standardized, upsampled to 32×32 and repeated
over three channels, for CIFAR-10: the same CNN, optimizer, batches of 100 and augmentation, but 20 epochs
(100 steps; 2 epochs of 5 batches leave it at its initial loss, where the spectrum is nearly symmetric and
power iteration does not converge). The dense reference is for one batch of 50 and the Hessian block of the
first convolution and the output layer (``params=``, 690 of the 5,100 parameters: the dense Hessian of all
5,100 takes minutes on a CPU), in float32; the power iteration makes 10 passes over the 5 batches. The
ResNet-50 gives way to torchvision's ResNet-18 (``weights=None``, 11,689,512 parameters; on this CPU one
Hessian-vector product of the ResNet-50 on four 32×32 images takes about 20 s), trained on 16 images for 2
epochs, its sharpness measured on 4 of them before and after (Lanczos tolerance 1e-2 instead of 1e-3).
--quick fixes the Hessian-vector product formulation to double backward, the reference (``hvp_mode="autograd"``):
what ``"auto"`` runs on a short run, but never tuned, however slowly a busy machine runs the products, and,
unlike another fixed formulation, not checked against the reference on the first product of each operator
(the power iteration builds one per batch product). Its numbers are not the study's.
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
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import hessops  # noqa: E402
from hessops.analysis.tracking import train  # noqa: E402
from hessops.plot import plot_sharpness  # noqa: E402
from hessops.zoo.data import NORMALIZATION, DeviceLoader, load_dataset, make_loader, on_device  # noqa: E402
from hessops.zoo.models import build_model  # noqa: E402

CNN = "cnn-cifar-5k"
LR, MOMENTUM = 0.01, 0.9
BATCH_TOL = 1e-6  # eigs on the one batch: residual ≤ BATCH_TOL · max|θ|
TOP_TOL = 1e-4  # eigs over the whole training set
STUDY_SHARPNESS = {0: 59950.0, 10: 99.8, 100: 5.35}  # ResNet-50: epoch -> top Hessian eigenvalue
DIGITS_MEAN, DIGITS_STD = (0.3049,), (0.3758,)  # the digits' pixel mean and std: standardized as CIFAR's are


class Augmented(Dataset):
    """``dataset`` seen through a random 32×32 crop of the image padded by 4 pixels of ``fill`` (the normalized
    value of a black pixel, per channel) and a random horizontal flip, drawn anew at every access."""

    def __init__(self, dataset: Dataset, fill: list[float]) -> None:
        self.dataset = dataset
        self.transform = v2.Compose([v2.RandomCrop(32, padding=4, fill=fill), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[index]
        return self.transform(x), y


def training_set(args: argparse.Namespace) -> tuple[Dataset, list[float]]:
    """The un-augmented, normalized training images and the per-channel value of a black pixel in them:
    CIFAR-10, or (--quick) the embedded digits, standardized, upsampled to 32×32 and repeated over 3 channels."""
    if not args.quick:
        mean, std = NORMALIZATION["cifar10"]
        data = load_dataset("cifar10", data_dir=args.data_dir, num_examples=args.train_examples, seed=args.seed)
        return data, [-m / s for m, s in zip(mean, std)]
    digits = load_dataset("digits", num_examples=args.train_examples, seed=args.seed, mean=DIGITS_MEAN, std=DIGITS_STD)
    x = torch.stack([digits[i][0] for i in range(len(digits))])
    y = torch.stack([digits[i][1] for i in range(len(digits))])
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x, y), [-DIGITS_MEAN[0] / DIGITS_STD[0]] * 3


def training_loader(data: Dataset, fill: list[float], args: argparse.Namespace) -> DeviceLoader:
    """Augmented, shuffled batches (a seeded order) on ``args.device``: for training only."""
    workers = 4 if args.device.type == "cuda" else 0
    loader = DataLoader(
        Augmented(data, fill),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(args.seed),
        pin_memory=args.device.type == "cuda",
    )
    return on_device(loader, args.device)


def one_batch(model: nn.Module, batch: tuple[Tensor, Tensor], args: argparse.Namespace) -> dict:
    """The 5 smallest and 5 largest eigenvalues of one batch's Hessian: dense (eigvalsh of dense_hessian) and by
    Lanczos (eigs, which="both"), with each Lanczos value's tolerance ‖Hv − θv‖ + n·ε·max|λ| (some eigenvalue
    lies within the residual of θ; n·ε·max|λ| bounds the rounding of the dense reference)."""
    loss_fn, dtype = nn.CrossEntropyLoss(), args.batch_dtype
    first_and_last = [*model[0].parameters(), *model[9].parameters()]  # conv1 and fc2 of the Sequential
    params = list(model.parameters()) if args.batch_params == "all" else first_and_last
    began = time.perf_counter()
    exact = torch.linalg.eigvalsh(hessops.dense_hessian(model, loss_fn, [batch], params=params, dtype=dtype)).cpu()
    dense_seconds = time.perf_counter() - began
    H = hessops.Hessian(model, loss_fn, [batch], params=params, dtype=dtype, hvp_mode=args.hvp_mode)
    spectrum = hessops.eigs(H, k=10, which="both", tol=BATCH_TOL, seed=args.seed)
    values, residuals = spectrum.values.cpu(), spectrum.residuals
    lanczos = {"smallest": values[5:].flip(0), "largest": values[:5]}  # "both" gives them all decreasing
    dense = {"smallest": exact[:5], "largest": exact[-5:].flip(0)}
    rounding = exact.numel() * torch.finfo(dtype).eps * float(exact.abs().max())
    tolerance = {"smallest": residuals[5:].flip(0) + rounding, "largest": residuals[:5] + rounding}
    difference = {end: (lanczos[end] - dense[end]).abs() for end in dense}
    return {
        "examples": len(batch[1]),
        "params": args.batch_params,
        "n": H.shape[0],
        "dtype": str(dtype).split(".")[-1],
        "dense": {**{end: v.tolist() for end, v in dense.items()}, "seconds": dense_seconds},
        "lanczos": {
            **{end: v.tolist() for end, v in lanczos.items()},
            "residuals": {"smallest": residuals[5:].flip(0).tolist(), "largest": residuals[:5].tolist()},
            "tol": BATCH_TOL,
            "converged": spectrum.converged,
            "steps": spectrum.steps,
            "n_matvecs": spectrum.n_matvecs,
            "seconds": spectrum.seconds,
        },
        "tolerance": {end: t.tolist() for end, t in tolerance.items()},
        "max_abs_difference": float(torch.cat(list(difference.values())).max()),
        "within_tolerance": all(bool((difference[end] <= tolerance[end]).all()) for end in dense),
    }


def power_iteration(
    model: nn.Module, loss_fn: nn.Module, batches: list[tuple[Tensor, Tensor]], *, passes: int, seed: int, hvp_mode: str
) -> tuple[float, Tensor, list[float]]:
    """The notebook's stochastic power iteration: v ← H_b v / ‖H_b v‖ over ``batches`` b, for ``passes``
    passes. Returns (the mean of vᵀH_b v over the last pass, the final unit v, every vᵀH_b v)."""
    parameter = next(model.parameters())
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=parameter.dtype).to(parameter.device)
    v /= torch.linalg.vector_norm(v)
    quotients = []
    for _ in range(passes):
        for batch in batches:
            product = hessops.Hessian(model, loss_fn, [batch], hvp_mode=hvp_mode) @ v
            quotients.append(v @ product)
            v = product / torch.linalg.vector_norm(product)
    quotients = torch.stack(quotients).tolist()
    last_pass = quotients[-(len(quotients) // passes) :]
    return sum(last_pass) / len(last_pass), v, quotients


def top_eigenvalue(model: nn.Module, data: Dataset, args: argparse.Namespace) -> dict:
    """λ_max of the Hessian of the mean loss over ``data`` by Lanczos and by stochastic power iteration."""
    loss_fn = nn.CrossEntropyLoss()
    batches = list(on_device(make_loader(data, batch_size=args.batch_size), args.device))  # moved once
    H = hessops.Hessian(model, loss_fn, batches, hvp_mode=args.hvp_mode)
    spectrum = hessops.eigs(H, k=1, which="LA", tol=TOP_TOL, seed=args.seed)
    began = time.perf_counter()
    estimate, v, quotients = power_iteration(
        model, loss_fn, batches, passes=args.power_passes, seed=args.seed + 1, hvp_mode=args.hvp_mode
    )
    power_seconds = time.perf_counter() - began
    rayleigh = float(v @ (H @ v))
    top = float(spectrum.values[0])
    return {
        "examples": len(data),
        "batches": len(batches),
        "n": H.shape[0],
        "lanczos": {
            "value": top,
            "residual": float(spectrum.residuals[0]),
            "tol": TOP_TOL,
            "converged": spectrum.converged,
            "steps": spectrum.steps,
            "n_matvecs": spectrum.n_matvecs,
            "batch_hvps": spectrum.n_matvecs * len(batches),
            "seconds": spectrum.seconds,
        },
        "power_iteration": {
            "estimate": estimate,
            "passes": args.power_passes,
            "batch_hvps": len(quotients),
            "quotients": quotients,
            "rayleigh_quotient": rayleigh,
            "seconds": power_seconds,
        },
        "relative_difference": (estimate - top) / abs(top),
    }


def resnet_sharpness(data: Dataset, fill: list[float], args: argparse.Namespace) -> dict:
    """Train the ResNet with the CNN's recipe, its top Hessian eigenvalue measured on fixed un-augmented images
    before training and every ``args.sharpness_every`` epochs."""
    torch.manual_seed(args.seed)  # the augmentation's random stream, whatever ran before
    model, loss_fn = build_model(args.resnet, seed=args.seed).to(args.device), nn.CrossEntropyLoss()
    images = data if args.resnet_examples is None else Subset(data, range(args.resnet_examples))
    # A list of batches, not a DataLoader: every pass over a DataLoader draws a seed from torch's global RNG,
    # so measuring would shift the augmentation that follows it
    fixed = list(on_device(make_loader(Subset(data, range(args.sharpness_examples)), args.batch_size), args.device))
    tracker = hessops.SharpnessTracker(
        model, loss_fn, fixed, unit="epoch", tol=args.sharpness_tol, seed=args.seed, hvp_mode=args.hvp_mode
    )
    history = train(
        model,
        loss_fn,
        training_loader(images, fill, args),
        epochs=args.resnet_epochs,
        lr=LR,
        momentum=MOMENTUM,
        sharpness=tracker,
        every=args.sharpness_every,
        progress=not args.quick,
    )
    return {
        "model": args.resnet,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_examples": len(images),
        "sharpness_examples": args.sharpness_examples,
        "epochs": args.resnet_epochs,
        "tol": args.sharpness_tol,
        "train_loss": [h["loss"] for h in history],
        "history": [
            {
                "epoch": r.step,
                "value": r.values[0],
                "residual": r.residuals[0],
                "n_matvecs": r.n_matvecs,
                "seconds": r.seconds,
            }
            for r in tracker.history
        ],
    }


def plot_one_batch(result: dict, path: Path) -> None:
    """The 5 smallest and 5 largest eigenvalues of the one batch's Hessian, dense against Lanczos."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, end in zip(axes, ("smallest", "largest")):
        index = range(1, 6)
        ax.plot(index, result["dense"][end], "o", ms=9, mfc="none", label="dense (eigvalsh)")
        ax.plot(index, result["lanczos"][end], "x", ms=8, color="tab:red", label="hessops.eigs (Lanczos)")
        ax.set(xlabel=f"i ({end} first)", ylabel="eigenvalue λ", title=f"the 5 {end}", xticks=list(index))
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"{CNN}, one batch of {result['examples']}: Hessian ({result['n']:,} parameters, "
        f"{result['dtype']}), max |Δλ| = {result['max_abs_difference']:.1e}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_top(result: dict, path: Path) -> None:
    """The power iteration's Rayleigh quotients per batch HVP against Lanczos' λ_max over the whole set."""
    power, lanczos = result["power_iteration"], result["lanczos"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        range(1, len(power["quotients"]) + 1),
        power["quotients"],
        ".-",
        ms=3,
        lw=0.8,
        label=r"stochastic power iteration: $v^\top H_b v$",
    )
    ax.axhline(power["estimate"], color="tab:blue", ls=":", label=f"its estimate (last pass) {power['estimate']:.4g}")
    ax.axhline(
        lanczos["value"],
        color="tab:red",
        ls="--",
        label=rf"Lanczos $\lambda_{{\max}}$ {lanczos['value']:.4g} ({lanczos['batch_hvps']:,} batch HVPs)",
    )
    ax.set(
        xlabel="batch Hessian-vector products",
        ylabel="top eigenvalue estimate",
        title=f"{CNN}: top Hessian eigenvalue over {result['examples']:,} training examples",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_resnet(result: dict, path: Path, quick: bool) -> None:
    """The ResNet's sharpness per epoch (hessops.plot.plot_sharpness), with the study's values in full mode."""
    name = {"resnet50": "ResNet-50", "resnet18": "ResNet-18"}[result["model"]]
    history = result["history"]
    fig = plot_sharpness(
        [h["epoch"] for h in history],
        [[h["value"]] for h in history],
        unit="epoch",
        title=f"Sharpness of torchvision {name} ({result['sharpness_examples']:,} images)",
    )
    if not quick:
        ax = fig.axes[0]
        ax.plot(list(STUDY_SHARPNESS), list(STUDY_SHARPNESS.values()), "k*", ms=10, label="study")
        if all(h["value"] > 0 for h in history):  # with the study's four decades, log scale
            ax.set_yscale("log")
        ax.legend()  # the figure's constrained layout (hessops.plot) makes room for it
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict) -> None:
    batch, top, resnet = result["one_batch"], result["top_eigenvalue"], result["resnet"]
    print(
        f"CNN ({result['cnn']['n_params']:,} parameters): train loss by epoch (augmented) "
        + ", ".join(f"{h['loss']:.4f}" for h in result["cnn"]["history"])
        + f"; at the end, un-augmented: loss {result['cnn']['train']['loss']:.4f}, accuracy "
        f"{result['cnn']['train']['accuracy']:.3f} (chance: ln 10 = 2.3026)"
    )
    print(
        f"one batch of {batch['examples']}, Hessian over {batch['n']:,} parameters ({batch['params']}), "
        f"{batch['dtype']}:"
    )
    for end in ("smallest", "largest"):
        print(f"  {end:8s} dense   " + " ".join(f"{v:11.6g}" for v in batch["dense"][end]))
        print(f"  {'':8s} Lanczos " + " ".join(f"{v:11.6g}" for v in batch["lanczos"][end]))
    print(
        f"  max |dense − Lanczos| = {batch['max_abs_difference']:.2e} (within tolerance: "
        f"{batch['within_tolerance']}); dense {batch['dense']['seconds']:.1f} s, Lanczos "
        f"{batch['lanczos']['n_matvecs']} HVPs in {batch['lanczos']['seconds']:.1f} s"
    )
    lanczos, power = top["lanczos"], top["power_iteration"]
    print(f"top eigenvalue over {top['examples']:,} training examples ({top['batches']} batches):")
    print(
        f"  Lanczos          {lanczos['value']:.6g} (residual {lanczos['residual']:.1e}), {lanczos['n_matvecs']} "
        f"products = {lanczos['batch_hvps']} batch HVPs, {lanczos['seconds']:.1f} s"
    )
    print(
        f"  power iteration  {power['estimate']:.6g} ({power['batch_hvps']} batch HVPs, {power['seconds']:.1f} s; "
        f"{top['relative_difference']:+.2%} from Lanczos); Rayleigh quotient of its vector "
        f"{power['rayleigh_quotient']:.6g} ≤ λ_max"
    )
    print(
        f"sharpness of {resnet['model']} ({resnet['n_params']:,} parameters) on {resnet['sharpness_examples']} images:"
    )
    for h in resnet["history"]:
        study = STUDY_SHARPNESS.get(h["epoch"]) if result["mode"] == "full" else None
        print(f"  epoch {h['epoch']:3d}: {h['value']:.5g}" + (f"   (study: {study:g})" if study else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="offline: upsampled digits, a ResNet-18, small sizes")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("results/cifar_cnn_spectrum"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="initialization, batch order, augmentation, start vectors")
    args = parser.parse_args()
    # CNN training examples (None: all), batch size, epochs; the one batch's examples, parameters and dtype;
    # power-iteration passes; the ResNet, its training examples (None: all), sharpness images, epochs,
    # epochs between sharpness measurements, their Lanczos tolerance (residual / |θ|); the HVP formulation
    quick = (500, 100, 20, 50, "conv1+fc2", torch.float32, 10, "resnet18", 16, 4, 2, 2, 1e-2, "autograd")
    full = (None, 100, 2, 100, "all", torch.float64, 2, "resnet50", None, 1000, 100, 10, 1e-3, "auto")
    (
        args.train_examples,
        args.batch_size,
        args.epochs,
        args.batch_examples,
        args.batch_params,
        args.batch_dtype,
        args.power_passes,
        args.resnet,
        args.resnet_examples,
        args.sharpness_examples,
        args.resnet_epochs,
        args.sharpness_every,
        args.sharpness_tol,
        args.hvp_mode,
    ) = quick if args.quick else full
    args.device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    try:
        data, fill = training_set(args)
    except hessops.DatasetNotFoundError as error:
        raise SystemExit(f"error: {error}") from error

    model = build_model(CNN, seed=args.seed).to(args.device)
    history = train(
        model,
        nn.CrossEntropyLoss(),
        training_loader(data, fill, args),
        epochs=args.epochs,
        lr=LR,
        momentum=MOMENTUM,
        progress=not args.quick,
    )
    batch = next(iter(on_device(make_loader(data, batch_size=args.batch_examples), args.device)))
    result = {
        "mode": "quick" if args.quick else "full",
        "device": str(args.device),
        "seed": args.seed,
        "data": "digits upsampled to 3x32x32" if args.quick else "cifar10",
        "cnn": {
            "model": CNN,
            "n_params": sum(p.numel() for p in model.parameters()),
            "train_examples": len(data),
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "lr": LR,
            "momentum": MOMENTUM,
            "augmentation": "random crop 32 of the 4-pixel padded image + horizontal flip, training only",
            "history": history,
            "train": hessops.evaluate(  # on the un-augmented images, in eval mode
                model, nn.CrossEntropyLoss(), on_device(make_loader(data, batch_size=args.batch_size), args.device)
            ),
        },
        "hvp_mode": args.hvp_mode,
        "one_batch": one_batch(model.eval(), batch, args),
        "top_eigenvalue": top_eigenvalue(model, data, args),
        "resnet": resnet_sharpness(data, fill, args),
        "study_sharpness": {str(k): v for k, v in STUDY_SHARPNESS.items()},
    }
    report(result)
    plot_one_batch(result["one_batch"], args.out / "one_batch_eigenvalues.png")
    plot_top(result["top_eigenvalue"], args.out / "top_eigenvalue.png")
    plot_resnet(result["resnet"], args.out / "resnet_sharpness.png", args.quick)
    result["seconds"] = time.perf_counter() - began
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'result.json'} and three figures in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
