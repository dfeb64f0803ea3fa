"""The Hessian spectrum of a vision transformer on CIFAR-10: its top eigenvalues by Lanczos and its spectral
density by stochastic Lanczos quadrature (SLQ: Ghorbani et al. 2019), after a short training run.

1. A timm ViT for 32×32 inputs (the zoo's ``vit-tiny-cifar``: ViT-Tiny, 4×4 patches, 5,362,762 parameters)
   is trained with AdamW (lr 1e-3, weight decay 0.05, batches of 128) on CIFAR-10 training images.
2. At the trained parameters (model in eval mode) on ``--examples`` fixed training images:
   L(θ) = (1/N) Σ_n ℓ(f(x_n; θ), y_n) with ℓ the cross-entropy; the top ``--k`` eigenvalues of ∇²L by
   ``hessops.eigs`` (Lanczos, which="LA", residuals verified) and the density of all its eigenvalues by
   ``hessops.spectral_density``. timm's attention runs in a fused kernel without second derivatives; hessops
   runs the products in torch's math kernel (said once, as an AttentionKernelWarning).

    python examples/vit_cifar_spectrum.py --data-dir data      # CIFAR-10 (hessops download cifar10 first)
    python examples/vit_cifar_spectrum.py --quick               # offline (its time: docs/examples.md)

--quick substitutes 500 of scikit-learn's bundled 8×8 digits, standardized, upsampled to 32×32 and repeated
over three channels, for CIFAR-10, and the zoo's ``vit-micro-cifar`` (2 blocks of width 32, 2 heads, 8×8
patches, 32,554 parameters) for ViT-Tiny, trained for 30 epochs of batches of 50; the spectrum is that of 200
training images (k=4, SLQ with 3 probes of 30 steps). Its numbers are not CIFAR-10's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset  # noqa: E402

import hessops  # noqa: E402
from hessops.analysis.tracking import evaluate  # noqa: E402
from hessops.plot import plot_density, plot_eigenvalues  # noqa: E402
from hessops.zoo.data import load_dataset  # noqa: E402
from hessops.zoo.models import build_model  # noqa: E402

DIGITS_MEAN, DIGITS_STD = (0.3049,), (0.3758,)  # the digits' pixel mean and std: standardized as CIFAR's are
SIZES = {  # mode -> model, training examples, epochs, batch size, curvature examples, k, probes, Lanczos steps
    "full": ("vit-tiny-cifar", 50_000, 10, 128, 1_000, 10, 10, 80),
    "quick": ("vit-micro-cifar", 500, 30, 50, 200, 4, 3, 30),
}


def training_set(args: argparse.Namespace) -> Dataset:
    """CIFAR-10's normalized training images, or (--quick) the embedded digits, standardized, upsampled to
    32×32 and repeated over 3 channels."""
    if not args.quick:
        return load_dataset("cifar10", data_dir=args.data_dir, num_examples=args.train_examples, seed=args.seed)
    digits = load_dataset("digits", num_examples=args.train_examples, seed=args.seed, mean=DIGITS_MEAN, std=DIGITS_STD)
    x = torch.stack([digits[i][0] for i in range(len(digits))])
    y = torch.stack([digits[i][1] for i in range(len(digits))])
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x, y)


def train(model: nn.Module, data: Dataset, args: argparse.Namespace) -> list[dict]:
    """AdamW over shuffled batches (a generator seeded by --seed); the per-epoch mean loss and accuracy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loader = DataLoader(
        data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum, correct, total = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(args.device), y.to(args.device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        history.append({"epoch": epoch, "loss": loss_sum / total, "accuracy": correct / total})
    return history


def spectrum(model: nn.Module, data: Dataset, args: argparse.Namespace) -> dict:
    """Top-k eigenvalues and the SLQ density of the Hessian of the mean loss over the first --examples."""
    subset = Subset(data, range(args.examples))
    loader = hessops.on_device(DataLoader(subset, batch_size=100), args.device)
    op = hessops.Hessian(model.eval(), nn.CrossEntropyLoss(), loader)
    top = hessops.eigs(op, k=args.k, which="LA", tol=1e-3, seed=args.seed)
    density = hessops.spectral_density(op, num_probes=args.probes, lanczos_steps=args.lanczos_steps, seed=args.seed)
    return {
        "examples": args.examples,
        "train": evaluate(model, nn.CrossEntropyLoss(), loader),
        "top": {
            "values": top.values.tolist(),
            "residuals": top.residuals.tolist(),
            "converged": top.converged,
            "verified": top.verified,
            "n_matvecs": top.n_matvecs,
            "seconds": top.seconds,
        },
        "density": density.to_dict() | {"n_matvecs": density.n_matvecs, "seconds": density.seconds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="offline: upsampled digits, a 32k-parameter ViT")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where `hessops download` put CIFAR-10")
    parser.add_argument("--out", type=Path, default=Path("results/vit_cifar_spectrum"), help="result.json, figures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    (args.model, args.train_examples, args.epochs, args.batch_size, args.examples, args.k, args.probes,
     args.lanczos_steps) = SIZES[mode]  # fmt: skip
    began = time.perf_counter()
    data = training_set(args)
    model = build_model(args.model, seed=args.seed).to(args.device)
    history = train(model, data, args)
    result = {
        "mode": mode,
        "model": args.model,
        "n_params": sum(p.numel() for p in model.parameters()),
        "data": "digits upsampled to 3x32x32" if args.quick else "cifar10",
        "train_examples": len(data),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "history": history,
        "chance_loss": math.log(10),
        **spectrum(model, data, args),
    }
    result["seconds"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    top = result["top"]["values"]
    plot_eigenvalues(top, args.out / "top_eigenvalues.png", title=f"{args.model}: top {len(top)} Hessian eigenvalues")
    density = result["density"]
    plot_density(
        density["grid"], density["density"], args.out / "density.png", top=top, title=f"{args.model}: Hessian density"
    )
    print(
        f"{args.model} ({result['n_params']:,} parameters), training loss {result['train']['loss']:.3f} "
        f"(chance {math.log(10):.2f}); top eigenvalues {', '.join(f'{v:.4g}' for v in top)}; "
        f"{result['seconds']:.0f} s; figures and result.json in {args.out}"
    )


if __name__ == "__main__":
    main()
