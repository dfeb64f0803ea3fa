"""Gauss quadrature of spectral measures by block Lanczos from random probes: the machinery of stochastic
Lanczos quadrature (SLQ), shared by spectral densities, log-determinants and basin volumes.

Golub & Meurant (2010); Ubaru, Chen & Saad (2017).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from hessops._arguments import boolean, integer, linear_operator
from hessops._cola import cola
from hessops.errors import InvalidArgumentError
from hessops.linalg.basis import check_mode
from hessops.linalg.checkpoint import open_checkpoint, tensor_digest
from hessops.linalg.lanczos import check_precision, lanczos, rademacher, ritz


@dataclass
class Quadrature:
    """Gauss quadrature of the spectral measure from ``P`` probes: ``nodes`` (ascending in each row) and
    ``weights`` are ``(P, m)``, each row's weights sum to one. For a probe ``v``, ``Σ_j w_j f(θ_j) ≈
    vᵀ f(A) v / ‖v‖²``, exact for polynomials of degree < 2m. ``residuals`` ``(P, m)`` are the Lanczos
    residual estimates ``|β_m s_mj|`` of the nodes as Ritz values: an eigenvalue lies within each of its
    node (in exact arithmetic). ``basis``: where the Lanczos basis lived (:mod:`hessops.linalg.basis`). ``couplings``
    ``(P, m)``: ``β_m s_mj sign(s_1j)``, the signed residuals that extend each rule to its Gauss-Radau rule
    (:meth:`radau`; ``s_j`` the eigenvectors of ``T_p``)."""

    nodes: Tensor
    weights: Tensor
    n: int
    n_matvecs: int
    residuals: Tensor
    basis: str = "device"
    couplings: Tensor | None = None

    def per_probe(self, f) -> Tensor:
        """``Σ_j w_pj f(θ_pj)`` for each probe: unbiased estimates of ``tr f(A) / n``."""
        return (self.weights * f(self.nodes)).sum(1)

    def estimate(self, f) -> tuple[float, float]:
        """``tr f(A)`` and its standard error across probes."""
        samples = self.n * self.per_probe(f)
        error = float(samples.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else float("nan")
        return float(samples.mean()), error

    def radau(self, f, a: float) -> Tensor:
        r"""``Σ_j ŵ_pj f(θ̂_pj)`` for each probe by the Gauss-Radau rule with the node ``a`` prescribed: the
        ``m + 1``-point rule of :math:`\hat T = \begin{pmatrix} T_m & \beta_m e_m \\ \beta_m e_m^\top &
        a + \delta_m \end{pmatrix}`, :math:`(T_m - aI)\,\delta = \beta_m^2 e_m`, which has ``a`` among its
        nodes and is exact for polynomials of degree ≤ 2m (Golub & Meurant, *Matrices, Moments and Quadrature
        with Applications*, 2010, §6.2). Built in the eigenbasis of ``T_m``: the arrowhead matrix with diagonal
        ``(θ, a + Σ_j b_j²/(θ_j − a))`` and border ``b`` = :attr:`couplings`, read at ``(√w, 0)``.

        For ``a`` at or below the smallest eigenvalue and ``f`` whose derivatives of odd order ``2m + 1`` are
        positive on the spectrum (``log``: :math:`f^{(k)}(x) = (-1)^{k-1}(k-1)!/x^k`), the remainder
        :math:`\frac{f^{(2m+1)}(\eta)}{(2m+1)!}\int (\lambda - a)\prod_j(\lambda - \hat\theta_j)^2\, d\mu`
        is non-negative: the rule is a lower bound on ``vᵀ f(A) v / ‖v‖²``, while Gauss's (:meth:`per_probe`),
        whose remainder has the sign of :math:`f^{(2m)} < 0`, is an upper bound. ``a`` above a Ritz value (the
        smallest Ritz value is at least the smallest eigenvalue, so only by rounding) is lowered to just below
        it, which keeps the bound."""
        if self.couplings is None:
            raise InvalidArgumentError(
                "this quadrature has no couplings: build it with hessops.analysis.density.quadrature"
            )
        theta, b = self.nodes.double(), self.couplings.double()
        P, m = theta.shape
        span = float(theta.max() - theta.min()) or 1.0
        a = torch.minimum(
            torch.full((P,), float(a), dtype=theta.dtype, device=theta.device), theta[:, 0] - 1e-12 * span
        )
        arrow = torch.diag_embed(torch.cat([theta, (a + (b**2 / (theta - a[:, None])).sum(1))[:, None]], dim=1))
        arrow[:, :m, m] = arrow[:, m, :m] = b
        values, vectors = torch.linalg.eigh(arrow)
        values = torch.maximum(values, a[:, None])  # a is the smallest node in exact arithmetic
        weights = (vectors[:, :m, :] * self.weights.double().sqrt()[:, :, None]).sum(1) ** 2
        return (weights * f(values)).sum(1)

    def moment(self, k: int) -> float:
        """The ``k``-th moment of the spectral density, ``tr(A^k)/n``, estimated."""
        return float(self.per_probe(lambda t: t**k).mean())

    def density(self, grid: int | Tensor = 1000, sigma: float | None = None) -> tuple[Tensor, Tensor, float]:
        r"""The rules broadened into a density, as :func:`spectral_density` returns it: ``(grid, density,
        sigma)``, :math:`\hat\phi(t) = \frac1P \sum_p \sum_j w_{pj}\, g_\sigma(t - \theta_{pj})` (float64) with
        :math:`g_\sigma` the normal density of width ``sigma`` (default 1% of the nodes' span), normalized to
        integrate to one on ``grid`` (a number of points spanning the nodes ± 5σ, or the points)."""
        nodes, weights = self.nodes.double().cpu(), self.weights.double().cpu()
        lo, hi = float(nodes.min()), float(nodes.max())
        span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
        sigma = 0.01 * span if sigma is None else sigma
        if isinstance(grid, int):
            grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64)
        grid = torch.as_tensor(grid, dtype=torch.float64)
        kernel = torch.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        density = (kernel * weights[None]).sum(-1).mean(-1)
        mass = torch.trapezoid(density, grid)
        return grid, density / mass if float(mass) > 0 else density, sigma


def quadrature(
    op: cola.ops.LinearOperator,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    seed: int = 0,
    reorthogonalize: bool | None = None,
    progress: bool = False,
    basis: str = "auto",
    basis_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    start: Tensor | None = None,
) -> Quadrature:
    """Run ``lanczos_steps`` Lanczos steps from ``num_probes`` Rademacher vectors at once (one ``(n, P)``
    product a step) and return the Gauss quadrature rules. ``basis`` says where the Lanczos basis lives
    (:mod:`hessops.linalg.basis`); ``"auto"`` keeps it on the device, else the host, when it fits in half of the
    free memory, else keeps none and runs the plain three-term recurrence, whose spurious Ritz copies leave
    the density's smooth shape intact but may bias sharp features. ``reorthogonalize=False`` means
    ``basis="none"``. ``checkpoint``: a file to save the run to every ``checkpoint_every`` seconds and to
    resume from (:mod:`hessops.linalg.checkpoint`). Half-precision operators are refused
    (:func:`hessops.linalg.lanczos.check_precision`). ``start`` ``(n, P)``: the probe vectors (any non-zero columns,
    each normalized), in place of ``num_probes`` Rademacher vectors; the rules are then of the measures
    ``vᵀ f(A) v / ‖v‖²`` of these columns (deflation projects its probes this way)."""
    linear_operator("op", op)
    if not op.isa(cola.SelfAdjoint):
        raise InvalidArgumentError(
            f"{op!r} is not annotated SelfAdjoint: stochastic Lanczos quadrature needs a symmetric operator"
        )
    check_precision(op, "stochastic Lanczos quadrature")
    num_probes = integer("num_probes", num_probes, minimum=1)
    lanczos_steps = integer("lanczos_steps", lanczos_steps, minimum=1)
    seed = integer("seed", seed)
    progress = boolean("progress", progress)
    if reorthogonalize is not None:
        reorthogonalize = boolean("reorthogonalize", reorthogonalize)
    basis = check_mode(basis, basis_path)
    n = op.shape[0]
    if start is not None:
        start = _checked_probes(start, op)
        num_probes = start.shape[1]
    steps = min(lanczos_steps, n)
    saving = open_checkpoint(
        checkpoint,
        checkpoint_every,
        "quadrature",
        op,
        num_probes=num_probes,
        lanczos_steps=lanczos_steps,
        seed=seed,
        reorthogonalize=reorthogonalize,
        basis=basis,
        start=None if start is None else tensor_digest(start),
    )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probes = rademacher(n, num_probes, generator, op) if start is None else start
    state = lanczos(
        op,
        probes,
        steps,
        reorthogonalize=reorthogonalize is not False,
        seed=seed,
        progress=progress,
        description="SLQ",
        basis=basis,
        basis_path=basis_path,
        checkpoint=saving,
    )
    state.close()
    nodes, weights, residuals, couplings = [], [], [], []
    for p in range(num_probes):
        theta, S, estimates = ritz(state, p)
        nodes.append(theta)
        weights.append(S[0] ** 2)
        residuals.append(estimates)
        couplings.append(state.betas[-1, p] * S[-1] * torch.where(S[0] < 0, -1.0, 1.0).to(S.dtype))
    return Quadrature(
        torch.stack(nodes),
        torch.stack(weights),
        n,
        state.n_matvecs,
        torch.stack(residuals),
        basis=state.mode,
        couplings=torch.stack(couplings),
    )


def _checked_probes(start: Tensor, op: cola.ops.LinearOperator) -> Tensor:
    """``start`` as ``(n, P)`` probes in the operator's dtype and device, when it is a finite ``(n, P)`` tensor
    without a zero column."""
    n = op.shape[0]
    if not isinstance(start, Tensor) or start.dim() != 2 or start.shape[0] != n or start.shape[1] < 1:
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise InvalidArgumentError(f"start must be an (n, P) tensor of probe vectors with n = {n}, got {shape}")
    if not bool(torch.isfinite(start).all()):
        raise InvalidArgumentError("start holds NaN or inf: pass finite probe vectors (or start=None)")
    if not bool((start != 0).any(dim=0).all()):
        raise InvalidArgumentError("start has a zero column, which spans no Krylov space: drop it (or start=None)")
    return start.to(device=op.device, dtype=op.dtype)
