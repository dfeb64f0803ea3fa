"""Spectral density by stochastic Lanczos quadrature (SLQ) with Gaussian broadening.

Ubaru, Chen & Saad (2017); for neural-network Hessians Ghorbani, Krishnan & Xiao (2019), Papyan (2020),
and PyHessian (Yao et al., 2020).
"""

from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hessops._arguments import integer, real
from hessops._cola import cola
from hessops.errors import InvalidArgumentError
from hessops.linalg.bounds import warn_inexact
from hessops.linalg.quadrature import Quadrature, quadrature


@dataclass
class SpectralDensity:
    """A density ``φ`` on ``grid`` (it integrates to one on the grid, trapezoid rule), smoothed with a
    Gaussian of width ``sigma``; unpacks as ``grid, density``.

    Attributes:
        grid: the points.
        density: ``φ`` at each point.
        sigma: the width of the Gaussian it was smoothed with.
        quadrature: the quadrature it came from.
        n_matvecs: the operator products it took (columns).
        seconds: its wall time."""

    grid: Tensor
    density: Tensor
    sigma: float
    quadrature: Quadrature
    n_matvecs: int
    seconds: float

    def __iter__(self):
        return iter((self.grid, self.density))

    def to_dict(self) -> dict:
        """The result as JSON-ready values.

        Returns:
            ``grid``, ``density``, ``sigma``, ``moments`` (``mean`` and ``second``: ``tr A / n`` and
            ``tr A² / n``), the quadrature's ``nodes`` and ``weights`` (one row per probe), ``n_matvecs``,
            ``seconds``, ``basis`` (where the Lanczos basis lived)."""
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "sigma": self.sigma,
            "moments": {"mean": self.quadrature.moment(1), "second": self.quadrature.moment(2)},
            "nodes": self.quadrature.nodes.tolist(),
            "weights": self.quadrature.weights.tolist(),
            "n_matvecs": self.n_matvecs,
            "seconds": self.seconds,
            "basis": self.quadrature.basis,
        }


def spectral_density(
    op: cola.ops.LinearOperator,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: int | Tensor = 1000,
    sigma: float | None = None,
    seed: int = 0,
    progress: bool = False,
    basis: str = "auto",
    basis_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> SpectralDensity:
    r"""The spectral density :math:`\phi(t) = \frac1n\sum_i \delta(t-\lambda_i)` estimated by SLQ and
    broadened: :math:`\hat\phi(t) = \frac1P \sum_p \sum_j w_{pj}\, g_\sigma(t - \theta_{pj})`, then normalized
    to integrate to one on the grid (Ghorbani et al. 2019; Papyan 2020). Cost: ``num_probes × lanczos_steps``
    products, ``lanczos_steps`` passes over the data.

    Args:
        op: the self-adjoint operator ``A`` (annotated ``cola.SelfAdjoint``).
        num_probes: ``P``, the Rademacher probe vectors.
        lanczos_steps: the Lanczos steps of each probe (the nodes of its rule).
        grid: a number of points spanning the Ritz values ± 5σ, or the points themselves (a 1-D tensor).
        sigma: the Gaussian's width; defaults to 1% of the grid's span.
        seed: the seed of the probes.
        progress: show the steps as they go.
        basis: :func:`quadrature`'s.
        basis_path: :func:`quadrature`'s.
        checkpoint: :func:`quadrature`'s: a file to save the run to and resume from.
        checkpoint_every: :func:`quadrature`'s: seconds between two saves.

    Returns:
        The :class:`SpectralDensity`; unpacks as ``grid, density = spectral_density(...)``.

    Raises:
        InvalidArgumentError: an argument of the wrong type or out of range, or ``op`` not annotated
            ``SelfAdjoint``.
        DtypeMismatchError: a half-precision operator.
        CheckpointMismatchError: ``checkpoint`` holds another run."""
    if not isinstance(grid, Tensor) and (isinstance(grid, bool) or not isinstance(grid, numbers.Integral)):
        raise InvalidArgumentError(f"grid={grid!r} must be a number of points or a 1-D tensor of points")
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 2 or not bool(torch.isfinite(grid).all()):
            raise InvalidArgumentError(
                f"grid must be a 1-D tensor of at least 2 finite points, got shape {tuple(grid.shape)}"
            )
    else:
        grid = integer("grid", grid, minimum=2)
    if sigma is not None:
        sigma = real("sigma", sigma, positive=True)
    began = time.perf_counter()
    warn_inexact(op, "a spectral density")
    rule = quadrature(
        op,
        num_probes=num_probes,
        lanczos_steps=lanczos_steps,
        seed=seed,
        progress=progress,
        basis=basis,
        basis_path=basis_path,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    grid, density, sigma = rule.density(grid, sigma)
    return SpectralDensity(grid, density, sigma, rule, rule.n_matvecs, time.perf_counter() - began)
