"""A run killed mid-way and resumed, against the same run uninterrupted: total time and agreement.

    python -m benchmarks.resume --out benchmarks/results/resume.json
    python -m benchmarks.resume --smoke                                   # the harness, at toy sizes

The run is ``hessops.spectral_density`` of the zoo's CIFAR ResNet-18 (random weights, seeded) on 16 seeded
random CIFAR-shaped images, 2 probes × 12 Lanczos steps, basis in memory, in a subprocess (``--child``). First
uninterrupted; then with ``checkpoint=`` (saved every ``--every`` seconds), killed with SIGKILL (no chance to
save: what a preempted job gets) at ``--kill-at`` of the uninterrupted time, and started again with the same
checkpoint until it finishes. Reported: each process's wall time (imports and construction included), the
total over the uninterrupted, and whether the densities are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def child(checkpoint: str | None, every: float, smoke: bool, out: str) -> None:
    """The measured run, in this process; writes its quadrature to ``out``."""
    import hessops
    from hessops.zoo.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn-cifar-5k" if smoke else "resnet18_cifar10").eval()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode="autograd")
    result = hessops.spectral_density(
        H, num_probes=2, lanczos_steps=6 if smoke else 12, checkpoint=checkpoint, checkpoint_every=every
    )
    torch.save({"nodes": result.quadrature.nodes, "weights": result.quadrature.weights}, out)


def run(args: list[str], kill_after: float | None = None) -> tuple[float, bool]:
    """Wall time of one child process, and whether it was killed (SIGKILL after ``kill_after`` seconds)."""
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.resume", "--child", *args])
    try:
        process.wait(timeout=kill_after)
        killed = False
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed = True
    return time.perf_counter() - began, killed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between checkpoint saves")
    parser.add_argument("--kill-at", type=float, default=0.5, help="when to kill, as a fraction of the plain run")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.child:
        child(args.checkpoint, args.every, args.smoke, args.result)
        return {}
    folder = Path(tempfile.mkdtemp(prefix="hessops-resume-"))
    common = ["--every", str(args.every)] + (["--smoke"] if args.smoke else [])
    plain, _ = run([*common, "--result", str(folder / "plain.pt")])
    checkpoint = folder / "run.ckpt"
    attempts = []
    while True:
        seconds, killed = run(
            [*common, "--checkpoint", str(checkpoint), "--result", str(folder / "resumed.pt")],
            kill_after=args.kill_at * plain if not attempts else None,
        )
        attempts.append({"seconds": seconds, "killed": killed, "checkpoint existed": checkpoint.exists()})
        if not killed:
            break
    a, b = (torch.load(folder / name, weights_only=True) for name in ("plain.pt", "resumed.pt"))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "checkpoint every seconds": args.every,
        "kill at fraction": args.kill_at,
        "uninterrupted seconds": plain,
        "attempts": attempts,
        "killed and resumed seconds": sum(x["seconds"] for x in attempts),
        "total / uninterrupted": sum(x["seconds"] for x in attempts) / plain,
        "bit-identical": bool(torch.equal(a["nodes"], b["nodes"]) and torch.equal(a["weights"], b["weights"])),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
