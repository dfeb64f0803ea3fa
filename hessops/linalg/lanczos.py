"""Lanczos with full re-orthogonalization, run on several start vectors at once, owned by hessops.

CoLA's Lanczos (0.0.7) preallocates an n × ``max_iters`` basis and re-orthogonalizes over all of it; this one
stores the steps actually taken, stops as soon as a caller's test says so, and runs ``P`` independent
recurrences side by side so that each step is a single ``(n, P)`` matmat: one pass over the data for all
probes of stochastic Lanczos quadrature. The basis lives where :mod:`hessops.linalg.basis` says (device, host,
disk or nowhere), and a run can checkpoint its state and resume (:mod:`hessops.linalg.checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessops._cola import cola
from hessops.errors import DtypeMismatchError
from hessops.linalg.basis import Basis, check_mode, choose_mode, make_basis
from hessops.linalg.checkpoint import Checkpoint
from hessops.numerics import column_dots, column_norms

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class LanczosState:
    """``P`` Lanczos recurrences after ``m`` steps: ``A Q_p = Q_p T_p + β_p q_{p,m+1} e_mᵀ``.

    ``storage`` holds the vectors (:class:`hessops.linalg.basis.Basis`; ``basis`` is them as an ``(m, n, P)``
    tensor, except in the ``"none"`` mode); ``alphas`` and ``betas`` are ``(m, P)`` float64 on the CPU
    (``betas[j]`` couples steps ``j`` and ``j+1``; a zero marks a restart after an invariant subspace was
    found). ``start``, ``op`` and ``restarts`` (the restart vectors by step) let :meth:`ritz_vectors` re-run
    the recurrence when no basis was kept."""

    storage: Basis
    alphas: Tensor
    betas: Tensor
    n_matvecs: int
    start: Tensor | None = None
    op: Any = None
    restarts: dict[int, Tensor] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """The number of Lanczos steps taken (the tridiagonal's size)."""
        return self.alphas.shape[0]

    @property
    def mode(self) -> str:
        """Where the basis lived: ``"device"``, ``"host"``, ``"disk"`` or ``"none"``."""
        return self.storage.mode

    @property
    def basis(self) -> Tensor:
        """The ``(m, n, P)`` Lanczos vectors (on the device, the host, or a view of the disk file)."""
        return self.storage.vectors()[: self.steps]

    def tridiagonal(self, p: int = 0) -> Tensor:
        """The ``(m, m)`` float64 tridiagonal matrix ``T_p``."""
        m = self.steps
        T = torch.diag(self.alphas[:, p])
        if m > 1:
            off = self.betas[: m - 1, p]
            T += torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def ritz_vectors(self, coefficients: Tensor, p: int = 0) -> Tensor:
        """The Ritz vectors ``Q_p S`` (``n × k``, on the operator's device) for eigenvectors ``S`` (``m × k``)
        of ``T_p``. Without a basis (``"none"``) a second pass re-runs recurrence ``p`` from its start vector
        with the stored coefficients and accumulates them: ``m − 1`` more products, counted in ``n_matvecs``."""
        if self.mode != "none":
            return self.storage.combine(coefficients, p)
        q = self.start[:, p : p + 1]
        q = q / column_norms(q, keepdim=True)
        previous = torch.zeros_like(q)
        alphas, betas = self.alphas[:, p].to(q.dtype), self.betas[:, p].to(q.dtype)
        coefficients = coefficients.to(device=q.device, dtype=q.dtype)
        vectors = torch.zeros(q.shape[0], coefficients.shape[1], dtype=q.dtype, device=q.device)
        for j in range(self.steps):
            vectors.addcmul_(q, coefficients[j])
            if j + 1 == self.steps:
                break
            w = self.op @ q
            self.n_matvecs += 1
            beta_prev = betas[j - 1 : j] if j else torch.zeros_like(alphas[:1])
            w = _three_term(w, q, alphas[j : j + 1], previous, beta_prev)
            restart = self.restarts.get(j + 1)
            fresh = restart[:, p : p + 1].to(q.device) if restart is not None and float(betas[j]) == 0 else None
            previous, q = (
                q,
                fresh if fresh is not None else w.div_(betas[j : j + 1].clamp_min(torch.finfo(q.dtype).tiny)),
            )
        return vectors

    def ritz(self, p: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``θ`` (ascending), the eigenvectors ``S`` of ``T_p``, and the residual estimates
        ``|β_m · S[m-1, i]|`` (``‖A y_i − θ_i y_i‖`` for the Ritz vector ``y_i = Q_p S[:, i]``, exact in exact
        arithmetic)."""
        theta, S = torch.linalg.eigh(self.tridiagonal(p))
        residuals = (self.betas[-1, p] * S[-1, :]).abs()
        return theta, S, residuals

    def close(self) -> None:
        """Release the basis (a temporary disk file is deleted)."""
        self.storage.close()


def lanczos(
    op: cola.ops.LinearOperator,
    start: Tensor,
    max_steps: int,
    *,
    stop: Callable[[LanczosState], bool] | None = None,
    reorthogonalize: bool = True,
    seed: int = 0,
    progress: bool = False,
    description: str = "Lanczos",
    basis: str = "auto",
    basis_path: str | os.PathLike | None = None,
    checkpoint: Checkpoint | None = None,
) -> LanczosState:
    """Run Lanczos from each column of ``start`` (``(n, P)``) for at most ``max_steps`` steps.

    After each step ``stop(state)`` may end the run. With ``reorthogonalize`` every new vector is
    orthogonalized twice against its whole basis (classical Gram-Schmidt, twice is enough), which keeps the
    Ritz values free of spurious copies. When a recurrence finds an invariant subspace (β ≈ 0) it restarts
    from a random vector orthogonal to its basis, so the run continues into the rest of the spectrum.

    ``basis`` (:mod:`hessops.linalg.basis`): ``"device"``, ``"host"``, ``"disk"`` (a memory-mapped file at
    ``basis_path``, default a temporary file), ``"none"`` (no basis, no re-orthogonalization; also what
    ``reorthogonalize=False`` means) or ``"auto"``, chosen from the free memory for ``max_steps`` steps.
    ``checkpoint`` (a :class:`~hessops.linalg.checkpoint.Checkpoint`): resume from its file if there is one, save
    to it every so often, at the end, and on Ctrl-C (then re-raise ``KeyboardInterrupt`` saying how to
    resume). With a checkpoint, a disk basis is kept (at ``basis_path``, default the checkpoint's path
    plus ``.basis``) so that the resumed run reopens it. Call :meth:`LanczosState.close` when done with
    the vectors."""
    n, P = start.shape
    max_steps = min(max_steps, n)
    mode = "none" if not reorthogonalize else check_mode(basis, basis_path)
    saved = checkpoint.load() if checkpoint is not None else None
    size = max_steps * n * P * start.dtype.itemsize
    mode = saved["mode"] if saved is not None else choose_mode(mode, size, start.device)
    keep = checkpoint is not None and mode == "disk"
    if keep and basis_path is None:
        basis_path = Path(str(checkpoint.path) + ".basis")
    storage = make_basis(mode, max_steps, start, basis_path, keep=keep, reopen=keep and saved is not None)
    recurrence = _Recurrence(start, storage, mode, seed)
    if saved is not None:
        recurrence.load_state_dict(saved)
    bar = {"total": max_steps, "desc": description, "disable": not progress, "leave": False, "unit": "step"}
    _run(recurrence, op, max_steps, stop, checkpoint, bar)
    state = recurrence.state()
    state.start, state.op = start, op
    return state


class _Recurrence:
    """``P`` Lanczos recurrences between two steps, as :func:`lanczos` runs them: the vectors ``q`` to multiply
    next, the ``previous`` ones and the ``beta_prev`` that couples them, the running ``scale`` (the largest
    ``|α| + β + β'`` so far, for the breakdown test), the ``generator`` of restart vectors, the coefficients
    ``alphas``/``betas`` and ``restarts`` (the restart vectors by step) so far, and the products ``n_matvecs``.
    :meth:`state_dict` and :meth:`load_state_dict` are what a checkpoint saves and resumes from."""

    def __init__(self, start: Tensor, storage: Basis, mode: str, seed: int) -> None:
        P, dtype, device = start.shape[1], start.dtype, start.device
        self.storage, self.mode, self.dtype = storage, mode, dtype
        self.reorthogonalize = mode != "none"
        self.generator = torch.Generator(device="cpu").manual_seed(seed + 7919)
        self.eps = torch.finfo(dtype).eps
        self.q = start / column_norms(start, keepdim=True)
        self.alphas: list[Tensor] = []
        self.betas: list[Tensor] = []
        self.restarts: dict[int, Tensor] = {}
        self.previous, self.beta_prev = torch.zeros_like(self.q), torch.zeros(P, dtype=dtype, device=device)
        self.n_matvecs, self.first, self.done = 0, 0, False
        self.scale = torch.zeros(P, dtype=dtype, device=device)

    def point(self) -> tuple:
        """The state before the next step, as a checkpoint taken there saves it (:meth:`state_dict`)."""
        return self.q, self.previous, self.beta_prev, self.scale, self.n_matvecs, self.generator.get_state()

    def state_dict(self, steps: int, point: tuple | None = None) -> dict[str, Any]:
        """The checkpoint of the run after ``steps`` steps: finished without ``point``, else to go on from
        ``point`` (:meth:`point`, taken before step ``steps``)."""
        finished = point is None
        P = self.q.shape[1]
        state = {
            "mode": self.mode,
            "steps": steps,
            "done": finished,
            "n_matvecs": self.n_matvecs if finished else point[-2],
            "alphas": _cpu64(self.alphas[:steps]) if steps else torch.zeros(0, P, dtype=torch.float64),
            "betas": _cpu64(self.betas[:steps]) if steps else torch.zeros(0, P, dtype=torch.float64),
            "restarts": {str(j): v for j, v in self.restarts.items() if j <= steps},
            "basis": self.storage.saved(steps),
        }
        if not finished:
            state |= dict(zip(("q", "previous", "beta_prev", "scale"), (v.cpu() for v in point[:4])))
            state["generator"] = point[-1]
        return state

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Resume from a checkpoint that :meth:`state_dict` wrote."""
        dtype, device = self.dtype, self.q.device
        self.first, self.done, self.n_matvecs = saved["steps"], saved["done"], saved["n_matvecs"]
        self.alphas = list(saved["alphas"].to(dtype=dtype, device=device))
        self.betas = list(saved["betas"].to(dtype=dtype, device=device))
        self.restarts = {int(j): v for j, v in saved["restarts"].items()}
        self.storage.restore(saved.get("basis"), self.first)
        if not self.done:
            vectors = (saved[key].to(device) for key in ("q", "previous", "beta_prev", "scale"))
            self.q, self.previous, self.beta_prev, self.scale = vectors
            self.generator.set_state(saved["generator"])

    def step(self, op: cola.ops.LinearOperator, j: int) -> tuple[Tensor, Tensor]:
        """Step ``j``: multiply ``q``, orthogonalize, and record ``α`` and ``β``; returns the new vector (not yet
        normalized) and ``β``."""
        storage, q = self.storage, self.q
        storage.truncate(j)
        storage.append(q)
        w = op @ q
        self.n_matvecs += q.shape[1]
        alpha = column_dots(q, w).to(self.dtype)
        w = _three_term(w, q, alpha, self.previous, self.beta_prev)
        if self.reorthogonalize:
            for _ in range(2):
                w = storage.orthogonalize(w)
        beta = column_norms(w)
        self.scale = torch.maximum(self.scale, alpha.abs() + beta + self.beta_prev)
        self.alphas.append(alpha)
        self.betas.append(beta)
        return w, beta

    def advance(self, w: Tensor, beta: Tensor, j: int) -> None:
        """Make ``w``, normalized, the next vector, or restart the recurrences that broke down (``β ≈ 0``)."""
        self.previous, self.q = self.q, w.div_(beta.clamp_min(torch.finfo(self.dtype).tiny))
        broken = beta <= 100 * self.eps * self.scale
        if bool(broken.any()):
            storage = self.storage if self.reorthogonalize else None
            self.q = _restart(self.q, broken, storage, self.previous, self.generator)
            self.restarts[j + 1] = self.q.cpu()
            beta = torch.where(broken, torch.zeros_like(beta), beta)
            self.betas[-1] = beta
        self.beta_prev = beta

    def state(self) -> LanczosState:
        """The :class:`LanczosState` of the steps taken."""
        return _state(self.storage, self.alphas, self.betas, self.n_matvecs, self.restarts)


def _run(
    recurrence: _Recurrence,
    op: cola.ops.LinearOperator,
    max_steps: int,
    stop: Callable[[LanczosState], bool] | None,
    checkpoint: Checkpoint | None,
    bar: dict[str, Any],
) -> None:
    """:func:`lanczos`' steps, from where ``recurrence`` stands to ``max_steps`` or until ``stop``, saving to
    ``checkpoint`` when due, at the end, and on Ctrl-C (then re-raised as the checkpoint's interruption);
    ``bar``: the progress bar's options."""
    first, done = recurrence.first, recurrence.done
    # Where a Ctrl-C or SIGTERM resumes from: the state before the step ``at`` (from the start on, so that a signal
    # while the progress bar is drawn, before the first step, saves too).
    at, point, progress = first, recurrence.point(), None
    try:
        progress = tqdm(initial=first, **bar)
        for j in range(first, max_steps if not done else first):
            at, point = j, recurrence.point()
            if checkpoint is not None and j > first and checkpoint.due():
                checkpoint.save(recurrence.state_dict(j, point))
            w, beta = recurrence.step(op, j)
            progress.update(1)
            if j + 1 == max_steps or (stop is not None and stop(recurrence.state())):
                break
            recurrence.advance(w, beta, j)
    except KeyboardInterrupt:
        if checkpoint is None or done:
            raise
        checkpoint.save(recurrence.state_dict(at, point))
        raise checkpoint.interrupted() from None
    finally:
        if progress is not None:
            progress.close()
    if checkpoint is not None and not done:
        checkpoint.save(recurrence.state_dict(len(recurrence.alphas)))


def _three_term(w: Tensor, q: Tensor, alpha: Tensor, previous: Tensor, beta_prev: Tensor) -> Tensor:
    """``w − αq − β'q'`` in one new tensor (``w`` may be the operator's own, or even ``q``): at 124M parameters
    each temporary is 0.5 GB of fresh pages, and four of them had cost a GPT-2 step as much as its product. Both
    passes of a run without a basis call this, so that the second regenerates the first's vectors bit for bit."""
    return torch.addcmul(w, q, alpha, value=-1).addcmul_(previous, beta_prev, value=-1)


def _state(storage: Basis, alphas: list, betas: list, n_matvecs: int, restarts: dict) -> LanczosState:
    storage.truncate(len(alphas))
    return LanczosState(storage, _cpu64(alphas), _cpu64(betas), n_matvecs, restarts=restarts)


def check_precision(op: cola.ops.LinearOperator, caller: str) -> None:
    """Refuse a ``bfloat16``/``float16`` operator: with 8 or 11 bits of mantissa, every product is off by
    about 1e-3 to 1e-2 relative, Lanczos loses orthogonality within a few steps, and its Ritz values were
    measured 2-12x too small with residual estimates that looked converged. The fix costs the user nothing:
    a hessops operator built with ``dtype=torch.float32`` evaluates a low-precision model in float32."""
    if op.dtype in LOW_PRECISION:
        raise DtypeMismatchError(
            f"{caller} needs a float32 or float64 operator, got {op.dtype}: Lanczos and the trace estimators lose "
            "all accuracy in half precision. Build the operator with dtype=torch.float32, which evaluates the "
            "model in float32 (e.g. hessops.Hessian(model, loss_fn, data, dtype=torch.float32)), or wrap a "
            "float32 copy of your matrix"
        )


def rademacher(n: int, k: int, generator: torch.Generator, op: cola.ops.LinearOperator) -> Tensor:
    """``k`` random ±1 probe vectors ``(n, k)`` in the operator's dtype and device, drawn on the CPU so that
    every device (and every rank) draws the same ones for a seed."""
    return (torch.randint(0, 2, (n, k), generator=generator) * 2 - 1).to(device=op.device, dtype=op.dtype)


def _restart(q: Tensor, broken: Tensor, storage: Basis | None, last: Tensor, generator: torch.Generator) -> Tensor:
    """Replace the columns of ``q`` whose recurrence broke down by random unit vectors orthogonal to their basis
    (to the last vector ``last`` only, without a basis)."""
    fresh = torch.randn(q.shape, generator=generator, dtype=q.dtype).to(q.device)
    for _ in range(2):
        if storage is None:
            fresh = fresh - last * (last * fresh).sum(0)
        else:
            fresh = storage.orthogonalize(fresh)
    fresh = fresh / column_norms(fresh, keepdim=True)
    return torch.where(broken, fresh, q)


def _cpu64(values: list[Tensor]) -> Tensor:
    return torch.stack(values).to(device="cpu", dtype=torch.float64)


def ritz(state, p: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values ``θ`` (ascending), the eigenvectors ``S`` of the projected matrix, and the residual estimates
    of run ``p`` of a :class:`LanczosState` or a :class:`~hessops.linalg.block_lanczos.BlockState` (their
    ``ritz``)."""
    return state.ritz(p)
