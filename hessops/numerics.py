"""Euclidean norms that stay accurate in float32 at any length.

torch's CPU norm kernel (``torch.linalg.vector_norm``, ``Tensor.norm``) accumulates sums of squares in float32
without the cascade summation that ``torch.sum`` uses, so its error grows with the length: on a 2-core CPU
with torch 2.14.1 we measured a relative error of 4e-4 for one Gaussian vector of 11M entries (a ResNet-18),
1.1e-2 at 100M, and, reducing the columns of a ``(100M, 4)`` block of ones, 0.41 of the true norm
(pytorch#169237, #151761). Every Lanczos step normalizes by such a norm, so a parameter-length float32 vector
is never normed with it here, nor is ``Qᵀw`` one BLAS call over all rows: :func:`inner_products` and
:func:`column_dots` sum blocks of :data:`ROWS` rows in the inputs' dtype and the blocks in float64, and
:func:`column_norms` is built on them. At 124M parameters (GPT-2 small) a vector is 0.5 GB, so these also avoid
temporaries of that size: a Lanczos step's element-wise temporaries had cost as much as its product there.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def column_norms(x: Tensor, dim: int | None = 0, keepdim: bool = False) -> Tensor:
    """The Euclidean norms of ``x`` along ``dim`` (the whole tensor's norm with ``dim=None``), accurate in
    float32 for vectors of any length on every device, zero for zero columns, ``inf``/``nan`` propagated.

    Columns whose largest entry lies in [2⁻⁵⁰, 2⁵⁰] (every practical one) are summed by :func:`column_dots`,
    without a temporary the size of ``x``; others are first scaled by their largest entry, so that no square
    overflows or underflows."""
    if dim is None:
        return column_norms(x.reshape(-1), 0, keepdim=False)
    columns = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    low, high = torch.aminmax(columns, dim=0)
    largest = torch.maximum(low.abs(), high.abs())
    if bool(((largest >= SAFE_LOW) & (largest <= SAFE_HIGH)).all()):
        norms = column_dots(columns, columns).sqrt().to(x.dtype)
    else:
        scale = largest[None]
        scaled = columns / torch.where(scale > 0, scale, torch.ones_like(scale))
        norms = (scaled.square_().sum(dim=0).sqrt_() * largest).to(x.dtype)
        norms = torch.where(largest.isinf(), largest, norms)  # inf/inf made a nan of an infinite norm
    norms = norms.reshape(tuple(size for i, size in enumerate(x.shape) if i != dim % x.dim()))
    return norms.unsqueeze(dim) if keepdim else norms


def norm(x: Tensor) -> Tensor:
    """The Euclidean norm of the whole tensor ``x`` (a 0-d tensor), as :func:`column_norms`."""
    return column_norms(x, None)


# Rows per partial product: float32 dot products of this length are accurate to about 1e-6 of |a|·|b| (measured
# on an 11M-row random pair: 2e-6 against 6e-5 for one BLAS call over all rows, at the same speed).
ROWS = 8192


# Columns whose largest magnitude lies in this range are summed without scaling: squares stay within float32's
# normal range, and a block's sum of squares (ROWS of them, at most 2¹⁰⁰ each) cannot overflow.
SAFE_LOW, SAFE_HIGH = 2.0**-50, 2.0**50
# Rows of the element-wise products that column_dots forms at once for several columns (a bounded temporary).
PRODUCT_ROWS = 1 << 20


def column_dots(a: Tensor, b: Tensor) -> Tensor:
    """The dot product of each column of ``a`` with the same column of ``b`` (both ``n × P``), float64 ``(P,)``,
    accumulated as :func:`inner_products` (without a temporary the size of ``a`` when both are contiguous)."""
    if a.shape[1] == 1:
        return inner_products(a, b)[0]
    out = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], PRODUCT_ROWS):  # torch.sum's cascade within a slice, float64 across slices
        out += (a[i : i + PRODUCT_ROWS] * b[i : i + PRODUCT_ROWS]).sum(0).double()
    return out


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


def digest(*parts: Tensor | str | None) -> str:
    """A SHA-256 (hex) of ``parts`` in order: a string by its UTF-8 bytes, a tensor by its dtype, shape and
    entries (moved to the CPU), ``None`` as a marker of its own."""
    sha = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().cpu().contiguous()
            sha.update(f"<tensor {t.dtype} {tuple(t.shape)}>".encode())
            sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            sha.update(f"<{type(part).__name__} {part}>".encode())
    return sha.hexdigest()
