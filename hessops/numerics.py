"""Euclidean norms that stay accurate in float32 at any length.

torch's CPU norm kernel (``torch.linalg.vector_norm``, ``Tensor.norm``) accumulates sums of squares in float32
without the cascade summation that ``torch.sum`` uses, so its error grows with the length: on a 2-core CPU
with torch 2.14.1 we measured a relative error of 4e-4 for one Gaussian vector of 11M entries (a ResNet-18),
1.1e-2 at 100M, and, reducing the columns of a ``(100M, 4)`` block of ones, 0.41 of the true norm
(pytorch#169237, #151761). Every Lanczos step normalizes by such a norm, so a parameter-length float32 vector
is never normed with it here: :func:`column_norms` scales by the largest entry (no overflow or underflow of
the squares) and sums with ``torch.sum``, which is accurate to a few float32 roundings at these lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor


def column_norms(x: Tensor, dim: int | None = 0, keepdim: bool = False) -> Tensor:
    """The Euclidean norms of ``x`` along ``dim`` (the whole tensor's norm with ``dim=None``), accurate in
    float32 for vectors of any length on every device, zero for zero columns, ``inf``/``nan`` propagated."""
    if dim is None:
        return column_norms(x.reshape(-1), 0, keepdim=False)
    scale = x.abs().amax(dim=dim, keepdim=True)
    scaled = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    norms = scaled.square_().sum(dim=dim, keepdim=True).sqrt_() * scale
    norms = torch.where(scale.isinf(), scale, norms)  # inf/inf made a nan of an infinite norm (a nan makes scale nan)
    return norms if keepdim else norms.squeeze(dim)


def norm(x: Tensor) -> Tensor:
    """The Euclidean norm of the whole tensor ``x`` (a 0-d tensor), as :func:`column_norms`."""
    return column_norms(x, None)


# Rows per partial product: float32 dot products of this length are accurate to about 1e-6 of |a|·|b| (measured
# on an 11M-row random pair: 2e-6 against 6e-5 for one BLAS call over all rows, at the same speed).
ROWS = 8192


def inner_products(A: Tensor, B: Tensor) -> Tensor:
    """``Aᵀ B`` (float64, ``a × b``) for ``A`` (``n × a``) and ``B`` (``n × b``): the rows in blocks of
    :data:`ROWS`, each block's product in the inputs' dtype, the blocks summed in float64. A single BLAS call
    over millions of float32 rows accumulates its error like torch's norm does (see the module docstring)."""
    n = A.shape[0]
    whole = n - n % ROWS
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    if whole:  # one batched product of the blocks (a loop of small GEMMs is 20-80× slower on the CPU)
        blocks_a = A[:whole].reshape(whole // ROWS, ROWS, A.shape[1])
        blocks_b = B[:whole].reshape(whole // ROWS, ROWS, B.shape[1])
        out += torch.bmm(blocks_a.transpose(1, 2), blocks_b).double().sum(0)
    if whole < n:
        out += (A[whole:].T @ B[whole:]).double()
    return out


def basis_coefficients(Q: Tensor, w: Tensor) -> Tensor:
    """``Q_pᵀ w_p`` for each column ``p`` (float64, ``m × P``): ``Q`` is ``(m, n, P)`` (``m`` vectors of ``P``
    columns), ``w`` is ``(n, P)``; accumulated as :func:`inner_products`."""
    out = torch.zeros(Q.shape[0], Q.shape[2], dtype=torch.float64, device=Q.device)
    for i in range(0, Q.shape[1], ROWS):
        out += torch.einsum("mnp,np->mp", Q[:, i : i + ROWS], w[i : i + ROWS]).double()
    return out


def orthonormal_basis(Y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``Y`` (``n × k``, full column rank): Householder QR, then two
    Cholesky refinements with the Gram matrix from :func:`inner_products` (LAPACK's float32 QR of 16.8M rows was
    orthonormal to only 1.6e-3: its column norms accumulate like torch's)."""
    Q, _ = torch.linalg.qr(Y)
    for _ in range(2):
        factor = torch.linalg.cholesky(inner_products(Q, Q))
        inverse = torch.linalg.solve_triangular(factor.T, torch.eye(len(factor), dtype=factor.dtype), upper=True)
        Q = Q @ inverse.to(device=Q.device, dtype=Q.dtype)
    return Q
