"""Density, trace, log-determinant and basin volume against exact answers on small operators.

Randomized estimates are checked within 3 of their reported standard errors (seeds fixed), and for
convergence as probes grow."""

from __future__ import annotations

import math

import cola
import pytest
import torch
from reference import reference_hessian, relative_error
from torch import nn
from toy_networks import mlp

import hessops


@pytest.fixture(scope="module")
def hessian():
    torch.manual_seed(0)
    model, x, y = (
        mlp(4, 16, 3).double(),
        torch.randn(40, 4, dtype=torch.float64),
        torch.randn(40, 3, dtype=torch.float64),
    )
    data = [(x[:25], y[:25]), (x[25:], y[25:])]
    H = hessops.Hessian(model, nn.MSELoss(), data)
    dense = reference_hessian(model, nn.MSELoss(), data)  # tests/reference.py: no hessops code
    return H, dense, torch.linalg.eigvalsh(dense), (model, data)


def test_density_mass_mean_and_second_moment(hessian):
    H, dense, exact, _ = hessian
    d = hessops.spectral_density(H, num_probes=30, lanczos_steps=40, seed=1)
    grid, density = d
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-12)
    assert (density >= 0).all()
    # Quadrature moments: per probe vᵀH^k v/‖v‖² (exact for k < 2m); their mean estimates tr(H^k)/n.
    for k in (1, 2):
        per_probe = d.quadrature.per_probe(lambda t: t**k)
        error = float(per_probe.std() / math.sqrt(len(per_probe)))
        assert abs(float(per_probe.mean()) - float((exact**k).mean())) < 3 * error
    # The broadened density's mean is the quadrature mean; its second moment adds σ².
    mean = float(torch.trapezoid(grid * density, grid))
    assert mean == pytest.approx(d.quadrature.moment(1), abs=1e-6 * float(exact.abs().max()))
    second = float(torch.trapezoid(grid**2 * density, grid))
    assert second == pytest.approx(d.quadrature.moment(2) + d.sigma**2, rel=1e-4)


def test_density_nodes_reach_the_extreme_eigenvalues(hessian):
    H, _, exact, _ = hessian
    d = hessops.spectral_density(H, num_probes=4, lanczos_steps=60)
    assert float(d.quadrature.nodes.max()) == pytest.approx(float(exact.max()), rel=1e-8)
    assert float(d.quadrature.nodes.min()) == pytest.approx(float(exact.min()), rel=1e-8)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_standard_errors_and_converging(hessian, method):
    H, dense, _, _ = hessian
    truth = float(dense.trace())
    small = hessops.trace(H, probes=30, method=method, seed=0)
    large = hessops.trace(H, probes=120, method=method, seed=0)
    for estimate in (small, large):
        assert abs(estimate.estimate - truth) < 3 * estimate.std_error
        assert estimate.n_matvecs in (30, 120)
    assert large.std_error < small.std_error


def test_hutchpp_is_exact_when_the_sketch_spans_the_operator():
    """For a rank-3 operator a sketch of ≥ 3 columns captures it all: the estimate is exact."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(60, 3, dtype=torch.float64, generator=g)
    A = cola.PSD(cola.ops.Dense(B @ B.T))
    t = hessops.trace(A, probes=12, method="hutch++")
    assert t.estimate == pytest.approx(float((B * B).sum()), rel=1e-10)
    assert t.std_error < 1e-10 * t.estimate


def test_logdet_dense_and_slq(hessian):
    H, dense, exact, _ = hessian
    c = float(-exact.min()) + 1.0
    R = hessops.Regularized(H, c)
    truth = float(torch.log(exact + c).sum())
    assert hessops.logdet(R).estimate == pytest.approx(truth, rel=1e-12)  # auto = dense at n = 131
    errors = []
    for probes in (10, 80):
        slq = hessops.logdet(R, method="slq", probes=probes, lanczos_steps=40, seed=2)
        assert abs(slq.estimate - truth) < 3 * slq.std_error + 1e-6 * abs(truth)
        errors.append(slq.std_error)
    assert errors[1] < errors[0]


def test_logdet_refuses_an_indefinite_operator(hessian):
    H, *_ = hessian
    with pytest.raises(hessops.NotPositiveDefiniteError, match="Regularized"):
        hessops.logdet(H)
    with pytest.raises(hessops.NotPositiveDefiniteError, match="Ritz value"):
        hessops.logdet(H, method="slq", probes=4, lanczos_steps=30)


def test_basin_volume_matches_a_direct_dense_computation(hessian):
    H, dense, exact, _ = hessian
    n, threshold, c = H.shape[0], 2.0, float(-exact.min()) + 0.5
    volume = hessops.basin_volume(H, threshold=threshold, c=c)
    half_logdet = 0.5 * float(torch.linalg.slogdet(dense + c * torch.eye(n, dtype=torch.float64))[1])
    direct = 0.5 * n * math.log(math.pi) - math.lgamma(n / 2 + 1) + 0.5 * n * math.log(2 * threshold) - half_logdet
    assert volume.log_volume == pytest.approx(direct, rel=1e-12)
    assert volume.half_logdet == pytest.approx(half_logdet, rel=1e-12)
    assert volume.log_volume == pytest.approx(
        volume.log_unit_ball + volume.log_threshold_term - volume.half_logdet, rel=1e-14
    )


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1710])
def test_basin_volume_of_a_multiple_of_the_identity(n):
    """H = a·I: the basin is a ball of radius √(2·threshold/a), volume V_n · r^n, V_n = π^{n/2}/Γ(n/2+1)."""
    a, threshold = 3.0, 2.0
    H = cola.PSD(cola.ops.Dense(a * torch.eye(n, dtype=torch.float64)))
    radius = math.sqrt(2 * threshold / a)
    expected = 0.5 * n * math.log(math.pi) - math.lgamma(n / 2 + 1) + n * math.log(radius)
    assert hessops.basin_volume(H, threshold=threshold).log_volume == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if n == 1:
        assert math.exp(hessops.basin_volume(H, threshold=threshold).log_volume) == pytest.approx(
            2 * radius
        )  # a segment
    if n == 2:
        assert math.exp(hessops.basin_volume(H, threshold=threshold).log_volume) == pytest.approx(math.pi * radius**2)


def test_unit_ball_term_of_the_mnist_study():
    """n = 1,710: the exact log V_n (lgamma) against the study's Stirling value −3942.74, and the threshold
    term for threshold 2: (n/2)·log 4 = 1185.28."""
    assert hessops.log_unit_ball_volume(1710) == pytest.approx(-3942.74, abs=0.01)
    volume = hessops.basin_volume(cola.PSD(cola.ops.Dense(torch.eye(1710, dtype=torch.float64))), threshold=2.0)
    assert volume.log_threshold_term == pytest.approx(1185.28, abs=0.01)


def test_dense_hessian_and_the_densified_operator_are_the_reference(hessian):
    """hessops.dense_hessian and H.to_dense() against tests/reference.py (float64; 1e-12 relative)."""
    H, dense, _, (model, data) = hessian
    assert relative_error(hessops.dense_hessian(model, nn.MSELoss(), data), dense) < 1e-12
    assert relative_error(H.to_dense(), dense) < 1e-12
