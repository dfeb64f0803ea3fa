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
    dtype, device = start.dtype, start.device
    mode = "none" if not reorthogonalize else check_mode(basis, basis_path)
    saved = checkpoint.load() if checkpoint is not None else None
    mode = saved["mode"] if saved is not None else choose_mode(mode, max_steps * n * P * dtype.itemsize, device)
    reorthogonalize = mode != "none"
    keep = checkpoint is not None and mode == "disk"
    if keep and basis_path is None:
        basis_path = Path(str(checkpoint.path) + ".basis")
    storage = make_basis(mode, max_steps, start, basis_path, keep=keep, reopen=keep and saved is not None)
    generator = torch.Generator(device="cpu").manual_seed(seed + 7919)
    eps = torch.finfo(dtype).eps
    q = start / column_norms(start, keepdim=True)
    alphas, betas, restarts = [], [], {}
    previous, beta_prev = torch.zeros_like(q), torch.zeros(P, dtype=dtype, device=device)
    n_matvecs, first, done = 0, 0, False
    scale = torch.zeros(P, dtype=dtype, device=device)
    if saved is not None:
        first, done, n_matvecs = saved["steps"], saved["done"], saved["n_matvecs"]
        alphas = list(saved["alphas"].to(dtype=dtype, device=device))
        betas = list(saved["betas"].to(dtype=dtype, device=device))
        restarts = {int(j): v for j, v in saved["restarts"].items()}
        storage.restore(saved.get("basis"), first)
        if not done:
            q, previous, beta_prev, scale = (saved[key].to(device) for key in ("q", "previous", "beta_prev", "scale"))
            generator.set_state(saved["generator"])

    def snapshot(steps: int, finished: bool, vectors: tuple = ()) -> dict[str, Any]:
        state = {
            "mode": mode,
            "steps": steps,
            "done": finished,
            "n_matvecs": n_matvecs if finished else vectors[-2],
            "alphas": _cpu64(alphas[:steps]) if steps else torch.zeros(0, P, dtype=torch.float64),
            "betas": _cpu64(betas[:steps]) if steps else torch.zeros(0, P, dtype=torch.float64),
            "restarts": {str(j): v for j, v in restarts.items() if j <= steps},
            "basis": storage.saved(steps),
        }
        if not finished:
            state |= dict(zip(("q", "previous", "beta_prev", "scale"), (v.cpu() for v in vectors[:4])))
            state["generator"] = vectors[-1]
        return state

    # Where a Ctrl-C or SIGTERM resumes from: the state before the step ``at`` (from the start on, so that a signal
    # while the progress bar is drawn, before the first step, saves too).
    at, point, bar = first, (q, previous, beta_prev, scale, n_matvecs, generator.get_state()), None
    try:
        bar = tqdm(total=max_steps, initial=first, desc=description, disable=not progress, leave=False, unit="step")
        for j in range(first, max_steps if not done else first):
            at, point = j, (q, previous, beta_prev, scale, n_matvecs, generator.get_state())
            if checkpoint is not None and j > first and checkpoint.due():
                checkpoint.save(snapshot(j, False, point))
            storage.truncate(j)
            storage.append(q)
            w = op @ q
            n_matvecs += P
            alpha = column_dots(q, w).to(dtype)
            w = _three_term(w, q, alpha, previous, beta_prev)
            if reorthogonalize:
                for _ in range(2):
                    w = storage.orthogonalize(w)
            beta = column_norms(w)
            scale = torch.maximum(scale, alpha.abs() + beta + beta_prev)
            alphas.append(alpha)
            betas.append(beta)
            bar.update(1)
            if j + 1 == max_steps or (stop is not None and stop(_state(storage, alphas, betas, n_matvecs, restarts))):
                break
            previous, q = q, w.div_(beta.clamp_min(torch.finfo(dtype).tiny))
            broken = beta <= 100 * eps * scale
            if bool(broken.any()):
                q = _restart(q, broken, storage if reorthogonalize else None, previous, generator)
                restarts[j + 1] = q.cpu()
                beta = torch.where(broken, torch.zeros_like(beta), beta)
                betas[-1] = beta
            beta_prev = beta
    except KeyboardInterrupt:
        if checkpoint is None or done:
            raise
        checkpoint.save(snapshot(at, False, point))
        raise checkpoint.interrupted() from None
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None and not done:
        checkpoint.save(snapshot(len(alphas), True))
    state = _state(storage, alphas, betas, n_matvecs, restarts)
    state.start, state.op = start, op
    return state


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


def ritz(state: LanczosState, p: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values ``θ`` (ascending), the eigenvectors ``S`` of ``T_p``, and the residual estimates
    ``|β_m · S[m-1, i]|`` (``‖A y_i − θ_i y_i‖`` for the Ritz vector ``y_i = Q_p S[:, i]``, exact in exact
    arithmetic)."""
    theta, S = torch.linalg.eigh(state.tridiagonal(p))
    residuals = (state.betas[-1, p] * S[-1, :]).abs()
    return theta, S, residuals
