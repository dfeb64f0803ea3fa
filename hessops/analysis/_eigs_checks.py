"""The deflated restart check of :func:`hessops.eigs` (:mod:`hessops.analysis.spectrum`): check runs on the
complement of the pairs found, until one finds nothing beyond the ``k``-th value, and how far the values they saw
reach (``_ordered``: the reported bounds widened to cover the order)."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from hessops._cola import cola
from hessops.analysis._eigs_runs import _distinct, _Found, _krylov, _select, _Settings
from hessops.linalg.block_lanczos import BlockState
from hessops.linalg.checkpoint import open_checkpoint, tensor_digest
from hessops.linalg.deflation import Complement
from hessops.linalg.lanczos import LanczosState
from hessops.numerics import column_norms

# a check run is long enough for a missing eigenvector whose start weight is this fraction of the typical 1/√n
CHECK_WEIGHT = 1e-3


def check_steps(n: int) -> int:
    r"""The fewest Lanczos steps of a check run on an ``n``-dimensional complement:
    :math:`\lceil \ln(\sqrt n / w) / \ln(3 + \sqrt 8) \rceil` with :math:`w` = :data:`CHECK_WEIGHT`, at least 2.

    A random start gives a missing eigenvector a weight about :math:`1/\sqrt n`, below :math:`w/\sqrt n` with
    probability about :math:`0.8\,w` (a standard normal within :math:`w` of 0). Lanczos multiplies that weight,
    relative to the rest, by the Chebyshev growth :math:`3 + \sqrt 8 \approx 5.83` a step (and more) once the
    eigenvalue lies beyond the rest of the complement's spectrum by at least that spectrum's width, so after these
    steps the missing eigenvector carries a weight of order one and its residual shows (Saad, *Numerical Methods
    for Large Eigenvalue Problems*, 2011, §6.6). 9 steps at 11M parameters, 6 at 100."""
    return max(2, math.ceil(math.log(math.sqrt(max(n, 2)) / CHECK_WEIGHT) / math.log(3 + math.sqrt(8))))


def _boundary(values: Tensor, settings: _Settings) -> tuple[float, float]:
    """``(upper, lower)``: a value lies beyond the ``k`` found when it is above ``upper`` or below ``lower`` (for
    ``"LM"``, its magnitude above ``upper``). With fewer than ``k`` found, every value lies beyond."""
    k, which, m = settings.k, settings.which, values.shape[0]
    if which in ("LA", "LM"):
        edge = values.abs() if which == "LM" else values
        return (float(edge.min()) if m >= k else -math.inf), -math.inf
    if which == "SA":
        return math.inf, (float(values.max()) if m >= k else math.inf)
    top, bottom = k - k // 2, k // 2
    upper = float(values[:top].min()) if m >= k else -math.inf
    lower = (float(values[top:].max()) if m >= k else math.inf) if bottom else -math.inf
    return upper, lower


def _outside(theta: Tensor, margin: Tensor, values: Tensor, settings: _Settings) -> Tensor:
    """Which ``theta`` lie beyond the found ``values`` (:func:`_boundary`) once moved outwards by ``margin``: with
    the residuals, the values whose interval reaches beyond; with minus their bounds, those surely beyond."""
    upper, lower = _boundary(values, settings)
    if settings.which == "LM":
        return theta.abs() + margin > upper
    return (theta + margin > upper) | (theta - margin < lower)


def _reach(theta: Tensor, bounds: Tensor, values: Tensor, settings: _Settings) -> tuple[float, float]:
    """``(upper, lower)``: the farthest that the intervals ``theta ± bounds`` of a check run's Ritz values reach
    beyond the found ``values`` (``"LM"``: ``|theta| + bounds`` above), ``(−inf, inf)`` where none does."""
    outside = _outside(theta, bounds, values, settings)
    if not bool(outside.any()):
        return -math.inf, math.inf
    theta, bounds = theta[outside], bounds[outside]
    if settings.which == "LM":
        return float((theta.abs() + bounds).max()), math.inf
    return float((theta + bounds).max()), float((theta - bounds).min())


def _ordered(values: Tensor, bounds: Tensor, reach: tuple[float, float], settings: _Settings) -> Tensor:
    """The bounds widened to cover the order: an eigenvalue the last check run saw within its bound of the
    ``k``-th value (not surely beyond it) may still be the true ``i``-th, so each value's bound reaches to the
    farthest such interval, ``reach`` (:func:`_reach`)."""
    upper, lower = reach
    edge = values.abs() if settings.which == "LM" else values
    top = torch.arange(values.shape[0]) < (settings.k - settings.k // 2 if settings.which == "both" else settings.k)
    if math.isfinite(upper):
        bounds = torch.where(top, torch.maximum(bounds, upper - edge), bounds)
    if math.isfinite(lower):
        bounds = torch.where(top & (settings.which != "SA"), bounds, torch.maximum(bounds, values - lower))
    return bounds


def _inside(found: _Found, which: str) -> float:
    """A value of the spectrum that is beyond none of the found ones, for the deflated span of a check run
    (:class:`~hessops.linalg.deflation.Complement`'s shift): rounding lets that span back in with weights of order
    ε²."""
    return {"LA": found.low, "SA": found.high, "LM": 0.0}.get(which, 0.5 * (found.low + found.high))


def _check_runs(
    op: cola.ops.LinearOperator,
    found: _Found,
    settings: _Settings,
    checkpoint: str | os.PathLike | None,
    every: float,
) -> None:
    """The deflated restart check of :func:`eigs`: check runs until one finds nothing beyond the ``k``-th value,
    at most ``k + 1`` of them (each that finds something adds at least one value)."""
    test, n = settings.test, op.shape[0]
    for round in range(1, settings.k + 2):
        if found.vectors.shape[1] >= n:
            return
        state, stopped = _check_run(op, found, settings, round, checkpoint, every)
        theta, S, estimates = _distinct(state, test, found.scale)
        none = state.mode == "none"
        surely = -_beside(found, theta, estimates, test.bounds, none)
        new = _outside(theta, surely, found.values, settings) & _beside(found, theta, estimates, test.meets, none)
        vectors = state.ritz_vectors(S[:, new]) if bool(new.any()) else None
        found.checks, found.steps, found.n_matvecs = found.checks + 1, found.steps + state.steps, found.n_matvecs
        found.n_matvecs += state.n_matvecs
        found.restarts += state.restarts if isinstance(state, BlockState) else 0
        state.close()
        if vectors is None:
            found.finished = stopped
            found.reach = _reach(theta, -surely, found.values, settings)
            return
        if none:
            vectors.div_(column_norms(vectors, keepdim=True))
        _merge(found, theta[new], vectors, estimates[new], settings)
    found.finished = False


def _check_run(
    op: cola.ops.LinearOperator,
    found: _Found,
    settings: _Settings,
    round: int,
    checkpoint: str | os.PathLike | None,
    every: float,
) -> tuple[LanczosState | BlockState, bool]:
    """One check run: Lanczos from a seeded random start on the complement of the pairs found, for at least
    :func:`check_steps` steps and until its Ritz values whose interval reaches beyond the ``k``-th found value
    pass the test. Returns the run and whether that test passed (rather than the step cap)."""
    test, n, m = settings.test, op.shape[0], found.vectors.shape[1]
    complement = Complement(op, found.vectors, _inside(found, settings.which))
    generator = torch.Generator(device="cpu").manual_seed(settings.seed + 104729 * round)
    width = min(settings.block, n - m)
    start = complement.project(torch.randn(n, width, generator=generator, dtype=op.dtype).to(op.device))
    fewest = min(max(check_steps(n), width), n - m)

    def settled(state: LanczosState) -> bool:
        if state.steps < fewest:
            return False
        theta, _, residuals = _distinct(state, test, found.scale, waiting=True)
        reach = _outside(theta, residuals, found.values, settings)
        return bool(_beside(found, theta, residuals, test.meets, state.mode == "none")[reach].all())

    saving = open_checkpoint(
        None if checkpoint is None else f"{os.fspath(checkpoint)}.check{round}",
        every,
        "eigs check",
        complement,
        k=settings.k,
        which=settings.which,
        tol=test.tol,
        value_tol=test.value_tol,
        max_iters=settings.max_iters,
        seed=settings.seed,
        deflated=tensor_digest(found.vectors),
        basis=settings.basis,
    )
    state = _krylov(
        complement,
        start,
        min(settings.max_iters, n - m),
        settled,
        settings,
        settings.seed + round,
        f"eigs {settings.which} check {round}",
        None if settings.basis_path is None else f"{os.fspath(settings.basis_path)}.check{round}",
        saving,
    )
    return state, settled(state)


def _beside(found: _Found, theta: Tensor, residuals: Tensor, measure, weyl: bool) -> Tensor:
    """``measure`` (the test's ``bounds`` or ``meets``) of a check run's Ritz values taken beside the pairs found,
    so that a further copy of a found eigenvalue is bounded as one of its cluster, as the result will be."""
    count = found.values.shape[0]
    every = measure(torch.cat([found.values, theta]), torch.cat([found.estimates, residuals]), found.scale, weyl)
    return every[count:]


def _merge(found: _Found, values: Tensor, vectors: Tensor, estimates: Tensor, settings: _Settings) -> None:
    """Add the pairs a check run found beyond the ``k``-th and keep the ``k`` extreme of all; the others join the
    rest of the spectrum."""
    every_value = torch.cat([found.values, values])
    order = torch.argsort(every_value, stable=True)
    wanted = order[_select(every_value[order], settings.k, settings.which)]
    dropped = torch.ones(every_value.shape[0], dtype=torch.bool)
    dropped[wanted] = False
    every_estimate = torch.cat([found.estimates, estimates])
    found.rest = torch.cat([found.rest, every_value[dropped]])
    found.rest_residuals = torch.cat([found.rest_residuals, every_estimate[dropped]])
    every_vector = torch.cat([found.vectors, vectors.to(found.vectors)], dim=1)
    found.values, found.estimates = every_value[wanted], every_estimate[wanted]
    found.vectors = every_vector[:, wanted.to(every_vector.device)]
