"""Where the Lanczos basis lives, timed: SLQ of a fixed number of steps with the basis on the device, in host
memory, in a memory-mapped file and nowhere, on a diagonal operator (products cost almost nothing, so the
times are the basis's own: re-orthogonalization, transfers, I/O).

    python -m benchmarks.basis_modes                       # CPU, n = 2,000,000, 60 steps
    python -m benchmarks.basis_modes --device cuda --n 20000000 --steps 100

Prints one JSON object: for each mode the seconds (best of ``--repeats``), the slowdown against the device
mode, and the peak resident memory of the process so far (``ru_maxrss``, which only grows: run the modes in
this order, smallest footprint last, or read the device's own peak for CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import cola
import torch

import hessops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["device", "host", "disk", "none"])
    args = parser.parse_args()
    device = torch.device(args.device)
    diagonal = torch.linspace(0, 1, args.n, device=device) ** 3
    op = cola.SelfAdjoint(cola.ops.Diagonal(diagonal))
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in args.modes:
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                density = hessops.spectral_density(
                    op,
                    num_probes=args.probes,
                    lanczos_steps=args.steps,
                    basis=mode,
                    basis_path=Path(folder) / "basis.npy" if mode == "disk" else None,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - began)
            results[mode] = {
                "seconds": min(times),
                "basis": density.quadrature.basis,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "mean_eigenvalue": density.quadrature.moment(1),
            }
    reference = results.get("device", next(iter(results.values())))["seconds"]
    for entry in results.values():
        entry["slowdown"] = entry["seconds"] / reference
    basis_gib = args.n * args.steps * args.probes * 4 / 2**30
    print(
        json.dumps(
            {"n": args.n, "steps": args.steps, "basis_gib": basis_gib, "device": str(device), **results}, indent=1
        )
    )


if __name__ == "__main__":
    main()
