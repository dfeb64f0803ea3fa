"""The ResNet-18's basin log-volume: the width of its confidence interval against the number of SLQ probes and
of deflated eigenvalues, and the deflated log det(GGN + cI) against KFAC's.

    python -m benchmarks.basin_volume --num-examples 1 --deflate 0 2 6 --probes 6 --probe-counts 2 3 6 \
        --lanczos-steps 6 --kfac --out benchmarks/results/2026-12-02-M-resnet18-basin-interval.json

The model and data are benchmarks/workloads.py's (a seeded, randomly initialized ``resnet18_cifar10`` in eval
mode, seeded random CIFAR-shaped images). First the smallest Hessian eigenvalue (``eigs`` "SA" with its error
bound) fixes ``c``: ``--c``, or twice the margin the check needs. Then for each number of deflated eigenvalues
``d`` one ``logdet(H + cI, method="deflated")`` with ``--probes`` probes, and the Student-t interval's width from
the first ``p`` of its probes' samples for each ``p`` of ``--probe-counts`` (the probes are independent, so a
prefix is a run with fewer probes). Widths depend on the operator and the seeds, not on the machine's load.

``--kfac``: over the convolution and linear weights (KFAC's layers; the BatchNorm parameters left out on both
sides), the deflated log det(GGN + cI) with its interval against curvlinops' KFAC (type-2: the exact Hessian
of the loss in the outputs, so both approximate the same GGN; KFAC's blocks are per layer and Kronecker-factored),
whose log det(K + cI) is exact from its factors' eigenvalues.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import hessops
from benchmarks.workloads import make_workload
from hessops.linalg.deflation import student_t_interval


def kfac_logdet(model: nn.Module, loss_fn: nn.Module, data: list, params: list, c: float) -> float:
    r""":math:`\log\det(K + cI)` of curvlinops' type-2 KFAC ``K`` of the GGN over ``params`` (weights and biases
    of a layer treated jointly), exactly: each layer's block is :math:`A \otimes G`, whose eigenvalues are the
    products :math:`a_i g_j` of the factors' eigenvalues, so the block contributes :math:`\sum_{ij}\log(a_i g_j + c)`
    (a bias alone: :math:`G`). KFAC's own ``logdet`` property has no damping."""
    from curvlinops import KFACLinearOperator

    kfac = KFACLinearOperator(
        model, loss_fn, params, data, fisher_type="type-2", separate_weight_and_bias=False, check_deterministic=False
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    total = 0.0
    for name, gradient in state["gradient_covariances"].items():
        g = torch.linalg.eigvalsh(gradient.double())
        inputs = state["input_covariances"].get(name)
        a = torch.ones(1, dtype=torch.float64) if inputs is None else torch.linalg.eigvalsh(inputs.double())
        total += float((a[:, None] * g[None, :] + c).log().sum())
    return total


def interval_widths(samples: torch.Tensor, counts: list[int], confidence: float) -> dict[int, float]:
    """The interval's width from the first ``p`` samples, for each ``p`` in ``counts``."""
    return {p: (lambda r: r[3] - r[2])(student_t_interval(samples[:p], confidence)) for p in counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=2)
    parser.add_argument("--deflate", type=int, nargs="+", default=[0, 2, 8])
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--probe-counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lanczos-steps", type=int, default=8)
    parser.add_argument("--c", type=float, help="the damping (default: twice the margin the c check needs)")
    parser.add_argument("--eigs-tol", type=float, default=1e-2)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--kfac", action="store_true", help="also the GGN + cI against KFAC, over conv/linear weights")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    began = time.perf_counter()
    work = make_workload(
        args.model,
        num_examples=args.num_examples,
        batch_size=args.num_examples,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    H = hessops.Hessian(work.model, work.loss_fn, work.data, hvp_mode="autograd")
    low = hessops.eigs(H, 1, "SA", value_tol=args.eigs_tol)
    if not low.converged:  # an unconverged run can stop far above λ_min: its bound proves no positivity
        raise SystemExit(f"error: the run for λ_min did not converge in {low.steps} steps: raise --eigs-tol")
    smallest, bound = float(low.values[0]), float(low.error_bounds[0])
    c = args.c if args.c is not None else float(f"{2 * max(bound - smallest, 0.5):.2g}")
    print(
        f"{args.model}, n = {H.shape[0]:,}: λ_min = {smallest:.5g} ± {bound:.2g} ({low.n_matvecs} products); c = {c:g}"
    )
    rows = []
    for d in args.deflate:
        est = hessops.logdet(
            hessops.Regularized(H, c),
            method="deflated",
            deflate=d,
            probes=args.probes,
            lanczos_steps=args.lanczos_steps,
            eigs_tol=args.eigs_tol,
            confidence=args.confidence,
            lower_bound=smallest - bound + c,
        )
        widths = interval_widths(est.samples, args.probe_counts, args.confidence)
        rows.append(
            {
                "deflate": d,
                "logdet": est.estimate,
                "std_error": est.std_error,
                "confidence_interval": list(est.confidence_interval),
                "noise_interval": list(est.noise_interval),
                "width_by_probes": {str(p): w for p, w in widths.items()},
                "half_logdet_width_by_probes": {str(p): w / 2 for p, w in widths.items()},
                "deflated_eigenvalues": est.deflated_eigenvalues.tolist(),
                "deflation_bias": est.deflation_bias,
                "quadrature_decay": est.quadrature_decay,
                "n_matvecs": est.n_matvecs,
                "seconds_under_load": est.seconds,
            }
        )
        print(
            f"deflate {d:3d}: log det = {est.estimate:.6g} ± {est.std_error:.3g}; width by probes "
            + ", ".join(f"{p}: {w:.3g}" for p, w in widths.items())
            + f"; bias ≤ {est.deflation_bias:.2g}, quadrature decay {est.quadrature_decay:.2g}, {est.n_matvecs} products"
        )
    result = {
        "command": "python -m benchmarks.basin_volume " + " ".join(argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "model": args.model,
        "n_params": H.shape[0],
        "num_examples": args.num_examples,
        "data": "seeded random CIFAR-shaped images and labels (benchmarks/workloads.py), random-init model, eval mode",
        "smallest_eigenvalue": smallest,
        "smallest_eigenvalue_bound": bound,
        "c": c,
        "probes": args.probes,
        "lanczos_steps": args.lanczos_steps,
        "eigs_tol": args.eigs_tol,
        "confidence": args.confidence,
        "rows": rows,
    }
    if args.kfac:
        params = [m.weight for m in work.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        params += [m.bias for m in work.model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
        G = hessops.GGN(work.model, work.loss_fn, work.data, params=params)
        d = max(args.deflate)
        est = hessops.logdet(
            hessops.Regularized(G, c),
            method="deflated",
            deflate=d,
            probes=args.probes,
            lanczos_steps=args.lanczos_steps,
            eigs_tol=args.eigs_tol,
            confidence=args.confidence,
            lower_bound=c,  # the GGN is PSD
        )
        kfac = kfac_logdet(work.model, work.loss_fn, work.data, params, c)
        n = G.shape[0]
        result["kfac"] = {
            "n_params": n,
            "deflate": d,
            "ggn_logdet": est.estimate,
            "ggn_confidence_interval": list(est.confidence_interval),
            "ggn_deflation_bias": est.deflation_bias,
            "kfac_logdet": kfac,
            "n_log_c": n * math.log(c),
            "difference": kfac - est.estimate,
        }
        print(
            f"GGN + cI over {n:,} conv/linear parameters: deflated {est.estimate:.8g} "
            f"[{est.confidence_interval[0]:.8g}, {est.confidence_interval[1]:.8g}]; KFAC {kfac:.8g} "
            f"(n·log c = {n * math.log(c):.8g})"
        )
    result["seconds_under_load"] = time.perf_counter() - began
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
