"""Log-determinants of PSD operators and the basin volume they imply."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import cola
import torch

from hessops.density import quadrature
from hessops.errors import NotPositiveDefiniteError
from hessops.operators.regularized import Regularized

LOGDET_METHODS = ("auto", "dense", "slq")
DENSE_LIMIT = 3000


@dataclass
class LogdetEstimate:
    """``estimate`` of ``log det A`` with its ``std_error`` (zero when exact), the method used, the products."""

    estimate: float
    std_error: float
    method: str
    n_matvecs: int
    seconds: float

    def __iter__(self):
        return iter((self.estimate, self.std_error))


def logdet(
    op: cola.ops.LinearOperator,
    *,
    method: str = "auto",
    probes: int = 30,
    lanczos_steps: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> LogdetEstimate:
    r""":math:`\log\det A` of a symmetric positive definite operator (build one with
    :class:`hessops.Regularized`, e.g. ``Regularized(H, c)``).

    - ``"dense"``: ``A.to_dense()`` (n products) and ``eigvalsh``; exact.
    - ``"slq"``: stochastic Lanczos quadrature, :math:`n \cdot \frac1P\sum_p \sum_j w_{pj}\log\theta_{pj}` over
      ``probes`` Rademacher vectors of ``lanczos_steps`` steps (Ubaru, Chen & Saad, 2017); ``std_error`` is the
      standard error over probes (the quadrature bias is small once ``lanczos_steps`` resolves the spectrum).
    - ``"auto"``: dense when ``n <= 3000``, else SLQ.

    A non-positive eigenvalue (or Ritz value) raises :class:`NotPositiveDefiniteError`, never a NaN."""
    if method not in LOGDET_METHODS:
        raise ValueError(f"method={method!r}: choose one of {LOGDET_METHODS}")
    if not op.isa(cola.SelfAdjoint):
        raise ValueError(f"logdet needs a symmetric operator; {op!r} is not annotated SelfAdjoint")
    n = op.shape[0]
    began = time.perf_counter()
    if method == "dense" or (method == "auto" and n <= DENSE_LIMIT):
        eigenvalues = torch.linalg.eigvalsh(op.to_dense().double())
        _check_positive(float(eigenvalues.min()), "eigenvalue")
        return LogdetEstimate(float(eigenvalues.log().sum()), 0.0, "dense", n, time.perf_counter() - began)
    rule = quadrature(op, num_probes=probes, lanczos_steps=lanczos_steps, seed=seed, progress=progress)
    _check_positive(float(rule.nodes.min()), "Ritz value")
    estimate, error = rule.estimate(torch.log)
    return LogdetEstimate(estimate, error, "slq", rule.n_matvecs, time.perf_counter() - began)


def _check_positive(smallest: float, what: str) -> None:
    if not smallest > 0:
        raise NotPositiveDefiniteError(
            f"the operator's smallest {what} is {smallest:.6g}, so log det is undefined: add a larger multiple of "
            "the identity (hessops.Regularized(op, c) with c above that magnitude), or use a PSD operator (GGN)"
        )


@dataclass
class BasinVolume:
    r"""``log_volume = log_unit_ball + log_threshold_term − half_logdet`` for the ellipsoid
    :math:`\{\delta : \tfrac12 \delta^\top (H + cI)\delta \le \text{threshold}\}` in :math:`n` dimensions."""

    log_volume: float
    log_unit_ball: float
    log_threshold_term: float
    half_logdet: float
    logdet_std_error: float
    n: int
    threshold: float
    c: float
    method: str


def log_unit_ball_volume(n: int) -> float:
    r""":math:`\log V_n = \tfrac n2 \log\pi - \log\Gamma(\tfrac n2 + 1)`, exact through ``lgamma``."""
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
) -> BasinVolume:
    r"""The log-volume of the basin :math:`\{\delta : \tfrac12\delta^\top(H+cI)\delta \le \text{threshold}\}`,
    the region where the quadratic model of the loss rises by at most ``threshold``:

    .. math:: \log V = \log V_n + \tfrac n2 \log(2\,\text{threshold}) - \tfrac12 \log\det(H + cI).

    ``c`` damps flat and negative directions; a Gaussian prior of std ``s`` with weight decay ``λ`` gives
    ``c = λ + 1/s²`` (the MNIST basin-volume study: ``1e-5 + 1/0.5**2``). The log-determinant is exact for
    small ``n`` (see :func:`logdet`), else estimated by SLQ with its standard error."""
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    n = H.shape[0]
    op = Regularized(H, c) if c != 0 else H
    estimate = logdet(op, method=method, probes=probes, lanczos_steps=lanczos_steps, seed=seed, progress=progress)
    unit_ball = log_unit_ball_volume(n)
    threshold_term = 0.5 * n * math.log(2 * threshold)
    half = 0.5 * estimate.estimate
    return BasinVolume(
        log_volume=unit_ball + threshold_term - half,
        log_unit_ball=unit_ball,
        log_threshold_term=threshold_term,
        half_logdet=half,
        logdet_std_error=estimate.std_error,
        n=n,
        threshold=float(threshold),
        c=float(c),
        method=estimate.method,
    )
