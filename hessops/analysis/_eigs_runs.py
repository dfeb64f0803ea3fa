"""The Lanczos runs of :func:`hessops.eigs` (:mod:`hessops.analysis.spectrum`): its stopping rule (``_Test``), its
checked arguments (``_Settings``), the pairs found so far (``_Found``), which Ritz values are wanted (``_select``)
and distinct (``_distinct``: without a basis, one copy of each), and the first run, with the path without a basis
(``_deduplicate``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from hessops._cola import cola
from hessops.linalg.basis import ghost_masks
from hessops.linalg.block_lanczos import BlockState, block_lanczos
from hessops.linalg.bounds import cluster_residuals, error_bounds, product_error, product_noise, rounding
from hessops.linalg.lanczos import LanczosState, lanczos, ritz
from hessops.numerics import column_norms, inner_products

GHOST_TOLERANCE = 1000  # without a basis, Ritz values within this × eps × max|θ| are copies of one eigenvalue


@dataclass
class _Test:
    """The stopping test of one :func:`eigs` call (see its docstring)."""

    tol: float
    value_tol: float | None
    eps: float
    op: cola.ops.LinearOperator

    @property
    def rounding(self) -> float:
        """How far rounding in the products moves an eigenvalue, relative to ``max|θ|``, plus the error of products
        that are not exact (finite differences: :func:`~hessops.linalg.bounds.product_error`)."""
        return rounding(self.eps, product_noise(self.op)) + product_error(self.op)

    def meets(
        self, theta: Tensor, residuals: Tensor, scale: float, weyl: bool = False, wanted: Tensor | None = None
    ) -> Tensor:
        """Which Ritz values pass the test on their residuals (all values set the gaps); ``weyl``: bound the values
        by their residuals alone, as a run without a basis reports them. With ``tol`` and the ``wanted`` indices,
        the wanted values of a cluster pass together, on :func:`~hessops.linalg.bounds.cluster_residuals`: the
        verifying Rayleigh–Ritz step may rotate copies of a repeated eigenvalue among themselves (a block run finds
        them together) and share their residuals out unevenly."""
        if self.value_tol is None:
            if wanted is not None and not weyl:
                residuals = residuals.clone()
                residuals[wanted] = cluster_residuals(theta[wanted], residuals[wanted])
            return residuals <= self.tol * scale
        return self.bounds(theta, residuals, scale, weyl) <= self.value_tol * scale

    def bounds(self, theta: Tensor, residuals: Tensor, scale: float, weyl: bool = False) -> Tensor:
        """The error bounds of :func:`error_bounds` (``weyl``: the residuals), plus the rounding."""
        return error_bounds(theta, residuals, self.rounding * scale, gaps=not weyl)


@dataclass
class _Settings:
    """The checked arguments of one :func:`eigs` call."""

    k: int
    which: str
    test: _Test
    max_iters: int
    seed: int
    given_start: bool
    verify: bool
    check: bool
    progress: bool
    basis: str
    basis_path: str | os.PathLike | None
    block: int = 1
    capacity: int | None = None

    @property
    def blocked(self) -> bool:
        """Whether the runs are block Lanczos runs (:mod:`hessops.linalg.block_lanczos`): several vectors a step,
        or a basis of bounded size that restarts thick."""
        return self.block > 1 or self.capacity is not None


@dataclass
class _Found:
    """The pairs found so far, and what finding them cost. ``rest``/``rest_residuals``: the first run's Ritz values
    that are not among the pairs, and the pairs a check run displaced, with their residual estimates (the rest of
    the spectrum, for the gaps of the bounds; a check run's own unconverged Ritz values are left out: where they
    approximate an eigenvalue the first run also saw, their wider intervals made gaps of the first run's exact
    neighbours look 7× smaller); ``scale``: ``max|θ|`` of the first run; ``finished``: the last check run found nothing
    beyond the ``k``-th value (or no check was asked for); ``reach``: how far beyond the found values (above, below;
    for ``"LM"`` above in magnitude) the intervals of that run's Ritz values reach, ``(−inf, inf)`` where none does."""

    values: Tensor
    vectors: Tensor
    estimates: Tensor
    rest: Tensor
    rest_residuals: Tensor
    scale: float
    mode: str
    steps: int
    n_matvecs: int
    low: float = 0.0
    high: float = 0.0
    reach: tuple[float, float] = (-math.inf, math.inf)
    checks: int = 0
    finished: bool = True
    estimated: bool = True
    restarts: int = 0


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the wanted Ritz values among ascending ``theta``, in the output order."""
    m = theta.shape[0]
    k = min(k, m)
    if which == "LA":
        return torch.arange(m - 1, m - 1 - k, -1)
    if which == "SA":
        return torch.arange(k)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)[:k]
    top, bottom = k - k // 2, k // 2
    wanted = torch.cat([torch.arange(m - 1, m - 1 - top, -1), torch.arange(bottom).flip(0)])
    return wanted if top + bottom <= m else torch.arange(m - 1, -1, -1)


def _scale(theta: Tensor) -> float:
    """``max|θ|``, the scale of the tolerances (at least the smallest positive float64)."""
    return float(theta.abs().max().clamp_min(1e-300)) if theta.numel() else 1e-300


def _distinct(
    state: LanczosState, test: _Test, scale: float | None = None, waiting: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The Ritz triples of :func:`ritz`, one copy of each value where no basis kept them orthogonal.

    Without a basis a value the Cullum–Willoughby test flags as spurious is reported only once it has
    converged, and, with ``waiting`` (the stopping test), it is kept unconverged too, so that the run waits
    for it: at millions of parameters in float32 the flag also hits genuine eigenvalues (dropping them,
    a ResNet-18's top-10 lost 86.9, 83.5 and 75.5 and reported three smaller ones as converged)."""
    theta, S, residuals = ritz(state)
    if state.mode == "none":
        scale = _scale(theta) if scale is None else scale
        first, spurious = ghost_masks(
            state.tridiagonal(),
            theta,
            GHOST_TOLERANCE * test.eps * scale,
            S[0],
            spurious_tolerance=GHOST_TOLERANCE * torch.finfo(torch.float64).eps * scale,
        )
        keep = first if waiting else first & (~spurious | test.meets(theta, residuals, scale, weyl=True))
        theta, S, residuals = theta[keep], S[:, keep], residuals[keep]
    return theta, S, residuals


def _first_run(op: cola.ops.LinearOperator, start: Tensor, settings: _Settings, saving) -> _Found:
    """Lanczos from ``start`` until the ``k`` wanted Ritz pairs pass the test (or ``max_iters`` steps)."""
    test, k, which = settings.test, settings.k, settings.which

    def estimated(state: LanczosState) -> bool:
        if state.steps < k:
            return False
        theta, _, residuals = _distinct(state, test, waiting=True)
        if theta.shape[0] < k:
            return False
        wanted = _select(theta, k, which)
        # The rest's residuals as _finish bounds them (at least the wanted pairs' largest): a test on the bare
        # estimates stopped where the reported bound, with the gaps that narrower, missed the tolerance by 3 %.
        residuals = residuals.clone()
        rest = torch.ones(theta.shape[0], dtype=torch.bool)
        rest[wanted] = False
        residuals[rest] = residuals[rest].clamp_min(float(residuals[wanted].max()))
        # Without a basis the values are reported with Weyl's bound: stop on the same test, or the run would stop
        # where the Kato-Temple bound passes and report that it has not converged.
        meets = test.meets(theta, residuals, _scale(theta), weyl=state.mode == "none", wanted=wanted)
        return bool(meets[wanted].all())

    state = _krylov(
        op, start, settings.max_iters, estimated, settings, settings.seed, f"eigs {which}", settings.basis_path, saving
    )
    met = estimated(state)
    theta, S, estimates = _distinct(state, test)
    wanted = _select(theta, k, which)
    rest = torch.ones(theta.shape[0], dtype=torch.bool)
    rest[wanted] = False
    vectors = state.ritz_vectors(S[:, wanted])
    state.close()
    found = _Found(
        values=theta[wanted],
        vectors=vectors,
        estimates=estimates[wanted],
        rest=theta[rest],
        rest_residuals=estimates[rest],
        scale=_scale(theta),
        mode=state.mode,
        steps=state.steps,
        n_matvecs=state.n_matvecs,
        low=float(theta.min()),
        high=float(theta.max()),
        estimated=met,
        restarts=state.restarts if isinstance(state, BlockState) else 0,
    )
    if state.mode == "none":
        _deduplicate(found)
    return found


def _krylov(
    op: cola.ops.LinearOperator,
    start: Tensor,
    max_steps: int,
    stop,
    settings: _Settings,
    seed: int,
    description: str,
    basis_path,
    checkpoint,
) -> LanczosState | BlockState:
    """One Lanczos run of :func:`eigs` from the ``(n, b)`` block ``start``: single-vector Lanczos
    (:func:`hessops.linalg.lanczos.lanczos`, ``b = 1``) or, when the settings ask for blocks or a bounded basis,
    block Lanczos with thick restarts keeping the Ritz vectors at the wanted end."""
    if not settings.blocked:
        return lanczos(
            op,
            start,
            max_steps,
            stop=stop,
            seed=seed,
            progress=settings.progress,
            description=description,
            basis=settings.basis,
            basis_path=basis_path,
            checkpoint=checkpoint,
        )
    return block_lanczos(
        op,
        start,
        max_steps,
        capacity=settings.capacity or max_steps,
        keep=lambda theta, count: _select(theta, count, settings.which),
        wanted=settings.k,
        stop=stop,
        seed=seed,
        progress=settings.progress,
        description=description,
    )


def _deduplicate(found: _Found) -> None:
    """Normalize the Ritz vectors of a run without a basis (its Lanczos vectors were not orthogonal) and drop
    those that copy a kept one (overlap above 1/2: a ghost the Cullum–Willoughby test did not merge)."""
    vectors = found.vectors.div_(column_norms(found.vectors, keepdim=True))  # in place: k parameter-length columns
    overlaps = inner_products(vectors, vectors).abs()
    kept: list[int] = []
    for i in range(vectors.shape[1]):
        if all(float(overlaps[i, j]) <= 0.5 for j in kept):
            kept.append(i)
    if len(kept) < vectors.shape[1]:
        index = torch.tensor(kept, dtype=torch.long)
        found.values, found.estimates = found.values[index], found.estimates[index]
        found.vectors = vectors[:, index.to(vectors.device)]
