"""Stochastic trace estimation: Hutchinson (1989) and Hutch++ (Meyer, Musco, Musco & Woodruff, 2021)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import cola
import torch

from hessops import constants
from hessops._arguments import choice, integer, linear_operator
from hessops.errors import InvalidArgumentError
from hessops.lanczos import check_precision, rademacher

METHODS = constants.TRACE_METHODS


@dataclass
class TraceEstimate:
    """``estimate`` of ``tr A`` with its ``std_error`` (the sample standard deviation of the stochastic part
    over √probes), and the products used. ``method`` is ``"exact"`` when ``probes ≥ n`` made the exact trace
    (``std_error`` 0) no dearer than the estimate."""

    estimate: float
    std_error: float
    n_matvecs: int
    method: str
    seconds: float

    def __iter__(self):
        return iter((self.estimate, self.std_error))


def trace(op: cola.ops.LinearOperator, *, probes: int = 100, method: str = "hutch++", seed: int = 0) -> TraceEstimate:
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
    sketch of ``probes // 3`` columns never exceeds ``n``). Half-precision operators are refused.
    """
    method = choice("method", method, METHODS)
    probes = integer("probes", probes, minimum=2 if method == "hutchinson" else 4)
    seed = integer("seed", seed)
    if linear_operator("op", op).shape[0] != op.shape[1]:
        raise InvalidArgumentError(f"op must be a square CoLA LinearOperator, got {op!r}")
    check_precision(op, "trace")
    n = op.shape[0]
    began = time.perf_counter()
    if probes >= n:
        identity = torch.eye(n, dtype=op.dtype, device=op.device)
        exact = float(torch.diagonal(op @ identity).double().sum())
        return TraceEstimate(exact, 0.0, n, "exact", time.perf_counter() - began)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if method == "hutchinson":
        Z = rademacher(n, probes, generator, op)
        samples = (Z * (op @ Z)).sum(0).double().cpu()
        return TraceEstimate(float(samples.mean()), float(samples.std() / math.sqrt(probes)), probes, method, time.perf_counter() - began)
    sketch = probes // 3
    remaining = probes - 2 * sketch
    Q, _ = torch.linalg.qr(op @ rademacher(n, sketch, generator, op))
    Z = rademacher(n, remaining, generator, op)
    Z = Z - Q @ (Q.T @ Z)
    products = op @ torch.cat([Q, Z], dim=1)  # one pass over the data for both
    exact_part = float(torch.einsum("nk,nk->", Q, products[:, :sketch]))
    deflated = products[:, sketch:] - Q @ (Q.T @ products[:, sketch:])
    samples = (Z * deflated).sum(0).double().cpu()
    return TraceEstimate(
        exact_part + float(samples.mean()),
        float(samples.std() / math.sqrt(remaining)),
        2 * sketch + remaining,
        method,
        time.perf_counter() - began,
    )
