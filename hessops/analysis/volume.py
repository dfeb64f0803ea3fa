"""Log-determinants of PSD operators and the basin volume they imply."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from hessops._arguments import boolean, integer, linear_operator, real
from hessops._cola import cola
from hessops.analysis.logdet import (  # noqa: F401 (*)
    DENSE_LIMIT,
    LOGDET_METHODS,
    SLQ_CONVERGED,
    LogdetEstimate,
    _check_converged,
    logdet,
    smallest_eigenvalue_of,
)
from hessops.errors import NotPositiveDefiniteError
from hessops.operators.regularized import Regularized

# (*) The log-determinants moved to hessops.analysis.logdet; their names are kept here, where hessops 0.1 had them.


@dataclass
class BasinVolume:
    r"""``log_volume = log_unit_ball + log_threshold_term − half_logdet`` for the ellipsoid
    :math:`\{\delta : \tfrac12 \delta^\top (H + cI)\delta \le \text{threshold}\}` in :math:`n` dimensions.

    Attributes:
        log_volume: the log-volume.
        log_unit_ball: :math:`\log V_n` (:func:`log_unit_ball_volume`).
        log_threshold_term: :math:`\tfrac n2 \log(2\,\text{threshold})`.
        n: the dimension.
        threshold: the loss rise that bounds the basin.
        c: the damping added to ``H``.
        logdet: the :class:`LogdetEstimate` of :math:`H + cI` it came from.
        n_matvecs: the operator products (columns).
        seconds: the wall time.
        smallest_eigenvalue: with ``check_c``, the smallest eigenvalue of ``H`` found (or the lower bound given
            as ``smallest_eigenvalue``; ``None`` without either).
        smallest_eigenvalue_bound: its error bound (0 for a given lower bound; ``None`` without either)."""

    log_volume: float
    log_unit_ball: float
    log_threshold_term: float
    n: int
    threshold: float
    c: float
    logdet: LogdetEstimate
    n_matvecs: int
    seconds: float
    smallest_eigenvalue: float | None = None
    smallest_eigenvalue_bound: float | None = None

    @property
    def confidence_interval(self) -> tuple[float, float] | None:
        """The interval of ``log_volume`` that the log-determinant's ``confidence_interval`` implies (``None``
        when that is exact)."""
        interval = self.logdet.confidence_interval
        if interval is None:
            return None
        return self.log_unit_ball + self.log_threshold_term - 0.5 * interval[1], (
            self.log_unit_ball + self.log_threshold_term - 0.5 * interval[0]
        )

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
        """How the log-determinant was computed: ``"dense"``, ``"slq"`` or ``"deflated"``."""
        return self.logdet.method

    def to_dict(self) -> dict:
        """The result as JSON-ready values.

        Returns:
            The terms (``log_volume``, ``log_unit_ball``, ``log_threshold_term``, ``half_logdet``,
            ``logdet_std_error``), ``n``, ``threshold``, ``c``, ``method``, ``n_matvecs``, ``seconds``, and
            ``logdet`` (:meth:`LogdetEstimate.to_dict`); when known, the log-volume's ``confidence_interval`` and
            ``confidence``, and the ``smallest_eigenvalue`` of ``H`` with its ``smallest_eigenvalue_bound``."""
        result = {
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
        if self.confidence_interval is not None:
            result["confidence_interval"] = list(self.confidence_interval)
            result["confidence"] = self.logdet.confidence
        if self.smallest_eigenvalue is not None:
            result["smallest_eigenvalue"] = self.smallest_eigenvalue
            result["smallest_eigenvalue_bound"] = self.smallest_eigenvalue_bound
        return result


def log_unit_ball_volume(n: int) -> float:
    r"""The log-volume of the unit ball, :math:`\log V_n = \tfrac n2 \log\pi - \log\Gamma(\tfrac n2 + 1)`.

    Args:
        n: the dimension, at least 0.

    Returns:
        :math:`\log V_n`, exact through ``lgamma``.

    Raises:
        InvalidArgumentError: ``n`` is not a whole number at least 0."""
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
    deflate: int = 10,
    confidence: float = 0.95,
    check_c: bool = True,
    eigs_tol: float = 1e-3,
    eigs_max_iters: int | None = None,
    smallest_eigenvalue: float | None = None,
) -> BasinVolume:
    r"""The log-volume of the basin :math:`\{\delta : \tfrac12\delta^\top(H+cI)\delta \le \text{threshold}\}`,
    the region where the quadratic model of the loss rises by at most ``threshold``:

    .. math:: \log V = \log V_n + \tfrac n2 \log(2\,\text{threshold}) - \tfrac12 \log\det(H + cI).

    ``c`` damps flat and negative directions; a Gaussian prior of std ``s`` with weight decay ``λ`` gives
    ``c = λ + 1/s²`` (the MNIST basin-volume study: ``1e-5 + 1/0.5**2``). The log-determinant is exact for
    small ``n`` (see :func:`logdet`), else estimated by SLQ, or with ``method="deflated"`` by deflating the
    ``deflate`` largest eigenvalues, with its standard error and a Student-t interval at level ``confidence``
    (:func:`logdet`; the volume's interval is ``confidence_interval``).

    ``check_c`` (default) first finds the smallest eigenvalue :math:`\lambda_{\min}` of ``H`` and its error
    bound ``b`` (:func:`hessops.eigs`, ``"SA"``, bound below ``eigs_tol · max|θ|``) and requires
    :math:`\lambda_{\min} - b + c > 0` (``c`` exceeds :math:`|\lambda_{\min}|` by more than the bound), else
    raises :class:`NotPositiveDefiniteError` naming :math:`\lambda_{\min}` and a ``c`` that works, before the
    costly part. A run that has not converged (``Spectrum.converged`` false: a short run, e.g. one capped by
    ``eigs_max_iters`` or, checkpointed, at what fits in memory, can stop far above a large negative eigenvalue)
    raises it too, naming the fixes: a larger ``eigs_max_iters`` (the run's ``max_iters``), ``smallest_eigenvalue``, a
    larger ``c``, or ``check_c=False`` at your own risk. It is the smallest eigenvalue *found*: Lanczos from a
    random start finds the bottom of the spectrum unless the start is nearly orthogonal to its eigenvector.
    ``smallest_eigenvalue``, a known lower bound on ``H``'s smallest eigenvalue (0 for a GGN or a Fisher),
    replaces that run: then ``smallest_eigenvalue + c > 0`` is required.

    Args:
        H: the curvature operator (annotated ``cola.SelfAdjoint``).
        threshold: the loss rise that bounds the basin, positive.
        c: damps flat and negative directions, as above.
        method: :func:`logdet`'s.
        probes: :func:`logdet`'s.
        lanczos_steps: :func:`logdet`'s.
        seed: :func:`logdet`'s.
        progress: show the steps as they go.
        basis: :func:`logdet`'s.
        basis_path: :func:`logdet`'s.
        checkpoint: :func:`logdet`'s (the check's ``eigs`` run checkpoints to ``checkpoint`` + ``".smallest"``).
        checkpoint_every: :func:`logdet`'s.
        deflate: :func:`logdet`'s.
        confidence: :func:`logdet`'s.
        check_c: find the smallest eigenvalue first, as above.
        eigs_tol: the check's tolerance, as above.
        eigs_max_iters: the check's ``max_iters``.
        smallest_eigenvalue: a known lower bound on ``H``'s smallest eigenvalue, as above.

    Returns:
        The :class:`BasinVolume`.

    Raises:
        NotPositiveDefiniteError: ``H + cI`` is not (verified) positive definite, as above.
        InvalidArgumentError: an argument of the wrong type or out of range.
        DtypeMismatchError: a half-precision operator (refused).
        CheckpointMismatchError: ``checkpoint`` holds another run."""
    threshold = real("threshold", threshold, positive=True)
    c = real("c", c)
    check_c = boolean("check_c", check_c)
    eigs_tol = real("eigs_tol", eigs_tol, positive=True)
    if eigs_max_iters is not None:
        eigs_max_iters = integer("eigs_max_iters", eigs_max_iters, minimum=1)
    if smallest_eigenvalue is not None:
        smallest_eigenvalue = real("smallest_eigenvalue", smallest_eigenvalue)
    linear_operator("H", H)
    n = H.shape[0]
    began = time.perf_counter()
    op = Regularized(H, c) if c != 0 else H
    long_run = {
        "basis": basis,
        "basis_path": basis_path,
        "checkpoint": checkpoint,
        "checkpoint_every": checkpoint_every,
    }
    eigs_options = {"tol": eigs_tol, "max_iters": eigs_max_iters, "seed": seed, "progress": progress}
    smallest, bound, n_matvecs = _check_c(H, c, check_c, smallest_eigenvalue, eigs_options, long_run)
    estimate = logdet(
        op,
        method=method,
        probes=probes,
        lanczos_steps=lanczos_steps,
        seed=seed,
        progress=progress,
        **long_run,
        deflate=deflate,
        confidence=confidence,
        eigs_tol=eigs_tol,
        lower_bound=smallest - bound + c if smallest is not None else None,  # checked above: positive
        eigs_max_iters=eigs_max_iters,
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
        n_matvecs=n_matvecs + estimate.n_matvecs,
        seconds=time.perf_counter() - began,
        smallest_eigenvalue=smallest,
        smallest_eigenvalue_bound=bound,
    )


def _check_c(
    H: cola.ops.LinearOperator,
    c: float,
    check_c: bool,
    known: float | None,
    eigs_options: dict[str, Any],
    long_run: dict[str, Any],
) -> tuple[float | None, float | None, int]:
    """:func:`basin_volume`'s check that ``H + cI`` is positive definite: ``(smallest, bound, n_matvecs)``, the
    smallest eigenvalue of ``H``, its error bound and the products spent finding it: ``known`` and 0 when given,
    else found with ``check_c`` (:func:`smallest_eigenvalue_of`), else ``None``; raises
    :class:`NotPositiveDefiniteError` when the run has not converged or ``smallest − bound + c`` is not positive."""
    smallest = bound = None
    n_matvecs = 0
    if known is not None:
        smallest, bound = known, 0.0
    elif check_c:
        low = smallest_eigenvalue_of(H, eigs_options, long_run)
        _check_converged(
            low,
            "H",
            "smallest_eigenvalue=, a known lower bound on it (0 for a GGN or a Fisher)",
            ", or use a larger c (one above the true |λ_min|), or check_c=False to skip the check at your own risk",
        )
        smallest, bound, n_matvecs = float(low.values[0]), float(low.error_bounds[0]), low.n_matvecs
    if smallest is not None and not smallest - bound + c > 0:
        works = max(2 * (bound - smallest), 0.0)
        raise NotPositiveDefiniteError(
            f"c={c:g} does not make H + cI positive definite: H's smallest eigenvalue is {smallest:.6g} "
            f"(± {bound:.2g}), so c must exceed {bound - smallest:.6g}; e.g. c={works:.3g} (the basin of a "
            "point that is not a minimum is unbounded without it)"
        )
    return smallest, bound, n_matvecs
