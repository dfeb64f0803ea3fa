"""Where a large model's Hessian-vector product spends its time: ``python -m benchmarks.product_profile``.

A GPT of GPT-2 small's size (124M parameters, random weights, ``gpt_config("gpt2-small")``) on ``--sequences``
random sequences of ``--tokens`` tokens, float32, on the CPU. Timed in one process: a gradient, a plain
double-backward HVP written here (``torch.autograd.grad`` twice, PyHessian's way: the floor hessops' product
should reach), the ``hessops.Hessian`` construction, its first product (which also runs the first-order witness
and the determinism fingerprint) and its later products; then the hessops product under cProfile, whose top
functions by own time say where the rest goes. Results in benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

import hessops
from hessops.operators.losses import next_token_cross_entropy
from hessops.zoo.lm import GPT, gpt_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="gpt2-small")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = GPT(gpt_config(args.size, block_size=args.tokens)).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.sequences, args.tokens))
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        torch.autograd.grad(next_token_cross_entropy(model(ids), ids), params)

    def plain_hvp(vs: list[torch.Tensor]) -> None:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            grads = torch.autograd.grad(next_token_cross_entropy(model(ids), ids), params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vs))
            torch.autograd.grad(dot, params)

    began = time.perf_counter()
    H = hessops.Hessian(model, next_token_cross_entropy, [(ids, ids)])
    construction = time.perf_counter() - began
    v = torch.randn(H.shape[0])
    vs = [piece.view_as(p) for piece, p in zip(v.split([p.numel() for p in params]), params)]
    began = time.perf_counter()
    H @ v
    first = time.perf_counter() - began
    gradient()
    plain_hvp(vs)  # warm-up
    times: dict[str, list[float]] = {"gradient": [], "plain double backward": [], "hessops H @ v": []}
    for _ in range(args.repeats):
        for name, call in (
            ("gradient", gradient),
            ("plain double backward", lambda: plain_hvp(vs)),
            ("hessops H @ v", lambda: H @ v),
        ):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    profiler = cProfile.Profile()
    profiler.enable()
    H @ v
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    report = {
        "n_params": H.shape[0],
        "construction_s": construction,
        "first_product_s": first,
        "seconds": medians,
        "in_gradients": {name: m / medians["gradient"] for name, m in medians.items()},
        "hessops_over_plain": medians["hessops H @ v"] / medians["plain double backward"],
        "hvp_tuning": {k: (t.mode, t.source) for k, t in H.hvp_tuning.items()},
    }
    print(json.dumps(report, indent=1))
    print(text.getvalue()[:6000])
    return report


if __name__ == "__main__":
    main()
