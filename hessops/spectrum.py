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
from hessops.basis import check_mode, ghost_masks, steps_in_memory
from hessops.checkpoint import open_checkpoint, tensor_digest
from hessops.errors import InvalidArgumentError
from hessops.lanczos import LanczosState, check_precision, lanczos, ritz
from hessops.numerics import column_dots, column_norms

WHICH = constants.WHICH
MIN_BASIS_STEPS = 40  # with basis='auto', the default max_iters is capped at what fits in memory, if at least this
GHOST_TOLERANCE = 1000  # without a basis, Ritz values within this × eps × max|θ| are copies of one eigenvalue


@dataclass
class Spectrum:
    """Eigenpairs found by :func:`eigs`; unpacks as ``values, vectors = eigs(...)``.

    ``values`` (k,) in the order ``which`` implies (LM: by decreasing magnitude; LA and both: decreasing;
    SA: increasing), ``vectors`` (n, k) orthonormal columns, ``residuals`` (k,) the true ``‖Av − λv‖``
    (one extra matmat; the Lanczos estimates with ``verify=False``), ``error_bounds`` (k,) bounds on each
    value's error ``min(r, r²/gap)`` computed from those residuals (see :func:`eigs`),
    ``residual_estimates`` (k,) the Lanczos estimates ``|β s|`` that decided when to stop, ``steps`` the
    Lanczos steps taken, ``converged`` whether the stopping test holds for the reported residuals,
    ``verified`` whether they are the true residuals (``False``: the estimates, which rounding can make far
    too small in float32), ``n_matvecs`` the operator products used (columns), ``seconds`` the wall time and
    ``basis`` where the Lanczos basis lived (:mod:`hessops.basis`)."""

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

    def __iter__(self):
        return iter((self.values, self.vectors))

    def save_vectors(self, path: str | os.PathLike, op: cola.ops.LinearOperator) -> Path:
        """Write the eigenpairs to ``path`` with the parameter layout of ``op``, the operator they are of, and
        return the path (:func:`hessops.save_eigenvectors`; :func:`hessops.load_eigenvectors` reads them back)."""
        from hessops.vectors import save_eigenvectors

        return save_eigenvectors(path, self, op)

    def to_dict(self) -> dict:
        """The result as JSON-ready values (the vectors left out): ``eigenvalues``, ``residuals``,
        ``error_bounds``, ``which``, ``converged``, ``verified``, ``lanczos_steps``, ``n_matvecs``, ``seconds``,
        ``basis``."""
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


def error_bounds(theta: Tensor, residuals: Tensor, rounding: float = 0.0) -> Tensor:
    """Bounds on the distance from each Ritz value to an eigenvalue: ``min(r_i, r_i² / gap_i) + rounding``.

    ``r_i`` alone always bounds it (Weyl). ``r_i² / gap_i`` is the Kato–Temple bound (Parlett, *The
    Symmetric Eigenvalue Problem*, 1998, §11.7), with ``gap_i`` the distance from ``θ_i`` to the rest of the
    spectrum, estimated by the other Ritz values moved towards ``θ_i`` by their own residuals:
    ``min_j≠i |θ_i − θ_j| − r_j``. The estimate is exact once the neighbouring eigenvalues have been found; it
    is optimistic only while an eigenvalue that the Krylov space has not yet seen lies closer to ``θ_i`` than
    the Ritz values do. Both bounds hold for the operator as its products are computed; ``rounding`` (in
    :func:`eigs`: ``eps · max|θ|`` of the operator's dtype) adds how far rounding in those products moves
    the eigenvalues, since a residual cannot show it."""
    m = theta.shape[0]
    if m == 1:
        return residuals + rounding
    distance = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
    distance.fill_diagonal_(float("inf"))
    gap = distance.min(dim=1).values.clamp_min(0.0)
    squared = torch.where(gap > 0, residuals**2 / gap.clamp_min(torch.finfo(gap.dtype).tiny), residuals)
    return torch.minimum(residuals, squared) + rounding


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
    basis: str = "auto",
    basis_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> Spectrum:
    """The ``k`` extreme eigenpairs of a self-adjoint operator by Lanczos with full re-orthogonalization.

    ``which``: ``"LM"`` largest magnitude (either sign: large negative Hessian eigenvalues are found),
    ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"both"``: the ``k - k//2`` largest and
    ``k//2`` smallest. Lanczos approximates both ends of the spectrum at once. It stops as soon as the wanted
    Ritz pairs pass the test below on their residual estimates, or after ``max_iters`` steps (default
    ``min(n, max(300, 20k))``). The test, with the default ``value_tol=None``: residuals below
    ``tol · max|θ|`` (eigenpairs: vectors and values; a value's error is then about ``residual² / gap``);
    with ``value_tol``: eigenvalue error bounds ``min(r, r²/gap)`` (:func:`error_bounds`) below
    ``value_tol · max|θ|`` (eigenvalues only, in far fewer steps when the wanted values are separated; the
    vectors are then less accurate than the values).

    ``verify`` (default) spends one product of ``k`` columns on the true residuals ``r = ‖Av − θv‖``; the
    reported ``residuals``, ``error_bounds`` and ``converged`` all come from them (the estimates, which
    rounding can make orders of magnitude too small in float32, only decide when to stop). In the gaps of
    the bounds, the Ritz values that were not verified count with their estimate raised to at least the
    largest verified residual. ``converged`` is ``False``, with a ``RuntimeWarning``, when the verified
    residuals miss the test. ``verify=False`` saves those products and reports the estimates
    (``Spectrum.verified`` is then ``False``). ``start`` warm-starts from a vector (a previous top
    eigenvector, say). Memory: the ``n × steps`` basis of the steps actually taken, where ``basis`` says
    (:mod:`hessops.basis`: ``"device"``, ``"host"``, ``"disk"`` at ``basis_path``, ``"none"``, or ``"auto"`` from the
    free memory; with the default ``max_iters``, ``"auto"`` caps the steps at what fits in half of the free memory when
    that is at least 40 steps, and keeps the basis there). With ``"none"`` nothing is re-orthogonalized: the Ritz values
    are deduplicated by the Cullum–Willoughby test (:func:`hessops.basis.cullum_willoughby`), and the vectors cost a
    second pass of the same products. ``checkpoint``: a file to save the run to every ``checkpoint_every`` seconds and
    to resume from (:mod:`hessops.checkpoint`). Half-precision operators are refused
    (:func:`hessops.lanczos.check_precision`).

    A single Lanczos run finds one copy of a repeated eigenvalue (the start vector's component in the
    eigenspace); near-exact multiplicities are therefore not resolved.
    """
    if not isinstance(which, str) or which not in WHICH:
        raise InvalidArgumentError(f"which={which!r}: choose one of {WHICH} (LM = largest magnitude)")
    linear_operator("op", op)
    if not op.isa(cola.SelfAdjoint):
        raise ValueError(
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
    seed = integer("seed", seed)
    verify, progress = boolean("verify", verify), boolean("progress", progress)
    requested_iters = max_iters
    max_iters = min(n, max(300, 20 * k)) if max_iters is None else min(integer("max_iters", max_iters, minimum=1), n)
    if max_iters < k:
        raise InvalidArgumentError(f"max_iters={max_iters} is less than k={k}: Lanczos needs at least k steps")
    basis = check_mode(basis, basis_path)
    if requested_iters is None and basis == "auto":
        # A basis of the default steps may not fit where one of the steps a run usually takes does: then cap the
        # steps at what fits, and keep full re-orthogonalization (no second pass for the vectors) rather than
        # go without a basis. A run that reaches the cap says so (raise max_iters, or pass basis="none").
        fit = steps_in_memory(n, 1, op.dtype, op.device)
        if min(max_iters, max(MIN_BASIS_STEPS, 4 * k)) <= fit < max_iters:
            max_iters = fit
    given = start is not None
    if start is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        start = torch.randn(n, generator=generator, dtype=op.dtype)
    start = _checked_start(start, n).reshape(n, 1).to(device=op.device, dtype=op.dtype)
    saving = open_checkpoint(
        checkpoint,
        checkpoint_every,
        "eigs",
        op,
        k=k,
        which=which,
        tol=tol,
        value_tol=value_tol,
        max_iters=requested_iters,
        seed=seed,
        start=tensor_digest(start) if given else None,
        basis=basis,
    )

    eps = torch.finfo(op.dtype).eps

    def meets(theta: Tensor, residuals: Tensor, weyl: bool = False) -> Tensor:
        """Which Ritz values pass the stopping test on their residuals (all values set the gaps).
        ``weyl``: bound the values by their residuals alone, as a run without a basis reports them."""
        scale = theta.abs().max().clamp_min(1e-300)
        if value_tol is None:
            return residuals <= tol * scale
        rounding = eps * float(scale)
        bounds = residuals + rounding if weyl else error_bounds(theta, residuals, rounding)
        return bounds <= value_tol * scale

    def met(theta: Tensor, residuals: Tensor, wanted: Tensor, weyl: bool = False) -> bool:
        """The stopping test: the wanted values all pass :func:`meets`."""
        return bool(meets(theta, residuals, weyl)[wanted].all())

    def distinct(state: LanczosState, waiting: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The Ritz triples of :func:`ritz`, one copy of each value where no basis kept them orthogonal.

        Without a basis a value the Cullum–Willoughby test flags as spurious is reported only once it has
        converged, and, with ``waiting`` (the stopping test), it is kept unconverged too, so that the run waits
        for it: at millions of parameters in float32 the flag also hits genuine eigenvalues (dropping them,
        a ResNet-18's top-10 lost 86.9, 83.5 and 75.5 and reported three smaller ones as converged)."""
        theta, S, residuals = ritz(state)
        if state.mode == "none":
            scale = float(theta.abs().max())
            first, spurious = ghost_masks(
                state.tridiagonal(),
                theta,
                GHOST_TOLERANCE * eps * scale,
                S[0],
                spurious_tolerance=GHOST_TOLERANCE * torch.finfo(torch.float64).eps * scale,
            )
            keep = first if waiting else first & (~spurious | meets(theta, residuals, weyl=True))
            theta, S, residuals = theta[keep], S[:, keep], residuals[keep]
        return theta, S, residuals

    def estimated(state: LanczosState) -> bool:
        if state.steps < k:
            return False
        theta, _, residuals = distinct(state, waiting=True)
        # Without a basis the values are reported with Weyl's bound (see _without_basis): stop on the same test,
        # or the run would stop where the Kato-Temple bound passes and report that it has not converged.
        return theta.shape[0] >= k and met(theta, residuals, _select(theta, k, which), weyl=state.mode == "none")

    began = time.perf_counter()
    state = lanczos(
        op,
        start,
        max_iters,
        stop=estimated,
        seed=seed,
        progress=progress,
        description=f"eigs {which}",
        basis=basis,
        basis_path=basis_path,
        checkpoint=saving,
    )
    theta, S, estimates = distinct(state)
    wanted = _select(theta, k, which)
    values = theta[wanted]
    vectors = state.ritz_vectors(S[:, wanted])
    state.close()
    everyone = estimates.clone()  # each Ritz value's residual: verified where known
    rounding = eps * float(theta.abs().max())
    n_verified = len(wanted) if verify else 0
    if state.mode == "none":
        values, vectors, residuals, kept = _without_basis(op, values, vectors, estimates[wanted], verify)
        wanted, bounds = wanted[kept], residuals + rounding
        scale = float(theta.abs().max())
        ok = bool((residuals <= tol * scale).all() if value_tol is None else (bounds <= value_tol * scale).all())
    else:
        if verify:
            products = _apply_columns(op, vectors)
            verified = column_norms(torch.addcmul(products, vectors, values.to(vectors), value=-1)).cpu().double()
            everyone = torch.maximum(everyone, verified.max())
            everyone[wanted] = verified
        residuals = everyone[wanted].clone()
        bounds = error_bounds(theta, everyone, rounding)[wanted]
        ok = met(theta, everyone, wanted)
    if len(wanted) < k:  # without a basis, Ritz values closer than the ghost tolerance count as one eigenvalue
        ok = False
        warnings.warn(
            f"eigs resolved only {len(wanted)} distinct eigenvalues of the {k} asked for in {state.steps} Lanczos "
            f"steps without a basis: Ritz values within {GHOST_TOLERANCE * eps * float(theta.abs().max()):.2g} of "
            "each other count as copies of one, which merges eigenvalues that close (e.g. a cluster near 0), and "
            "Ritz vectors that are copies of one eigenvector are dropped. Keep a basis (basis='device', 'host' or "
            "'disk'), which resolves them, or ask for fewer",
            RuntimeWarning,
            stacklevel=2,
        )
    elif not ok:
        _warn_not_converged(
            state.steps,
            residuals,
            bounds,
            estimates[wanted],
            theta,
            tol,
            value_tol,
            op.dtype,
            verify and estimated(state),
        )
    return Spectrum(
        values=values,
        vectors=vectors,
        residuals=residuals,
        error_bounds=bounds,
        residual_estimates=estimates[wanted],
        which=which,
        steps=state.steps,
        converged=ok,
        verified=verify,
        n_matvecs=state.n_matvecs + n_verified,
        seconds=time.perf_counter() - began,
        basis=state.mode,
    )


def _without_basis(
    op: cola.ops.LinearOperator, values: Tensor, vectors: Tensor, estimates: Tensor, verify: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Ritz pairs of a run without a basis, made trustworthy: its Lanczos vectors were not orthogonal, so
    the second pass's Ritz vectors are normalized, and, with ``verify``, each value is replaced by its vector's
    Rayleigh quotient, whose distance to an eigenvalue the true residual bounds (Weyl; no gap refinement, as
    the gaps between Ritz values are not trustworthy here), and vectors that are copies of a kept one (overlap
    above 1/2: a ghost the Cullum–Willoughby test did not merge) are dropped. Returns the values, vectors,
    residuals (without ``verify``: the estimates) and the indices kept."""
    vectors = vectors.div_(column_norms(vectors, keepdim=True))  # in place: k parameter-length columns
    if not verify:
        return values, vectors, estimates, torch.arange(len(values))
    products = _apply_columns(op, vectors)
    if products.data_ptr() == vectors.data_ptr():  # an operator that returns its input: updated in place below
        products = products.clone()
    quotients = column_dots(vectors, products).to(vectors.dtype)
    residuals = column_norms(products.addcmul_(vectors, quotients, value=-1)).cpu().double()
    kept: list[int] = []
    for i in range(vectors.shape[1]):
        if all(abs(float(vectors[:, i] @ vectors[:, j])) <= 0.5 for j in kept):
            kept.append(i)
    index = torch.tensor(kept, dtype=torch.long)
    return quotients.cpu().double()[index], vectors[:, index.to(vectors.device)], residuals[index], index


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
    theta: Tensor,
    tol: float,
    value_tol: float | None,
    dtype: torch.dtype,
    estimates_met: bool,
) -> None:
    """The RuntimeWarning of a run whose reported residuals (or bounds) miss the stopping test."""
    what = "residuals" if value_tol is None else "eigenvalue error bounds"
    worst = float(residuals.max() if value_tol is None else bounds.max())
    tolerance = f"tolerance {tol if value_tol is None else value_tol:g} × {float(theta.abs().max()):.3g}"
    fix = "raise max_iters or tol"
    if estimates_met:
        what = "verified " + what
        fix = (
            f"the Lanczos estimates (up to {float(estimates.max()):.3g}) met it, but products in {dtype} do not "
            "reach that accuracy: raise tol (or value_tol) above the verified level, or use a float64 operator"
        )
    warnings.warn(
        f"eigs stopped after {steps} Lanczos steps with {what} up to {worst:.3g} ({tolerance}): {fix}",
        RuntimeWarning,
        stacklevel=3,
    )
