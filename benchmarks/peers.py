"""The peers, each behind the same small interface: a Hessian-vector product over the dataset, top-k
eigenvalues, and a trace. Each counts its Hessian-vector products."""

from __future__ import annotations

import math
from collections.abc import Callable

import cola
import torch
from torch.func import functional_call

from benchmarks.workloads import Workload


def dataset_gradient(w: Workload) -> list[torch.Tensor]:
    """The reference cost: one gradient of the dataset mean loss, plain autograd, batch by batch."""
    params = list(w.model.parameters())
    total = None
    N = w.num_examples
    for x, y in w.data:
        g = torch.autograd.grad(w.loss_fn(w.model(x), y) * (len(y) / N), params)
        total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    return total


class PyHessianPeer:
    """PyHessian 0.1 (Yao et al. 2020): double-backward HVPs over the dataloader, power iteration with
    deflation for the top-k, Hutchinson for the trace."""

    def __init__(self, w: Workload):
        from pyhessian import hessian

        self.w = w
        self.h = hessian(w.model, w.loss_fn, dataloader=w.data, cuda=w.data[0][0].is_cuda)
        self.h.device = str(w.data[0][0].device)
        self.hvps = 0
        original = self.h.dataloader_hv_product

        def counted(v):
            self.hvps += 1
            return original(v)

        self.h.dataloader_hv_product = counted

    def hvp(self, v: list[torch.Tensor]):
        return self.h.dataloader_hv_product(v)[1]

    def top(self, k: int) -> list[float]:
        values, _ = self.h.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
        return sorted(values, reverse=True)

    def trace(self, rel_tol: float = 1e-2) -> tuple[float, float]:
        samples = self.h.trace(maxIter=1000, tol=rel_tol)
        mean = sum(samples) / len(samples)
        var = sum((s - mean) ** 2 for s in samples) / max(len(samples) - 1, 1)
        return mean, math.sqrt(var / len(samples))


class CurvlinopsPeer:
    """curvlinops 3 (Dangel et al.): HessianLinearOperator, vmapped torch.func HVPs."""

    def __init__(self, w: Workload):
        from curvlinops import HessianLinearOperator

        params = [p for p in w.model.parameters() if p.requires_grad]
        self.op = HessianLinearOperator(
            w.model, w.loss_fn, params, w.data, check_deterministic=False, num_data=w.num_examples
        )

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op @ V


class ColaPerBatch(cola.ops.LinearOperator):
    """CoLA's own ``cola.ops.Hessian`` built for each batch and averaged with weights n_b/N, the way CoLA's
    documentation computes a ResNet-18 spectrum."""

    def __init__(self, w: Workload):
        params = [p for p in w.model.parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        super().__init__(dtype=theta.dtype, shape=(theta.numel(), theta.numel()))
        self.spec = _ColaSpec(w, [n for n, _ in w.model.named_parameters()], [p.shape for p in params], theta)
        self.device = theta.device

    def _matmat(self, X):
        spec = self.spec
        spec.hvps += X.shape[1]
        out = torch.zeros_like(X)
        for x, y in spec.w.data:

            def loss(flat, x=x, y=y):
                parts = flat.split([s.numel() for s in spec.shapes])
                state = {n: t.reshape(s) for n, t, s in zip(spec.names, parts, spec.shapes)}
                return spec.w.loss_fn(functional_call(spec.w.model, state, (x,)), y)

            out += (len(y) / spec.w.num_examples) * (cola.ops.Hessian(loss, spec.theta) @ X)
        return out


class _ColaSpec:
    def __init__(self, w, names, shapes, theta):
        self.w, self.names, self.shapes, self.theta, self.hvps = w, names, shapes, theta, 0


def cola_top(op: ColaPerBatch, k: int, steps: int) -> list[float]:
    """``cola.eig`` with its Lanczos for ``steps`` steps (CoLA's tol stops only at an invariant subspace)."""
    values, _ = cola.eig(cola.SelfAdjoint(op), k, which="LM", alg=cola.Lanczos(max_iters=steps, tol=1e-7, key=0))
    return sorted(values.real.tolist(), reverse=True)


def interleaved_times(methods: dict[str, Callable[[], object]], repeats: int, now: Callable[[], float]) -> dict:
    """``{name: [seconds of each round]}``: ``repeats`` rounds in which the methods take turns, so that a
    change in the machine's speed falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, f in methods.items():
            start = now()
            f()
            times[name].append(now() - start)
    return times


def timer(device: torch.device) -> Callable[[], float]:
    """A clock that waits for the device's queued work first."""
    import time

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now
