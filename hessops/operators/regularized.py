"""A curvature operator plus a multiple of the identity."""

from __future__ import annotations

import torch
from torch import Tensor

from hessops._arguments import real
from hessops._cola import cola
from hessops.errors import InvalidArgumentError


class Regularized(cola.ops.LinearOperator):
    r"""The operator :math:`A + cI` as one CoLA operator that keeps the annotations: ``PSD`` when ``A`` is PSD
    (checked, see :func:`is_psd`) and :math:`c \ge 0`, ``SelfAdjoint`` when ``A`` is self-adjoint.

    CoLA's own ``A + c * cola.ops.I_like(A)`` builds a ``Sum`` that drops ``SelfAdjoint``/``PSD`` (so
    ``cola.linalg.logdet`` falls back to LU, and Lanczos refuses it) and, with beartype ≥ 0.23, raises plum's
    ``AmbiguousLookupError``. Use this instead, e.g. for the log-determinant of a Hessian damped by a prior.

    Args:
        op: the operator ``A``, square.
        c: the shift, a finite real number.

    Raises:
        InvalidArgumentError: ``op`` is not a square CoLA operator, or ``c`` not a finite real number.
    """

    def __init__(self, op: cola.ops.LinearOperator, c: float):
        if not isinstance(op, cola.ops.LinearOperator):
            raise InvalidArgumentError(f"Regularized wraps a CoLA LinearOperator, got {type(op).__name__}")
        if op.shape[0] != op.shape[1]:
            raise InvalidArgumentError(f"Regularized needs a square operator, got shape {op.shape}")
        c = real("c", c)
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op = op
        self.c = c
        self.device = op.device
        annotations = set()
        if op.isa(cola.SelfAdjoint):
            annotations.add(cola.SelfAdjoint)
        if c >= 0 and is_psd(op):
            annotations.add(cola.PSD)
        self.annotations = annotations

    @property
    def product_noise(self) -> float | None:
        """The wrapped operator's measured relative noise of one product (:attr:`CurvatureOperator.product_noise
        <hessops.CurvatureOperator.product_noise>`), ``None`` before its first product or for an operator that
        measures none."""
        return getattr(self.op, "product_noise", None)

    @property
    def product_error(self) -> float | None:
        """The wrapped operator's relative product error that is not rounding (a finite-difference Hessian's
        ``product_error``), ``None`` where it has none."""
        return getattr(self.op, "product_error", None)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.op @ X + self.c * X

    def __repr__(self) -> str:
        return f"<Regularized {self.op!r} + {self.c:g}·I>"


def is_psd(op: cola.ops.LinearOperator) -> bool:
    """Whether ``op`` is positive semi-definite, proved from its structure rather than CoLA's annotation.

    CoLA 0.0.7 annotates every ``ScalarMul`` ``PSD`` whatever the sign of its scalar, and a product or sum
    keeps the annotations its terms share: ``-2 * G`` (``Product[ScalarMul, GGN]``) claims ``PSD`` although
    it is negative semi-definite. Here a ``ScalarMul`` is PSD when its scalar is real and ≥ 0; a ``Product``
    when it is one PSD factor times such scalars; a ``Sum``, ``Kronecker`` or ``BlockDiag`` when all its
    parts are; a ``Diagonal`` when its entries are real and ≥ 0; ``Identity`` always. Any other CoLA
    composite (it holds operators) is not trusted; any other operator (``Dense``, a hessops curvature
    operator, :class:`Regularized`) keeps its own annotation."""
    if isinstance(op, cola.ops.Identity):
        return True
    if isinstance(op, cola.ops.ScalarMul):
        return _nonnegative(op.c)
    if isinstance(op, cola.ops.Diagonal):
        return _nonnegative(op.diag)
    if isinstance(op, cola.ops.Product):
        factors = [M for M in op.Ms if not isinstance(M, cola.ops.ScalarMul)]
        return len(factors) <= 1 and all(is_psd(M) for M in op.Ms)
    if isinstance(op, (cola.ops.Sum, cola.ops.Kronecker, cola.ops.BlockDiag)):
        return all(is_psd(M) for M in op.Ms)
    parts = [*getattr(op, "Ms", ()), getattr(op, "A", None)]
    if any(isinstance(part, cola.ops.LinearOperator) for part in parts):  # Transpose, Adjoint, Sliced, KronSum, ...
        return False
    return op.isa(cola.PSD)


def _nonnegative(values) -> bool:
    values = torch.as_tensor(values)
    if values.is_complex():
        return bool((values.imag == 0).all() and (values.real >= 0).all())
    return bool((values >= 0).all())
