"""Extreme eigenvalues of a symmetric operator: ``eigs``, with the meanings numerical libraries give to
``which``, residual norms, and a stop as soon as the wanted Ritz pairs have converged."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import cola
import torch
from torch import Tensor

from hessops.lanczos import LanczosState, lanczos, ritz

WHICH = ("LM", "LA", "SA", "both")


@dataclass
class Spectrum:
    """Eigenpairs found by :func:`eigs`; unpacks as ``values, vectors = eigs(...)``.

    ``values`` (k,) in the order ``which`` implies (LM: by decreasing magnitude; LA and both: decreasing;
    SA: increasing), ``vectors`` (n, k) orthonormal columns, ``residuals`` (k,) the true ``‖Av − λv‖``
    (one extra matmat; the Lanczos estimates with ``verify=False``), ``error_bounds`` (k,) bounds on each
    value's error ``min(r, r²/gap)`` (see :func:`eigs`), ``n_matvecs`` the operator products used,
    ``converged`` whether the stopping test was met."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    n_matvecs: int
    seconds: float
    converged: bool
    which: str = "LM"
    steps: int = 0
    error_bounds: Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.values, self.vectors))


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


def error_bounds(theta: Tensor, residuals: Tensor) -> Tensor:
    """Bounds on the distance from each Ritz value to an eigenvalue: ``min(r_i, r_i² / gap_i)``.

    ``r_i`` alone always bounds it (Weyl). ``r_i² / gap_i`` is the Kato–Temple bound (Parlett, *The
    Symmetric Eigenvalue Problem*, 1998, §11.7), with ``gap_i`` the distance from ``θ_i`` to the rest of the
    spectrum, estimated by the other Ritz values moved towards ``θ_i`` by their own residuals:
    ``min_j≠i |θ_i − θ_j| − r_j``. The estimate is exact once the neighbouring eigenvalues have been found; it
    is optimistic only while an eigenvalue that the Krylov space has not yet seen lies closer to ``θ_i`` than
    the Ritz values do."""
    m = theta.shape[0]
    if m == 1:
        return residuals.clone()
    distance = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
    distance.fill_diagonal_(float("inf"))
    gap = distance.min(dim=1).values.clamp_min(0.0)
    squared = torch.where(gap > 0, residuals**2 / gap.clamp_min(torch.finfo(gap.dtype).tiny), residuals)
    return torch.minimum(residuals, squared)


def eigs(
    op: cola.ops.LinearOperator,
    k: int = 10,
    which: str = "LM",
    *,
    tol: float = 1e-5,
    value_tol: float | None = None,
    max_iters: int | None = None,
    seed: int = 0,
    start: Tensor | None = None,
    verify: bool = True,
    progress: bool = False,
) -> Spectrum:
    """The ``k`` extreme eigenpairs of a self-adjoint operator by Lanczos with full re-orthogonalization.

    ``which``: ``"LM"`` largest magnitude (either sign: large negative Hessian eigenvalues are found),
    ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"both"``: the ``k - k//2`` largest and
    ``k//2`` smallest. Lanczos approximates both ends of the spectrum at once. It stops as soon as the wanted
    Ritz pairs have converged, or after ``max_iters`` steps (default ``min(n, max(300, 20k))``), with a
    warning. Converged means, with the default ``value_tol=None``, residual estimates below
    ``tol · max|θ|`` (eigenpairs: vectors and values; a value's error is then about ``residual² / gap``);
    with ``value_tol``, eigenvalue error bounds ``min(r, r²/gap)`` (:func:`error_bounds`) below
    ``value_tol · max|θ|``: eigenvalues only, in far fewer steps when the wanted values are separated,
    and the vectors are then less accurate than the values. ``start`` warm-starts from a vector (a previous
    top eigenvector, say). ``verify`` spends one product of ``k`` columns on the true residuals
    ``‖Av − θv‖``; ``False`` reports the Lanczos estimates (equal in exact arithmetic). Memory: the
    ``n × steps`` basis of the steps actually taken.

    A single Lanczos run finds one copy of a repeated eigenvalue (the start vector's component in the
    eigenspace); near-exact multiplicities are therefore not resolved.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}: choose one of {WHICH} (LM = largest magnitude)")
    if not op.isa(cola.SelfAdjoint):
        raise ValueError(
            f"eigs needs a self-adjoint operator (Lanczos); {op!r} is not annotated SelfAdjoint: wrap it with "
            "cola.SelfAdjoint(op) if you know it is symmetric"
        )
    n = op.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the operator's size {n}")
    if value_tol is not None and not value_tol > 0:
        raise ValueError(f"value_tol={value_tol} must be positive (a relative eigenvalue accuracy, e.g. 1e-4)")
    max_iters = min(n, max(300, 20 * k)) if max_iters is None else min(max_iters, n)
    if max_iters < k:
        raise ValueError(f"max_iters={max_iters} is less than k={k}: Lanczos needs at least k steps")
    if start is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        start = torch.randn(n, generator=generator, dtype=op.dtype)
    start = start.reshape(n, 1).to(device=op.device, dtype=op.dtype)

    def met(theta: Tensor, residuals: Tensor) -> bool:
        wanted = _select(theta, k, which)
        scale = theta.abs().max().clamp_min(1e-300)
        if value_tol is None:
            return bool((residuals[wanted] <= tol * scale).all())
        return bool((error_bounds(theta, residuals)[wanted] <= value_tol * scale).all())

    def converged(state: LanczosState) -> bool:
        if state.steps < k:
            return False
        theta, _, residuals = ritz(state)
        return met(theta, residuals)

    began = time.perf_counter()
    state = lanczos(op, start, max_iters, stop=converged, seed=seed, progress=progress, description=f"eigs {which}")
    theta, S, estimates = ritz(state)
    wanted = _select(theta, k, which)
    values = theta[wanted]
    vectors = torch.einsum("mn,mk->nk", state.basis[:, :, 0], S[:, wanted].to(state.basis))
    residuals = estimates[wanted].clone()
    if verify:
        residuals = torch.linalg.vector_norm(op @ vectors - vectors * values.to(vectors), dim=0).cpu().double()
    bounds = error_bounds(theta, estimates)[wanted]
    ok = converged(state)
    if not ok and verify and value_tol is None:  # the true residuals may have met the tolerance (with room)
        ok = bool((residuals <= 10 * tol * theta.abs().max().clamp_min(1e-300)).all())
    if not ok:
        what = "residuals" if value_tol is None else "eigenvalue error bounds"
        worst = float(residuals.max() if value_tol is None else bounds.max())
        warnings.warn(
            f"eigs stopped after {state.steps} Lanczos steps with {what} up to {worst:.3g} "
            f"(tolerance {tol if value_tol is None else value_tol:g} × {float(theta.abs().max()):.3g}): raise max_iters or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return Spectrum(
        values=values,
        vectors=vectors,
        residuals=residuals,
        n_matvecs=state.n_matvecs + (len(wanted) if verify else 0),
        seconds=time.perf_counter() - began,
        converged=ok,
        which=which,
        steps=state.steps,
        error_bounds=bounds,
        extra={"residual_estimates": estimates[wanted]},
    )
