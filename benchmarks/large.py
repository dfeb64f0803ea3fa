"""Runs that outgrow memory: where the Lanczos basis lives, and what each place costs in time and memory.

    python -m benchmarks.large --out benchmarks/results/large.json             # the grid below, one process each
    python -m benchmarks.large --one mlp-100m top none                          # a single configuration
    python -m benchmarks.large --smoke                                          # the harness, at toy sizes

Each configuration runs in a fresh process (``--one``), so that the peak resident memory reported
(``resource.getrusage``'s ``ru_maxrss``, the whole process: torch, the model, the data, the basis) belongs to
it alone. The grid:

- ``mlp-100m``: a 64-10000-10000-10 ReLU MLP (100,750,010 parameters, 0.4 GB a float32 vector) on 64 of the
  scikit-learn digits: the top-10 eigenvalues (``eigs``, ``value_tol=1e-3``, at most 150 steps) and an SLQ
  density (2 probes, 15 steps), with the basis nowhere (``basis="none"``, which is where ``"auto"`` puts it on a 24 GB machine: a basis
  of its 300 default steps would be 121 GB, and not even the 40 steps below which eigs goes without one fit in
  half of the free memory).
- ``resnet18``: the zoo's CIFAR ResNet-18 (11,173,962 parameters) on 16 seeded random CIFAR-shaped images: the
  top-10 eigenvalues with the basis on the device (the CPU's memory here), in a memory-mapped file, and
  nowhere, and the slowdown of each against the device.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

GRID = [
    ("mlp-100m", "top", "none"),
    ("mlp-100m", "density", "none"),
    ("resnet18", "top", "device"),
    ("resnet18", "top", "disk"),
    ("resnet18", "top", "none"),
]
# The 100M MLP's products take 3.2 s each on 2 cores; its top-10 had not converged after 61 steps without a basis,
# so its run is capped: at most 150 steps and as many more for the vectors' second pass (about 16 minutes); the
# 100 of Run Z, taken before the float32 norm fix, resolved only 4 of the 10.
MAX_STEPS = {"mlp-100m": 150}
# SLQ's products of 4 columns took 22 s a step on it (5.5 s a column: four 0.4 GB columns at once run slower
# per column than one), so its density is 2 probes of 15 steps.
DENSITY = {"mlp-100m": (2, 15)}
SMOKE_GRID = [("mlp-small", "top", "device"), ("mlp-small", "top", "disk"), ("mlp-small", "density", "none")]


def workload(name: str) -> tuple[nn.Module, nn.Module, list]:
    """The model (eval mode, seeded), the loss and the batches of workload ``name``."""
    from hessops.zoo.data import load_dataset
    from hessops.zoo.models import build_model

    torch.manual_seed(0)
    if name == "resnet18":
        model = build_model("resnet18_cifar10").eval()
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        return model, nn.CrossEntropyLoss(), [(x, y)]
    width, count = {"mlp-100m": (10_000, 64), "mlp-small": (32, 64)}[name]
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).eval()
    digits = load_dataset("digits", num_examples=count)
    x = torch.stack([digits[i][0] for i in range(count)])
    y = torch.tensor([int(digits[i][1]) for i in range(count)])
    return model, nn.CrossEntropyLoss(), [(x[i : i + 128], y[i : i + 128]) for i in range(0, count, 128)]


def run_one(name: str, task: str, basis: str) -> dict:
    """One configuration in this process: its result, time and peak resident memory."""
    import hessops

    began = time.perf_counter()
    model, loss_fn, data = workload(name)
    H = hessops.Hessian(model, loss_fn, data, hvp_mode="autograd")
    n = H.shape[0]
    record: dict = {"workload": name, "task": task, "basis asked": basis, "parameters": n}
    start = time.perf_counter()
    if task == "top":
        steps = MAX_STEPS.get(name)
        k = 10 if name != "mlp-small" else 3
        result = hessops.eigs(H, k, "LM", value_tol=1e-3, max_iters=steps, basis=basis, progress=True)
        record["max steps"] = steps
        record |= {
            "eigenvalues": result.values.tolist(),
            "error bounds": result.error_bounds.tolist(),
            "converged": result.converged,
            "lanczos steps": result.steps,
            "hvps": result.n_matvecs,
            "basis used": result.basis,
        }
    else:
        probes, steps = DENSITY.get(name, (4, 30))
        result = hessops.spectral_density(H, num_probes=probes, lanczos_steps=steps, basis=basis, progress=True)
        record |= {"probes": probes, "lanczos steps": steps}
        record |= {
            "moments": {"mean": result.quadrature.moment(1), "second": result.quadrature.moment(2)},
            "hvps": result.n_matvecs,
            "basis used": getattr(result, "basis", basis),
        }
    record["seconds"] = time.perf_counter() - start
    record["process seconds"] = time.perf_counter() - began
    record["vector bytes"] = n * 4
    record["peak resident bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "TASK", "BASIS"), help="run one configuration here")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the harness")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.one:
        record = run_one(*args.one)
        print(json.dumps(record), flush=True)
        return record
    report: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "runs": []}
    for name, task, basis in SMOKE_GRID if args.smoke else GRID:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.large", "--one", name, task, basis],
            stdout=subprocess.PIPE,  # progress bars and warnings pass through on stderr
            text=True,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        record = (
            json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": f"exit status {done.returncode}"}
        )
        record |= {"workload": name, "task": task, "basis asked": basis}
        report["runs"].append(record)
        print(json.dumps(record), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    device_times = {r["workload"]: r["seconds"] for r in report["runs"] if r.get("basis used") == "device"}
    for r in report["runs"]:
        if "seconds" in r and r["workload"] in device_times and r["task"] == "top":
            r["slowdown against the device basis"] = r["seconds"] / device_times[r["workload"]]
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
