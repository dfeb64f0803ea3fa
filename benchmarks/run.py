"""hessops against its peers, side by side in one process on the same model, data and device.

    python -m benchmarks.run                                  # CPU workloads, prints the table
    python -m benchmarks.run --workloads resnet18 --num-examples 64 --batch-size 64 --device cuda
    python -m benchmarks.run --smoke                          # seconds: checks the harness (CI)

The headline (``--headline``, on by default) is what a user waits for: a fresh process that builds the
operator and computes ``eigs(H, k=2, which="LA", value_tol=1e-3)`` with defaults, construction and the
formulation tuner included (its cost on a line of its own), then PyHessian's top-2 in the same process.

Timings are medians over ``--repeats`` rounds in which the methods take turns (interleaved). Ratios:
``hvp/grad`` is one dataset HVP over one dataset gradient; ``block8/8×hvp`` one product with 8 columns over
8 single products. Eigenvalues and traces are compared with a reference (hessops' eigs at a tight tolerance)
to show that faster is not less accurate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

PROCESS_START = time.perf_counter()  # before torch and hessops are imported: a fresh process's own set-up

import torch

import hessops
from benchmarks.memory import peak_bytes
from benchmarks.peers import (
    ColaPerBatch,
    CurvlinopsPeer,
    PyHessianPeer,
    add_race_arguments,
    cola_top,
    dataset_gradient,
    equal_accuracy_race,
    interleaved_times,
    timer,
)
from benchmarks.workloads import make_workload
from hessops.numerics import norm


def _median(times: list[float]) -> float:
    return statistics.median(times) if times else float("nan")


def bench_products(w, device, repeats: int, peers: dict, micro_batch_size: int | None = None) -> dict:
    """Interleaved medians of: dataset gradient, one HVP per method, a block of 8 per method (and hessops'
    HVP over micro-batches of ``micro_batch_size``, the memory-bounded product)."""
    now = timer(device)
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    n = H.shape[0]
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(n, generator=generator, dtype=H.dtype).to(device)
    V8 = torch.randn(n, 8, generator=generator, dtype=H.dtype).to(device)
    shapes = [p.shape for p in w.model.parameters()]
    v_list = [t.reshape(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes)]
    methods = {
        "grad": lambda: dataset_gradient(w),
        "hessops hvp": lambda: H @ v,
        "hessops block8": lambda: H @ V8,
    }
    if micro_batch_size:
        H_micro = hessops.Hessian(w.model, w.loss_fn, w.data, micro_batch_size=micro_batch_size)
        methods[f"hessops micro{micro_batch_size} hvp"] = lambda: H_micro @ v
    if "pyhessian" in peers:
        methods["pyhessian hvp"] = lambda: peers["pyhessian"].hvp(v_list)
    if "curvlinops" in peers:
        methods["curvlinops hvp"] = lambda: peers["curvlinops"].matmat(v[:, None])
        methods["curvlinops block8"] = lambda: peers["curvlinops"].matmat(V8)
    if "cola" in peers:
        methods["cola-per-batch hvp"] = lambda: peers["cola"] @ v
    for f in methods.values():  # warm-up: first-call costs are not what we compare
        f()
    times = interleaved_times(methods, repeats, now)
    medians = {k: _median(t) for k, t in times.items()}
    grad = medians["grad"]
    ratios = {f"{k} / grad": medians[k] / grad for k in medians if k.endswith("hvp")}
    ratios["hessops block8 / 8×hvp"] = medians["hessops block8"] / (8 * medians["hessops hvp"])
    if "curvlinops block8" in medians:
        ratios["curvlinops block8 / 8×hvp"] = medians["curvlinops block8"] / (8 * medians["curvlinops hvp"])
    agreement = {}
    reference = H @ v
    if "curvlinops" in peers:
        agreement["curvlinops hvp rel. diff"] = float(
            norm(peers["curvlinops"].matmat(v[:, None])[:, 0] - reference) / norm(reference)
        )
    if "pyhessian" in peers:
        ph = torch.cat([t.reshape(-1) for t in peers["pyhessian"].hvp(v_list)]).to(reference)
        agreement["pyhessian hvp rel. diff"] = float(norm(ph - reference) / norm(reference))
    return {"seconds": medians, "ratios": ratios, "agreement": agreement}


def bench_memory(w, device) -> dict:
    """Peak memory of one HVP against one gradient (CUDA: allocator peaks; on the CPU, benchmarks/memory.py
    counts tensor storages, which is slower, so it is a script of its own)."""
    if device.type != "cuda":
        return {}
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    v = torch.randn(H.shape[0], device=device, dtype=H.dtype)
    peaks = {
        name: peak_bytes(f, device)
        for name, f in (("grad", lambda: dataset_gradient(w)), ("hessops hvp", lambda: H @ v))
    }
    return {"peak_bytes": peaks, "hvp / grad": peaks["hessops hvp"] / peaks["grad"]}


def bench_top(w, device, k: int, peers: dict, cola_steps: int, value_tol: float | None = None) -> dict:
    """Wall time and HVPs to the top-k eigenvalues. PyHessian's deflated power iteration (tol 1e-3) finds
    the k largest in *magnitude*, so it is compared with hessops.eigs(which="LM"); CoLA's Lanczos
    (`cola_steps` steps, no convergence test) returns the largest *algebraic*, compared with which="LA".
    hessops runs at residual tol 1e-4, or, with ``value_tol``, stops on eigenvalue error bounds and skips the
    residual product (eigenvalues only, as the peers return); errors are against hessops.eigs at tol 1e-7
    with the same `which`."""
    now = timer(device)
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    H @ torch.randn(H.shape[0], dtype=H.dtype, device=device)  # tune the single-vector formulation first
    out: dict = {}
    references = {}
    criterion = {"tol": 1e-4} if value_tol is None else {"value_tol": value_tol, "verify": False}
    for which in ("LA", "LM"):
        start = now()
        ours = hessops.eigs(H, k, which, **criterion)
        out[f"hessops {which}"] = {
            "seconds": now() - start,
            "hvps": ours.n_matvecs,
            "values": ours.values.tolist(),
            "which": which,
            "criterion": criterion,
            "error_bounds": ours.error_bounds.tolist(),
        }
        references[which] = hessops.eigs(H, k, which, tol=1e-7, start=ours.vectors.sum(1)).values.double().cpu()
    if "pyhessian" in peers:
        peer = peers["pyhessian"]
        peer.hvps = 0
        start = now()
        values = peer.top(k)
        out["pyhessian"] = {"seconds": now() - start, "hvps": peer.hvps, "values": values, "which": "LM"}
    if "cola" in peers:
        peers["cola"].spec.hvps = 0
        start = now()
        values = cola_top(peers["cola"], k, cola_steps)
        out["cola-per-batch"] = {
            "seconds": now() - start,
            "hvps": peers["cola"].spec.hvps,
            "values": values,
            "which": "LA",
        }
    for result in out.values():
        reference = references[result["which"]]
        got = torch.tensor(result["values"], dtype=torch.float64)
        order = (
            torch.argsort(got.abs(), descending=True)
            if result["which"] == "LM"
            else torch.argsort(got, descending=True)
        )
        ref_order = (
            torch.argsort(reference.abs(), descending=True)
            if result["which"] == "LM"
            else torch.argsort(reference, descending=True)
        )
        result["max rel. error"] = float((got[order] - reference[ref_order]).abs().max() / reference.abs().max())
    out["reference LA"], out["reference LM"] = references["LA"].tolist(), references["LM"].tolist()
    if "pyhessian" in out:
        out["pyhessian / hessops LM time"] = out["pyhessian"]["seconds"] / out["hessops LM"]["seconds"]
    if "cola-per-batch" in out:
        out["cola-per-batch / hessops LA time"] = out["cola-per-batch"]["seconds"] / out["hessops LA"]["seconds"]
    return out


def bench_trace(w, device, peers: dict, probes: int) -> dict:
    """Traces from the same number of products: hessops Hutch++ and Hutchinson, PyHessian's Hutchinson
    (forced to ``probes`` samples). Each reports its standard error and the time it would take to reach 1%
    standard error, projected by the 1/probes law of the variance: ``seconds · (std_error / 1%)²``."""
    now = timer(device)
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    H @ torch.randn(H.shape[0], probes, dtype=H.dtype, device=device)  # tune the block formulation first
    out = {}
    for method in ("hutch++", "hutchinson"):
        start = now()
        estimate = hessops.trace(H, probes=probes, method=method)
        out[f"hessops {method}"] = {
            "seconds": now() - start,
            "trace": estimate.estimate,
            "std_error": estimate.std_error,
            "probes": probes,
        }
    if "pyhessian" in peers:
        peers["pyhessian"].hvps = 0
        start = now()
        samples = peers["pyhessian"].h.trace(maxIter=probes, tol=0.0)
        mean = sum(samples) / len(samples)
        error = (sum((x - mean) ** 2 for x in samples) / (len(samples) - 1) / len(samples)) ** 0.5
        out["pyhessian"] = {"seconds": now() - start, "trace": mean, "std_error": error, "probes": len(samples)}
    for r in out.values():
        r["projected seconds to 1%"] = r["seconds"] * (r["std_error"] / (0.01 * abs(r["trace"]))) ** 2
    return out


def headline(args: argparse.Namespace, name: str) -> dict:
    """The headline of workload ``name``, measured in a fresh process (no warm caches but the disk's)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--headline-child",
        "--workloads",
        name,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--num-examples",
        str(args.num_examples),
        "--batch-size",
        str(args.batch_size),
        "--headline-k",
        str(args.headline_k),
        "--peers",
        *args.peers,
    ]
    if args.equal_accuracy:
        command.append("--equal-accuracy")
    if args.pyhessian_budget is not None:
        command += ["--pyhessian-budget", str(args.pyhessian_budget)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def headline_child(args: argparse.Namespace) -> dict:
    """In this (fresh) process: hessops' top-k (2) with defaults, construction included, then PyHessian's (with
    ``--equal-accuracy``: run to the same accuracy, the largest in magnitude on both sides)."""
    imported = time.perf_counter() - PROCESS_START  # importing torch, hessops (CoLA) and the peers
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    torch.set_num_threads(args.threads) if args.threads else None
    w = make_workload(
        args.workloads[0], num_examples=args.num_examples, batch_size=args.batch_size, device=device, dtype=dtype
    )
    now = timer(device)
    start = now()
    H = hessops.Hessian(w.model, w.loss_fn, w.data)
    built = now()
    k, which = args.headline_k, "LM" if args.equal_accuracy else "LA"
    result = hessops.eigs(H, k, which, value_tol=1e-3)
    out = {
        "import seconds": imported,
        "hessops": {
            "seconds": now() - start,
            "construction seconds": built - start,
            "hvps": result.n_matvecs,
            "values": result.values.tolist(),
            "error bounds": result.error_bounds.tolist(),
            "converged": result.converged,
            "check runs": result.checks,
            "tuning seconds": sum(t.seconds for t in H.hvp_tuning.values()),
            "tuning": {kind: t.to_dict() for kind, t in H.hvp_tuning.items()},
        },
    }
    if "pyhessian" in args.peers and args.equal_accuracy:
        out |= equal_accuracy_race(
            H, result, out["hessops"]["seconds"], PyHessianPeer(w), 1e-3, now, which, args.pyhessian_budget
        )
    elif "pyhessian" in args.peers:
        peer = PyHessianPeer(w)
        start = now()
        values = peer.top(2)
        out["pyhessian"] = {"seconds": now() - start, "hvps": peer.hvps, "values": values}
        out["pyhessian / hessops time"] = out["pyhessian"]["seconds"] / out["hessops"]["seconds"]
        ours = sorted(result.values.tolist(), reverse=True)
        out["max relative difference of the values"] = max(
            abs(a - b) / abs(a) for a, b in zip(ours, sorted(values, reverse=True))
        )
    # the multiplicity check's share: the same call without it, warm (after everything above)
    start = now()
    plain = hessops.eigs(H, k, which, value_tol=1e-3, check=False)
    out["hessops without the check, warm"] = {
        "seconds": now() - start,
        "hvps": plain.n_matvecs,
        "values": plain.values.tolist(),
    }
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    torch.set_num_threads(args.threads) if args.threads else None
    report = {
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "machine": _machine(device),
        "torch": torch.__version__,
        "hessops": hessops.__version__,
        "workloads": {},
    }
    for name in args.workloads:
        w = make_workload(name, num_examples=args.num_examples, batch_size=args.batch_size, device=device, dtype=dtype)
        peers = {}
        for peer in args.peers:
            try:
                peers[peer] = {"pyhessian": PyHessianPeer, "curvlinops": CurvlinopsPeer, "cola": ColaPerBatch}[peer](w)
            except ImportError as error:
                print(f"skipping {peer}: {error} (pip install -e '.[bench]')", file=sys.stderr)
        entry = {
            "n_params": w.n_params,
            "num_examples": w.num_examples,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
        }
        began = time.perf_counter()
        if args.headline:
            entry["headline"] = headline(args, name)
        entry["products"] = bench_products(w, device, args.repeats, peers, args.micro_batch_size)
        entry["memory"] = bench_memory(w, device)
        if args.top:
            entry["top"] = bench_top(w, device, args.top, peers, args.cola_steps, args.value_tol)
        if args.trace:
            entry["trace"] = bench_trace(w, device, peers, args.trace)
        entry["seconds"] = time.perf_counter() - began
        report["workloads"][name] = entry
        print(render_workload(name, entry), flush=True)
    return report


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {torch.get_num_threads()} CPU threads"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def render_headline(h: dict) -> list[str]:
    """The headline's rows (a fresh process's top-k, and PyHessian's beside it)."""
    lines = []
    k, which = len(h["hessops"]["values"]), "LM" if "pyhessian to equal accuracy" in h else "LA"
    lines.append(
        f"| **fresh process, top-{k} {which} (value_tol 1e-3), defaults: hessops s / HVPs** "
        f"| **{h['hessops']['seconds']:.2f} / {h['hessops']['hvps']}** |"
    )
    lines.append(f"| of which construction (s) | {h['hessops'].get('construction seconds', float('nan')):.2f} |")
    lines.append(f"| of which formulation tuning (s) | {h['hessops']['tuning seconds']:.2f} |")
    if "import seconds" in h:
        lines.append(f"| before both: importing torch, hessops and the peers (s) | {h['import seconds']:.2f} |")
    if "pyhessian" in h:
        lines.append(
            f"| same process: pyhessian top-{k} s / HVPs | {h['pyhessian']['seconds']:.2f} / {h['pyhessian']['hvps']} |"
        )
        lines.append(f"| **fresh process: pyhessian / hessops time** | **{h['pyhessian / hessops time']:.2f}** |")
    if "pyhessian to equal accuracy" in h:
        race = h["pyhessian to equal accuracy"]
        for a in race["attempts"]:
            error = "stopped at the budget" if a["values"] is None else f"{a['max certified error']:.3g}"
            lines.append(
                f"| same process: pyhessian top-{k} at tol {a['tol']:g}: s / HVPs / certified error "
                f"(accuracy {race['accuracy']:.3g}) | {a['seconds']:.2f} / {a['hvps']} / {error} |"
            )
        if race["agreed"] is not None:
            ratio = h["pyhessian / hessops time, equal accuracy"]
            lines.append(f"| **fresh process: pyhessian / hessops time, equal accuracy** | **{ratio:.2f}** |")
        lines.append(f"| pyhessian's whole sweep / hessops time | {h['pyhessian sweep / hessops time']:.2f} |")
    return lines


def render_workload(name: str, e: dict) -> str:
    """A markdown table of one workload's results."""
    lines = [
        f"### {name}: n = {e['n_params']:,} parameters, N = {e['num_examples']}, batch {e['batch_size']}, {e['dtype']}",
        "",
    ]
    lines += ["| measure | value |", "| --- | ---: |"]
    if "headline" in e:
        lines += render_headline(e["headline"])
    for k, v in e["products"]["seconds"].items():
        lines.append(f"| {k} (s, median) | {v:.4f} |")
    for k, v in e["products"]["ratios"].items():
        lines.append(f"| **{k}** | **{v:.2f}** |")
    for k, v in e["products"]["agreement"].items():
        lines.append(f"| {k} | {v:.1e} |")
    if e.get("memory"):
        lines.append(f"| peak memory hvp / grad | {e['memory']['hvp / grad']:.2f} |")
    if "top" in e:
        t = e["top"]
        k = len(t["reference LA"])
        for method in ("hessops LA", "cola-per-batch", "hessops LM", "pyhessian"):
            if method in t:
                r = t[method]
                lines.append(
                    f"| top-{k} ({r['which']}) {method}: s / HVPs / max rel. error | {r['seconds']:.2f} / {r['hvps']} / {r['max rel. error']:.1e} |"
                )
        for key in ("pyhessian / hessops LM time", "cola-per-batch / hessops LA time"):
            if key in t:
                lines.append(f"| **top-{k} {key}** | **{t[key]:.2f}** |")
        lines.append(f"| reference LA | {', '.join(f'{x:.5g}' for x in t['reference LA'])} |")
        lines.append(f"| reference LM | {', '.join(f'{x:.5g}' for x in t['reference LM'])} |")
    if "trace" in e:
        for method, r in e["trace"].items():
            lines.append(
                f"| trace {method}: s / HVPs / estimate ± s.e. / projected s to 1% | {r['seconds']:.2f} / {r['probes']} / "
                f"{r['trace']:.5g} ± {r['std_error']:.2g} / {r['projected seconds to 1%']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=("mlp", "cnn", "resnet18", "tiny"))
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=10, help="top-k eigenvalues to time (0: skip)")
    parser.add_argument("--cola-steps", type=int, default=80, help="CoLA Lanczos steps (it has no convergence test)")
    parser.add_argument(
        "--value-tol",
        type=float,
        help="hessops' top-k stops on eigenvalue error bounds at this relative accuracy (default: residual tol 1e-4)",
    )
    parser.add_argument("--micro-batch-size", type=int, help="also time hessops' HVP over micro-batches of this size")
    parser.add_argument(
        "--trace", type=int, default=0, metavar="PROBES", help="also compare traces from this many products (0: skip)"
    )
    parser.add_argument("--peers", nargs="*", default=["pyhessian", "curvlinops", "cola"])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--headline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time top-2 with defaults in a fresh process, tuning included (the headline)",
    )
    parser.add_argument("--headline-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--headline-k", type=int, default=2, help="the headline's top-k (default 2)")
    add_race_arguments(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the harness")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.headline_child:
        out = headline_child(args)
        print(json.dumps(out))
        return out
    if args.smoke:
        args.workloads, args.num_examples, args.batch_size, args.repeats, args.top, args.cola_steps = (
            ["tiny"],
            12,
            5,
            1,
            2,
            20,
        )
        args.trace, args.micro_batch_size, args.value_tol = 8, 2, 1e-4
    report = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
