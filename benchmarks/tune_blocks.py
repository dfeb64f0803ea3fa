"""A small model's long block run with the tuner's cumulative threshold: ``python -m benchmarks.tune_blocks
THRESHOLD STEPS`` times ``spectral_density(H, num_probes=8, lanczos_steps=STEPS)`` of the 5,100-parameter CIFAR
CNN on 256 random images (2 batches of 128), ``hvp_mode="auto"``, with ``hvp_tuning.TUNE_AFTER_SECONDS`` set
to THRESHOLD (0: infinity, never tuned), and prints one JSON line. Run each in a fresh process with an empty
``HESSOPS_CACHE_DIR``; results in benchmarks/RESULTS.md, "Cheap products tuned once they add up"."""

from __future__ import annotations

import json
import sys
import time

began = time.perf_counter()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hessops  # noqa: E402
from hessops.operators import hvp_tuning  # noqa: E402
from hessops.zoo.models import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    threshold, steps = (float((argv or sys.argv[1:])[0]), int((argv or sys.argv[1:])[1]))
    hvp_tuning.TUNE_AFTER_SECONDS = threshold if threshold > 0 else float("inf")
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 256, 128)]
    model = build_model("cnn-cifar-5k").eval()
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), batches)
    start = time.perf_counter()
    density = hessops.spectral_density(H, num_probes=8, lanczos_steps=steps, seed=0)
    end = time.perf_counter()
    report = {
        "threshold": threshold,
        "steps": steps,
        "density_s": round(end - start, 2),
        "process_s": round(end - began, 2),
        "tuning": {k: (t.mode, t.source, round(t.seconds, 2)) for k, t in H.hvp_tuning.items()},
        "mean": density.quadrature.moment(1),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
