"""The closed-form softmax cross-entropy head (hessops/operators/softmax_head.py) against plain double backward
through the vocabulary, on GPTs with GPT-2's vocabulary (50,257 tokens), in one process:

    python -m benchmarks.softmax_head                                  # 2 layers of width 192, 2 x 64 tokens
    python -m benchmarks.softmax_head --size gpt2-small --tokens 128   # GPT-2 small's own sizes
    python -m benchmarks.softmax_head --smoke                          # toy sizes: checks the harness
    python -m benchmarks.softmax_head --loss-only --sequences 8 --tokens 256   # the loss alone, in the logits
    python -m benchmarks.softmax_head --compiled                       # and hvp_mode="compiled" beside them
    python -m benchmarks.softmax_head --finite-difference              # and the gradient-only product

One dataset gradient, hessops' ``H @ v`` with the head (the default) and without it (``HESSOPS_SOFTMAX_HEAD=0``),
each warmed up once (the first-use check and the witness are the warm-up, timed on their own line), then
medians of ``--repeats`` interleaved rounds; the peak tensor memory of each (benchmarks/memory.py, exact on the
CPU); the two products' relative difference. Random weights and tokens (seeded), float32 (``--dtype``), eval mode.

``--compiled``: also ``hvp_mode="compiled"`` (hessops/operators/compiled.py); its first call (the compile and the
check against double backward) is timed on its own line. Its peak memory is not measured: compiled code allocates
its buffers below torch's dispatcher, where benchmarks/memory.py's exact CPU count does not see them.

``--finite-difference``: also ``hvp_mode="finite-difference"`` (two gradients a column; its first call measures its
error, timed on its own line), its distance to double backward's product and its measured ``product_error``.

``--loss-only``: the next-token loss alone, as a function of random logits ``(sequences, tokens, 50,304)`` (the
sizes of hessian-eigenthings' fused cross-entropy HVP, its PR #47): one gradient in the logits, the product
``u ↦ ∇²_z L u`` by plain double backward and in closed form (hessops.operators.softmax_head.hessian_product),
medians and peak memory of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import hessops
from benchmarks.memory import peak_bytes
from benchmarks.peers import interleaved_times, timer
from hessops.numerics import norm
from hessops.operators.losses import next_token_cross_entropy
from hessops.zoo.lm import GPT, gpt_config


def loss_only(sequences: int, tokens: int, vocabulary: int, repeats: int, device: torch.device) -> dict:
    """The loss's own curvature in the logits: plain double backward against the closed form."""
    from hessops.operators import softmax_head
    from hessops.operators.losses import loss_spec

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(sequences, tokens, vocabulary, generator=generator).to(device)
    labels = torch.randint(0, vocabulary, (sequences, tokens), generator=generator).to(device)
    u = torch.randn(sequences, tokens, vocabulary, generator=generator).to(device)
    spec = loss_spec(next_token_cross_entropy)

    def gradient() -> torch.Tensor:
        z = logits.detach().requires_grad_()
        return torch.autograd.grad(next_token_cross_entropy(z, labels), z)[0]

    def plain() -> torch.Tensor:
        z = logits.detach().requires_grad_()
        (g,) = torch.autograd.grad(next_token_cross_entropy(z, labels), z, create_graph=True)
        return torch.autograd.grad(g, z, u)[0]

    def closed() -> torch.Tensor:
        s, dim = softmax_head.coefficients(spec, logits, labels)
        return softmax_head.hessian_product(logits, s, dim, u)

    methods = {"grad": gradient, "plain": plain, "closed form": closed}
    for work in methods.values():
        work()
    times = interleaved_times(methods, repeats, timer(device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    peaks = {name: peak_bytes(work, device) for name, work in methods.items()}
    reference = plain()
    return {
        "logits": [sequences, tokens, vocabulary],
        "seconds": medians,
        "plain / closed form": medians["plain"] / medians["closed form"],
        "peak_bytes": peaks,
        "memory plain / closed form": peaks["plain"] / peaks["closed form"],
        "closed_vs_plain": float(norm(closed() - reference) / norm(reference)),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def optional_products(args, model, data, v, warm: dict) -> dict:
    """The ``hvp_mode="compiled"`` and ``"finite-difference"`` operators asked for, each's first call (the compile
    and its check; the error's measurement) timed into ``warm``."""
    operators = {}
    for flag, mode in (("compiled", "compiled"), ("finite_difference", "finite-difference")):
        if getattr(args, flag):
            operators[mode] = hessops.Hessian(model, next_token_cross_entropy, data, hvp_mode=mode)
            began = time.perf_counter()
            operators[mode] @ v
            warm[mode] = time.perf_counter() - began
    return operators


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small-vocab", help="'small-vocab' (2 x 192) or a hessops.zoo.lm size")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--smoke", action="store_true", help="a toy GPT (vocabulary 300, width 16)")
    parser.add_argument("--compiled", action="store_true", help="also hvp_mode='compiled' (its compile timed apart)")
    parser.add_argument("--finite-difference", action="store_true", help="also hvp_mode='finite-difference'")
    parser.add_argument("--loss-only", action="store_true", help="the loss alone in random logits (vocabulary 50,304)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.loss_only:
        report = loss_only(args.sequences, args.tokens, 300 if args.smoke else 50_304, args.repeats, device)
        print(json.dumps(report, indent=1))
        return report
    if args.smoke:
        config = gpt_config("gpt2-small", n_layer=1, n_embd=16, n_head=2, vocab_size=300, block_size=args.tokens)
        args.repeats = 1
    elif args.size == "small-vocab":
        config = gpt_config("gpt2-small", n_layer=2, n_embd=192, n_head=4, block_size=args.tokens)
    else:
        config = gpt_config(args.size, block_size=args.tokens)
    model = GPT(config).eval().to(device=device, dtype=getattr(torch, args.dtype))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.sequences, args.tokens), generator=generator).to(device)
    data = [(ids, ids)]
    head = hessops.Hessian(model, next_token_cross_entropy, data)
    v = torch.randn(head.shape[0], generator=torch.Generator().manual_seed(2)).to(device=device, dtype=head.dtype)

    def gradient() -> None:
        torch.autograd.grad(next_token_cross_entropy(model(ids), ids), list(model.parameters()))

    def plain_product() -> torch.Tensor:
        os.environ["HESSOPS_SOFTMAX_HEAD"] = "0"
        try:
            return plain @ v
        finally:
            os.environ.pop("HESSOPS_SOFTMAX_HEAD")

    warm: dict[str, float] = {}
    for name, work in (("grad", gradient), ("head", lambda: head @ v)):
        began = time.perf_counter()
        work()
        warm[name] = time.perf_counter() - began
    os.environ["HESSOPS_SOFTMAX_HEAD"] = "0"
    plain = hessops.Hessian(model, next_token_cross_entropy, data)
    began = time.perf_counter()
    plain @ v
    warm["plain"] = time.perf_counter() - began
    os.environ.pop("HESSOPS_SOFTMAX_HEAD")
    methods = {"grad": gradient, "plain": plain_product, "head": lambda: head @ v}
    extra = optional_products(args, model, data, v, warm)
    methods |= {mode: (lambda op=op: op @ v) for mode, op in extra.items()}
    times = interleaved_times(methods, args.repeats, timer(device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    peaks = {name: peak_bytes(work, device) for name, work in methods.items() if name != "compiled"}
    with_head, without = head @ v, plain_product()
    report = {
        "model": f"GPT {config.n_layer} x {config.n_embd}, vocabulary {config.vocab_size}",
        "parameters": head.shape[0],
        "tokens": f"{args.sequences} x {args.tokens}",
        "dtype": args.dtype,
        "first_call_seconds": warm,
        "head_check": head.softmax_head.to_dict() if head.softmax_head else None,
        "seconds": medians,
        "in_gradients": {name: m / medians["grad"] for name, m in medians.items()},
        "peak_bytes": peaks,
        "peak_in_gradients": {name: p / peaks["grad"] for name, p in peaks.items()},
        "head_vs_plain": float(norm(with_head - without) / norm(without)),
        "vs_plain": {mode: float(norm(op @ v - without) / norm(without)) for mode, op in extra.items()},
        "compiles": hessops.operators.compiled.stats(model) if args.compiled else None,
        "finite_difference_report": extra["finite-difference"].finite_difference_report.to_dict()
        if args.finite_difference
        else None,
        "torch": torch.__version__,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
