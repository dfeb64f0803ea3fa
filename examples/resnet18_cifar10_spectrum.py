"""The CIFAR-10 ResNet-18 spectrum study with hessops: from a trained checkpoint, the test accuracy, the top-10
Hessian eigenvalues over the CIFAR-10 test set and the Hessian's spectral density, timed and counted.

The model is the zoo's ``resnet18_cifar10`` (torchvision's ResNet-18 with a 3×3 stride-1 stem and no
max-pool, 11,173,962 parameters), its weights read by ``hessops.zoo.models.load_checkpoint`` (strict, tensors
only). The Hessian is that of the mean cross-entropy over the 10,000 test images,
L(θ) = (1/N) Σ_n ℓ(f(x_n; θ), y_n), in eval mode (BatchNorm uses its running statistics). Its 10
eigenvalues of largest magnitude come from ``hessops.eigs`` (Lanczos, stopped when their residuals
‖Hv − θv‖ fall below 1e-3·max|θ|), its density from ``hessops.spectral_density`` (stochastic Lanczos
quadrature, 30 Lanczos steps from one Rademacher probe, Gaussian broadening), plotted on a log scale. The
study took about 15 minutes on a GPU for its 30 Lanczos steps; the example prints its own time and number of
Hessian-vector products (each one a pass over the test set).

    python examples/resnet18_cifar10_spectrum.py --pretrained --data-dir data       # published weights (online)
    python examples/resnet18_cifar10_spectrum.py --checkpoint model.pt --data-dir data
    python examples/resnet18_cifar10_spectrum.py --quick                    # offline (its time: docs/examples.md)

CIFAR-10 comes from ``hessops download cifar10``. ``--pretrained`` fetches the published ``resnet18_cifar10``
weights (https://huggingface.co/edadaltocg/resnet18_cifar10, a timm state_dict whose keys and shapes the zoo's
model has) with ``torch.hub.download_url_to_file`` into ``torch.hub.get_dir()/checkpoints`` once, then loads
them like any ``--checkpoint``. They were trained on inputs normalized with std (0.2023, 0.1994, 0.2010), not
the dataset's own, so the test set is normalized as ``model_spec("resnet18_cifar10")`` says.

--quick writes its own checkpoint and loads it through the same path: the architecture initialized from seed
1 (the evaluated model is built from seed 0, so only a loaded checkpoint makes them agree) after two SGD steps
in train mode on 8 seeded random CIFAR-shaped images, which also moves the BatchNorm statistics, saved as
``{"epoch": 0, "state_dict": ...}`` to ``OUT/checkpoint.pt``. Its test set is 8 other seeded random images in
one batch; it computes the top-2 eigenvalues and a density from 8 Lanczos steps, with the Hessian-vector
product fixed to double backward, the reference (``hvp_mode="autograd"``: what ``"auto"`` runs on a short run,
but never tuned, however slowly a busy machine runs the products, and not checked on its first product as
another fixed formulation is, which cost 2.2× the first product of the ResNet). Its numbers are not the study's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

import hessops
from hessops.plot import plot_density, plot_eigenvalues
from hessops.zoo.data import load_dataset, make_loader, on_device
from hessops.zoo.models import build_model, load_checkpoint, model_spec

MODEL = "resnet18_cifar10"
PUBLISHED = "https://huggingface.co/edadaltocg/resnet18_cifar10/resolve/main/pytorch_model.bin"
# eigs: verified residual ≤ TOL · max|θ|. A float32 ResNet-18 product is not accurate to 1e-3 of the norm: with
# the Lanczos estimates at 9e-4, the true residuals were 2.2e-3 (--quick, 2026-12-02), so 1e-2.
TOL = 1e-2
QUICK_IMAGES = 8  # --quick's checkpoint-training and test images, each
STUDY = {"lanczos_steps": 30, "seconds": 15 * 60, "device": "a GPU"}


def fetch_published() -> Path:
    """The published weights, downloaded once into torch.hub's checkpoint folder."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / "resnet18_cifar10_pytorch_model.bin"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(PUBLISHED, str(path))
        except OSError as error:
            raise SystemExit(
                f"error: could not fetch the published {MODEL} weights from {PUBLISHED} ({error}). Without a "
                "network, download that file on a machine that has one and pass it with --checkpoint FILE"
            ) from error
    return path


def random_images(n: int, seed: int) -> TensorDataset:
    """``n`` seeded standard-normal 3×32×32 images with uniform labels in 0..9: --quick's stand-in for CIFAR-10."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    return TensorDataset(images, torch.randint(0, 10, (n,), generator=generator))


def write_quick_checkpoint(path: Path, data: TensorDataset, seed: int) -> Path:
    """A checkpoint that differs from ``build_model(MODEL, seed=seed)``: seed + 1's initialization after two SGD
    steps (lr 0.01, momentum 0.9) in train mode on ``data``, which also move the BatchNorm running statistics."""
    model = build_model(MODEL, seed=seed + 1).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = data.tensors
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.save({"epoch": 0, "state_dict": model.state_dict()}, path)
    return path


def load_test_set(args: argparse.Namespace) -> Dataset:
    """CIFAR-10's test split normalized as the model's spec says, or (--quick) seeded random images."""
    if args.quick:
        return random_images(QUICK_IMAGES, seed=args.seed + 1)
    spec = model_spec(MODEL)
    return load_dataset("cifar10", data_dir=args.data_dir, train=False, mean=spec.mean, std=spec.std)


def spectrum(model: nn.Module, batches: list[tuple[Tensor, Tensor]], args: argparse.Namespace) -> dict:
    """The top-``args.k`` eigenvalues (largest magnitude) of the Hessian of the mean loss over ``batches`` and its
    spectral density from ``args.lanczos_steps`` Lanczos steps on ``args.probes`` probes."""
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), batches, hvp_mode=args.hvp_mode)
    top = hessops.eigs(H, k=args.k, which="LM", tol=TOL, seed=args.seed, progress=not args.quick)
    density = hessops.spectral_density(
        H, num_probes=args.probes, lanczos_steps=args.lanczos_steps, seed=args.seed, progress=not args.quick
    )
    rule = density.quadrature
    return {
        "n_params": H.shape[0],
        "eigs": {
            "k": args.k,
            "which": "LM",
            "tol": TOL,
            "values": top.values.tolist(),
            "residuals": top.residuals.tolist(),
            "converged": top.converged,
            "steps": top.steps,
            "n_matvecs": top.n_matvecs,
            "seconds": top.seconds,
        },
        "density": {
            "num_probes": args.probes,
            "lanczos_steps": args.lanczos_steps,
            "sigma": density.sigma,
            "grid": density.grid.tolist(),
            "density": density.density.tolist(),
            "nodes": rule.nodes.tolist(),
            "weights": rule.weights.tolist(),
            "n_matvecs": rule.n_matvecs,
            "seconds": density.seconds,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="offline: its own checkpoint, 8 random images, top-2")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="a resnet18_cifar10 state_dict (torch.save or safetensors)")
    weights.add_argument("--pretrained", action="store_true", help=f"fetch the published weights ({PUBLISHED})")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("results/resnet18_cifar10_spectrum"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="start and probe vectors; --quick's images and checkpoint")
    args = parser.parse_args()
    if not (args.quick or args.checkpoint or args.pretrained):
        parser.error("the full mode needs weights: --checkpoint FILE, or --pretrained (online)")
    # batch size, top-k, SLQ probes and Lanczos steps, HVP formulation
    quick, full = (QUICK_IMAGES, 2, 1, 8, "autograd"), (200, 10, 1, STUDY["lanczos_steps"], "auto")
    args.batch_size, args.k, args.probes, args.lanczos_steps, args.hvp_mode = quick if args.quick else full
    args.device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    if args.checkpoint:
        checkpoint, source = args.checkpoint, "file"
    elif args.pretrained:
        checkpoint, source = fetch_published(), "published"
    else:
        images = random_images(QUICK_IMAGES, seed=args.seed)
        checkpoint = write_quick_checkpoint(args.out / "checkpoint.pt", images, args.seed)
        source = "written by --quick"
    try:
        model = load_checkpoint(build_model(MODEL, seed=args.seed), checkpoint).to(args.device).eval()
        data = load_test_set(args)
    except (hessops.CheckpointError, hessops.DatasetNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    batches = list(on_device(make_loader(data, batch_size=args.batch_size), args.device))  # moved once
    test = hessops.evaluate(model, nn.CrossEntropyLoss(), batches)
    print(
        f"{MODEL} from {checkpoint} ({source}): test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} "
        f"on {len(data):,} images"
    )

    result = spectrum(model, batches, args)
    eigs, density = result["eigs"], result["density"]
    products = eigs["n_matvecs"] + density["n_matvecs"]
    print(f"top-{args.k} Hessian eigenvalues (largest magnitude; residuals ≤ {TOL:g}·max|θ|: {eigs['converged']}):")
    print("  " + ", ".join(f"{v:.5g}" for v in eigs["values"]))
    print(
        f"eigs: {eigs['steps']} Lanczos steps, {eigs['n_matvecs']} HVPs, {eigs['seconds']:.1f} s; density: "
        f"{density['lanczos_steps']} steps × {density['num_probes']} probe = {density['n_matvecs']} HVPs, "
        f"{density['seconds']:.1f} s; in all {products} HVPs over the {len(data):,} test images in "
        f"{eigs['seconds'] + density['seconds']:.1f} s on {args.device} (the study: about "
        f"{STUDY['seconds'] // 60} minutes on {STUDY['device']} for {STUDY['lanczos_steps']} Lanczos steps)"
    )

    what = f"{len(data)} random images (quick)" if args.quick else f"CIFAR-10 test set, {len(data):,} images"
    plot_eigenvalues(
        eigs["values"],
        args.out / "eigenvalues.png",
        title=f"Top-{args.k} Hessian eigenvalues (largest |λ|), {MODEL}\n{what}",
    )
    plot_density(
        density["grid"],
        density["density"],
        args.out / "density.png",
        top=eigs["values"],
        title=f"Hessian spectral density (SLQ, {density['lanczos_steps']} steps), {MODEL}\n{what}",
    )
    spec = model_spec(MODEL)
    summary = {
        "mode": "quick" if args.quick else "full",
        "model": MODEL,
        "device": str(args.device),
        "seed": args.seed,
        "checkpoint": {"path": str(checkpoint), "source": source},
        "data": "random images" if args.quick else "cifar10 test",
        "normalization": None if args.quick else {"mean": list(spec.mean), "std": list(spec.std)},
        "test_examples": len(data),
        "batch_size": args.batch_size,
        "test": test,
        "hvp_mode": args.hvp_mode,
        **result,
        "n_matvecs": products,
        "study": STUDY,
        "seconds": time.perf_counter() - began,
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'result.json'}, eigenvalues.png and density.png in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
