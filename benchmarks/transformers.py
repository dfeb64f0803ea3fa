"""Transformers against the peers, side by side in one process: a GPT-style language model and a ViT.

    python -m benchmarks.transformers --workloads gpt2-small --batch-size 2 --seq-len 128 --top 0
    python -m benchmarks.transformers --workloads vit-tiny gpt-bytes-mini --top 2
    python -m benchmarks.transformers --smoke                      # seconds: checks the harness
    python -m benchmarks.transformers --workloads vit-tiny --compiled --peers --top 0   # and hvp_mode="compiled"

For each workload, with random weights (seeded) and random tokens or images (seeded), float32, eval mode:

- ``products``: medians over ``--repeats`` interleaved rounds of one dataset gradient (torch's default, fused
  attention kernel), hessops' HVP, PyHessian's and curvlinops' (after one warm-up each, timed on its own line), the ratios HVP / gradient, and each peer's relative difference from
  hessops' product (curvlinops 3.0.1 is wrong through LayerNorm: docs/torch-pitfalls.md);
- ``memory``: the peak tensor memory of one HVP against one gradient (benchmarks/memory.py; exact counts, CPU or
  CUDA), for hessops and PyHessian;
- ``top`` (``--top k``, 0 to skip): wall time and HVPs to the top-k eigenvalues, hessops'
  ``eigs(H, k, "LM", value_tol=1e-3)`` (``--value-tol``) with its verified error bounds against PyHessian's power
  iteration (tolerance 1e-3), and how far apart their values are. With ``--equal-accuracy``, PyHessian is run
  again at tighter tolerances until a tight verified reference (eigs at tol 1e-7) certifies its values to
  hessops' accuracy (benchmarks/peers.py: ``pyhessian_to_accuracy``), and the ratio is taken to that run: the
  same answer.

Workloads: ``gpt2-small`` and the byte-level GPTs of hessops.zoo.lm; ``gpt2-vocab-2x192`` (2 layers of width 192
with GPT-2's vocabulary, 10.5M parameters: where the vocabulary dominates); ``vit-tiny``.

The peers cannot differentiate the fused attention kernels twice ("derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), so they run inside
``sdpa_kernel(SDPBackend.MATH)``, as their users must write; hessops switches by itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessops
from benchmarks.memory import peak_bytes
from benchmarks.peers import (
    CurvlinopsPeer,
    PyHessianPeer,
    add_race_arguments,
    dataset_gradient,
    equal_accuracy_race,
    interleaved_times,
    timer,
)
from benchmarks.workloads import Workload
from hessops.numerics import norm

SIZES = ("gpt2-small", "gpt-bytes-mini", "gpt-bytes-tiny", "gpt2-vocab-2x192")


def language_workload(name: str, *, num_examples: int, batch_size: int, seq_len: int, seed: int) -> Workload:
    """hessops.zoo.lm's GPT of size ``name`` (block size ``seq_len``) on random tokens; labels are the inputs
    (the next-token loss shifts them), no padding."""
    from hessops.operators.losses import NextTokenCrossEntropy
    from hessops.zoo.lm import GPT, gpt_config

    torch.manual_seed(seed)
    if name == "gpt2-vocab-2x192":
        config = gpt_config("gpt2-small", n_layer=2, n_embd=192, n_head=4, block_size=seq_len)
    else:
        config = gpt_config(name, block_size=seq_len)
    model = GPT(config).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (num_examples, seq_len), generator=generator)
    data = [(tokens[i : i + batch_size], tokens[i : i + batch_size]) for i in range(0, num_examples, batch_size)]
    return Workload(name, model, NextTokenCrossEntropy(), data)


def vit_workload(*, num_examples: int, batch_size: int, seed: int, tiny: bool = False) -> Workload:
    """timm's ViT-Tiny at CIFAR's 32×32 (patch 4, 10 classes; two blocks of width 48 for ``tiny``) on random
    images and labels."""
    import timm

    torch.manual_seed(seed)
    options = {"depth": 2, "embed_dim": 48, "num_heads": 3} if tiny else {}
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10, **options
    ).eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_examples, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (num_examples,), generator=generator)
    data = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_examples, batch_size)]
    return Workload("vit-tiny" + ("-smoke" if tiny else ""), model, nn.CrossEntropyLoss(), data)


def on_device(w: Workload, device: torch.device) -> Workload:
    """The workload with its model and batches on ``device``."""
    if device.type == "cpu":
        return w
    data = [(x.to(device), y.to(device)) for x, y in w.data]
    return Workload(w.name, w.model.to(device), w.loss_fn, data)


def _math_attention(f):
    """``f`` run with scaled_dot_product_attention's math kernel, which has a double backward (for the peers)."""

    def run(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return f(*args, **kwargs)

    return run


def bench_products(w: Workload, device: torch.device, repeats: int, peers: dict, compiled: bool = False) -> dict:
    """Interleaved medians of the gradient and each method's HVP, their ratios, and the peers' agreement; with
    ``compiled``, hessops' ``hvp_mode="compiled"`` too (its first call, the compile, timed on its own line)."""
    now = timer(device)
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=H.dtype).to(device)
    shapes = [p.shape for p in w.model.parameters()]
    v_list = [t.reshape(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes)]
    methods = {"grad": lambda: dataset_gradient(w), "hessops hvp": lambda: H @ v}
    if compiled:
        H_compiled = hessops.Hessian(w.model, w.loss_fn, w.data, hvp_mode="compiled")
        methods["hessops compiled hvp"] = lambda: H_compiled @ v
    if "pyhessian" in peers:
        methods["pyhessian hvp"] = lambda: peers["pyhessian"].hvp(v_list)
    if "curvlinops" in peers:
        methods["curvlinops hvp"] = lambda: peers["curvlinops"].matmat(v[:, None])
    first = {}
    for name, f in methods.items():  # warm-up, timed on its own: a fresh process's first product
        start = now()
        f()
        first[name] = now() - start
    times = interleaved_times(methods, repeats, now)
    medians = {k: statistics.median(t) for k, t in times.items()}
    ratios = {f"{k} / grad": medians[k] / medians["grad"] for k in medians if k != "grad"}
    reference = H @ v
    agreement = {}
    if "pyhessian" in peers:
        theirs = torch.cat([t.detach().reshape(-1) for t in peers["pyhessian"].hvp(v_list)]).to(reference)
        agreement["pyhessian rel. diff"] = float(norm(theirs - reference) / norm(reference))
    if "curvlinops" in peers:
        theirs = peers["curvlinops"].matmat(v[:, None])[:, 0].detach().to(reference)
        agreement["curvlinops rel. diff"] = float(norm(theirs - reference) / norm(reference))
    if compiled:
        agreement["hessops compiled rel. diff"] = float(norm(H_compiled @ v - reference) / norm(reference))
    return {"first call seconds": first, "seconds": medians, "ratios": ratios, "agreement": agreement}


def bench_memory(w: Workload, device: torch.device, peers: dict, micro_batch_size: int | None = None) -> dict:
    """Peak tensor memory of one gradient and one HVP (hessops, PyHessian), in bytes, and the ratios; with
    ``micro_batch_size``, also hessops' HVP over the same batches cut into micro-batches of that size, and its
    median time over three products against the whole batches' (same data, same result to rounding)."""
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    v = torch.randn(H.shape[0], dtype=H.dtype, device=device)
    H @ v  # the first product's one-off work (formulation check, determinism) is not one HVP's memory
    work = {"grad": lambda: dataset_gradient(w), "hessops hvp": lambda: H @ v}
    extra = {}
    if micro_batch_size:
        H_micro = hessops.Hessian(w.model, w.loss_fn, w.data, micro_batch_size=micro_batch_size)
        whole, micro = H @ v, H_micro @ v
        extra["micro-batch rel. diff"] = float(norm(micro - whole) / norm(whole))
        label = f"hessops hvp (micro-batches of {micro_batch_size})"
        work[label] = lambda: H_micro @ v
        now = timer(device)
        times = interleaved_times({"whole": lambda: H @ v, "micro": lambda: H_micro @ v}, 3, now)
        extra["seconds (median of 3)"] = {
            "whole batches": statistics.median(times["whole"]),
            label: statistics.median(times["micro"]),
        }
    if "pyhessian" in peers:
        shapes = [p.shape for p in w.model.parameters()]
        v_list = [t.reshape(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes)]
        work["pyhessian hvp"] = lambda: peers["pyhessian"].hvp(v_list)
    peaks = {name: peak_bytes(f, device) for name, f in work.items()}
    ratios = {f"{k} / grad": peaks[k] / peaks["grad"] for k in peaks if k != "grad"}
    return {"peak_bytes": peaks, "ratios": ratios, **extra}


def bench_top(
    w: Workload,
    device: torch.device,
    k: int,
    peers: dict,
    value_tol: float = 1e-3,
    equal_accuracy: bool = False,
    budget_seconds: float | None = None,
) -> dict:
    """Time and HVPs to the top-k (largest magnitude) eigenvalues: hessops at ``value_tol`` with verified
    error bounds, PyHessian's power iteration at its tolerance 1e-3, or, with ``equal_accuracy``, at the first
    tolerance whose values a tight verified reference certifies to the same accuracy."""
    now = timer(device)
    start = now()
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    ours = hessops.eigs(H, k, "LM", value_tol=value_tol)
    out = {
        "hessops": {
            "seconds": now() - start,
            "hvps": ours.n_matvecs,
            "values": ours.values.tolist(),
            "error_bounds": ours.error_bounds.tolist(),
            "converged": bool(ours.converged),
        }
    }
    if "pyhessian" in peers and equal_accuracy:
        race = equal_accuracy_race(
            H, ours, out["hessops"]["seconds"], peers["pyhessian"], value_tol, now, budget_seconds=budget_seconds
        )
        out |= race
    elif "pyhessian" in peers:
        peers["pyhessian"].hvps = 0
        start = now()
        values = peers["pyhessian"].top(k)
        out["pyhessian"] = {"seconds": now() - start, "hvps": peers["pyhessian"].hvps, "values": values}
        ours_sorted = sorted(ours.values.tolist(), key=abs, reverse=True)
        theirs_sorted = sorted(values, key=abs, reverse=True)
        scale = max(abs(x) for x in ours_sorted)
        out["max rel. difference"] = max(abs(a - b) for a, b in zip(ours_sorted, theirs_sorted)) / scale
        out["pyhessian / hessops time"] = out["pyhessian"]["seconds"] / out["hessops"]["seconds"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["vit-tiny", "gpt-bytes-mini"], choices=(*SIZES, "vit-tiny"))
    parser.add_argument("--num-examples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (language models)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=2, help="top-k eigenvalues to time (0: skip)")
    parser.add_argument("--value-tol", type=float, default=1e-3, help="hessops' top-k accuracy (relative)")
    add_race_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory counts")
    parser.add_argument("--compiled", action="store_true", help="also time hessops' hvp_mode='compiled' product")
    parser.add_argument("--only-top", action="store_true", help="skip the products and memory: only the top-k race")
    parser.add_argument(
        "--micro-batch-size", type=int, help="also count (and time) hessops' HVP in micro-batches of this size"
    )
    parser.add_argument("--peers", nargs="*", default=["pyhessian", "curvlinops"], choices=("pyhessian", "curvlinops"))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the harness")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report: dict = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args) | {"out": str(args.out)},
        "workloads": {},
    }
    for name in args.workloads:
        began = time.perf_counter()
        if args.smoke:
            w = (
                vit_workload(num_examples=4, batch_size=2, seed=0, tiny=True)
                if name == "vit-tiny"
                else language_workload("gpt-bytes-tiny", num_examples=4, batch_size=2, seq_len=16, seed=0)
            )
        elif name == "vit-tiny":
            w = vit_workload(num_examples=args.num_examples, batch_size=args.batch_size, seed=0)
        else:
            w = language_workload(
                name, num_examples=args.num_examples, batch_size=args.batch_size, seq_len=args.seq_len, seed=0
            )
        w = on_device(w, device)
        peers = {}
        if "pyhessian" in args.peers:
            peers["pyhessian"] = PyHessianPeer(w)
            peers["pyhessian"].hvp = _math_attention(peers["pyhessian"].hvp)
            peers["pyhessian"].top = _math_attention(peers["pyhessian"].top)
        if "curvlinops" in args.peers:
            peers["curvlinops"] = CurvlinopsPeer(w)
            peers["curvlinops"].matmat = _math_attention(peers["curvlinops"].matmat)
        entry: dict = {"n_params": w.n_params, "num_examples": w.num_examples}
        report["workloads"][w.name] = entry
        sections = {}
        if not args.only_top:
            sections["products"] = lambda: bench_products(
                w, device, 1 if args.smoke else args.repeats, peers, args.compiled
            )
        if not (args.no_memory or args.only_top):
            sections["memory"] = lambda: bench_memory(w, device, peers, args.micro_batch_size)
        if args.top:
            sections["top"] = lambda: bench_top(
                w, device, args.top, peers, args.value_tol, args.equal_accuracy, args.pyhessian_budget
            )
        for section, run in sections.items():  # each printed (and written) as it ends: a late failure keeps them
            entry[section] = run()
            entry["seconds"] = time.perf_counter() - began
            print(json.dumps({w.name: {section: entry[section]}}, indent=2), flush=True)
            if args.out:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
