"""Lanczos with full re-orthogonalization, run on several start vectors at once, owned by hessops.

CoLA's Lanczos (0.0.7) preallocates an n × ``max_iters`` basis and re-orthogonalizes over all of it; this one
stores the steps actually taken, stops as soon as a caller's test says so, and runs ``P`` independent
recurrences side by side so that each step is a single ``(n, P)`` matmat: one pass over the data for all
probes of stochastic Lanczos quadrature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessops._cola import cola
from hessops.errors import DtypeMismatchError

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class LanczosState:
    """``P`` Lanczos recurrences after ``m`` steps: ``A Q_p = Q_p T_p + β_p q_{p,m+1} e_mᵀ``.

    ``basis`` is ``(m, n, P)``; ``alphas`` and ``betas`` are ``(m, P)`` float64 on the CPU (``betas[j]`` couples
    steps ``j`` and ``j+1``; a zero marks a restart after an invariant subspace was found)."""

    basis: Tensor
    alphas: Tensor
    betas: Tensor
    n_matvecs: int

    @property
    def steps(self) -> int:
        """The number of Lanczos steps taken (the tridiagonal's size)."""
        return self.alphas.shape[0]

    def tridiagonal(self, p: int = 0) -> Tensor:
        """The ``(m, m)`` float64 tridiagonal matrix ``T_p``."""
        m = self.steps
        T = torch.diag(self.alphas[:, p])
        if m > 1:
            off = self.betas[: m - 1, p]
            T += torch.diag(off, 1) + torch.diag(off, -1)
        return T


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
) -> LanczosState:
    """Run Lanczos from each column of ``start`` (``(n, P)``) for at most ``max_steps`` steps.

    After each step ``stop(state)`` may end the run. With ``reorthogonalize`` every new vector is
    orthogonalized twice against its whole basis (classical Gram-Schmidt, twice is enough), which keeps the
    Ritz values free of spurious copies. When a recurrence finds an invariant subspace (β ≈ 0) it restarts
    from a random vector orthogonal to its basis, so the run continues into the rest of the spectrum."""
    n, P = start.shape
    max_steps = min(max_steps, n)
    dtype, device = start.dtype, start.device
    generator = torch.Generator(device="cpu").manual_seed(seed + 7919)
    eps = torch.finfo(dtype).eps
    capacity = min(max_steps, 16)
    basis = torch.empty(capacity, n, P, dtype=dtype, device=device)
    q = start / torch.linalg.vector_norm(start, dim=0, keepdim=True)
    alphas, betas = [], []
    previous, beta_prev = torch.zeros_like(q), torch.zeros(P, dtype=dtype, device=device)
    n_matvecs = 0
    scale = torch.zeros(P, dtype=dtype, device=device)
    bar = tqdm(total=max_steps, desc=description, disable=not progress, leave=False, unit="step")
    state = None
    try:
        for j in range(max_steps):
            if j == capacity:
                capacity = min(2 * capacity, max_steps)
                grown = torch.empty(capacity, n, P, dtype=dtype, device=device)
                grown[:j] = basis[:j]
                basis = grown
            basis[j] = q
            w = op @ q
            n_matvecs += P
            alpha = (q * w).sum(0)
            w = w - alpha * q - beta_prev * previous
            if reorthogonalize:
                for _ in range(2):
                    w = w - torch.einsum("mnp,mp->np", basis[: j + 1], torch.einsum("mnp,np->mp", basis[: j + 1], w))
            beta = torch.linalg.vector_norm(w, dim=0)
            scale = torch.maximum(scale, alpha.abs() + beta + beta_prev)
            alphas.append(alpha)
            betas.append(beta)
            state = LanczosState(basis[: j + 1], _cpu64(alphas), _cpu64(betas), n_matvecs)
            bar.update(1)
            if j + 1 == max_steps or (stop is not None and stop(state)):
                break
            previous, q = q, w / beta.clamp_min(torch.finfo(dtype).tiny)
            broken = beta <= 100 * eps * scale
            if bool(broken.any()):
                q = _restart(q, broken, basis[: j + 1], generator)
                beta = torch.where(broken, torch.zeros_like(beta), beta)
                betas[-1] = beta
            beta_prev = beta
    finally:
        bar.close()
    return state


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


def _restart(q: Tensor, broken: Tensor, basis: Tensor, generator: torch.Generator) -> Tensor:
    """Replace the columns of ``q`` whose recurrence broke down by random unit vectors orthogonal to their basis."""
    fresh = torch.randn(q.shape, generator=generator, dtype=q.dtype).to(q.device)
    for _ in range(2):
        fresh = fresh - torch.einsum("mnp,mp->np", basis, torch.einsum("mnp,np->mp", basis, fresh))
    fresh = fresh / torch.linalg.vector_norm(fresh, dim=0, keepdim=True)
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
