"""How far Ritz values may lie from the eigenvalues they approximate: :func:`error_bounds` from the residuals and
the gaps (Weyl, Kato–Temple, Kahan), and :func:`rounding`, how far rounding in the products moves the eigenvalues
(:func:`product_noise`: the noise an operator measured in its own products). Knows no model: what
:func:`hessops.eigs` reports and stops on."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from hessops import constants
from hessops._cola import cola
from hessops.errors import InexactProductWarning

# The products' rounding moves eigenvalues by up to this many eps × max|θ|, unless the operator measured more
# (product_noise). Measured against float64: 1.7 eps on a float32 MLP's Hessian; 10-11 eps on the tiny byte-level
# GPT's (tests/cli/test_cli.py; an AMD EPYC family 25: 8, the value before, held on other CPUs); 24 leaves 2x.
ROUNDING = 24


# The unit roundoffs of the precisions a model may compute in inside, finest first.
INNER_PRECISIONS = tuple(sorted(torch.finfo(d).eps for d in (torch.float32, torch.float16, torch.bfloat16)))


def error_bounds(theta: Tensor, residuals: Tensor, rounding: float = 0.0, gaps: bool = True) -> Tensor:
    """Bounds on the distance from each Ritz value to an eigenvalue: the smaller of two, plus ``rounding``.

    - Each value alone: ``min(r_i, r_i² / gap_i)``. ``r_i`` always bounds it (Weyl); ``r_i² / gap_i`` is the
      Kato–Temple bound (Parlett, *The Symmetric Eigenvalue Problem*, 1998, §11.7), with ``gap_i`` the distance
      from ``θ_i`` to the rest of the spectrum, estimated by the other Ritz values moved towards ``θ_i`` by their
      own residuals: ``min_j≠i |θ_i − θ_j| − r_j`` (Weyl alone where that is not positive).
    - Its cluster: values whose intervals ``θ ± r`` overlap (copies of a repeated eigenvalue) share
      ``ρ_C = (Σ_{i∈C} r_i²)^{1/2}``, which bounds the norm of their residual matrix, and ``gap_C``, the same
      estimate taken from the values outside the cluster: ``min(ρ_C, ρ_C² / gap_C)`` (Kahan's bound, ibid.
      Thm 11.5.1, and the block Kato–Temple bound: for orthonormal Ritz vectors, ``|C|`` eigenvalues, one within
      it of each value of the cluster). Copies of one eigenvalue have no gap between them, so only this bound
      is small for them.

    The gap estimates are exact once the neighbouring eigenvalues have been found; they are optimistic only
    while an eigenvalue that no Krylov space has yet seen lies closer than the Ritz values do. Both bounds hold for
    the operator as its products are computed; ``rounding`` (in :func:`eigs`: :func:`rounding` ``· max|θ|``,
    ``ROUNDING`` eps of the precision the products are computed in) adds how far rounding in those products
    moves the eigenvalues, since a residual cannot show it. ``gaps=False``: ``r_i + rounding`` (where the other
    Ritz values are not trustworthy: a run without a basis)."""
    m = theta.shape[0]
    if m == 1 or not gaps:
        return residuals + rounding
    distance = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
    distance.fill_diagonal_(float("inf"))
    alone = _kato_temple(residuals, distance.min(dim=1).values)
    cluster = _clusters(theta, residuals)
    rho = torch.zeros(m, dtype=residuals.dtype).index_add_(0, cluster, residuals**2).sqrt()[cluster]
    distance[cluster[:, None] == cluster[None, :]] = float("inf")
    nearest = torch.full((m,), float("inf"), dtype=distance.dtype).scatter_reduce_(
        0, cluster, distance.min(dim=1).values, reduce="amin"
    )
    return torch.minimum(alone, _kato_temple(rho, nearest[cluster])) + rounding


def cluster_residuals(theta: Tensor, residuals: Tensor) -> Tensor:
    """For each value, ``ρ_C = (Σ_{i∈C} r_i²)^{1/2}`` over its cluster ``C`` (values whose intervals ``θ ± r``
    overlap): the norm bound of the cluster's residual matrix, and so of the residual of any unit vector in the
    span of the cluster's Ritz vectors. A Rayleigh–Ritz step may rotate copies of a repeated eigenvalue among
    themselves; each rotated residual stays below ``ρ_C``, not below the largest ``r_i``."""
    if theta.shape[0] < 2:
        return residuals
    cluster = _clusters(theta, residuals)
    return torch.zeros(theta.shape[0], dtype=residuals.dtype).index_add_(0, cluster, residuals**2).sqrt()[cluster]


def _kato_temple(residuals: Tensor, gap: Tensor) -> Tensor:
    """``min(r, r² / gap)``, or ``r`` where the gap is not positive or unknown (no other value: infinite)."""
    usable = (gap > 0) & torch.isfinite(gap)
    return torch.where(
        usable, torch.minimum(residuals, residuals**2 / gap.clamp_min(torch.finfo(gap.dtype).tiny)), residuals
    )


def _clusters(theta: Tensor, residuals: Tensor) -> Tensor:
    """A cluster label for each value: the connected groups of values whose intervals ``θ ± r`` overlap."""
    order = torch.argsort(theta)
    low, high = (theta - residuals)[order], (theta + residuals)[order]
    reach = torch.cummax(high, dim=0).values
    starts = torch.cat([torch.tensor([True]), low[1:] > reach[:-1]])
    labels = torch.empty_like(order)
    labels[order] = torch.cumsum(starts.long(), 0) - 1
    return labels


def _layers(op: cola.ops.LinearOperator):
    """``op`` and the operators it wraps (``Regularized``, ``Complement``: their ``op``), outermost first."""
    inner = op
    for _ in range(16):
        yield inner
        inner = getattr(inner, "op", None)
        if inner is None:
            return


def _measured(op: cola.ops.LinearOperator, name: str) -> float:
    """The finite number ``<name>`` of ``op`` or of the first operator it wraps that holds one, else 0."""
    for layer in _layers(op):
        value = getattr(layer, name, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return 0.0


def product_noise(op: cola.ops.LinearOperator) -> float:
    """The relative noise of ``op``'s products as measured by the operator itself (a hessops operator's
    ``product_noise``, looked up through wrappers such as ``Regularized`` and ``Complement``), or 0 where none was
    measured: a float64 model that computes in float32 inside carries ~1e-7, far above float64's eps."""
    return _measured(op, "product_noise")


def product_error(op: cola.ops.LinearOperator) -> float:
    """The relative error of ``op``'s products that is not rounding, as the operator measured it (a finite-difference
    Hessian's ``product_error``, hessops/operators/finite_difference.py, looked up through wrappers), or 0: how far,
    relative to ``max|θ|``, its products may move an eigenvalue, added to :func:`rounding` in the error bounds."""
    return _measured(op, "product_error")


def warn_inexact(op: cola.ops.LinearOperator, what: str) -> None:
    """One :class:`~hessops.errors.InexactProductWarning` when ``op`` (or an operator it wraps) computes its products
    by finite differences, whose error ``what`` (an estimate that does not carry it) leaves out."""
    if any(getattr(layer, "hvp_mode", None) == "finite-difference" for layer in _layers(op)):
        warnings.warn(
            f"{what} of an operator whose products are finite differences (hvp_mode='finite-difference', each "
            "product's relative error measured on its first use: op.product_error): its interval leaves that "
            "error out. eigs and trace carry it; for this estimate use an exact hvp_mode",
            InexactProductWarning,
            stacklevel=3,
        )


def rounding(eps: float, noise: float) -> float:
    """How far rounding in the products moves an eigenvalue, relative to ``max|θ|``: ``ROUNDING · eps`` of the
    operator's dtype, unless the measured ``noise`` (the symmetry defect, :func:`product_noise`) exceeds
    :data:`hessops.constants.NOISE_WARNING` of those eps: the model computes in a lower precision inside
    (a float64 Llama's float32 RMSNorm), and ``ROUNDING`` eps of the finest precision whose eps reaches the noise
    count instead, and at least the noise. The symmetry defect alone is too small a bound: it sees the
    antisymmetric part of the error on random vectors, and a float64 residual MLP with float32 RMS norms measured
    2e-9 for eigenvalue errors up to 1.4e-8 of ``max|θ|`` (tests/operators/test_witness.py)."""
    if noise <= constants.NOISE_WARNING * eps:
        return max(ROUNDING * eps, noise)
    inner = next((e for e in INNER_PRECISIONS if e >= noise), noise)
    return max(ROUNDING * inner, noise)
