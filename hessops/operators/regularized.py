"""A curvature operator plus a multiple of the identity."""

from __future__ import annotations

import cola
from torch import Tensor


class Regularized(cola.ops.LinearOperator):
    r"""The operator :math:`A + cI` as one CoLA operator that keeps the annotations: ``PSD`` when ``A`` is PSD
    and :math:`c \ge 0`, ``SelfAdjoint`` when ``A`` is self-adjoint.

    CoLA's own ``A + c * cola.ops.I_like(A)`` builds a ``Sum`` that drops ``SelfAdjoint``/``PSD`` (so
    ``cola.linalg.logdet`` falls back to LU, and Lanczos refuses it) and, with beartype ≥ 0.23, raises plum's
    ``AmbiguousLookupError``. Use this instead, e.g. for the log-determinant of a Hessian damped by a prior.
    """

    def __init__(self, op: cola.ops.LinearOperator, c: float):
        if not isinstance(op, cola.ops.LinearOperator):
            raise TypeError(f"Regularized wraps a CoLA LinearOperator, got {type(op).__name__}")
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"Regularized needs a square operator, got shape {op.shape}")
        c = float(c)
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op = op
        self.c = c
        self.device = op.device
        annotations = set()
        if op.isa(cola.SelfAdjoint):
            annotations.add(cola.SelfAdjoint)
        if op.isa(cola.PSD) and c >= 0:
            annotations.add(cola.PSD)
        self.annotations = annotations

    def _matmat(self, X: Tensor) -> Tensor:
        return self.op @ X + self.c * X

    def __repr__(self) -> str:
        return f"<Regularized {self.op!r} + {self.c:g}·I>"
