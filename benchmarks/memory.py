"""Peak memory of one dataset HVP against one dataset gradient, on the CPU: each measured in a fresh process
(peak resident set size, ``ru_maxrss``, minus the resident size once the workload is built).

    python -m benchmarks.memory --workloads mlp cnn resnet18 --num-examples 64 --batch-size 64

(On CUDA, ``python -m benchmarks.run`` reports allocator peaks instead.)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource

import torch


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _measure(name: str, what: str, num_examples: int, batch_size: int, mode: str, queue) -> None:
    import hessops
    from benchmarks.peers import dataset_gradient
    from benchmarks.workloads import make_workload

    w = make_workload(name, num_examples=num_examples, batch_size=batch_size, device=torch.device("cpu"), dtype=torch.float32)
    H = hessops.Hessian(w.model, w.loss_fn, w.data, hvp_mode=mode)
    v = torch.randn(H.shape[0])
    base = _rss_kib()
    if what == "grad":
        dataset_gradient(w)
    else:
        H @ v
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)


def measure(name: str, what: str, num_examples: int, batch_size: int, mode: str = "autograd") -> int:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(name, what, num_examples, batch_size, mode, queue))
    process.start()
    peak = queue.get()
    process.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hvp-mode", default="autograd", help="the Hessian's hvp_mode (not auto: it would time them all)")
    args = parser.parse_args()
    print("| workload | grad peak (MiB) | hvp peak (MiB) | hvp / grad |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.workloads:
        grad, hvp = (measure(name, what, args.num_examples, args.batch_size, args.hvp_mode) / 1024 for what in ("grad", "hvp"))
        print(f"| {name} | {grad:.0f} | {hvp:.0f} | {hvp / grad:.2f} |", flush=True)


if __name__ == "__main__":
    main()
