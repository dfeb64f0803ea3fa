"""Log-determinants of PSD operators and the basin volume they imply."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hessops import constants
from hessops._arguments import boolean, choice, integer, linear_operator, real
from hessops._cola import cola
from hessops.density import Quadrature, quadrature
from hessops.errors import NotPositiveDefiniteError
from hessops.lanczos import check_precision
from hessops.operators.regularized import Regularized

LOGDET_METHODS = constants.LOGDET_METHODS
DENSE_LIMIT = 3000
SLQ_CONVERGED = 1e-2  # a smallest Ritz value counts as converged when its residual is below this × the Ritz span


@dataclass
class LogdetEstimate:
    """``estimate`` of ``log det A`` with its ``std_error`` (zero when exact), the ``method`` used, the
    operator products (``n_matvecs``, columns), the wall time in ``seconds``, and what the estimate came from:
    the exact ``eigenvalues`` (``"dense"``) or the SLQ ``quadrature`` (``"slq"``), the other ``None``."""

    estimate: float
    std_error: float
    method: str
    n_matvecs: int
    seconds: float
    eigenvalues: Tensor | None = None
    quadrature: Quadrature | None = None

    def __iter__(self):
        return iter((self.estimate, self.std_error))

    def to_dict(self) -> dict:
        """The result as JSON-ready values: ``logdet``, ``std_error``, ``method``, ``n_matvecs``, ``seconds``,
        and for SLQ the ``quadrature``'s ``nodes`` and ``weights`` (one row per probe) and its ``basis``."""
        result = {
            "logdet": self.estimate,
            "std_error": self.std_error,
            "method": self.method,
            "n_matvecs": self.n_matvecs,
            "seconds": self.seconds,
        }
        if self.quadrature is not None:
            result["quadrature"] = {
                "nodes": self.quadrature.nodes.tolist(),
                "weights": self.quadrature.weights.tolist(),
                "basis": self.quadrature.basis,
            }
        return result


def logdet(
    op: cola.ops.LinearOperator,
    *,
    method: str = "auto",
    probes: int = 30,
    lanczos_steps: int = 50,
    seed: int = 0,
    progress: bool = False,
    basis: str = "auto",
    basis_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> LogdetEstimate:
    r""":math:`\log\det A` of a symmetric positive definite operator (build one with
    :class:`hessops.Regularized`, e.g. ``Regularized(H, c)``).

    - ``"dense"``: ``A.to_dense()`` (n products) and ``eigvalsh``; exact.
    - ``"slq"``: stochastic Lanczos quadrature, :math:`n \cdot \frac1P\sum_p \sum_j w_{pj}\log\theta_{pj}` over
      ``probes`` Rademacher vectors of ``lanczos_steps`` steps (Ubaru, Chen & Saad, 2017); ``std_error`` is the
      standard error over probes (the quadrature bias is small once ``lanczos_steps`` resolves the spectrum).
    - ``"auto"``: dense when ``n <= 3000``, else SLQ.

    A non-positive eigenvalue raises :class:`NotPositiveDefiniteError`, never a NaN. SLQ sees the spectrum
    only through Ritz values, so it also raises unless every probe's smallest Ritz value ``θ`` is verified
    positive: converged (its residual estimate ``r`` at most ``1e-2`` times the span of the Ritz values: the
    bottom of the spectrum has been reached) and ``θ − r > 0``, so that the eigenvalue ``θ`` approximates lies
    above 0. Guaranteed (in exact arithmetic): a non-positive Ritz value proves the operator indefinite
    (interlacing), and a refused run is never reported as a number. Not guaranteed: that the operator is
    positive definite when the check passes, since an eigenvalue that the Krylov spaces have not reached
    (one the probes barely touch) can still lie below 0; ``method="dense"`` is exact. Half-precision
    operators are refused. ``basis``, ``basis_path``, ``checkpoint`` and ``checkpoint_every``: the SLQ
    run's, as in :func:`hessops.density.quadrature` (the dense method is one step, not checkpointed)."""
    method = choice("method", method, LOGDET_METHODS)
    probes = integer("probes", probes, minimum=1)
    lanczos_steps = integer("lanczos_steps", lanczos_steps, minimum=1)
    seed = integer("seed", seed)
    progress = boolean("progress", progress)
    linear_operator("op", op)
    if not op.isa(cola.SelfAdjoint):
        raise ValueError(f"logdet needs a symmetric operator; {op!r} is not annotated SelfAdjoint")
    check_precision(op, "logdet")
    n = op.shape[0]
    began = time.perf_counter()
    if method == "dense" or (method == "auto" and n <= DENSE_LIMIT):
        eigenvalues = torch.linalg.eigvalsh(op.to_dense().double())
        _check_positive(float(eigenvalues.min()), "eigenvalue")
        return LogdetEstimate(
            float(eigenvalues.log().sum()), 0.0, "dense", n, time.perf_counter() - began, eigenvalues=eigenvalues.cpu()
        )
    rule = quadrature(
        op,
        num_probes=probes,
        lanczos_steps=lanczos_steps,
        seed=seed,
        progress=progress,
        basis=basis,
        basis_path=basis_path,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    _check_positive(float(rule.nodes.min()), "Ritz value")
    _check_verified(rule)
    estimate, error = rule.estimate(torch.log)
    return LogdetEstimate(estimate, error, "slq", rule.n_matvecs, time.perf_counter() - began, quadrature=rule)


def _check_positive(smallest: float, what: str) -> None:
    if not smallest > 0:
        raise NotPositiveDefiniteError(
            f"the operator's smallest {what} is {smallest:.6g}, so log det is undefined: add a larger multiple of "
            "the identity (hessops.Regularized(op, c) with c above that magnitude), or use a PSD operator (GGN)"
        )


def _check_verified(rule: Quadrature) -> None:
    """Refuse unless each probe's smallest Ritz value ``θ`` has converged (residual estimate ``r`` at most
    ``SLQ_CONVERGED`` times the span of the Ritz values) and ``θ − r > 0``."""
    theta, r = rule.nodes[:, 0], rule.residuals[:, 0]
    span = float(rule.nodes.max() - rule.nodes.min())
    failing = (theta - r <= 0) | (r > SLQ_CONVERGED * span)
    if bool(failing.any()):
        p = int(failing.nonzero()[0])
        theta, r = float(theta[p]), float(r[p])
        raise NotPositiveDefiniteError(
            f"SLQ cannot verify that the operator is positive definite: probe {p}'s smallest Ritz value {theta:.6g} "
            f"has residual {r:.3g} (converged means at most {SLQ_CONVERGED:g} × the Ritz span {span:.3g}, and an "
            f"interval [{theta - r:.3g}, {theta + r:.3g}] above 0), so an eigenvalue at or below 0 is not ruled out "
            "(the operator may be indefinite, and log det undefined): raise "
            "lanczos_steps (the smallest Ritz values converge as steps grow), use method='dense' where n allows, "
            "or add a larger multiple of the identity (hessops.Regularized(op, c))"
        )


@dataclass
class BasinVolume:
    r"""``log_volume = log_unit_ball + log_threshold_term − half_logdet`` for the ellipsoid
    :math:`\{\delta : \tfrac12 \delta^\top (H + cI)\delta \le \text{threshold}\}` in :math:`n` dimensions,
    with the :class:`LogdetEstimate` of :math:`H + cI` it came from (``logdet``), the operator products
    (``n_matvecs``, columns) and the wall time in ``seconds``."""

    log_volume: float
    log_unit_ball: float
    log_threshold_term: float
    n: int
    threshold: float
    c: float
    logdet: LogdetEstimate
    n_matvecs: int
    seconds: float

    @property
    def half_logdet(self) -> float:
        r""":math:`\tfrac12 \log\det(H + cI)`, the term subtracted."""
        return 0.5 * self.logdet.estimate

    @property
    def logdet_std_error(self) -> float:
        r"""The standard error of :math:`\log\det(H + cI)` (that of ``log_volume`` is half of it)."""
        return self.logdet.std_error

    @property
    def method(self) -> str:
        """How the log-determinant was computed: ``"dense"`` or ``"slq"``."""
        return self.logdet.method

    def to_dict(self) -> dict:
        """The result as JSON-ready values: the terms (``log_volume``, ``log_unit_ball``,
        ``log_threshold_term``, ``half_logdet``, ``logdet_std_error``), ``n``, ``threshold``, ``c``,
        ``method``, ``n_matvecs``, ``seconds``, and ``logdet`` (:meth:`LogdetEstimate.to_dict`)."""
        return {
            "log_volume": self.log_volume,
            "log_unit_ball": self.log_unit_ball,
            "log_threshold_term": self.log_threshold_term,
            "half_logdet": self.half_logdet,
            "logdet_std_error": self.logdet_std_error,
            "n": self.n,
            "threshold": self.threshold,
            "c": self.c,
            "method": self.method,
            "n_matvecs": self.n_matvecs,
            "seconds": self.seconds,
            "logdet": self.logdet.to_dict(),
        }


def log_unit_ball_volume(n: int) -> float:
    r""":math:`\log V_n = \tfrac n2 \log\pi - \log\Gamma(\tfrac n2 + 1)`, exact through ``lgamma``."""
    n = integer("n", n, minimum=0)
    return 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1)


def basin_volume(
    H: cola.ops.LinearOperator,
    *,
    threshold: float,
    c: float = 0.0,
    method: str = "auto",
    probes: int = 30,
    lanczos_steps: int = 50,
    seed: int = 0,
    progress: bool = False,
    basis: str = "auto",
    basis_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> BasinVolume:
    r"""The log-volume of the basin :math:`\{\delta : \tfrac12\delta^\top(H+cI)\delta \le \text{threshold}\}`,
    the region where the quadratic model of the loss rises by at most ``threshold``:

    .. math:: \log V = \log V_n + \tfrac n2 \log(2\,\text{threshold}) - \tfrac12 \log\det(H + cI).

    ``c`` damps flat and negative directions; a Gaussian prior of std ``s`` with weight decay ``λ`` gives
    ``c = λ + 1/s²`` (the MNIST basin-volume study: ``1e-5 + 1/0.5**2``). The log-determinant is exact for
    small ``n`` (see :func:`logdet`), else estimated by SLQ with its standard error; ``basis``, ``basis_path``,
    ``checkpoint`` and ``checkpoint_every`` are :func:`logdet`'s."""
    threshold = real("threshold", threshold, positive=True)
    c = real("c", c)
    linear_operator("H", H)
    n = H.shape[0]
    began = time.perf_counter()
    op = Regularized(H, c) if c != 0 else H
    estimate = logdet(
        op,
        method=method,
        probes=probes,
        lanczos_steps=lanczos_steps,
        seed=seed,
        progress=progress,
        basis=basis,
        basis_path=basis_path,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    unit_ball = log_unit_ball_volume(n)
    threshold_term = 0.5 * n * math.log(2 * threshold)
    return BasinVolume(
        log_volume=unit_ball + threshold_term - 0.5 * estimate.estimate,
        log_unit_ball=unit_ball,
        log_threshold_term=threshold_term,
        n=n,
        threshold=float(threshold),
        c=float(c),
        logdet=estimate,
        n_matvecs=estimate.n_matvecs,
        seconds=time.perf_counter() - began,
    )
