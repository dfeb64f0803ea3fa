"""Extreme eigenvalues of a symmetric operator: ``eigs``, with the meanings numerical libraries give to
``which``, residual norms, and a stop as soon as the wanted Ritz pairs have converged."""

from __future__ import annotations

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
from hessops.analysis._eigs_checks import CHECK_WEIGHT, _check_runs, _ordered, check_steps  # noqa: F401 (*)
from hessops.analysis._eigs_runs import GHOST_TOLERANCE, _first_run, _Found, _select, _Settings, _Test
from hessops.errors import InvalidArgumentError
from hessops.linalg.basis import check_mode, steps_in_memory
from hessops.linalg.bounds import (  # noqa: F401 (*)
    INNER_PRECISIONS,
    ROUNDING,
    error_bounds,
    product_error,
    product_noise,
    rounding,
)
from hessops.linalg.checkpoint import open_checkpoint, tensor_digest
from hessops.linalg.lanczos import check_precision
from hessops.numerics import column_norms, inner_products, orthonormal_basis

# (*) Names kept here, where they were before the runs, the check and the bounds moved into their own modules
# (_eigs_runs, _eigs_checks, hessops.linalg.bounds): docs/analysis.md and users' code import them from this module.

WHICH = constants.WHICH
MIN_BASIS_STEPS = 40  # with basis='auto', the default max_iters is capped at what fits in memory, if at least this
# with basis='auto', a run whose default steps' basis does not fit restarts thick in what fits, if at least this
MIN_RESTART_SIZE = 8


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
        checks: the deflated check runs made.
        block_size: the vectors multiplied per Lanczos step (1: single-vector Lanczos).
        restarts: the thick restarts made (a basis of bounded size: ``basis_size``)."""

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
    block_size: int = 1
    restarts: int = 0

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
            ``lanczos_steps``, ``n_matvecs``, ``seconds``, ``basis``, ``check_runs``, ``block_size``,
            ``restarts``."""
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
            "block_size": self.block_size,
            "restarts": self.restarts,
        }


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
    block_size: int = 1,
    basis_size: int | None = None,
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

    **Memory**: the ``n × steps`` basis of the steps actually taken, where ``basis`` says. With ``basis_size`` the
    basis holds at most that many vectors: when it is full the run restarts thick (Wu & Simon 2000), keeping the
    Ritz vectors nearest the wanted end, and goes on to ``max_iters`` products
    (:mod:`hessops.linalg.block_lanczos`). With ``basis="auto"`` and the default ``max_iters``, a run whose basis
    would not fit in half of the free memory restarts in a basis of what fits (a checkpointed run instead caps its
    steps there, or keeps no basis). With ``"none"`` nothing is re-orthogonalized: the Ritz values are
    deduplicated by the Cullum–Willoughby test (:func:`hessops.linalg.basis.cullum_willoughby`), the vectors cost
    a second pass of the same products, and the bounds are Weyl's (the residuals).

    **Blocks**: ``block_size = b`` multiplies ``b`` vectors a step (block Lanczos, Golub & Underwood 1977): each
    run then finds up to ``b`` copies of a repeated eigenvalue, and a step costs one product of ``b`` columns,
    which pays where such a product costs little more than one column (a GPU a single product leaves idle, a small
    model). ``steps`` and ``max_iters`` count vectors, ``b`` a step.

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
        start: warm-starts the first run from a vector (a previous top eigenvector, say), or, with
            ``block_size = b``, from up to ``b`` columns ``(n, c)`` (the previous top-``c`` eigenvectors: a block
            warm start).
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
        block_size: the vectors multiplied per Lanczos step (block Lanczos above); the first are ``start``'s
            columns or the seeded one, the others seeded Gaussian.
        basis_size: the most vectors the basis holds (at least ``k + 2·block_size``); a full basis restarts thick.
            ``None``: as many as the steps, except where ``basis="auto"`` restarts in what fits. Neither
            ``block_size > 1`` nor ``basis_size`` takes a ``checkpoint`` or a ``basis`` other than ``"auto"`` or
            ``"device"``.

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
    _restarting(settings, op, block_size, basis_size, max_iters, checkpoint is not None)
    settings.given_start = start is not None
    start = _start(op, start, settings.seed, settings.block)
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


def _start(op: cola.ops.LinearOperator, start: Tensor | None, seed: int, block: int = 1) -> Tensor:
    """The first run's start block ``(n, block)``: ``start`` checked (a vector, or up to ``block`` columns), or a
    seeded Gaussian vector, then seeded Gaussian columns for the rest of a block."""
    n = op.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if start is None:
        start = torch.randn(n, generator=generator, dtype=op.dtype)
    start = _checked_start(start, n, block).reshape(n, -1).to(device=op.device, dtype=op.dtype)
    if start.shape[1] == block:
        return start
    rest = torch.randn(n, block - start.shape[1], generator=generator, dtype=op.dtype).to(op.device)
    return torch.cat([start, rest], dim=1)


def _restarting(
    settings: _Settings, op: cola.ops.LinearOperator, block_size, basis_size, max_iters, checkpoint: bool
) -> None:
    """Check :func:`eigs`' ``block_size`` and ``basis_size`` into ``settings``; with neither given, ``basis="auto"``
    and the default ``max_iters``, restart thick in a basis of what fits in memory when the default steps' would
    not fit (a checkpointed run keeps the single-vector Lanczos it can resume, capped or without a basis). A
    restarted run's ``max_iters`` is not capped at ``n``: restarts may need more products than the space has
    dimensions."""
    n, k, default_steps = op.shape[0], settings.k, max_iters is None
    settings.block = integer("block_size", block_size, minimum=1)
    if settings.block > n:
        raise InvalidArgumentError(f"block_size={block_size} must be at most the operator's size {n}")
    if basis_size is not None:
        fewest = min(n, k + 2 * settings.block)
        settings.capacity = min(integer("basis_size", basis_size, minimum=fewest), n)
    elif settings.block == 1 and default_steps and settings.basis == "auto" and not checkpoint:
        fit, default = steps_in_memory(n, 1, op.dtype, op.device), min(n, max(300, 20 * k))
        if max(MIN_RESTART_SIZE, k + 2) <= fit < default:
            settings.capacity = fit
    if not settings.blocked:
        return
    if settings.capacity is not None and settings.capacity < n:
        settings.max_iters = max(300, 20 * k) if default_steps else max_iters
    if settings.basis not in ("auto", "device"):
        raise InvalidArgumentError(
            f"basis={settings.basis!r} with block_size={block_size} or basis_size={basis_size}: block Lanczos keeps "
            "its basis on the operator's device (basis='auto' or 'device'); a bounded basis_size is how it fits "
            "there"
        )
    if checkpoint:
        raise InvalidArgumentError(
            f"checkpoint with block_size={block_size} or basis_size={basis_size}: only single-vector Lanczos without "
            "restarts saves checkpoints; leave block_size and basis_size out to resume a run"
        )
    if settings.block > 1 and settings.max_iters < settings.block:
        raise InvalidArgumentError(f"max_iters={settings.max_iters} is less than block_size={settings.block}")


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
        block_size=settings.block,
        restarts=found.restarts,
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
            product_error(settings.test.op),
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


def _checked_start(start: Tensor, n: int, block: int = 1) -> Tensor:
    """``start`` when it is a finite, non-zero tensor of ``n`` entries (``(n,)``) or of at most ``block`` columns
    (``(n, c)``)."""
    if not isinstance(start, Tensor):
        raise InvalidArgumentError(f"start must be a torch tensor of {n} entries, got {type(start).__name__}")
    if start.shape != (n,) and not (start.dim() == 2 and start.shape[0] == n and 1 <= start.shape[1] <= block):
        columns = f"an ({n}, c) block of c ≤ block_size={block} columns" if block > 1 else f"({n},)"
        raise InvalidArgumentError(
            f"start has shape {tuple(start.shape)}: it must be one vector of the operator's size, {columns}"
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
    inexact: float = 0.0,
) -> None:
    """The RuntimeWarning of a run whose reported residuals (or bounds) miss the stopping test; ``inexact``: the
    relative error of products that are not exact (finite differences), 0 for exact ones."""
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
        if inexact > 0:
            fix = (
                f"the Lanczos estimates (up to {float(estimates.max()):.3g}) met it, but the products are finite "
                f"differences, each within {inexact:.2g} relative as measured (op.product_error): raise tol (or "
                "value_tol) above that, or use an exact hvp_mode"
            )
    warnings.warn(
        f"eigs stopped after {steps} Lanczos steps with {what} up to {worst:.3g} ({tolerance}): {fix}",
        RuntimeWarning,
        stacklevel=5,
    )
