"""Fewer products per answer? Single-vector Lanczos (eigs' default) against block Lanczos and thick restarts, for
k = 2 and k = 10, on the CIFAR CNN, ResNet-18, ViT-Tiny and a GPT (random models and data, seeded):
``python -m benchmarks.eigs_blocks [--workloads cnn resnet18 vit-tiny gpt-bytes-mini] [--k 2 10]``.

Every configuration runs ``hessops.eigs(H, k, "LM", tol=TOL)`` (or ``value_tol=--value-tol``; verified, with
the check runs) on one operator, warmed by products first (its tuning and first-use checks done). Each reports
its products, wall seconds (the median of ``--repeats``, configurations interleaved), thick restarts,
``converged`` and the largest distance of its values from the single-vector run's, in units of the reported
bounds (≤ 1: the same answer at the verified accuracy). ``--basis-size`` sets the bounded basis of the
thick-restart rows (the memory a 124M-parameter model has for ~20 vectors on 24 GB). Results in
benchmarks/RESULTS.md ("Block Lanczos and thick restarts")."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import hessops
from benchmarks.transformers import language_workload, vit_workload
from benchmarks.workloads import make_workload

TOL = 1e-4
CONFIGS = {
    "single": {},
    "block 4": {"block_size": 4},
    "block 8": {"block_size": 8},
    "thick restart": {"basis_size": None},  # filled from --basis-size
    "block 4 + restart": {"block_size": 4, "basis_size": None},
    "no basis": {"basis": "none"},  # what basis="auto" did before thick restarts where the basis did not fit
}


def workload(name: str, examples: int, batch: int, seq_len: int):
    if name == "vit-tiny":
        return vit_workload(num_examples=examples, batch_size=batch, seed=0)
    if name.startswith("gpt"):
        return language_workload(name, num_examples=examples, batch_size=batch, seq_len=seq_len, seed=0)
    return make_workload(name, num_examples=examples, batch_size=batch, device=torch.device("cpu"), dtype=torch.float32)


def run_one(H, k: int, options: dict, value_tol: float | None = None) -> dict:
    began = time.perf_counter()
    result = hessops.eigs(H, k, "LM", tol=TOL, value_tol=value_tol, **options)
    return {
        "seconds": time.perf_counter() - began,
        "n_matvecs": result.n_matvecs,
        "restarts": result.restarts,
        "checks": result.checks,
        "converged": result.converged,
        "values": result.values.tolist(),
        "bounds": result.error_bounds.tolist(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["cnn", "resnet18", "vit-tiny", "gpt-bytes-mini"])
    parser.add_argument("--k", nargs="+", type=int, default=[2, 10])
    parser.add_argument("--num-examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--basis-size", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--value-tol", type=float, default=None, help="stop on eigenvalue bounds instead of tol")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "runs": []}
    for name in args.workloads:
        w = workload(name, args.num_examples, args.batch_size, args.seq_len)
        H = hessops.Hessian(w.model, w.loss_fn, w.data)
        widest = max(CONFIGS[config].get("block_size", 1) for config in args.configs)
        began = time.perf_counter()
        H @ torch.randn(H.shape[0], 1)  # the first-use checks and the tuner's decisions, before any timing
        if widest > 1:
            H @ torch.randn(H.shape[0], widest)
        warm = time.perf_counter() - began
        for k in args.k:
            rows, seconds = {}, {config: [] for config in args.configs}
            for _ in range(args.repeats):  # configurations in turn, each repeat; the median time is reported
                for config in args.configs:
                    options = {key: args.basis_size if v is None else v for key, v in CONFIGS[config].items()}
                    rows[config] = run_one(H, k, options, args.value_tol)
                    seconds[config].append(rows[config]["seconds"])
                    print(name, k, config, {key: rows[config][key] for key in ("seconds", "n_matvecs", "restarts")})
            for config, row in rows.items():
                row["seconds"], row["all_seconds"] = statistics.median(seconds[config]), seconds[config]
            single = rows.get("single")
            for row in rows.values() if single is not None else ():
                gaps = [abs(a - b) for a, b in zip(row["values"], single["values"])]
                row["distance_over_bounds"] = max(
                    g / max(b1 + b2, 1e-300) for g, b1, b2 in zip(gaps, row["bounds"], single["bounds"])
                )
                row["seconds_over_single"] = row["seconds"] / single["seconds"]
            report["runs"].append(
                {"workload": name, "n_params": H.shape[0], "k": k, "warm_seconds": warm, "rows": rows}
            )
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
