"""Deflation for the log-determinant: the operator compressed to the orthogonal complement of a few
eigenvectors, and the Student-t confidence interval of an estimate averaged over random probes."""

from __future__ import annotations

import math

from torch import Tensor

from hessops._cola import cola
from hessops.numerics import inner_products, orthonormal_basis


class Complement(cola.ops.LinearOperator):
    r""":math:`P A P + \mu VV^\top` with :math:`P = I - VV^\top`, for a symmetric ``op`` :math:`A` and
    orthonormal columns ``V`` ``(n, k)``: :math:`A` compressed to the orthogonal complement of ``V``'s span,
    where its eigenvalues are those of :math:`W^\top A W` (``W`` an orthonormal basis of the complement), and
    ``shift`` :math:`\mu` on the span. Lanczos started in the complement stays there in exact arithmetic, so it
    sees only :math:`W^\top A W`; in rounding, the span enters with weights of order ε², where ``shift`` (a
    value inside the spectrum, such as the smallest deflated eigenvalue) keeps it harmless, instead of the zero
    eigenvalue of :math:`PAP` that a full-length run would find."""

    def __init__(self, op: cola.ops.LinearOperator, V: Tensor, shift: float):
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op = op
        # orthonormal to rounding: LAPACK's QR alone is not, at millions of float32 rows (hessops.numerics)
        self.V = orthonormal_basis(V.to(device=op.device, dtype=op.dtype))
        self.shift = shift
        self.device = op.device
        self.annotations = {cola.SelfAdjoint}

    def project(self, X: Tensor) -> Tensor:
        r""":math:`(I - VV^\top) X`."""
        return X - self.V @ inner_products(self.V, X).to(X.dtype)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.project(self.op @ self.project(X)) + self.shift * (self.V @ inner_products(self.V, X).to(X.dtype))

    def __repr__(self) -> str:
        return f"<Complement of {self.V.shape[1]} vectors in {self.op!r}>"


def student_t_interval(samples: Tensor, confidence: float) -> tuple[float, float, float, float]:
    """The mean of ``samples`` (independent, identically distributed estimates), its standard error
    ``s/√P``, and the two-sided Student-t interval ``mean ± t_{P−1, (1+confidence)/2} · s/√P`` at level
    ``confidence``: exact for normal samples, asymptotically right otherwise (central limit theorem). Needs
    at least 2 samples."""
    from scipy.stats import t

    P = samples.numel()
    mean = float(samples.mean())
    error = float(samples.double().std(unbiased=True)) / math.sqrt(P)
    half = float(t.ppf(0.5 + 0.5 * confidence, P - 1)) * error
    return mean, error, mean - half, mean + half
