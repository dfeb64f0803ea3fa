"""The GPU check: what a lent GPU should measure, in one process, in under 8 minutes.

    python -m benchmarks.gpu_check --data-dir data --out gpu_check.json            # on a GPU
    python -m benchmarks.gpu_check --smoke                                          # the harness, on a CPU

On the CIFAR ResNet-18 of the zoo (``resnet18_cifar10``; a ``--checkpoint`` of it when given, random weights
otherwise) over the 10,000 CIFAR-10 test images (``--data-dir``; when the files are not there, seeded random
CIFAR-shaped images, and the report says so):

1. ``top``: a fresh operator's top-10 eigenvalues in magnitude, construction included (``hessops.eigs`` with
   verified error bounds); the CoLA notebook took about 15 minutes for 30 Lanczos steps, our target is under
   a minute on a current GPU.
2. ``products``: one dataset gradient and one dataset HVP (hessops' ``H @ v``), interleaved medians, their
   ratio, and the peak allocated memory of each (``torch.cuda.max_memory_allocated``; exact tensor counts on
   a CPU).
3. ``compiled``: the same with ``torch.compile``: a compiled per-batch gradient and a compiled per-batch
   forward-over-reverse HVP (``jvp(grad(loss))``), compile time on its own line, checked against hessops'
   product, and hessops' own ``hvp_mode="compiled"`` (a compiled product that disagrees is reported as such, never
   timed as a success). Its memory is
   counted on a GPU only: the CPU's exact tensor counter (benchmarks/memory.py) cannot see compiled code.

4. ``head``: a GPT with GPT-2's vocabulary (GPT-2 small, 8 sequences of 256 tokens; a toy GPT with ``--smoke``):
   gradient, HVP with the closed-form softmax head and without it, in gradients and in peak memory
   (benchmarks/softmax_head.py).

5. ``blocks``: single-vector Lanczos against block Lanczos (blocks of 4 and 8) for the top-``k`` on the same
   operator, warmed first (benchmarks/eigs_blocks.py): products and seconds of each. Blocks are where a single
   product leaves the GPU idle; eigs' default stays ``block_size=1`` until this row says otherwise.

6. ``peers``: the ResNet-18's top-2 and top-``k`` against PyHessian on the first ``--peer-examples`` images, each
   from a fresh operator (construction and tuning timed), PyHessian run at tighter tolerances until its values
   are as accurate as hessops' verified ones (benchmarks/peers.py: ``equal_accuracy_race``; each sweep stopped
   after ``--pyhessian-budget`` seconds).

7. ``vit``: ViT-Tiny at 32×32 (benchmarks/transformers.py): gradient and HVP (hessops and PyHessian), peak
   memory, and the top-2 race to equal accuracy.

8. ``gpt``: GPT-2 small (8 sequences of 128 tokens) in the same harness: products and the top-2 race.

9. ``tracking``: benchmarks/tracking.py on the device: each tracker's measurement as a fraction of a training
   epoch (the digits MLP, the CIFAR CNN, the micro ViT on 20,000 random examples, a 1 % subset measured).

Sections run in that order, each in its own ``try`` (a failure is recorded and the next section runs), and
the JSON report is rewritten after each one, so what finished survives a time limit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

import hessops
from benchmarks import eigs_blocks, softmax_head, tracking, transformers
from benchmarks.memory import peak_bytes
from benchmarks.peers import PyHessianPeer, equal_accuracy_race, interleaved_times, timer
from benchmarks.workloads import Workload
from hessops.errors import DatasetNotFoundError
from hessops.numerics import norm
from hessops.zoo.data import load_dataset
from hessops.zoo.models import build_model, load_checkpoint, model_spec

MODEL = "resnet18_cifar10"
TARGET_TOP_SECONDS = 60.0
AGREEMENT = 1e-4  # float32 products that agree to rounding differ by ~1e-6; TF32 convolutions by ~1e-4


def environment(device: torch.device) -> dict:
    """The machine, torch and the precision settings that decide what a float32 product means."""
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record |= {
            "gpu": props.name,
            "gpu_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_precision": torch.get_float32_matmul_precision(),
        }
    return record


def cifar_test_batches(
    data_dir: Path, num_examples: int, batch_size: int, device: torch.device, seed: int = 0
) -> tuple[list[tuple[Tensor, Tensor]], str]:
    """The CIFAR-10 test images (normalized as the zoo's model expects) in batches on ``device``, or, when the
    files are not in ``data_dir``, as many seeded random CIFAR-shaped images; and a line saying which."""
    spec = model_spec(MODEL)
    try:
        dataset = load_dataset(
            "cifar10", data_dir=data_dir, train=False, num_examples=num_examples, mean=spec.mean, std=spec.std
        )
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        source = f"CIFAR-10 test split from {data_dir} ({len(labels)} images)"
    except DatasetNotFoundError:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(num_examples, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (num_examples,), generator=generator)
        source = f"synthetic: CIFAR-10 not found in {data_dir}; {num_examples} seeded random images"
    images, labels = images.to(device), labels.to(device)
    batches = [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]
    return batches, source


def dataset_gradient(model: nn.Module, loss_fn: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """One gradient of the dataset mean loss, plain autograd, batch by batch: the reference cost."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in batches)
    result = None
    for x, y in batches:
        g = torch.autograd.grad(loss_fn(model(x), y) * (len(y) / total), params)
        result = list(g) if result is None else [a + b for a, b in zip(result, g)]
    return result


def check_top(model: nn.Module, batches: list, k: int, device: torch.device) -> dict:
    """A fresh operator's top-``k`` eigenvalues in magnitude, construction included."""
    now = timer(device)
    began = now()
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), batches)
    built = now() - began
    spectrum = hessops.eigs(H, k, "LM", tol=1e-2, progress=True)
    seconds = now() - began
    return {
        "seconds": seconds,
        "construction seconds": built,
        "target seconds": TARGET_TOP_SECONDS,
        "target met": seconds <= TARGET_TOP_SECONDS,
        "hvps": spectrum.n_matvecs,
        "lanczos steps": spectrum.steps,
        "eigenvalues": spectrum.values.tolist(),
        "error bounds": spectrum.error_bounds.tolist(),
        "residuals": spectrum.residuals.tolist(),
        "converged": spectrum.converged,
        "hvp tuning": {kind: t.to_dict() for kind, t in H.hvp_tuning.items()},
    }


def check_products(model: nn.Module, batches: list, repeats: int, device: torch.device) -> tuple[dict, Tensor, Tensor]:
    """Interleaved medians of a dataset gradient and hessops' HVP, their ratio and peak memory; also returns
    the vector and hessops' product, which the compiled section is checked against."""
    now = timer(device)
    loss_fn = nn.CrossEntropyLoss()
    H = hessops.Hessian(model, loss_fn, batches, hvp_mode="autograd")
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1)).to(device=device, dtype=H.dtype)
    methods = {"grad": lambda: dataset_gradient(model, loss_fn, batches), "hessops hvp": lambda: H @ v}
    first = {}
    for name, f in methods.items():
        start = now()
        f()
        first[name] = now() - start
    medians = {name: statistics.median(t) for name, t in interleaved_times(methods, repeats, now).items()}
    peaks = {name: peak_bytes(f, device) for name, f in methods.items()}
    report = {
        "first call seconds": first,
        "seconds": medians,
        "hvp / grad": medians["hessops hvp"] / medians["grad"],
        "peak bytes": peaks,
        "hvp / grad memory": peaks["hessops hvp"] / peaks["grad"],
    }
    return report, v, H @ v


def check_compiled(
    model: nn.Module, batches: list, v: Tensor, reference: Tensor, repeats: int, device: torch.device
) -> dict:
    """``torch.compile`` of a per-batch gradient and of a per-batch forward-over-reverse HVP: compile time,
    medians, ratio, memory, and the HVP's agreement with hessops' product."""
    now = timer(device)
    loss_fn = nn.CrossEntropyLoss()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    sizes = [p.numel() for p in params.values()]
    tangents = {name: t.view_as(p) for (name, p), t in zip(params.items(), v.split(sizes))}
    total = sum(len(y) for _, y in batches)

    def batch_loss(p: dict, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**p, **buffers}, (x,)), y)

    def batch_grad(p: dict, x: Tensor, y: Tensor) -> dict:
        return grad(batch_loss)(p, x, y)

    def batch_hvp(p: dict, t: dict, x: Tensor, y: Tensor) -> dict:
        return jvp(lambda q: grad(batch_loss)(q, x, y), (p,), (t,))[1]

    compiled_grad, compiled_hvp = torch.compile(batch_grad), torch.compile(batch_hvp)

    def dataset_mean(per_batch: Callable[[Tensor, Tensor], dict]) -> Tensor:
        result = None
        for x, y in batches:
            parts = per_batch(x, y)
            flat = torch.cat([parts[name].reshape(-1) for name in params]) * (len(y) / total)
            result = flat if result is None else result + flat
        return result

    H = hessops.Hessian(model, loss_fn, batches, hvp_mode="compiled")  # hessops' own, checked on its first batch
    methods = {
        "compiled grad": lambda: dataset_mean(lambda x, y: compiled_grad(params, x, y)),
        "compiled hvp": lambda: dataset_mean(lambda x, y: compiled_hvp(params, tangents, x, y)),
        "hessops compiled hvp": lambda: H @ v,
    }
    compile_seconds = {}
    for name, f in methods.items():  # the first call compiles
        start = now()
        f()
        compile_seconds[name] = now() - start
    difference = max(float(norm(methods[name]() - reference) / norm(reference)) for name in methods if "hvp" in name)
    report: dict = {"compile + first call seconds": compile_seconds, "hvp rel. diff from hessops": difference}
    if not difference <= AGREEMENT:
        report["error"] = f"the compiled HVP disagrees with hessops' by {difference:.2e} (> {AGREEMENT:g}): not timed"
        return report
    medians = {name: statistics.median(t) for name, t in interleaved_times(methods, repeats, now).items()}
    report |= {
        "seconds": medians,
        "hvp / grad": medians["compiled hvp"] / medians["compiled grad"],
        "hessops compiled hvp / grad": medians["hessops compiled hvp"] / medians["compiled grad"],
    }
    if device.type != "cuda":  # the CPU's tensor counter is a dispatch mode, which compiled code escapes
        report["peak bytes"] = "not counted on the CPU (benchmarks/memory.py's counter cannot see compiled code)"
        return report
    peaks = {name: peak_bytes(f, device) for name, f in methods.items()}
    return report | {
        "peak bytes": peaks,
        "hvp / grad memory": peaks["compiled hvp"] / peaks["compiled grad"],
        "hessops compiled hvp / grad memory": peaks["hessops compiled hvp"] / peaks["compiled grad"],
    }


def peer_batches(batches: list, count: int) -> list:
    """The first ``count`` examples of ``batches``, in the same batches (the last one cut)."""
    out, left = [], count
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(y)
    return out


def check_blocks(model: nn.Module, batches: list, k: int, device: torch.device) -> dict:
    """Top-``k`` by single-vector and block Lanczos (blocks of 4 and 8) on one warmed operator, in turn."""
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), batches)
    H @ torch.randn(H.shape[0], 8, device=device)  # the first-use checks and the tuning, before any timing
    rows = {f"block {b}": eigs_blocks.run_one(H, k, {"block_size": b}) for b in (1, 4, 8)}
    for row in rows.values():
        row["seconds over single"] = row["seconds"] / rows["block 1"]["seconds"]
    return rows


def check_peers(model: nn.Module, batches: list, ks: tuple[int, ...], device: torch.device, budget: float) -> dict:
    """Top-k by hessops (a fresh operator each time) against PyHessian run to the same accuracy."""
    w = Workload(MODEL, model, nn.CrossEntropyLoss(), batches)
    peer = PyHessianPeer(w)
    now = timer(device)
    rows = {}
    for k in sorted(set(ks)):
        start = now()
        H = hessops.Hessian(model, nn.CrossEntropyLoss(), batches)
        result = hessops.eigs(H, k, "LM", value_tol=1e-3)
        seconds = now() - start
        rows[f"top-{k}"] = {
            "hessops": {"seconds": seconds, "hvps": result.n_matvecs, "values": result.values.tolist()},
            **equal_accuracy_race(H, result, seconds, peer, 1e-3, now, budget_seconds=budget),
        }
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--checkpoint", type=Path, help=f"weights of the zoo's {MODEL} (random weights without)")
    parser.add_argument("--model", default=MODEL, help="a zoo model on CIFAR-shaped inputs (the check: the default)")
    parser.add_argument("--num-examples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-examples", type=int, default=2_000, help="the images of the race against PyHessian")
    parser.add_argument("--pyhessian-budget", type=float, default=60.0, help="seconds of each PyHessian sweep")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["top", "products", "compiled", "head", "blocks", "peers", "vit", "gpt", "tracking"],
    )
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device: checks the harness")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.num_examples, args.batch_size, args.k, args.repeats = "cnn-cifar-5k", 16, 8, 2, 1
        args.peer_examples, args.pyhessian_budget = 16, 1.0
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    model = model.to(device).eval()
    batches, source = cifar_test_batches(args.data_dir, args.num_examples, args.batch_size, device)
    report: dict = {
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(device),
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(args.checkpoint) if args.checkpoint else "random weights (seed 0)",
        "data": source,
        "batch size": args.batch_size,
    }

    def record(section: str, run: Callable[[], dict]) -> None:
        began = time.perf_counter()
        try:
            report[section] = run()
        except Exception as error:  # noqa: BLE001 - one failing section must not cost the others
            report[section] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        report[section]["section seconds"] = time.perf_counter() - began
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(json.dumps({section: {k: v for k, v in report[section].items() if k != "traceback"}}, default=str))

    if "top" in args.sections:
        record("top", lambda: check_top(model, batches, args.k, device))
    products = {}
    if "products" in args.sections or "compiled" in args.sections:

        def run_products() -> dict:
            result, products["v"], products["reference"] = check_products(model, batches, args.repeats, device)
            return result

        record("products", run_products)
    if "compiled" in args.sections and "v" in products:
        record(
            "compiled",
            lambda: check_compiled(model, batches, products["v"], products["reference"], args.repeats, device),
        )
    if "head" in args.sections:
        sizes = (
            ["--smoke", "--tokens", "16"]
            if args.smoke
            else ["--size", "gpt2-small", "--sequences", "8", "--tokens", "256"]
        )
        record("head", lambda: softmax_head.main([*sizes, "--device", str(device), "--repeats", str(args.repeats)]))
    if "blocks" in args.sections:
        record("blocks", lambda: check_blocks(model, batches, args.k, device))
    if "peers" in args.sections:
        subset = peer_batches(batches, args.peer_examples)
        record("peers", lambda: check_peers(model, subset, (2, args.k), device, args.pyhessian_budget))
    common = ["--device", str(device), "--repeats", str(args.repeats), "--peers", "pyhessian"]
    race = ["--top", "2", "--equal-accuracy", "--pyhessian-budget", str(args.pyhessian_budget)]
    if "vit" in args.sections:
        sizes = ["--smoke"] if args.smoke else ["--num-examples", "256", "--batch-size", "128"]
        record("vit", lambda: transformers.main(["--workloads", "vit-tiny", *sizes, *common, *race]))
    if "gpt" in args.sections:
        sizes = ["--smoke"] if args.smoke else ["--num-examples", "8", "--batch-size", "8", "--seq-len", "128"]
        record("gpt", lambda: transformers.main(["--workloads", "gpt2-small", *sizes, *common, *race]))
    if "tracking" in args.sections:
        small = ["--models", "mlp-digits", "--train", "100", "--subset", "20"]
        sizes = small if args.smoke else ["--data", "random", "--train", "20000", "--subset", "200"]
        record("tracking", lambda: {"rows": tracking.main([*sizes, "--epochs", "2", "--device", str(device)])})
    return report


if __name__ == "__main__":
    main()
