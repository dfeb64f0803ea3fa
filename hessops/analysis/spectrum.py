"""Extreme eigenvalues of a symmetric operator: ``eigs``, with the meanings numerical libraries give to
``which``, residual norms, and a stop as soon as the wanted Ritz pairs have converged."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hessops import constants
from hessops._arguments import boolean, integer, linear_operator, real
from hessops._cola import cola
from hessops.errors import InvalidArgumentError
from hessops.linalg.basis import check_mode, ghost_masks, steps_in_memory
from hessops.linalg.checkpoint import open_checkpoint, tensor_digest
from hessops.linalg.deflation import Complement
from hessops.linalg.lanczos import LanczosState, check_precision, lanczos, ritz
from hessops.numerics import column_norms, inner_products, orthonormal_basis

WHICH = constants.WHICH
MIN_BASIS_STEPS = 40  # with basis='auto', the default max_iters is capped at what fits in memory, if at least this
# The products' rounding moves eigenvalues by up to this many eps × max|θ| (measured: 1.7 eps on a float32 MLP's
# Hessian against float64), unless the operator measured more (product_noise)
ROUNDING = 8
# a check run is long enough for a missing eigenvector whose start weight is this fraction of the typical 1/√n
CHECK_WEIGHT = 1e-3
GHOST_TOLERANCE = 1000  # without a basis, Ritz values within this × eps × max|θ| are copies of one eigenvalue


@dataclass
class Spectrum:
    """Eigenpairs found by :func:`eigs`; unpacks as ``values, vectors = eigs(...)``.

    Attributes:
        values: ``(k,)`` in the order ``which`` implies (LM: by decreasing magnitude; LA and both: decreasing;
            SA: increasing).
        vectors: ``(n, k)`` orthonormal columns.
        residuals: ``(k,)`` the true ``‖Av − λv‖`` (one extra matmat; the Lanczos estimates with
            ``verify=False``).
        error_bounds: ``(k,)`` bounds on each value's error ``min(r, r²/gap)`` computed from those residuals (see
            :func:`eigs`).
        residual_estimates: ``(k,)`` the Lanczos estimates ``|β s|`` that decided when to stop.
        which: the ``which`` of :func:`eigs`.
        steps: the Lanczos steps taken (the check runs' included).
        converged: whether the stopping test holds for the reported residuals.
        verified: whether they are the true residuals (``False``: the estimates, which rounding can make far too
            small in float32).
        n_matvecs: the operator products used (columns; the check runs' included).
        seconds: the wall time.
        basis: where the Lanczos basis lived (:mod:`hessops.linalg.basis`).
        checks: the deflated check runs made."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    residual_estimates: Tensor
    which: str
    steps: int
    converged: bool
    verified: bool
    n_matvecs: int
    seconds: float
    basis: str = "device"
    checks: int = 0

    def __iter__(self):
        return iter((self.values, self.vectors))

    def save_vectors(self, path: str | os.PathLike, op: cola.ops.LinearOperator) -> Path:
        """Write the eigenpairs to ``path`` with the parameter layout of ``op``, the operator they are of
        (:func:`hessops.save_eigenvectors`; :func:`hessops.load_eigenvectors` reads them back).

        Args:
            path: the file to write.
            op: the operator the eigenpairs are of (its parameter names and shapes are saved with them).

        Returns:
            The path written.

        Raises:
            OutputError: the file could not be written."""
        from hessops.analysis.eigenvectors import save_eigenvectors

        return save_eigenvectors(path, self, op)

    def to_dict(self) -> dict:
        """The result as JSON-ready values (the vectors left out).

        Returns:
            ``eigenvalues``, ``residuals``, ``error_bounds``, ``which``, ``converged``, ``verified``,
            ``lanczos_steps``, ``n_matvecs``, ``seconds``, ``basis``, ``check_runs``."""
        return {
            "eigenvalues": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "error_bounds": self.error_bounds.tolist(),
            "which": self.which,
            "converged": self.converged,
            "verified": self.verified,
            "lanczos_steps": self.steps,
            "n_matvecs": self.n_matvecs,
            "seconds": self.seconds,
            "basis": self.basis,
            "check_runs": self.checks,
        }


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
    check: bool = True,
    progress: bool = False,
    basis: str = "auto",
    basis_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> Spectrum:
    """The ``k`` extreme eigenpairs of a self-adjoint operator, with multiplicity, by Lanczos with full
    re-orthogonalization and a deflated restart check.

    Lanczos approximates both ends of the spectrum at once. It stops as soon as the wanted Ritz pairs pass the
    test below on their residual estimates, or after ``max_iters`` steps. The test, with the default
    ``value_tol=None``: residuals below ``tol · max|θ|`` (eigenpairs: vectors and values; a value's error is then
    about ``residual² / gap``); with ``value_tol``: eigenvalue error bounds ``min(r, r²/gap)``
    (:func:`error_bounds`) below ``value_tol · max|θ|`` (eigenvalues only, in far fewer steps when the wanted
    values are separated; the vectors are then less accurate than the values).

    **Multiplicity.** One Lanczos run sees one copy of a repeated eigenvalue: its Krylov space meets the
    eigenspace only in the start vector's component there. With ``check`` (default) each run is followed by a
    *check run*: Lanczos from a fresh random start on the complement of the pairs found
    (:class:`hessops.linalg.deflation.Complement`), at least :func:`check_steps` steps and until every one of its Ritz
    values whose interval reaches beyond the current ``k``-th value passes the same test. The values it finds
    beyond the ``k``-th (a further copy, or an eigenvalue the first start barely touched) join the pairs and
    another check run follows; the check ends with a run that finds nothing beyond. Each run finds one more
    copy of every repeated eigenvalue, so ``m`` copies cost ``m`` runs; a run on a complement whose spectrum
    has nothing beyond costs about :func:`check_steps` products. A miss would need the check run's random start
    to be nearly orthogonal to the missing eigenvector: its weight there is about ``1/√n``, amplified by
    Lanczos' Chebyshev growth (at least 5.8× a step once the eigenvalue stands apart from the rest of the
    complement's spectrum by that spectrum's width), which the minimum steps are chosen to lift to order one.

    **What the result promises.** ``verify`` (default) finishes with a Rayleigh–Ritz step on the span of all
    pairs found (one product of their columns): the reported values, vectors and true residuals
    ``r = ‖Av − θv‖`` come from it, and ``error_bounds`` (:func:`error_bounds`, counting clusters of values
    together) from those residuals and the gaps to the other values and to the rest of the first run's Ritz values,
    plus the rounding of the products (:func:`rounding` ``· max|θ|``: ``ROUNDING`` eps of the dtype, or of the
    lower precision the model computes in inside when the measured :func:`product_noise` says so).
    ``converged=True`` means every reported value passes the test on these verified residuals and the check
    ended with a run that found nothing beyond: the ``i``-th reported value lies within its bound of the
    ``i``-th extreme eigenvalue, counted with multiplicity. ``converged`` is ``False``, with a
    ``RuntimeWarning``, otherwise.

    **Memory**: the ``n × steps`` basis of the steps actually taken, where ``basis`` says. With ``"none"`` nothing
    is re-orthogonalized: the Ritz values are deduplicated by the Cullum–Willoughby test
    (:func:`hessops.linalg.basis.cullum_willoughby`), the vectors cost a second pass of the same products, and the
    bounds are Weyl's (the residuals).

    Args:
        op: the self-adjoint operator (annotated ``cola.SelfAdjoint``), of size ``n``.
        k: how many eigenpairs.
        which: ``"LM"`` largest magnitude (either sign: large negative Hessian eigenvalues are found), ``"LA"``
            largest algebraic, ``"SA"`` smallest algebraic, ``"both"``: the ``k - k//2`` largest and ``k//2``
            smallest.
        tol: the residual test's relative tolerance, ``tol · max|θ|`` (with ``value_tol=None``).
        value_tol: test the eigenvalue error bounds against ``value_tol · max|θ|`` instead of the residuals.
        max_iters: the cap on Lanczos steps of a run (default ``min(n, max(300, 20k))``).
        seed: the seed of the random start vectors.
        start: warm-starts the first run from a vector (a previous top eigenvector, say).
        verify: finish with the Rayleigh–Ritz step above; ``False`` saves those products and reports the Lanczos
            estimates (``Spectrum.verified`` is then ``False``).
        check: run the check runs above; ``False`` skips them: ``converged`` then certifies the values found, not
            that no copy was missed.
        progress: show the steps as they go.
        basis: where the Lanczos basis is kept (:mod:`hessops.linalg.basis`): ``"device"``, ``"host"``, ``"disk"``
            at ``basis_path``, ``"none"``, or ``"auto"`` from the free memory; with the default ``max_iters``,
            ``"auto"`` caps the steps at what fits in half of the free memory when that is at least 40 steps, and
            keeps the basis there.
        basis_path: the file of the ``"disk"`` basis.
        checkpoint: a file to save the run to every ``checkpoint_every`` seconds and to resume from
            (:mod:`hessops.linalg.checkpoint`; each check run saves to the same path plus ``.check1``, ``.check2``,
            …).
        checkpoint_every: seconds between two saves of ``checkpoint``.

    Returns:
        The :class:`Spectrum`: ``k`` values in the order ``which`` asks, their vectors ``(n, k)``, residuals,
        error bounds, ``converged``, ``verified``, steps and products.

    Raises:
        InvalidArgumentError: an argument of the wrong type or out of range, or ``op`` not annotated
            ``SelfAdjoint``.
        DtypeMismatchError: a half-precision operator (:func:`hessops.linalg.lanczos.check_precision`).
        CheckpointMismatchError: ``checkpoint`` holds another run.
    """
    settings = _settings(op, k, which, tol, value_tol, max_iters, seed, verify, check, progress, basis, basis_path)
    settings.given_start = start is not None
    start = _start(op, start, settings.seed)
    saving = open_checkpoint(
        checkpoint,
        checkpoint_every,
        "eigs",
        op,
        k=settings.k,
        which=which,
        tol=settings.test.tol,
        value_tol=settings.test.value_tol,
        max_iters=max_iters,
        seed=settings.seed,
        start=tensor_digest(start) if settings.given_start else None,
        basis=settings.basis,
    )
    began = time.perf_counter()
    found = _first_run(op, start, settings, saving)
    if settings.check and found.estimated and found.values.shape[0] < op.shape[0]:
        _check_runs(op, found, settings, checkpoint, checkpoint_every)
    return _finish(op, found, settings, began)


@dataclass
class _Test:
    """The stopping test of one :func:`eigs` call (see its docstring)."""

    tol: float
    value_tol: float | None
    eps: float
    op: cola.ops.LinearOperator

    @property
    def rounding(self) -> float:
        """How far rounding in the products moves an eigenvalue, relative to ``max|θ|``."""
        return rounding(self.eps, product_noise(self.op))

    def meets(self, theta: Tensor, residuals: Tensor, scale: float, weyl: bool = False) -> Tensor:
        """Which Ritz values pass the test on their residuals (all values set the gaps); ``weyl``: bound the
        values by their residuals alone, as a run without a basis reports them."""
        if self.value_tol is None:
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


def _settings(op, k, which, tol, value_tol, max_iters, seed, verify, check, progress, basis, basis_path) -> _Settings:
    """Check :func:`eigs`' arguments and derive its default step cap."""
    if not isinstance(which, str) or which not in WHICH:
        raise InvalidArgumentError(f"which={which!r}: choose one of {WHICH} (LM = largest magnitude)")
    linear_operator("op", op)
    if not op.isa(cola.SelfAdjoint):
        raise InvalidArgumentError(
            f"eigs needs a self-adjoint operator (Lanczos); {op!r} is not annotated SelfAdjoint: wrap it with "
            "cola.SelfAdjoint(op) if you know it is symmetric"
        )
    check_precision(op, "eigs")
    n = op.shape[0]
    k = integer("k", k, minimum=1)
    if k > n:
        raise InvalidArgumentError(f"k={k} must be between 1 and the operator's size {n}")
    tol = real("tol", tol, positive=True)
    if value_tol is not None:
        value_tol = real("value_tol", value_tol, positive=True)
    requested = max_iters
    max_iters = min(n, max(300, 20 * k)) if max_iters is None else min(integer("max_iters", max_iters, minimum=1), n)
    if max_iters < k:
        raise InvalidArgumentError(f"max_iters={max_iters} is less than k={k}: Lanczos needs at least k steps")
    basis = check_mode(basis, basis_path)
    if requested is None and basis == "auto":
        # A basis of the default steps may not fit where one of the steps a run usually takes does: then cap the
        # steps at what fits, and keep full re-orthogonalization (no second pass for the vectors) rather than
        # go without a basis. A run that reaches the cap says so (raise max_iters, or pass basis="none").
        fit = steps_in_memory(n, 1, op.dtype, op.device)
        if min(max_iters, max(MIN_BASIS_STEPS, 4 * k)) <= fit < max_iters:
            max_iters = fit
    return _Settings(
        k=k,
        which=which,
        test=_Test(tol, value_tol, torch.finfo(op.dtype).eps, op),
        max_iters=max_iters,
        seed=integer("seed", seed),
        given_start=False,
        verify=boolean("verify", verify),
        check=boolean("check", check),
        progress=boolean("progress", progress),
        basis=basis,
        basis_path=basis_path,
    )


def _start(op: cola.ops.LinearOperator, start: Tensor | None, seed: int) -> Tensor:
    """The first run's start vector ``(n, 1)``: ``start`` checked, or a seeded Gaussian one."""
    n = op.shape[0]
    if start is None:
        start = torch.randn(n, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=op.dtype)
    return _checked_start(start, n).reshape(n, 1).to(device=op.device, dtype=op.dtype)


def product_noise(op: cola.ops.LinearOperator) -> float:
    """The relative noise of ``op``'s products as measured by the operator itself (a hessops operator's
    ``product_noise``, looked up through wrappers such as ``Regularized`` and ``Complement``), or 0 where none was
    measured: a float64 model that computes in float32 inside carries ~1e-7, far above float64's eps."""
    inner = op
    for _ in range(16):
        noise = getattr(inner, "product_noise", None)
        if isinstance(noise, (int, float)) and math.isfinite(noise):
            return float(noise)
        inner = getattr(inner, "op", None)
        if inner is None:
            break
    return 0.0


# The unit roundoffs of the precisions a model may compute in inside, finest first.
INNER_PRECISIONS = tuple(sorted(torch.finfo(d).eps for d in (torch.float32, torch.float16, torch.bfloat16)))


def rounding(eps: float, noise: float) -> float:
    """How far rounding in the products moves an eigenvalue, relative to ``max|θ|``: ``ROUNDING · eps`` of the
    operator's dtype, unless the measured ``noise`` (the symmetry defect, :func:`product_noise`) exceeds
    :data:`hessops.constants.NOISE_WARNING` of those eps: the model computes in a lower precision inside
    (a float64 Llama's float32 RMSNorm), and ``ROUNDING`` eps of the finest precision whose eps reaches the noise
    count instead, and at least the noise. The symmetry defect alone is too small a bound: it sees the
    antisymmetric part of the error on random vectors, and a float64 residual MLP with float32 RMS norms measured
    2e-9 for eigenvalue errors up to 1.4e-8 of ``max|θ|`` (tests/test_witness.py)."""
    if noise <= constants.NOISE_WARNING * eps:
        return max(ROUNDING * eps, noise)
    inner = next((e for e in INNER_PRECISIONS if e >= noise), noise)
    return max(ROUNDING * inner, noise)


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
        meets = test.meets(theta, residuals, _scale(theta), weyl=state.mode == "none")
        return bool(meets[wanted].all())

    state = lanczos(
        op,
        start,
        settings.max_iters,
        stop=estimated,
        seed=settings.seed,
        progress=settings.progress,
        description=f"eigs {which}",
        basis=settings.basis,
        basis_path=settings.basis_path,
        checkpoint=saving,
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
    )
    if state.mode == "none":
        _deduplicate(found)
    return found


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
) -> tuple[LanczosState, bool]:
    """One check run: Lanczos from a seeded random start on the complement of the pairs found, for at least
    :func:`check_steps` steps and until its Ritz values whose interval reaches beyond the ``k``-th found value
    pass the test. Returns the run and whether that test passed (rather than the step cap)."""
    test, n, m = settings.test, op.shape[0], found.vectors.shape[1]
    complement = Complement(op, found.vectors, _inside(found, settings.which))
    generator = torch.Generator(device="cpu").manual_seed(settings.seed + 104729 * round)
    start = complement.project(torch.randn(n, 1, generator=generator, dtype=op.dtype).to(op.device))
    fewest = min(check_steps(n), n - m)

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
    state = lanczos(
        complement,
        start,
        min(settings.max_iters, n - m),
        stop=settled,
        seed=settings.seed + round,
        progress=settings.progress,
        description=f"eigs {settings.which} check {round}",
        basis=settings.basis,
        basis_path=None if settings.basis_path is None else f"{os.fspath(settings.basis_path)}.check{round}",
        checkpoint=saving,
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


def _finish(op: cola.ops.LinearOperator, found: _Found, settings: _Settings, began: float) -> Spectrum:
    """The :class:`Spectrum` of the pairs found: verified by a Rayleigh–Ritz step (with ``verify``), bounded, and
    tested (see :func:`eigs`)."""
    test, k = settings.test, settings.k
    n_matvecs = found.n_matvecs
    if settings.verify and found.values.shape[0]:
        values, vectors, residuals = _rayleigh_ritz(op, found.vectors, k, settings.which)
        n_matvecs += found.vectors.shape[1]
        rest_residuals = found.rest_residuals.clamp_min(float(residuals.max()))
    else:
        values, vectors, residuals, rest_residuals = found.values, found.vectors, found.estimates, found.rest_residuals
    weyl = found.mode == "none"
    m = values.shape[0]
    bounds = test.bounds(torch.cat([values, found.rest]), torch.cat([residuals, rest_residuals]), found.scale, weyl)
    bounds = _ordered(values, bounds[:m], found.reach, settings)
    passes = residuals <= test.tol * found.scale if test.value_tol is None else bounds <= test.value_tol * found.scale
    passes = bool(passes.all())
    ok = m == k and found.finished and passes
    _warn(found, settings, m, ok, passes, residuals, bounds)
    return Spectrum(
        values=values,
        vectors=vectors,
        residuals=residuals,
        error_bounds=bounds,
        residual_estimates=found.estimates,
        which=settings.which,
        steps=found.steps,
        converged=ok,
        verified=settings.verify,
        n_matvecs=n_matvecs,
        seconds=time.perf_counter() - began,
        basis=found.mode,
        checks=found.checks,
    )


def _warn(
    found: _Found, settings: _Settings, m: int, ok: bool, passes: bool, residuals: Tensor, bounds: Tensor
) -> None:
    """The RuntimeWarning of a run that has not converged, naming why and the fix."""
    if ok:
        return
    if m < settings.k:  # without a basis, Ritz values closer than the ghost tolerance count as one eigenvalue
        warnings.warn(
            f"eigs resolved only {m} distinct eigenvalues of the {settings.k} asked for in {found.steps} Lanczos "
            f"steps without a basis: Ritz values within {GHOST_TOLERANCE * settings.test.eps * found.scale:.2g} of "
            "each other count as copies of one, which merges eigenvalues that close (e.g. a cluster near 0), and "
            "Ritz vectors that are copies of one eigenvector are dropped. Keep a basis (basis='device', 'host' or "
            "'disk'), which resolves them, or ask for fewer",
            RuntimeWarning,
            stacklevel=4,
        )
    elif not passes:
        _warn_not_converged(
            found.steps,
            residuals,
            bounds,
            found.estimates,
            found.scale,
            settings.test.tol,
            settings.test.value_tol,
            settings.test.op.dtype,
            settings.verify and found.estimated,
        )
    else:
        warnings.warn(
            f"eigs' check for eigenvalues beyond the {settings.k} found (further copies of a repeated eigenvalue, or "
            f"one the first start missed) did not finish after {found.checks} check runs ({found.steps} Lanczos steps "
            "in all): the values may not be the extreme ones with multiplicity. Raise max_iters (or tol/value_tol)",
            RuntimeWarning,
            stacklevel=4,
        )


def _rayleigh_ritz(op: cola.ops.LinearOperator, V: Tensor, k: int, which: str) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` wanted Ritz pairs of ``op`` on the span of ``V``'s columns (normalized, nearly orthogonal) and
    their true residuals ``‖Av − θv‖``, with one product of ``V``'s columns. The small problem
    ``VᵀAV s = θ VᵀV s`` is solved through the Cholesky factor of ``VᵀV``, so that the vectors ``Vs`` are
    orthonormal without a second parameter-length copy of ``V``; ``V`` and its product are overwritten."""
    products = _apply_columns(op, V)
    if products.data_ptr() == V.data_ptr():  # an operator that returns its input: updated in place below
        products = products.clone()
    gram = inner_products(V, V)
    projected = inner_products(V, products)
    projected = 0.5 * (projected + projected.T)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:  # columns too close to dependent for the small problem: orthonormalize them first
        V = orthonormal_basis(V)
        return _rayleigh_ritz(op, V, k, which)
    inverse = torch.linalg.solve_triangular(factor, torch.eye(len(factor), dtype=factor.dtype), upper=False)
    theta, S = torch.linalg.eigh(inverse @ projected @ inverse.T)
    wanted = _select(theta, k, which)
    coefficients = inverse.T @ S[:, wanted]
    values = theta[wanted]
    vectors, products = _rotate(V, coefficients), _rotate(products, coefficients)
    residuals = column_norms(products.addcmul_(vectors, values.to(vectors), value=-1)).cpu().double()
    return values, vectors, residuals


ROTATION_ROWS = 1 << 16


def _rotate(X: Tensor, coefficients: Tensor) -> Tensor:
    """``X @ coefficients`` (``n × k'`` by ``k' × k``, ``k ≤ k'``) written over ``X``'s first ``k`` columns a block
    of rows at a time, so that no second parameter-length copy is made."""
    coefficients = coefficients.to(device=X.device, dtype=X.dtype)
    k = coefficients.shape[1]
    for i in range(0, X.shape[0], ROTATION_ROWS):
        X[i : i + ROTATION_ROWS, :k] = X[i : i + ROTATION_ROWS] @ coefficients
    return X if k == X.shape[1] else X[:, :k].contiguous()


# Vectors at least this large are verified one column at a time: a block of ten products of a 100M-parameter
# MLP (0.4 GB vectors) took its top-10 run to 22.3 GB of a 24 GB machine's memory; on a CPU a block saves
# little time over its columns (benchmarks/RESULTS.md, Runs C and H2).
ONE_COLUMN_BYTES = 1 << 26


def _apply_columns(op: cola.ops.LinearOperator, vectors: Tensor) -> Tensor:
    """``op @ vectors``, one column at a time when the vectors are :data:`ONE_COLUMN_BYTES` or more."""
    if vectors.shape[1] == 1 or vectors.shape[0] * vectors.element_size() < ONE_COLUMN_BYTES:
        return op @ vectors
    products = torch.empty_like(vectors)
    for i in range(vectors.shape[1]):
        products[:, i : i + 1] = op @ vectors[:, i : i + 1]
    return products


def _checked_start(start: Tensor, n: int) -> Tensor:
    """``start`` when it is a finite, non-zero tensor of ``n`` entries (``(n,)`` or ``(n, 1)``)."""
    if not isinstance(start, Tensor):
        raise InvalidArgumentError(f"start must be a torch tensor of {n} entries, got {type(start).__name__}")
    if start.shape not in ((n,), (n, 1)):
        raise InvalidArgumentError(
            f"start has shape {tuple(start.shape)}: it must be one vector of the operator's size, ({n},)"
        )
    if not bool(torch.isfinite(start).all()):
        raise InvalidArgumentError("start holds NaN or inf: pass a finite vector (or start=None for a random one)")
    if not bool((start != 0).any()):
        raise InvalidArgumentError(
            "start is the zero vector, which spans no Krylov space: pass a non-zero vector (or start=None)"
        )
    return start


def _warn_not_converged(
    steps: int,
    residuals: Tensor,
    bounds: Tensor,
    estimates: Tensor,
    scale: float,
    tol: float,
    value_tol: float | None,
    dtype: torch.dtype,
    estimates_met: bool,
) -> None:
    """The RuntimeWarning of a run whose reported residuals (or bounds) miss the stopping test."""
    what = "residuals" if value_tol is None else "eigenvalue error bounds"
    worst = float(residuals.max() if value_tol is None else bounds.max())
    tolerance = f"tolerance {tol if value_tol is None else value_tol:g} × {scale:.3g}"
    fix = "raise max_iters or tol"
    if estimates_met:
        what = "verified " + what
    if estimates_met and float(residuals.max()) > 2 * float(estimates.max()):  # rounding, not too few steps
        fix = (
            f"the Lanczos estimates (up to {float(estimates.max()):.3g}) met it, but products in {dtype} do not "
            "reach that accuracy: raise tol (or value_tol) above the verified level, or use a float64 operator"
        )
    warnings.warn(
        f"eigs stopped after {steps} Lanczos steps with {what} up to {worst:.3g} ({tolerance}): {fix}",
        RuntimeWarning,
        stacklevel=5,
    )
