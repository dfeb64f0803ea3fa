"""hessops.eigs against eigvalsh on indefinite Hessians, for every `which`."""

from __future__ import annotations

import cola
import pytest
import torch
from reference import dense_empirical_fisher, reference_hessian
from torch import nn
from toy_networks import mlp

import hessops


@pytest.fixture(scope="module")
def indefinite():
    """An MLP Hessian (n = 131) with negative eigenvalues, and its exact spectrum."""
    torch.manual_seed(0)
    model, x, y = (
        mlp(4, 16, 3).double(),
        torch.randn(40, 4, dtype=torch.float64),
        torch.randn(40, 3, dtype=torch.float64),
    )
    H = hessops.Hessian(model, nn.MSELoss(), [(x[:25], y[:25]), (x[25:], y[25:])])
    exact = torch.linalg.eigvalsh(reference_hessian(model, nn.MSELoss(), [(x, y)]))  # tests/reference.py
    assert exact.min() < -0.1 * exact.max()  # really indefinite
    return H, exact


def expected(exact: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "LA":
        return exact.flip(0)[:k]
    if which == "SA":
        return exact[:k]
    if which == "LM":
        return exact[torch.argsort(exact.abs(), descending=True)[:k]]
    return torch.cat([exact.flip(0)[: k - k // 2], exact[: k // 2].flip(0)])


@pytest.mark.parametrize("which", ["LM", "LA", "SA", "both"])
def test_eigs_matches_eigvalsh(indefinite, which):
    """tol 1e-8 on residuals relative to max|λ| bounds eigenvalue errors by ~residual²/gap: 1e-9 · max|λ|."""
    H, exact = indefinite
    spectrum = hessops.eigs(H, 4, which, tol=1e-8)
    scale = float(exact.abs().max())
    torch.testing.assert_close(spectrum.values, expected(exact, 4, which), rtol=0, atol=1e-9 * scale)
    assert spectrum.converged and spectrum.n_matvecs < H.shape[0]  # stopped early, not at n steps
    assert float(spectrum.residuals.max()) < 1e-7 * scale
    V = spectrum.vectors
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    values, vectors = spectrum  # unpacks
    assert values is spectrum.values and vectors is V


def test_eigs_finds_a_large_negative_eigenvalue():
    """LM must return the largest *magnitude*: here a negative eigenvalue, which CoLA's "LM" misses."""
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    spectrum = torch.linspace(-1, 1, 50, dtype=torch.float64)
    spectrum[0] = -20.0
    A = cola.SelfAdjoint(cola.ops.Dense(q @ torch.diag(spectrum) @ q.T))
    assert float(hessops.eigs(A, 1, "LM").values[0]) == pytest.approx(-20.0, rel=1e-10)
    assert float(cola.eig(A, 1, which="LM", alg=cola.Lanczos(max_iters=50, key=0))[0].real[0]) == pytest.approx(
        1.0, rel=1e-6
    )


def test_eigs_of_a_low_rank_operator_restarts_past_the_invariant_subspace():
    """The empirical Fisher of 5 examples has rank ≤ 5: Lanczos breaks down after 5 steps and must restart."""
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    F = hessops.EmpiricalFisher(model, nn.CrossEntropyLoss(), [(x, y)])
    exact = torch.linalg.eigvalsh(dense_empirical_fisher(model, nn.CrossEntropyLoss(), [(x, y)]))
    spectrum = hessops.eigs(F, 8, "LA", tol=1e-10)
    torch.testing.assert_close(spectrum.values, exact.flip(0)[:8], rtol=0, atol=1e-10 * float(exact.max()))


def test_warm_start_cuts_the_steps(indefinite):
    H, _ = indefinite
    cold = hessops.eigs(H, 1, "LA", tol=1e-6)
    warm = hessops.eigs(H, 1, "LA", tol=1e-6, start=cold.vectors[:, 0])
    assert warm.n_matvecs < cold.n_matvecs


def test_eigs_warns_when_not_converged(indefinite):
    H, _ = indefinite
    with pytest.warns(RuntimeWarning, match="raise max_iters"):
        spectrum = hessops.eigs(H, 3, "SA", tol=1e-12, max_iters=5)
    assert not spectrum.converged


def test_eigs_bad_arguments(indefinite):
    H, _ = indefinite
    with pytest.raises(ValueError, match="largest magnitude"):
        hessops.eigs(H, 2, "BE")
    with pytest.raises(ValueError, match="k=0"):
        hessops.eigs(H, 0)
    with pytest.raises(ValueError, match="value_tol"):
        hessops.eigs(H, 2, value_tol=0.0)
    with pytest.raises(ValueError, match="SelfAdjoint"):
        hessops.eigs(cola.ops.Dense(torch.eye(3, dtype=torch.float64)), 1)


@pytest.mark.parametrize("which", ["LM", "LA", "SA", "both"])
def test_value_tol_bounds_the_eigenvalue_errors(indefinite, which):
    """With value_tol the stop is on eigenvalue error bounds min(r, r²/gap): the values must be within
    value_tol · max|λ| of the exact ones (and within their reported bounds), in fewer products than the
    residual test at the same tolerance."""
    H, exact = indefinite
    scale = float(exact.abs().max())
    for value_tol in (1e-4, 1e-8):
        spectrum = hessops.eigs(H, 4, which, value_tol=value_tol)
        errors = (spectrum.values - expected(exact, 4, which)).abs()
        assert spectrum.converged and float(errors.max()) <= value_tol * scale
        assert bool((errors <= spectrum.error_bounds * (1 + 1e-6) + 1e-12 * scale).all())
        assert spectrum.n_matvecs < hessops.eigs(H, 4, which, tol=value_tol).n_matvecs


def test_error_bounds_on_a_known_spectrum():
    """Kato–Temple: on a diagonal operator with separated top eigenvalues, every Lanczos Ritz value lies within
    its bound of an eigenvalue, at every step count, and the bound is far below the residual once converged."""
    from hessops.analysis.spectrum import error_bounds
    from hessops.linalg.lanczos import lanczos, ritz

    spectrum = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.linspace(-1, 1, 197)]).double()
    A = cola.SelfAdjoint(cola.ops.Dense(torch.diag(spectrum)))
    start = torch.randn(200, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (5, 10, 20, 40):
        theta, _, residuals = ritz(lanczos(A, start, steps))
        bounds = error_bounds(theta, residuals)
        for value, bound in zip(theta[-3:], bounds[-3:]):  # the three largest Ritz values
            assert float((spectrum - value).abs().min()) <= float(bound) * (1 + 1e-9) + 1e-13
        if steps == 10:
            assert 0 < float(bounds[-1]) < 1e-2 * float(residuals[-1])


def test_verify_false_skips_the_residual_product(indefinite):
    H, _ = indefinite
    checked = hessops.eigs(H, 3, "LA", tol=1e-8)
    estimated = hessops.eigs(H, 3, "LA", tol=1e-8, verify=False)
    assert estimated.n_matvecs == checked.n_matvecs - 3
    # the verified values come from a Rayleigh-Ritz step on the Ritz vectors: equal to rounding
    torch.testing.assert_close(estimated.values, checked.values, rtol=0, atol=1e-13 * float(checked.values.abs().max()))
    assert float(estimated.residuals.max()) < 1e-7 * float(checked.values.abs().max())


@pytest.fixture(scope="module")
def float32_hessian():
    """A float32 MLP Hessian (n = 131) and the exact spectrum of the same function in float64."""
    torch.manual_seed(0)
    model, x, y = mlp(4, 16, 3), torch.randn(40, 4), torch.randn(40, 3)
    exact_model = mlp(4, 16, 3).double()
    exact_model.load_state_dict(model.state_dict())  # float32 values, held exactly in float64
    exact = torch.linalg.eigvalsh(reference_hessian(exact_model, nn.MSELoss(), [(x.double(), y.double())]))
    return hessops.Hessian(model, nn.MSELoss(), [(x, y)]), exact


def test_converged_and_bounds_come_from_the_verified_residuals(float32_hessian):
    """tol=1e-8 is below what float32 products reach (~eps·‖H‖ = 1.2e-7 · 2.1): the Lanczos estimates pass it
    (rounding makes them orders of magnitude too small) but the true residuals do not, so converged must be
    False with a warning, and the bounds must cover the true errors (against float64: up to ~1.3e-7)."""
    H, exact = float32_hessian
    scale = float(exact.abs().max())
    with pytest.warns(RuntimeWarning, match="verified residuals .* Lanczos estimates .* met it"):
        strict = hessops.eigs(H, 3, "LA", tol=1e-8)
    assert not strict.converged and strict.verified
    assert float(strict.residual_estimates.max()) <= 1e-8 * scale < float(strict.residuals.max())
    errors = (strict.values - exact.flip(0)[:3]).abs()
    assert bool((errors <= strict.error_bounds).all())
    assert float(strict.error_bounds.min()) >= torch.finfo(torch.float32).eps * float(strict.values.abs().max())
    loose = hessops.eigs(H, 3, "LA", tol=1e-5)  # reachable in float32: converged, the bounds still cover the errors
    assert loose.converged and float(loose.residuals.max()) <= 1e-5 * scale
    assert bool(((loose.values - exact.flip(0)[:3]).abs() <= loose.error_bounds).all())


def test_verify_false_says_so(float32_hessian):
    """Without verification, converged is the estimate test, and the result says it was not verified."""
    H, _ = float32_hessian
    unverified = hessops.eigs(H, 3, "LA", tol=1e-8, verify=False)
    assert unverified.converged and not unverified.verified
    torch.testing.assert_close(unverified.residuals, unverified.residual_estimates, rtol=0, atol=0)
