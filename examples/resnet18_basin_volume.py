"""The basin log-volume of the CIFAR-10 ResNet-18 with a confidence interval, as the MNIST study computes it for
its CNN: log V = log V_n + (n/2)·log(2·threshold) − ½ log det(H + cI) for the basin
{δ : ½ δᵀ(H + cI)δ ≤ threshold}, n = 11,173,962, where no dense log-determinant is possible.

The model and data are examples/resnet18_cifar10_spectrum.py's (its checkpoint, published-weights and test-set
loading are reused): the Hessian of the mean cross-entropy over the CIFAR-10 test set in eval mode. The
log-determinant is ``hessops.basin_volume(..., method="deflated")``: first the smallest eigenvalue of H (Lanczos,
with its verified error bound) must lie above −c by more than its bound, else the run stops at once naming a c
that works; then the ``--deflate`` largest eigenvalues of H + cI are counted exactly and the rest estimated by
stochastic Lanczos quadrature on the complement of their eigenvectors, with a Student-t interval over the probes.
The interval covers the probes' noise; the result also reports the bound on deflation's bias and the rate at
which the quadrature's error falls with the Lanczos steps.

    python examples/resnet18_basin_volume.py --pretrained --data-dir data       # published weights (online)
    python examples/resnet18_basin_volume.py --checkpoint model.pt --data-dir data
    python examples/resnet18_basin_volume.py --quick                    # offline, about a minute on one CPU core

``c`` defaults to 4, the precision of the N(0, 0.5²) prior of the MNIST study (``--c``). --quick writes and
loads the sibling example's checkpoint (seed 1's initialization after two SGD steps on 8 random images), takes
1 other random image as its test set, whose Hessian is strongly indefinite (its smallest eigenvalue is near
−80), hence c = 100, and deflates 2 eigenvalues with 2 probes of 5 Lanczos steps, with the Hessian-vector
product fixed to double backward: 40 products. Its numbers are not a study's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

import hessops
from hessops.plot import plot_log_volume
from hessops.zoo.data import make_loader, on_device
from hessops.zoo.models import build_model, load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resnet18_cifar10_spectrum as spectrum_study  # noqa: E402  the sibling's weights and data loading

MODEL = spectrum_study.MODEL
THRESHOLD = 2.0  # the MNIST study's
PRIOR_C = 4.0  # 1/0.5²: the MNIST study's prior precision
# eigs' tolerance for the deflated eigenpairs and the smallest eigenvalue's bound: float32 ResNet-18 products do
# not reach 1e-3 of the norm (resnet18_cifar10_spectrum.py)
EIGS_TOL = 1e-2
QUICK_IMAGES = 1
QUICK_C = 100.0


def load_test_set(args: argparse.Namespace) -> Dataset:
    """CIFAR-10's test split as the sibling study loads it, or (--quick) ``QUICK_IMAGES`` seeded random images."""
    if args.quick:
        return spectrum_study.random_images(QUICK_IMAGES, seed=args.seed + 1)
    return spectrum_study.load_test_set(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="offline: its own checkpoint, 1 random image")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="a resnet18_cifar10 state_dict (torch.save or safetensors)")
    weights.add_argument("--pretrained", action="store_true", help="fetch the published weights (online)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("results/resnet18_basin_volume"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="probes and start vectors; --quick's images")
    parser.add_argument("--c", type=float, help=f"the damping c (default {PRIOR_C:g}; --quick: {QUICK_C:g})")
    parser.add_argument("--deflate", type=int, help="eigenvalues counted exactly (default 10; --quick: 2)")
    parser.add_argument("--probes", type=int, help="SLQ probes (default 10; --quick: 2)")
    parser.add_argument("--lanczos-steps", type=int, help="Lanczos steps per probe (default 30; --quick: 5)")
    args = parser.parse_args()
    if not (args.quick or args.checkpoint or args.pretrained):
        parser.error("the full mode needs weights: --checkpoint FILE, or --pretrained (online)")
    # batch size, c, deflated eigenvalues, probes, Lanczos steps, HVP formulation
    quick, full = (QUICK_IMAGES, QUICK_C, 2, 2, 5, "autograd"), (200, PRIOR_C, 10, 10, 30, "auto")
    batch_size, c, deflate, probes, steps, hvp_mode = quick if args.quick else full
    c, deflate = c if args.c is None else args.c, deflate if args.deflate is None else args.deflate
    probes, steps = (
        probes if args.probes is None else args.probes,
        steps if args.lanczos_steps is None else args.lanczos_steps,
    )
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    if args.checkpoint:
        checkpoint, source = args.checkpoint, "file"
    elif args.pretrained:
        checkpoint, source = spectrum_study.fetch_published(), "published"
    else:
        images = spectrum_study.random_images(spectrum_study.QUICK_IMAGES, seed=args.seed)
        checkpoint = spectrum_study.write_quick_checkpoint(args.out / "checkpoint.pt", images, args.seed)
        source = "written by --quick"
    try:
        model = load_checkpoint(build_model(MODEL, seed=args.seed), checkpoint).to(device).eval()
        data = load_test_set(args)
    except (hessops.CheckpointError, hessops.DatasetNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    batches = list(on_device(make_loader(data, batch_size=batch_size), device))
    test = hessops.evaluate(model, nn.CrossEntropyLoss(), batches)
    images = f"{len(data):,} image{'s' * (len(data) != 1)}"
    print(f"{MODEL} from {checkpoint} ({source}): test loss {test['loss']:.4f} on {images}")

    H = hessops.Hessian(model, nn.CrossEntropyLoss(), batches, hvp_mode=hvp_mode)
    try:
        volume = hessops.basin_volume(
            H,
            threshold=THRESHOLD,
            c=c,
            method="deflated",
            deflate=deflate,
            probes=probes,
            lanczos_steps=steps,
            seed=args.seed,
            eigs_tol=EIGS_TOL,
            progress=not args.quick,
        )
    except hessops.HessopsError as error:  # c too small (found before the costly part), bad sizes
        raise SystemExit(f"error: {error}") from error
    result, logdet = volume.to_dict(), volume.logdet
    low, high = volume.confidence_interval
    print(
        f"smallest Hessian eigenvalue {volume.smallest_eigenvalue:.5g} ± {volume.smallest_eigenvalue_bound:.2g}, "
        f"so H + {c:g}·I is positive definite; top-{deflate} eigenvalues of H + cI: "
        + ", ".join(f"{v:.5g}" for v in logdet.deflated_eigenvalues.tolist())
    )
    print(
        f"log V = {volume.log_volume:.2f}, {100 * logdet.confidence:g}% interval [{low:.2f}, {high:.2f}] "
        f"(probes' noise; deflation's bias ≤ {0.5 * logdet.deflation_bias:.2g}): log unit ball "
        f"{volume.log_unit_ball:.2f} + threshold term {volume.log_threshold_term:.2f} − ½ logdet "
        f"{volume.half_logdet:.2f}; {volume.n_matvecs} Hessian-vector products, {volume.seconds:.1f} s on {device}"
    )
    plural = "s" * (len(data) != 1)
    what = f"{len(data)} random image{plural} (quick)" if args.quick else f"CIFAR-10 test set, {len(data):,} images"
    plot_log_volume(
        volume,
        args.out / "basin.png",
        title=f"Log basin volume of {MODEL}, c = {c:g}, deflating {deflate}\n{what}",
    )
    summary = {
        "mode": "quick" if args.quick else "full",
        "model": MODEL,
        "device": str(device),
        "seed": args.seed,
        "checkpoint": {"path": str(checkpoint), "source": source},
        "data": "random images" if args.quick else "cifar10 test",
        "test_examples": len(data),
        "batch_size": batch_size,
        "hvp_mode": hvp_mode,
        "test": test,
        "eigs_tol": EIGS_TOL,
        "deflate": deflate,
        "probes": probes,
        "lanczos_steps": steps,
        "basin_volume": result,
        "seconds": time.perf_counter() - began,
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'result.json'} and basin.png in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
