"""torch.compile of a forward-over-reverse HVP of a GPT against hessops' ``H @ v``, on the CPU: a GPT with
GPT-2's vocabulary (50,257 tokens; the head is where the vocabulary costs), 2 layers of width 192, on
``--sequences`` random sequences of 64 tokens. ``python -m benchmarks.compile_transformer`` (set
TORCHINDUCTOR_CACHE_DIR to a new folder for a cold compile). Prints the compile time, medians of interleaved
repeats in gradients, and the agreement with hessops' product; results in benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp

import hessops
from hessops.numerics import norm
from hessops.operators.losses import next_token_cross_entropy
from hessops.zoo.lm import GPT, gpt_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=192)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = gpt_config("gpt2-small", n_layer=2, n_embd=args.width, n_head=4, block_size=args.tokens)
    model = GPT(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.sequences, args.tokens))
    batches = [(ids, ids)]
    params = {name: p.detach() for name, p in model.named_parameters()}
    H = hessops.Hessian(model, next_token_cross_entropy, batches)
    v = torch.randn(H.shape[0])
    pieces = v.split([p.numel() for p in params.values()])
    tangents = {name: t.view_as(params[name]) for name, t in zip(params, pieces)}

    def batch_hvp(params: dict, tangents: dict, xb: Tensor, yb: Tensor) -> dict:
        def batch_loss(p: dict) -> Tensor:
            return next_token_cross_entropy(functional_call(model, p, (xb,)), yb)

        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return jvp(grad(batch_loss), (params,), (tangents,))[1]

    def flat(hvp) -> Tensor:
        out = hvp(params, tangents, ids, ids)
        return torch.cat([out[name].reshape(-1) for name in params])

    def gradient() -> None:
        torch.autograd.grad(next_token_cross_entropy(model(ids), ids), list(model.parameters()))

    compiled = torch.compile(batch_hvp)
    began = time.perf_counter()
    try:
        flat(compiled)
        compile_seconds, compile_error = time.perf_counter() - began, None
    except Exception as error:  # noqa: BLE001 - a compile that fails is a result to record
        compile_seconds, compile_error = time.perf_counter() - began, f"{type(error).__name__}: {str(error)[:300]}"
    methods = {
        "grad": gradient,
        "hessops H@v (auto)": lambda: H @ v,
        "eager jvp(grad)": lambda: flat(batch_hvp),
    }
    if compile_error is None:
        methods["compiled jvp(grad)"] = lambda: flat(compiled)
    for method in methods.values():  # warm-up
        method()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            began = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = H @ v
    report = {
        "n_params": H.shape[0],
        "compile_seconds": compile_seconds,
        "compile_error": compile_error,
        "seconds": medians,
        "in_gradients": {name: m / medians["grad"] for name, m in medians.items()},
        "eager_vs_hessops": float(norm(flat(batch_hvp) - reference) / norm(reference)),
        "compiled_vs_hessops": None if compile_error else float(norm(flat(compiled) - reference) / norm(reference)),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
