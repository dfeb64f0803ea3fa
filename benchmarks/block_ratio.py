"""What a block of columns costs against as many single products, per HVP formulation, on the 5,100-parameter
CIFAR CNN (256 random images, 2 batches of 128, float32): ``python -m benchmarks.block_ratio``. For each
``hvp_mode``, after a warm-up, the median of interleaved repeats of ``H @ V`` (8 columns) and of 8 single
``H @ v``; ``auto`` is measured after the run has spent its tuning threshold (hvp_tuning.TUNE_AFTER_SECONDS) on
blocks, so it is the tuned choice. Results in benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import hessops
from hessops.zoo.models import build_model

MODES = ("autograd", "autograd-loop", "forward-over-reverse", "reverse-over-reverse", "auto")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 256, 128)]
    model = build_model("cnn-cifar-5k").eval()
    operators = {mode: hessops.Hessian(model, nn.CrossEntropyLoss(), batches, hvp_mode=mode) for mode in MODES}
    n = operators["auto"].shape[0]
    V = torch.randn(n, args.columns)
    spent, began = 0, time.perf_counter()
    while (
        "block" not in operators["auto"].hvp_tuning or operators["auto"].hvp_tuning["block"].source == "cheap product"
    ):
        operators["auto"] @ V  # until auto has tuned its blocks (or decided for good)
        spent += 1
    warm = time.perf_counter() - began
    for op in operators.values():  # warm-up
        op @ V
        op @ V[:, 0]
    block = {mode: [] for mode in MODES}
    single = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, op in operators.items():
            start = time.perf_counter()
            op @ V
            block[mode].append(time.perf_counter() - start)
            start = time.perf_counter()
            for j in range(args.columns):
                op @ V[:, j]
            single[mode].append(time.perf_counter() - start)
    report = {
        "auto_block_choice": operators["auto"].hvp_tuning["block"].mode,
        "auto_blocks_before_tuned": spent,
        "auto_seconds_before_tuned": warm,
        "block_over_singles": {m: statistics.median(block[m]) / statistics.median(single[m]) for m in MODES},
        "block_seconds": {m: statistics.median(block[m]) for m in MODES},
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
