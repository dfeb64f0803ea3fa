"""Peak memory of one dataset HVP against one dataset gradient, at the same batch size.

    python -m benchmarks.memory --workloads mlp cnn resnet18 --num-examples 64 --batch-size 64
    python -m benchmarks.memory --workloads resnet18 --micro-batch-sizes 32 16

On the CPU the peak is of the tensor memory the computation allocates, counted exactly: every tensor an
operator creates is recorded (a ``TorchDispatchMode``) until its storage is freed, the same quantity that
``torch.cuda.max_memory_allocated`` reports on a GPU (where that is used instead). Tensors that exist before
(the model, the data, the vector) are not counted, for the gradient and the HVP alike. Deterministic: one
run of each suffices, in one process.
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hessops
from benchmarks.peers import dataset_gradient
from benchmarks.workloads import make_workload


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active (views and in-place
    results share their base's storage and are not counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._record(t.untyped_storage())
        return out

    def _record(self, storage: torch.UntypedStorage) -> None:
        address, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or address in self.live:
            return
        self.live[address] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, address)

    def _free(self, address: int) -> None:
        self.current -= self.live.pop(address, 0)


def peak_bytes(work: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``work()`` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with TensorMemory() as tracker:
        work()
    return tracker.peak


def measure(
    name: str, *, num_examples: int, batch_size: int, hvp_mode: str, micro_batch_sizes: list[int], device: torch.device
) -> dict:
    """Peaks of a gradient, an HVP over whole batches, and an HVP over each micro-batch size (MiB)."""
    w = make_workload(name, num_examples=num_examples, batch_size=batch_size, device=device, dtype=torch.float32)
    v = torch.randn(w.n_params, generator=torch.Generator().manual_seed(0)).to(device)
    out = {"grad": peak_bytes(lambda: dataset_gradient(w), device) / 2**20}
    for micro in [None, *micro_batch_sizes]:
        H = hessops.Hessian(w.model, w.loss_fn, w.data, hvp_mode=hvp_mode, micro_batch_size=micro)
        out[f"hvp micro {micro}" if micro else "hvp"] = peak_bytes(lambda: H @ v, device) / 2**20
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--micro-batch-sizes", type=int, nargs="*", default=[], help="also measure HVPs over pieces of these sizes"
    )
    parser.add_argument(
        "--hvp-mode", default="autograd", help="the Hessian's hvp_mode (not auto: it would time them all)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    print("| workload | batch | hvp_mode | micro-batch | grad peak (MiB) | hvp peak (MiB) | hvp / grad |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in args.workloads:
        r = results[name] = measure(
            name,
            num_examples=args.num_examples,
            batch_size=args.batch_size,
            hvp_mode=args.hvp_mode,
            micro_batch_sizes=args.micro_batch_sizes,
            device=device,
        )
        for key, hvp in r.items():
            if key != "grad":
                micro = key.split()[-1] if "micro" in key else "—"
                print(
                    f"| {name} | {args.batch_size} | {args.hvp_mode} | {micro} | {r['grad']:.1f} | {hvp:.1f} | {hvp / r['grad']:.2f} |",
                    flush=True,
                )
    return results


if __name__ == "__main__":
    main()
