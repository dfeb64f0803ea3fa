"""The peers, each behind the same small interface: a Hessian-vector product over the dataset, top-k
eigenvalues, and a trace. Each counts its Hessian-vector products."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
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


class OutOfBudget(Exception):
    """A peer's run stopped at its time budget (benchmarks only)."""


class PyHessianPeer:
    """PyHessian 0.1 (Yao et al. 2020): double-backward HVPs over the dataloader, power iteration with
    deflation for the top-k, Hutchinson for the trace."""

    def __init__(self, w: Workload):
        from pyhessian import hessian

        self.w = w
        self.h = hessian(w.model, w.loss_fn, dataloader=w.data, cuda=w.data[0][0].is_cuda)
        self.h.device = str(w.data[0][0].device)
        self.hvps = 0
        self.deadline: float | None = None  # time.perf_counter() past which a product raises OutOfBudget
        original = self.h.dataloader_hv_product

        def counted(v):
            if self.deadline is not None and time.perf_counter() > self.deadline:
                raise OutOfBudget
            self.hvps += 1
            return original(v)

        self.h.dataloader_hv_product = counted

    def hvp(self, v: list[torch.Tensor]):
        return self.h.dataloader_hv_product(v)[1]

    def top(self, k: int, tol: float = 1e-3, max_iter: int = 100) -> list[float]:
        """PyHessian's deflated power iteration: the ``k`` largest eigenvalues in magnitude, each iterated until
        its relative change is below ``tol`` or ``max_iter`` products (its defaults: 1e-3, 100)."""
        values, _ = self.h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        return sorted(values, reverse=True)

    def trace(self, rel_tol: float = 1e-2) -> tuple[float, float]:
        samples = self.h.trace(maxIter=1000, tol=rel_tol)
        mean = sum(samples) / len(samples)
        var = sum((s - mean) ** 2 for s in samples) / max(len(samples) - 1, 1)
        return mean, math.sqrt(var / len(samples))


# PyHessian's tolerances tried in turn, with the iteration cap a user tightening the tolerance would raise too
PYHESSIAN_SWEEP: tuple[tuple[float, int], ...] = ((1e-3, 100), (1e-4, 1000), (1e-5, 1000), (1e-6, 1000))


def by_magnitude(values: list[float], bounds: list[float]) -> list[tuple[float, float]]:
    """``(value, bound)`` pairs ranked by ``|value|``, largest first: how top-k answers are matched rank by rank."""
    return sorted(zip(values, bounds), key=lambda t: abs(t[0]), reverse=True)


def certified_errors(theirs: list[float], reference: list[float], bounds: list[float]) -> list[float]:
    """How far each of a method's top-k (largest magnitude) values can be from the truth, by a verified
    reference: its distance from the reference value of the same rank plus that value's bound ``|λ − λ_ref| ≤ b``."""
    ranked = sorted(theirs, key=abs, reverse=True)
    return [abs(mu - value) + bound for mu, (value, bound) in zip(ranked, by_magnitude(reference, bounds))]


def pyhessian_to_accuracy(
    peer: PyHessianPeer,
    reference: list[float],
    bounds: list[float],
    accuracy: float,
    now: Callable[[], float],
    sweep: tuple[tuple[float, int], ...] = PYHESSIAN_SWEEP,
    budget_seconds: float | None = None,
) -> dict:
    """PyHessian run until its values are as accurate as hessops' (the fair race: the same answer).

    hessops' ``eigs(..., value_tol=τ)`` promises each value within ``accuracy = τ·max|θ|`` of the truth. PyHessian
    has no such promise, so its top-k is run from scratch at each ``(tol, maxIter)`` of ``sweep`` in turn, and
    stops at the first run whose values are within ``accuracy`` of the truth as a tight, verified ``reference``
    (hessops' eigs at a far smaller tolerance, with error ``bounds``) certifies it (:func:`certified_errors`).
    Reported: every attempt, and the first agreeing one's seconds and products (a user who knew that tolerance
    beforehand) and the sweep's total (one who did not); ``agreed`` is ``None`` when no run of the sweep agreed,
    or when the sweep reached ``budget_seconds`` before one did (a run still going then is stopped at its next
    product, and recorded with what it cost and no values)."""
    attempts = []
    for tol, max_iter in sweep:
        spent = sum(a["seconds"] for a in attempts)
        peer.hvps = 0
        peer.deadline = None if budget_seconds is None else time.perf_counter() + budget_seconds - spent
        start = now()
        try:
            values = peer.top(len(reference), tol=tol, max_iter=max_iter)
        except OutOfBudget:  # stopped mid-run: what it had cost, and no values
            values = None
        finally:
            peer.deadline = None
        attempt = {"tol": tol, "maxIter": max_iter, "seconds": now() - start, "hvps": peer.hvps, "values": values}
        if values is None:
            attempt |= {"stopped at the budget": True, "agrees": False}
        else:
            error = max(certified_errors(values, reference, bounds))
            attempt |= {"max certified error": error, "agrees": error <= accuracy}
        attempts.append(attempt)
        print(json.dumps({"pyhessian attempt": attempt}), file=sys.stderr, flush=True)
        if values is None or attempt["agrees"]:
            break
        if budget_seconds is not None and sum(a["seconds"] for a in attempts) >= budget_seconds:
            break
    agreed = attempts[-1] if attempts[-1]["agrees"] else None
    return {
        "accuracy": accuracy,
        "attempts": attempts,
        "agreed": agreed,
        "sweep seconds": sum(a["seconds"] for a in attempts),
        "sweep hvps": sum(a["hvps"] for a in attempts),
        "budget seconds": budget_seconds,
    }


def add_race_arguments(parser) -> None:
    """``--equal-accuracy`` and ``--pyhessian-budget``, the options of :func:`equal_accuracy_race`, on an argparse
    parser."""
    parser.add_argument(
        "--equal-accuracy",
        action="store_true",
        help="rerun PyHessian at tighter tolerances until its values are as accurate as hessops'",
    )
    parser.add_argument(
        "--pyhessian-budget", type=float, help="with --equal-accuracy: stop PyHessian's sweep after this many seconds"
    )


def equal_accuracy_race(
    H,
    result,
    seconds: float,
    peer: PyHessianPeer,
    value_tol: float,
    now: Callable[[], float],
    which: str = "LM",
    budget_seconds: float | None = None,
) -> dict:
    """hessops' top-k ``result`` (``eigs(H, k, which, value_tol=value_tol)``, which took ``seconds``) against
    PyHessian run to the same accuracy (:func:`pyhessian_to_accuracy`). The truth both are held to is ``eigs``
    at tol 1e-7 from hessops' vectors, not timed; hessops' own values are checked against it too."""
    import hessops

    k = len(result.values)
    with warnings.catch_warnings():  # float32 products stop short of 1e-7: the bounds say how short
        warnings.simplefilter("ignore", RuntimeWarning)
        tight = hessops.eigs(H, k, which, tol=1e-7, start=result.vectors.sum(1))
    reference, reference_bounds = tight.values.tolist(), tight.error_bounds.tolist()
    ours = by_magnitude(result.values.tolist(), result.error_bounds.tolist())
    truth = by_magnitude(reference, reference_bounds)
    accuracy = value_tol * float(result.values.abs().max())
    summary = {"seconds": seconds, "hvps": result.n_matvecs, "values": result.values.tolist(), "reference": reference}
    print(json.dumps({"hessops": summary}), file=sys.stderr, flush=True)
    race = pyhessian_to_accuracy(peer, reference, reference_bounds, accuracy, now, budget_seconds=budget_seconds)
    out = {
        "reference": {"values": reference, "error_bounds": reference_bounds, "hvps": tight.n_matvecs},
        "hessops max certified error": max(certified_errors(result.values.tolist(), reference, reference_bounds)),
        "hessops within its bounds": all(abs(v - r) <= b + rb for (v, b), (r, rb) in zip(ours, truth)),
        "pyhessian to equal accuracy": race,
        "pyhessian sweep / hessops time": race["sweep seconds"] / seconds,
    }
    if race["agreed"] is not None:
        out["pyhessian / hessops time, equal accuracy"] = race["agreed"]["seconds"] / seconds
    return out


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
