"""Log-determinants of PSD operators: :func:`logdet`, exact, by stochastic Lanczos quadrature or deflated (the
top eigenvalues exact, SLQ on the complement), with the positivity checks it rests on."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessops import constants
from hessops._arguments import boolean, choice, integer, linear_operator, real
from hessops._cola import cola
from hessops.analysis.spectrum import Spectrum, eigs
from hessops.errors import InvalidArgumentError, NotPositiveDefiniteError
from hessops.linalg.bounds import warn_inexact
from hessops.linalg.deflation import Complement, student_t_interval
from hessops.linalg.lanczos import check_precision, rademacher
from hessops.linalg.quadrature import Quadrature, quadrature
from hessops.numerics import column_norms

LOGDET_METHODS = constants.LOGDET_METHODS
DENSE_LIMIT = 3000
SLQ_CONVERGED = 1e-2  # a smallest Ritz value counts as converged when its residual is below this × the Ritz span


@dataclass
class LogdetEstimate:
    """An estimate of ``log det A`` with its standard error; unpacks as ``estimate, std_error``; see :func:`logdet`.

    Attributes:
        estimate: the estimate of ``log det A``.
        std_error: its standard error (zero when exact).
        method: the method used: ``"dense"``, ``"slq"`` or ``"deflated"``.
        n_matvecs: the operator products (columns).
        seconds: the wall time.
        eigenvalues: the exact eigenvalues (``"dense"``; else ``None``).
        quadrature: the SLQ quadrature (``"slq"``; ``"deflated"``: that of the complement; ``None`` when dense).
        confidence_interval: SLQ and deflation: the Student-t interval at level ``confidence`` over the probes'
            ``samples``; deflation lowers its low end by ``deflation_bias + quadrature_bias``.
        confidence: its level.
        samples: each probe's estimate of the SLQ part.
        deflated_eigenvalues: deflation: the exact top eigenvalues.
        deflation_bias: deflation: a bound on how far deflating approximate eigenvectors raises the estimate.
        quadrature_decay: deflation: the rate ``ρ^{−2m}`` at which the quadrature's error falls with the Lanczos
            steps ``m``.
        quadrature_bias: deflation: a bound on how far the Lanczos quadrature raises the estimate (the Gauss
            rules' mean less their Gauss-Radau counterparts').
        noise_interval: deflation: the Student-t interval alone, the probes' noise only."""

    estimate: float
    std_error: float
    method: str
    n_matvecs: int
    seconds: float
    eigenvalues: Tensor | None = None
    quadrature: Quadrature | None = None
    confidence_interval: tuple[float, float] | None = None
    confidence: float | None = None
    samples: Tensor | None = None
    deflated_eigenvalues: Tensor | None = None
    deflation_bias: float | None = None
    quadrature_decay: float | None = None
    quadrature_bias: float | None = None
    noise_interval: tuple[float, float] | None = None

    def __iter__(self):
        return iter((self.estimate, self.std_error))

    def to_dict(self) -> dict:
        """The result as JSON-ready values.

        Returns:
            ``logdet``, ``std_error``, ``method``, ``n_matvecs``, ``seconds``, for SLQ the ``quadrature``'s
            ``nodes``, ``weights`` (one row per probe) and ``basis``, ``confidence_interval`` and ``confidence``, and
            for deflation ``deflated_eigenvalues``, ``deflation_bias``, ``quadrature_decay``, ``quadrature_bias``,
            ``noise_interval``."""
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
        if self.confidence_interval is not None:
            result["confidence_interval"] = list(self.confidence_interval)
            result["confidence"] = self.confidence
        if self.deflated_eigenvalues is not None:
            result["deflated_eigenvalues"] = self.deflated_eigenvalues.tolist()
            result["deflation_bias"] = self.deflation_bias
            result["quadrature_decay"] = self.quadrature_decay
            result["quadrature_bias"] = self.quadrature_bias
            result["noise_interval"] = list(self.noise_interval) if self.noise_interval is not None else None
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
    deflate: int = 10,
    confidence: float = 0.95,
    eigs_tol: float = 1e-3,
    lower_bound: float | None = None,
    eigs_max_iters: int | None = None,
) -> LogdetEstimate:
    r""":math:`\log\det A` of a symmetric positive definite operator (build one with
    :class:`hessops.Regularized`, e.g. ``Regularized(H, c)``).

    - ``"dense"``: ``A.to_dense()`` (n products) and ``eigvalsh``; exact.
    - ``"slq"``: stochastic Lanczos quadrature, :math:`n \cdot \frac1P\sum_p \sum_j w_{pj}\log\theta_{pj}` over
      ``probes`` Rademacher vectors of ``lanczos_steps`` steps (Ubaru, Chen & Saad, 2017); ``std_error`` is the
      standard error over probes (the quadrature bias is small once ``lanczos_steps`` resolves the spectrum).
    - ``"deflated"``: the ``deflate`` largest eigenvalues ``θ_i`` of ``A`` (:func:`hessops.eigs`, ``"LA"``,
      residuals below ``eigs_tol · θ_max``) counted exactly, the rest by SLQ on the complement of their
      eigenvectors ``V``: Lanczos on :math:`PAP`, :math:`P = I - VV^\top`, from the projected probes
      :math:`Pz`, each probe's quadrature weighted by :math:`\|Pz\|^2`, which is unbiased for the
      complement's :math:`\operatorname{tr}\log`; with the control variate :math:`\mu(n - k - \|Pz\|^2)`
      (mean zero), :math:`\mu` the midpoint of the smallest eigenvalue's and the smallest deflated one's
      logarithms, which cancels the fluctuation of :math:`\|Pz\|^2` times the mean log-eigenvalue.
      Removing the top of the spectrum shrinks the complement's condition number :math:`\kappa`, on which
      the quadrature's error depends, and the probes' variance where the outliers dominate the spread of
      :math:`\log A` (not where ``c`` does). The quadrature's error falls like :math:`\rho^{-2m}`,
      :math:`\rho = (\sqrt\kappa + 1)/(\sqrt\kappa - 1)`, with the Lanczos steps ``m`` (Ubaru, Chen &
      Saad, 2017, Thm. 4.2; reported as ``quadrature_decay``, with :math:`\kappa` from the largest Ritz
      value and the smallest eigenvalue). For :math:`\log` the Gauss rule of each probe is an upper bound on
      its exact value and the Gauss-Radau rule with the node :math:`\lambda_{\min}` (less its bound, or
      ``lower_bound``) a lower bound (:meth:`hessops.analysis.density.Quadrature.radau`; Golub & Meurant, 2010, §6.2;
      for log-determinants Bai, Fahey & Golub, 1996): the mean gap of the probes' samples, ``quadrature_bias``,
      bounds how far the quadrature raises the estimate. Positivity is checked first,
      by the smallest eigenvalue (:func:`hessops.eigs`, ``"SA"``, error bound below ``eigs_tol · max|θ|``),
      which must exceed its bound; a run that has not converged (the bottom of the spectrum not yet reached)
      raises :class:`NotPositiveDefiniteError` naming the fixes. ``eigs_max_iters`` is both ``eigs`` runs'
      ``max_iters``. Deflating Ritz vectors with residuals ``r_i`` can only raise the estimate
      (Fischer's inequality), by at most :math:`-\log(1 - \sum_i r_i^2/(\theta_i \lambda_{\min}))`, with
      :math:`\lambda_{\min}` the smallest eigenvalue less its bound (``deflation_bias``). ``lower_bound``, a
      positive lower bound on the smallest eigenvalue when one is known (``c`` for a PSD operator plus
      ``cI``; :func:`basin_volume` passes the one it checked), replaces that search. Cost: the two ``eigs``
      runs plus ``probes × lanczos_steps`` products.
    - ``"auto"``: dense when ``n <= 3000``, else SLQ.

    SLQ and deflation report a ``confidence_interval`` at level ``confidence``, built on the Student t interval
    ``[low, high]`` with ``probes − 1`` degrees of freedom over the probes' estimates. For SLQ it is that
    interval: the probes' noise only, not the quadrature's bias (which ``lanczos_steps`` bounds, see above).
    For deflation both biases are bounded and can only raise the estimate, so its ``confidence_interval`` is
    ``[low − quadrature_bias − deflation_bias, high]``, which covers :math:`\log\det A` at least at about the
    level (the Gauss samples' standard error standing in for the exact quadrature's); ``noise_interval`` is
    ``[low, high]`` alone.

    A non-positive eigenvalue raises :class:`NotPositiveDefiniteError`, never a NaN. SLQ sees the spectrum
    only through Ritz values, so it also raises unless every probe's smallest Ritz value ``θ`` is verified
    positive: converged (its residual estimate ``r`` at most ``1e-2`` times the span of the Ritz values: the
    bottom of the spectrum has been reached) and ``θ − r > 0``, so that the eigenvalue ``θ`` approximates lies
    above 0. Guaranteed (in exact arithmetic): a non-positive Ritz value proves the operator indefinite
    (interlacing), and a refused run is never reported as a number. Not guaranteed: that the operator is
    positive definite when the check passes, since an eigenvalue that the Krylov spaces have not reached
    (one the probes barely touch) can still lie below 0; ``method="dense"`` is exact.

    Args:
        op: the symmetric positive definite operator ``A`` (annotated ``cola.SelfAdjoint``).
        method: ``"auto"``, ``"dense"``, ``"slq"`` or ``"deflated"``, as above.
        probes: ``P``, the Rademacher probe vectors of SLQ.
        lanczos_steps: the Lanczos steps of each probe.
        seed: the seed of the probes and of the ``eigs`` runs.
        progress: show the steps as they go.
        basis: the SLQ run's, as in :func:`hessops.analysis.density.quadrature`.
        basis_path: the SLQ run's, as in :func:`hessops.analysis.density.quadrature`.
        checkpoint: the SLQ run's file to save to and resume from (the dense method is one step, not
            checkpointed); the deflated method's three Lanczos runs each checkpoint to ``checkpoint`` plus
            ``".smallest"``, ``".top"`` and ``".slq"``.
        checkpoint_every: seconds between two saves of ``checkpoint``.
        deflate: ``"deflated"``: how many of the largest eigenvalues are counted exactly.
        confidence: the level of ``confidence_interval``.
        eigs_tol: the ``eigs`` runs' tolerance, as above.
        lower_bound: a positive lower bound on the smallest eigenvalue when one is known, as above.
        eigs_max_iters: both ``eigs`` runs' ``max_iters``.

    Returns:
        The :class:`LogdetEstimate`; unpacks as ``estimate, std_error = logdet(...)``.

    Raises:
        NotPositiveDefiniteError: a non-positive eigenvalue, or one not verified positive, as above.
        InvalidArgumentError: an argument of the wrong type or out of range, or ``op`` not annotated
            ``SelfAdjoint``.
        DtypeMismatchError: a half-precision operator (refused).
        CheckpointMismatchError: ``checkpoint`` holds another run."""
    method = choice("method", method, LOGDET_METHODS)
    probes = integer("probes", probes, minimum=1)
    lanczos_steps = integer("lanczos_steps", lanczos_steps, minimum=1)
    seed = integer("seed", seed)
    progress = boolean("progress", progress)
    deflate = integer("deflate", deflate, minimum=0)
    confidence = _confidence(confidence)
    eigs_tol = real("eigs_tol", eigs_tol, positive=True)
    if lower_bound is not None:
        lower_bound = real("lower_bound", lower_bound, positive=True)
    if eigs_max_iters is not None:
        eigs_max_iters = integer("eigs_max_iters", eigs_max_iters, minimum=1)
    linear_operator("op", op)
    if not op.isa(cola.SelfAdjoint):
        raise InvalidArgumentError(f"logdet needs a symmetric operator; {op!r} is not annotated SelfAdjoint")
    check_precision(op, "logdet")
    warn_inexact(op, "logdet")
    n = op.shape[0]
    began = time.perf_counter()
    if method == "dense" or (method == "auto" and n <= DENSE_LIMIT):
        eigenvalues = torch.linalg.eigvalsh(op.to_dense().double())
        _check_positive(float(eigenvalues.min()), "eigenvalue")
        return LogdetEstimate(
            float(eigenvalues.log().sum()), 0.0, "dense", n, time.perf_counter() - began, eigenvalues=eigenvalues.cpu()
        )
    long_run = {
        "basis": basis,
        "basis_path": basis_path,
        "checkpoint": checkpoint,
        "checkpoint_every": checkpoint_every,
    }
    if method == "deflated":
        eigs_options = {"tol": eigs_tol, "max_iters": eigs_max_iters, "seed": seed, "progress": progress}
        return _deflated(
            op, deflate, probes, lanczos_steps, seed, confidence, eigs_options, lower_bound, began, long_run
        )
    rule = quadrature(op, num_probes=probes, lanczos_steps=lanczos_steps, seed=seed, progress=progress, **long_run)
    _check_positive(float(rule.nodes.min()), "Ritz value")
    _check_verified(rule)
    estimate, error = rule.estimate(torch.log)
    interval = None
    samples = n * rule.per_probe(torch.log)
    if probes > 1:
        interval = student_t_interval(samples, confidence)[2:]
    return LogdetEstimate(
        estimate,
        error,
        "slq",
        rule.n_matvecs,
        time.perf_counter() - began,
        quadrature=rule,
        confidence_interval=interval,
        confidence=confidence if interval else None,
        samples=samples,
    )


def _confidence(confidence: float) -> float:
    confidence = real("confidence", confidence, positive=True)
    if not confidence < 1:
        raise InvalidArgumentError(f"confidence={confidence!r} must lie strictly between 0 and 1, e.g. 0.95")
    return confidence


def _deflated(
    op: cola.ops.LinearOperator,
    deflate: int,
    probes: int,
    lanczos_steps: int,
    seed: int,
    confidence: float,
    eigs_options: dict[str, Any],
    smallest: float | None,
    began: float,
    long_run: dict[str, Any],
) -> LogdetEstimate:
    """:func:`logdet`'s ``"deflated"`` method; ``smallest``: a lower bound on the smallest eigenvalue of ``op``
    when the caller has one, else the smallest eigenvalue found less its error bound. ``eigs_options``: the
    ``tol``, ``max_iters``, ``seed`` and ``progress`` of the two ``eigs`` runs. ``long_run``: the
    ``basis``, ``basis_path``, ``checkpoint`` and ``checkpoint_every`` of each of its three Lanczos runs (the
    smallest eigenvalue, the top ones, the complement's SLQ), each run's files suffixed by :func:`_suffixed`."""
    n = op.shape[0]
    if deflate >= n:
        raise InvalidArgumentError(
            f"deflate={deflate} must be less than the operator's size {n}: deflating everything is the dense "
            "log-determinant, method='dense'"
        )
    if probes < 2:
        raise InvalidArgumentError(f"probes={probes}: a confidence interval needs at least 2 probes")
    n_matvecs = 0
    tol, max_iters, progress = eigs_options["tol"], eigs_options["max_iters"], eigs_options["progress"]
    if smallest is None:
        low = smallest_eigenvalue_of(op, eigs_options, long_run)
        _check_converged(
            low,
            "op",
            "lower_bound=, a known positive lower bound on op's smallest eigenvalue (c for a PSD operator plus cI; "
            "basin_volume: smallest_eigenvalue=)",
        )
        smallest, n_matvecs = float(low.values[0] - low.error_bounds[0]), low.n_matvecs
        _check_positive(smallest, "eigenvalue found, less its error bound,")
    values = residuals = torch.zeros(0, dtype=torch.float64)
    complement = op
    if deflate:
        top = eigs(
            op, deflate, "LA", tol=tol, max_iters=max_iters, seed=seed, progress=progress, **_suffixed(long_run, ".top")
        )
        values, residuals = top.values.double().cpu(), top.residuals.double().cpu()
        n_matvecs += top.n_matvecs
        complement = Complement(op, top.vectors, float(values[-1]))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = rademacher(n, probes, generator, op)
    if deflate:
        start = complement.project(start)
    norms = column_norms(start).double().cpu() ** 2
    steps = min(lanczos_steps, n - deflate)
    rule = quadrature(
        complement, start=start, lanczos_steps=steps, seed=seed, progress=progress, **_suffixed(long_run, ".slq")
    )
    _check_positive(float(rule.nodes.min()), "Ritz value on the complement of the deflated eigenvectors")
    exact = float(values.log().sum())
    # Control variate: E‖Pz‖² = n − k, so m·(n − k − ‖Pz‖²) has mean zero for any m fixed before the probes;
    # with m inside [log λ_min, log θ_k] ⊇ the complement's log-spectrum it cancels the fluctuation of ‖Pz‖²
    # times the mean log-eigenvalue, which would otherwise dominate the variance when that mean is large.
    m = 0.5 * (math.log(smallest) + math.log(float(values[-1]))) if deflate else 0.0
    samples = norms * (rule.per_probe(torch.log) - m) + (n - deflate) * m
    below = norms * (rule.radau(torch.log, smallest) - m) + (n - deflate) * m  # Gauss-Radau: a lower bound
    mean, error, low, high = student_t_interval(samples, confidence)
    share = float((residuals**2 / values).sum()) / smallest
    kappa = max(float(rule.nodes.max()) / smallest, 1.0)
    deflation_bias = -math.log1p(-share) if share < 1 else math.inf
    quadrature_bias = max(float((samples - below).mean()), 0.0)
    return LogdetEstimate(
        exact + mean,
        error,
        "deflated",
        n_matvecs + rule.n_matvecs,
        time.perf_counter() - began,
        quadrature=rule,
        # both biases can only raise the estimate: the interval's low end makes room for them
        confidence_interval=(exact + low - quadrature_bias - deflation_bias, exact + high),
        confidence=confidence,
        samples=samples,
        deflated_eigenvalues=values,
        deflation_bias=deflation_bias,
        quadrature_decay=((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** (2 * steps),
        quadrature_bias=quadrature_bias,
        noise_interval=(exact + low, exact + high),
    )


def smallest_eigenvalue_of(
    op: cola.ops.LinearOperator, eigs_options: dict[str, Any], long_run: dict[str, Any]
) -> Spectrum:
    """The ``eigs`` run (``"SA"``, ``value_tol`` = ``eigs_options["tol"]``) for the smallest eigenvalue of ``op``
    that :func:`logdet`'s deflation and :func:`basin_volume`'s check rest on, checkpointed to ``checkpoint``
    plus ``".smallest"``."""
    options = {"value_tol": eigs_options["tol"]} | {key: eigs_options[key] for key in ("max_iters", "seed", "progress")}
    return eigs(op, 1, "SA", **options, **_suffixed(long_run, ".smallest"))


def _check_converged(low: Spectrum, name: str, known: str, alternatives: str = "") -> None:
    """Refuse a run for the smallest eigenvalue of the operator ``name`` that has not converged: its smallest
    Ritz value may still lie far above the smallest eigenvalue (a short run misses a large negative one), so it
    proves no positivity. ``known``: the argument that gives the bound instead; ``alternatives``: more fixes."""
    if low.converged:
        return
    value, bound = float(low.values[0]), float(low.error_bounds[0])
    raise NotPositiveDefiniteError(
        f"the smallest eigenvalue of {name} is not known, so positive definiteness is not established: the Lanczos "
        f"run for it (eigs 'SA', basis '{low.basis}') stopped after {low.steps} steps without converging, at "
        f"{value:.6g} with error bound {bound:.2g}, and an unconverged run can lie far above the smallest "
        "eigenvalue (a short run misses a large negative one). Fixes: raise eigs_max_iters (without it, "
        "eigs' default steps, restarted in what fits in memory, or capped there for a checkpointed run; "
        f"basis='none' needs no memory for them), or pass {known}{alternatives}"
    )


def _suffixed(long_run: dict[str, Any], suffix: str) -> dict[str, Any]:
    """``long_run`` for one of several Lanczos runs of a call: its checkpoint and basis files (when given) with
    ``suffix`` appended, so that the runs neither overwrite nor resume each other's."""
    return {
        key: (Path(str(value) + suffix) if key in ("checkpoint", "basis_path") and value is not None else value)
        for key, value in long_run.items()
    }


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
