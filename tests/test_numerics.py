"""Norms of long float32 vectors: torch's CPU norm kernel loses accuracy with length (pytorch#169237), which made
eigenvalues of ~10M-parameter float32 operators wrong by far more than the error bounds eigs verified with it."""

from __future__ import annotations

import cola
import pytest
import torch

import hessops
from hessops.numerics import basis_coefficients, column_dots, column_norms, inner_products, norm, orthonormal_basis

LONG = 1 << 24  # 16.8M entries: a ResNet-18 and a half; torch's own float32 norm is off by ~1e-3 here


@pytest.fixture(scope="module")
def block() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(LONG, 3, generator=generator)
    x[:, 2] = 1.0  # a column of ones: the worst case for a float32 accumulator (every term adds the same sign)
    return x


def test_column_norms_of_long_float32_vectors_match_float64(block):
    exact = block.double().square().sum(0).sqrt()
    assert torch.allclose(column_norms(block).double(), exact, rtol=1e-6, atol=0)
    assert torch.allclose(column_norms(block, keepdim=True).double(), exact[None], rtol=1e-6, atol=0)
    assert torch.allclose(column_norms(block.T.contiguous(), dim=1).double(), exact, rtol=1e-6, atol=0)
    assert abs(float(norm(block[:, 0].contiguous())) / float(exact[0]) - 1) < 1e-6
    assert abs(float(norm(block)) / float(block.double().square().sum().sqrt()) - 1) < 1e-6


def test_long_inner_products_and_orthonormal_basis_match_float64(block):
    """Aᵀ B, the Lanczos basis's coefficients and an orthonormal basis of 16.8M float32 rows: to ~1e-6 of
    |a|·|b| (one BLAS call over all rows: 1e-4 to 1e-3; torch.linalg.qr's columns: orthonormal to 1.6e-3)."""
    exact = block.double().T @ block.double()
    scale = exact.diagonal().sqrt()
    assert ((inner_products(block, block) - exact).abs() / scale.outer(scale)).max() < 1e-6
    assert (
        (inner_products(block[:-5], block[:-5]) - block[:-5].double().T @ block[:-5].double()).abs().max()
    ) < 1e-6 * exact.max()
    Q = block.T.reshape(3, -1, 1)  # three "Lanczos vectors" of one column
    w = block[:, :1].flip(0).contiguous()
    got = basis_coefficients(Q, w)[:, 0]
    want = block.double().T @ w[:, 0].double()
    assert ((got - want).abs() / (scale * float(w.double().norm()))).max() < 1e-6
    basis = orthonormal_basis(block)
    gram = basis.double().T @ basis.double()
    assert (gram - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-6


def test_column_norms_edge_cases():
    x = torch.zeros(5, 3)
    x[:, 1] = 1e-30  # squares underflow float32: scaling keeps them
    x[0, 2] = 3e30  # squares overflow float32: scaling keeps them
    got = column_norms(x)
    assert got[0] == 0
    assert torch.isclose(got[1], torch.tensor(1e-30 * 5**0.5))
    assert torch.isclose(got[2], torch.tensor(3e30))
    x[1, 0] = float("inf")
    assert column_norms(x)[0] == float("inf")
    x[2, 0] = float("nan")
    assert column_norms(x)[0].isnan()


@pytest.mark.parametrize("basis", ["device", "none"])
def test_eigenvalues_of_a_long_float32_operator_are_within_their_bounds(basis):
    """A diagonal float32 operator of 16.8M entries with known top eigenvalues: each returned value lies within
    its verified error bound of the truth (before column_norms, the normalizations were off by ~1e-3 and the
    values by as much, far outside bounds computed with the same norm)."""
    diagonal = torch.linspace(0.0, 1.0, LONG)
    top = torch.tensor([10.0, 7.0, 5.0])
    diagonal[-3:] = top.flip(0)
    op = cola.SelfAdjoint(cola.ops.Diagonal(diagonal))
    spectrum = hessops.eigs(op, 3, "LA", value_tol=1e-4, max_iters=60, basis=basis)
    assert spectrum.converged
    errors = (spectrum.values.double() - top.double()).abs()
    assert (errors <= spectrum.error_bounds.double() + 1e-7 * 10).all(), (spectrum.values, spectrum.error_bounds)
    assert (errors <= 1e-4 * 10).all(), spectrum.values


@pytest.mark.parametrize("columns", [1, 3, 12])
def test_column_dots_match_float64(columns):
    generator = torch.Generator().manual_seed(columns)
    a, b = torch.randn(3_000_001, columns, generator=generator), torch.randn(3_000_001, columns, generator=generator)
    exact = (a.double() * b.double()).sum(0)
    scale = a.double().norm(dim=0) * b.double().norm(dim=0)
    assert ((column_dots(a, b) - exact).abs() / scale).max() < 1e-6


def test_column_norms_fast_and_scaled_paths_agree():
    """Columns within [2⁻⁵⁰, 2⁵⁰] are summed directly; a column outside sends the block to the scaled sum."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(100_003, 2, generator=generator)
    direct = column_norms(x)
    y = x.clone()
    y[0, 1] = 2.0**60  # forces the scaled path for the block
    scaled = column_norms(y)
    assert torch.allclose(direct[0], scaled[0], rtol=1e-6, atol=0)
    assert torch.isclose(scaled[1], torch.tensor(2.0**60))
    assert torch.allclose(column_norms(x.T, dim=1), direct, rtol=1e-6, atol=0)
    assert column_norms(x.T, dim=-1, keepdim=True).shape == (2, 1)
    assert column_norms(x, keepdim=True).shape == (1, 2)


class Aliasing(cola.ops.LinearOperator):
    """The identity, returning the very tensor it is given: Lanczos must not update it in place."""

    def __init__(self, n: int):
        super().__init__(torch.float64, (n, n))

    def _matmat(self, X):
        return X


@pytest.mark.parametrize("basis", ["device", "none"])
def test_lanczos_does_not_write_into_what_the_operator_returns(basis):
    spectrum = hessops.eigs(cola.SelfAdjoint(Aliasing(50)), 1, "LA", basis=basis)
    assert spectrum.converged
    assert torch.allclose(spectrum.values, torch.ones(1, dtype=torch.float64))
    assert torch.allclose(spectrum.residuals, torch.zeros(1, dtype=torch.float64), atol=1e-12)
