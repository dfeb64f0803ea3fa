"""Stochastic trace estimation, the function `hessops.trace`: Hutchinson (1989) and Hutch++ (Meyer, Musco, Musco
& Woodruff, 2021)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from hessops import constants
from hessops._arguments import choice, integer, linear_operator
from hessops._cola import cola
from hessops.errors import InvalidArgumentError
from hessops.linalg.bounds import product_error
from hessops.linalg.checkpoint import Checkpoint, open_checkpoint
from hessops.linalg.lanczos import check_precision, rademacher
from hessops.numerics import column_norms, inner_products, orthonormal_basis

METHODS = constants.TRACE_METHODS
CHUNKS = 8  # with a checkpoint, each block of products runs in this many chunks of columns


@dataclass(frozen=True)
class TraceHistory:
    """The running estimate against the products used: after ``probes[i]`` products the estimate was
    ``estimate[i] ± std_error[i]`` (Hutchinson: the first ``probes[i]`` samples; Hutch++: the exact part of
    the sketch and the first deflated samples; exact: one point)."""

    probes: list[int]
    estimate: list[float]
    std_error: list[float]


@dataclass
class TraceEstimate:
    """An estimate of ``tr A`` with its standard error; unpacks as ``estimate, std_error``.

    Attributes:
        estimate: the estimate of ``tr A``.
        std_error: the sample standard deviation of the stochastic part over √samples.
        method: ``"hutchinson"``, ``"hutch++"``, or ``"exact"`` when ``probes ≥ n`` made the exact trace
            (``std_error`` 0, no dearer than the estimate).
        probes: the probes asked for.
        history: the running estimate.
        n_matvecs: the operator products used (columns).
        seconds: the wall time.
        bias_bound: a bound on what products that are not exact (``hvp_mode="finite-difference"``, relative error
            ``η = product_error``) can move the estimate: ``η/(1−η)`` times the sum, over the exact part's and the
            samples' contributions, of ``‖z‖‖Az‖`` as computed (0 for exact products). An interval is
            ``estimate ± (t · std_error + bias_bound)``."""

    estimate: float
    std_error: float
    method: str
    probes: int
    history: TraceHistory
    n_matvecs: int
    seconds: float
    bias_bound: float = 0.0

    def __iter__(self):
        return iter((self.estimate, self.std_error))

    def to_dict(self) -> dict:
        """The result as JSON-ready values.

        Returns:
            ``trace``, ``std_error``, ``method``, ``probes``, ``history`` (``probes``, ``estimate``,
            ``std_error`` lists), ``n_matvecs``, ``seconds``, ``bias_bound``."""
        return {
            "trace": self.estimate,
            "std_error": self.std_error,
            "method": self.method,
            "probes": self.probes,
            "history": asdict(self.history),
            "n_matvecs": self.n_matvecs,
            "seconds": self.seconds,
            "bias_bound": self.bias_bound,
        }


def _running(samples: Tensor, offset: float, products_before: int) -> TraceHistory:
    """``offset + mean`` of the first ``i`` samples and its standard error, for ``i = 2, …, len(samples)``
    (the first sample has no spread), against the products used: ``products_before + i``."""
    shifted = samples - samples.mean()  # running sums of centred samples: no cancellation in the variance
    count = torch.arange(1, len(samples) + 1, dtype=samples.dtype)
    first, second = shifted.cumsum(0), (shifted**2).cumsum(0)
    mean = samples.mean() + first / count
    variance = (second - first**2 / count) / (count - 1).clamp_min(1)
    error = (variance.clamp_min(0) / count).sqrt()
    return TraceHistory(
        probes=(products_before + count[1:].long()).tolist(),
        estimate=(offset + mean[1:]).tolist(),
        std_error=error[1:].tolist(),
    )


def trace(
    op: cola.ops.LinearOperator,
    *,
    probes: int = 100,
    method: str = "hutch++",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> TraceEstimate:
    r"""Estimate :math:`\mathrm{tr}\,A` with ``probes`` products of ``A`` (all in one block: one data pass
    for Hutchinson, two for Hutch++).

    - ``"hutchinson"``: :math:`\frac1m \sum_i z_i^\top A z_i`, Rademacher :math:`z_i`; variance
      :math:`2(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)/m`.
    - ``"hutch++"``: a third of the products find the dominant range :math:`Q` of :math:`AS`, whose trace
      :math:`\mathrm{tr}(Q^\top A Q)` is exact, and Hutchinson on the deflated :math:`(I-QQ^\top)A(I-QQ^\top)`
      takes the rest: error :math:`O(1/m)` instead of :math:`O(1/\sqrt m)` for the spiked spectra of Hessians.
      ``std_error`` is the deflated part's.

    When ``probes ≥ n`` the exact trace :math:`\sum_i e_i^\top A e_i` takes ``n ≤ probes`` products, no more
    than the estimate: it is returned instead, with ``std_error`` 0 and ``method="exact"`` (so Hutch++'s
    sketch of ``probes // 3`` columns never exceeds ``n``).

    ``history`` holds the running estimate as the samples accumulate (all products are computed in one
    block, so it costs nothing): how the estimate converged, for :func:`hessops.plot.plot_trace`.

    Args:
        op: the operator ``A``, square.
        probes: ``m``, the products to spend.
        method: ``"hutchinson"`` or ``"hutch++"`` (Meyer et al. 2021).
        seed: the seed of the Rademacher vectors.
        checkpoint: a file to resume from and to save the finished products to, at most every
            ``checkpoint_every`` seconds (:mod:`hessops.linalg.checkpoint`); the products then run in
            :data:`CHUNKS` chunks of columns per block (more passes over the data), so that a killed run loses at
            most one chunk.
        checkpoint_every: seconds between two saves of ``checkpoint``.

    Returns:
        The :class:`TraceEstimate`; unpacks as ``estimate, std_error = trace(...)``.

    Raises:
        InvalidArgumentError: an argument of the wrong type or out of range.
        DtypeMismatchError: a half-precision operator (refused).
        CheckpointMismatchError: ``checkpoint`` holds another run.
    """
    method = choice("method", method, METHODS)
    probes = integer("probes", probes, minimum=2 if method == "hutchinson" else 4)
    seed = integer("seed", seed)
    if linear_operator("op", op).shape[0] != op.shape[1]:
        raise InvalidArgumentError(f"op must be a square CoLA LinearOperator, got {op!r}")
    check_precision(op, "trace")
    n = op.shape[0]
    began = time.perf_counter()
    apply = _Products(
        op, open_checkpoint(checkpoint, checkpoint_every, "trace", op, probes=probes, method=method, seed=seed)
    )
    if probes >= n:
        identity = torch.eye(n, dtype=op.dtype, device=op.device)
        columns = apply("identity", identity)
        exact = float(torch.diagonal(columns).double().sum())
        history = TraceHistory([n], [exact], [0.0])
        bias = _bias_bound(op, identity, columns)
        return TraceEstimate(exact, 0.0, "exact", probes, history, n, time.perf_counter() - began, bias)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if method == "hutchinson":
        Z = rademacher(n, probes, generator, op)
        products = apply("probes", Z)
        samples = (Z * products).sum(0).double().cpu()
        history = _running(samples, 0.0, 0)
        bias = _bias_bound(op, Z, products) / probes
        return TraceEstimate(
            history.estimate[-1],
            history.std_error[-1],
            method,
            probes,
            history,
            probes,
            time.perf_counter() - began,
            bias,
        )
    sketch = probes // 3
    remaining = probes - 2 * sketch
    Q = orthonormal_basis(apply("sketch", rademacher(n, sketch, generator, op)))
    Z = rademacher(n, remaining, generator, op)
    Z = Z - Q @ inner_products(Q, Z).to(Z.dtype)
    products = apply("rest", torch.cat([Q, Z], dim=1))  # one pass over the data for both
    exact_part = float((Q * products[:, :sketch]).sum(0).double().sum())
    deflated = products[:, sketch:] - Q @ inner_products(Q, products[:, sketch:]).to(Q.dtype)
    samples = (Z * deflated).sum(0).double().cpu()
    history = _running(samples, exact_part, 2 * sketch)
    bias = _bias_bound(op, Q, products[:, :sketch]) + _bias_bound(op, Z, products[:, sketch:]) / max(remaining, 1)
    return TraceEstimate(
        history.estimate[-1], history.std_error[-1], method, probes, history, probes, time.perf_counter() - began, bias
    )


def _bias_bound(op: cola.ops.LinearOperator, Z: Tensor, products: Tensor) -> float:
    """``η/(1−η) Σ_i ‖z_i‖‖A z_i‖`` over the columns, ``η`` the operator's product error (0: exact products):
    how far inexact products can move ``Σ_i z_iᵀ A z_i``, each product being within ``η‖Az‖`` of the exact one."""
    eta = product_error(op)
    if eta == 0.0:
        return 0.0
    eta = min(eta, 0.5)
    return eta / (1 - eta) * float((column_norms(Z).double() * column_norms(products).double()).sum())


class _Products:
    """``op @ X`` for each named stage of an estimator; with a checkpoint, in :data:`CHUNKS` chunks of columns,
    the finished ones saved (as the checkpoint's state, by stage) and taken back by a resumed run."""

    def __init__(self, op: cola.ops.LinearOperator, saving: Checkpoint | None):
        self.op, self.saving = op, saving
        self.finished = {} if saving is None else saving.load() or {}

    def __call__(self, stage: str, X: Tensor) -> Tensor:
        if self.saving is None:
            return self.op @ X
        k = X.shape[1]
        chunk = -(-k // CHUNKS)
        pieces = [self.finished[stage].to(X.device)] if stage in self.finished else []
        try:
            for i in range(sum(piece.shape[1] for piece in pieces), k, chunk):
                pieces.append(self.op @ X[:, i : i + chunk])
                self.finished[stage] = torch.cat(pieces, dim=1).cpu()
                if self.saving.due():
                    self.saving.save(self.finished)
        except KeyboardInterrupt:
            self.saving.save(self.finished)
            raise self.saving.interrupted() from None
        self.saving.save(self.finished)
        return torch.cat(pieces, dim=1)
