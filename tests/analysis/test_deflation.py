"""The deflated log-determinant and the basin volume's confidence interval and c check, against dense float64
references (hessops.dense_hessian, eigvalsh) on small networks, and against KFAC where KFAC is exact.

Randomized estimates are checked against their own confidence intervals (seeds fixed): the interval covers the
probes' noise, and deflation can only raise the estimate, by at most its reported ``deflation_bias``."""

from __future__ import annotations

import json
import math
import re

import cola
import pytest
import torch
from scipy.stats import t as student_t
from torch import nn
from toy_networks import hidden_bottom, mlp

import hessops
import hessops.linalg.basis
from hessops.cli import main
from hessops.linalg.lanczos import rademacher
from hessops.linalg.quadrature import quadrature


def logdet_of(dense: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(dense).log().sum())


@pytest.fixture(scope="module")
def mlp_hessian():
    """An MLP's float64 Hessian of an MSE loss (n = 131, indefinite) from hessops.dense_hessian, as a CoLA
    operator (the estimators' arithmetic on the true Hessian, at a fraction of the products' cost), with its
    spectrum."""
    torch.manual_seed(0)
    model = mlp(4, 16, 3).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    dense = hessops.dense_hessian(model, nn.MSELoss(), [(x, y)], dtype=torch.float64)
    return cola.SelfAdjoint(cola.ops.Dense(dense)), dense, torch.linalg.eigvalsh(dense)


@pytest.fixture(scope="module")
def cnn_hessian():
    """A small CNN's float64 cross-entropy Hessian operator (n = 113, matrix-free products) with its dense
    reference."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 5), nn.Tanh(),
        nn.Linear(5, 3),
    ).double().eval()  # fmt: skip
    x, y = torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    data = [(x[:12], y[:12]), (x[12:], y[12:])]
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    dense = hessops.dense_hessian(model, nn.CrossEntropyLoss(), data, dtype=torch.float64)
    return H, dense, torch.linalg.eigvalsh(dense)


def test_quadrature_from_given_probes_is_the_rule_of_those_probes(mlp_hessian):
    H, *_ = mlp_hessian
    ours = quadrature(H, num_probes=3, lanczos_steps=12, seed=4)
    probes = rademacher(H.shape[0], 3, torch.Generator().manual_seed(4), H)
    given = quadrature(H, start=probes, lanczos_steps=12, seed=4)
    assert torch.equal(ours.nodes, given.nodes) and torch.equal(ours.weights, given.weights)
    for bad, message in (
        (probes[:-1], r"\(n, P\) tensor"),
        (torch.cat([probes[:, :1], torch.zeros_like(probes[:, :1])], 1), "zero column"),
        (probes * float("nan"), "NaN"),
    ):
        with pytest.raises(hessops.InvalidArgumentError, match=message):
            quadrature(H, start=bad, lanczos_steps=4)


def test_deflation_with_loose_eigenpairs_overestimates_within_its_bound(mlp_hessian):
    """The expectation of the deflated estimator, Σ log θ_i + log det(WᵀAW) for the Ritz pairs (θ_i, v_i) that
    ``eigs`` gives with a loose tolerance, computed densely: it lies above log det A (Fischer's inequality) and
    within the reported ``deflation_bias`` of it."""
    H, dense, exact = mlp_hessian
    c = float(-exact.min()) + 0.5
    A = dense + c * torch.eye(dense.shape[0], dtype=torch.float64)
    R = hessops.Regularized(H, c)
    # λ_min(R) = 0.5 by construction: given, since the loose run for it (0.05) ends unconverged (0.602 ± 0.132;
    # before the multiplicity check it claimed 0.602 ± 0.093, converged, 0.102 from the truth)
    est = hessops.logdet(
        R, method="deflated", deflate=4, probes=4, lanczos_steps=20, seed=3, eigs_tol=0.05, lower_bound=0.5
    )
    top = hessops.eigs(R, 4, "LA", tol=0.05, seed=3)  # what the deflation used
    assert torch.equal(est.deflated_eigenvalues, top.values)
    V = torch.linalg.qr(top.vectors).Q
    W = torch.linalg.eigh(torch.eye(A.shape[0], dtype=torch.float64) - V @ V.T).eigenvectors[:, 4:]  # I − VVᵀ's 1s
    expected = float(top.values.log().sum()) + logdet_of(W.T @ A @ W)
    overestimate = expected - logdet_of(A)
    assert 1e-6 < overestimate <= est.deflation_bias  # loose eigenpairs: a bias, and bounded
    assert est.deflation_bias < 1.0


def test_interval_covers_the_truth_at_its_level():
    """A 40×40 operator with outliers (e^8, e^6, e^5) over a bulk, in a random basis: deflating 3 with 4
    probes and Lanczos to the complement's dimension (exact quadrature) leaves the probes' noise, which the
    95% interval covers in 95% of 40 seeded runs: at least 33 (a binomial(40, 0.95) falls below that with
    probability 0.2 %)."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.tensor([math.e**8, math.e**6, math.e**5]), torch.rand(37, generator=g) * 3 + 0.1])
    A = cola.SelfAdjoint(cola.ops.Dense(Q @ torch.diag(spectrum.double()) @ Q.T))
    truth = float(spectrum.double().log().sum())
    covered = 0
    for seed in range(40):
        est = hessops.logdet(
            A, method="deflated", deflate=3, probes=4, lanczos_steps=37, seed=seed, lower_bound=0.1
        )  # λ_min ≥ 0.1 by construction: no search for it
        low, high = est.confidence_interval
        covered += low <= truth <= high
        assert est.deflation_bias < 0.05 * (high - low)  # converged eigenpairs: small beside the noise
    assert covered >= 33


def test_basin_volume_checks_c_and_names_one_that_works(mlp_hessian):
    H, _, exact = mlp_hessian
    smallest = float(exact.min())
    with pytest.raises(hessops.NotPositiveDefiniteError, match="smallest eigenvalue is -") as error:
        hessops.basin_volume(H, threshold=2.0, c=0.5 * -smallest)
    found, bound = re.search(r"smallest eigenvalue is (\S+) \(± (\S+)\)", str(error.value)).groups()
    assert abs(float(found) - smallest) <= float(bound)  # the bound holds
    suggested = float(re.search(r"e\.g\. c=([0-9.e+-]+)", str(error.value)).group(1))
    volume = hessops.basin_volume(H, threshold=2.0, c=suggested)  # dense (n = 131): exact
    assert abs(volume.smallest_eigenvalue - smallest) <= volume.smallest_eigenvalue_bound + 1e-12
    assert volume.half_logdet == pytest.approx(0.5 * float((exact + suggested).log().sum()), rel=1e-12)
    assert volume.confidence_interval is None and volume.to_dict()["smallest_eigenvalue"] == volume.smallest_eigenvalue
    # without the check, the dense log-determinant refuses it in its own words
    with pytest.raises(hessops.NotPositiveDefiniteError, match="smallest eigenvalue is -.*Regularized"):
        hessops.basin_volume(H, threshold=2.0, c=0.5 * -smallest, check_c=False)
    assert hessops.basin_volume(H, threshold=2.0, c=suggested, check_c=False).smallest_eigenvalue is None


def test_basin_volume_refuses_a_smallest_eigenvalue_that_has_not_converged(monkeypatch):
    """The check's eigs run capped at 40 steps (``eigs_max_iters``; before thick restarts, basis="auto" capped it
    there when memory held 40 steps): the run stops unconverged at 0.25 ± 1.4 while λ_min = −10. Its bound cannot
    clear c = 2 (H + 2I has the eigenvalue −8), but before the convergence check 0.25 − 1.4 + 2 > 0 passed. Now it
    is refused, naming the fixes; with the steps raised the run finds −10 and c = 2 is refused as too small, c = 12
    accepted. Memory for only 40 steps now restarts thick in them and finds −10 too."""
    H, spectrum = hidden_bottom()
    n = H.shape[0]
    with (
        pytest.warns(RuntimeWarning, match="eigs stopped after 40 Lanczos steps"),
        pytest.raises(hessops.NotPositiveDefiniteError, match="stopped after 40 steps without converging") as error,
    ):
        hessops.basin_volume(H, threshold=1.0, c=2.0, eigs_max_iters=40)
    for fix in ("raise eigs_max_iters", "smallest_eigenvalue=", "larger c", "check_c=False"):
        assert fix in str(error.value)
    with pytest.raises(hessops.NotPositiveDefiniteError, match=r"smallest eigenvalue is -(9\.9|10)"):
        hessops.basin_volume(H, threshold=1.0, c=2.0, eigs_max_iters=n)
    volume = hessops.basin_volume(H, threshold=1.0, c=12.0, eigs_max_iters=n)
    assert abs(volume.smallest_eigenvalue + 10) <= volume.smallest_eigenvalue_bound
    monkeypatch.setattr(hessops.linalg.basis, "free_device_bytes", lambda device: 2 * 40 * n * 8)
    with pytest.raises(hessops.NotPositiveDefiniteError, match=r"smallest eigenvalue is -(9\.9|10)"):
        hessops.basin_volume(H, threshold=1.0, c=2.0)
    assert volume.half_logdet == pytest.approx(0.5 * float((spectrum + 12).log().sum()), rel=1e-10)


def test_a_given_smallest_eigenvalue_replaces_the_check():
    """``smallest_eigenvalue``, a known lower bound, replaces the eigs run (no products for it) and is checked
    against c like a found one."""
    H, spectrum = hidden_bottom()
    volume = hessops.basin_volume(H, threshold=1.0, c=12.0, smallest_eigenvalue=-10.0)
    assert (volume.smallest_eigenvalue, volume.smallest_eigenvalue_bound) == (-10.0, 0.0)
    assert volume.n_matvecs == volume.logdet.n_matvecs == H.shape[0]  # the dense log-determinant's only
    with pytest.raises(hessops.NotPositiveDefiniteError, match="c=9 does not make H \\+ cI positive definite"):
        hessops.basin_volume(H, threshold=1.0, c=9.0, smallest_eigenvalue=-10.0)
    with pytest.raises(hessops.InvalidArgumentError, match="smallest_eigenvalue"):
        hessops.basin_volume(H, threshold=1.0, c=9.0, smallest_eigenvalue=float("nan"))


def test_deflated_logdet_refuses_a_smallest_eigenvalue_that_has_not_converged():
    """logdet(method="deflated") without a lower_bound checks positivity by its own eigs run: unconverged (here
    eigs_max_iters=40 on the operator above plus 2·I, whose smallest eigenvalue −8 that run does not reach), it
    is refused rather than trusted; given the steps, the run finds −8 and the operator is refused as indefinite."""
    H, _ = hidden_bottom()
    A = hessops.Regularized(H, 2.0)
    settings = dict(method="deflated", deflate=2, probes=4, lanczos_steps=10)
    with (
        pytest.warns(RuntimeWarning, match="eigs stopped after 40"),
        pytest.raises(hessops.NotPositiveDefiniteError, match="without converging.*lower_bound=") as error,
    ):
        hessops.logdet(A, **settings, eigs_max_iters=40)
    assert "raise eigs_max_iters" in str(error.value)
    with pytest.raises(hessops.NotPositiveDefiniteError, match="smallest eigenvalue found, less its error bound, is -"):
        hessops.logdet(A, **settings, eigs_max_iters=600)


def test_deflated_basin_volume_against_the_dense_one(cnn_hessian):
    """On the CNN's Hessian operator: the exact log det(H + cI) lies in [low − deflation_bias, high] (deflation
    can only raise the estimate); the deflated eigenvalues are the top of the dense spectrum to within their
    residuals (each error is at most its residual, Weyl; residuals ≤ eigs_tol · θ_max = 1e-3 · θ_max); the
    intervals are Student t's, the volume's from the log-determinant's; the c check's λ_min is the dense one
    within its bound."""
    H, _, exact = cnn_hessian
    c, threshold, n = float(-exact.min()) + 0.05, 2.0, H.shape[0]
    volume = hessops.basin_volume(
        H, threshold=threshold, c=c, method="deflated", deflate=6, probes=8, lanczos_steps=20, seed=1
    )
    est = volume.logdet
    truth = float((exact + c).log().sum())
    low, high = est.noise_interval
    biases = est.deflation_bias + est.quadrature_bias
    assert est.confidence_interval == pytest.approx((low - biases, high), rel=1e-15)
    assert low - biases <= truth <= high and est.confidence == 0.95
    assert est.method == volume.method == "deflated" and low < est.estimate < high
    top = (exact + c).flip(0)[:6]
    assert torch.allclose(est.deflated_eigenvalues, top, rtol=0, atol=1e-3 * float(top[0]))
    assert (high - low) / 2 == pytest.approx(student_t.ppf(0.975, 7) * est.std_error, rel=1e-10)
    assert abs(volume.smallest_eigenvalue - float(exact.min())) <= volume.smallest_eigenvalue_bound
    unit_ball = 0.5 * n * math.log(math.pi) - math.lgamma(n / 2 + 1)
    exact_volume = unit_ball + 0.5 * n * math.log(2 * threshold) - 0.5 * truth
    v_low, v_high = volume.confidence_interval
    terms = unit_ball + 0.5 * n * math.log(2 * threshold)
    assert (v_low, v_high) == pytest.approx((terms - 0.5 * high, terms - 0.5 * (low - biases)), rel=1e-12)
    assert v_low <= exact_volume <= v_high
    assert volume.log_volume == pytest.approx(volume.log_unit_ball + volume.log_threshold_term - volume.half_logdet)
    assert volume.n_matvecs > est.n_matvecs  # the c check's products
    result = volume.to_dict()
    assert result["confidence_interval"] == [v_low, v_high] and result["confidence"] == 0.95
    assert result["logdet"]["deflated_eigenvalues"] == est.deflated_eigenvalues.tolist()
    json.dumps(result)  # JSON-ready


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(confidence=1.0), "confidence=1.0 must lie strictly between 0 and 1"),
        (dict(confidence=0.0), "confidence=0 must be positive"),
        (dict(deflate=-1), "deflate=-1 must be at least 0"),
        (dict(deflate=131), "deflate=131 must be less than the operator's size 131"),
        (dict(probes=1), "probes=1: a confidence interval needs at least 2 probes"),
        (dict(eigs_tol=0.0), "eigs_tol=0 must be positive"),
    ],
)
def test_deflated_bad_input(mlp_hessian, kwargs, message):
    H, _, exact = mlp_hessian
    R = hessops.Regularized(H, float(-exact.min()) + 1.0)
    with pytest.raises(hessops.InvalidArgumentError, match=re.escape(message)):
        hessops.logdet(R, method="deflated", **{"lanczos_steps": 5, **kwargs})


def test_kfac_is_exact_for_one_linear_layer_and_agrees_with_deflation():
    """For one linear layer (weight and bias treated jointly) under MSE the GGN is exactly Kronecker-factored,
    E[x̃x̃ᵀ] ⊗ (2/C)·I, so KFAC's log det(K + cI), from the factors' eigenvalues, is the dense GGN's to rounding;
    the deflated estimate of log det(GGN + cI) agrees within its interval."""
    from benchmarks.basin_volume import kfac_logdet

    torch.manual_seed(2)
    model = nn.Linear(6, 3).double()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    data, c = [(x[:12], y[:12]), (x[12:], y[12:])], 0.01
    G = hessops.GGN(model, nn.MSELoss(), data)
    dense = G.to_dense()
    truth = logdet_of(dense + c * torch.eye(G.shape[0], dtype=torch.float64))
    kfac = kfac_logdet(model, nn.MSELoss(), data, list(model.parameters()), c)
    assert kfac == pytest.approx(truth, rel=1e-10)
    est = hessops.logdet(hessops.Regularized(G, c), method="deflated", deflate=3, probes=6, lanczos_steps=15)
    low, high = est.confidence_interval
    assert low - est.deflation_bias <= truth <= high


def test_cli_logdet_and_basin_deflated(tmp_path):
    """The deflated CLI estimates against tests/reference.py's float64 GGN and Hessian of the same 40 digits: the
    true log det(GGN + 0.1·I) (slogdet) and log volume (with c = 5) inside the reported intervals, widened by the
    reported deflation bias where there is one (as the Python test above)."""
    from digits_reference import digits_dense_ggn, digits_dense_hessian

    common = ("--num-examples", "40", "--dtype", "float64", "--no-progress", "--probes", "3", "--lanczos-steps", "10")
    out = tmp_path / "logdet.json"
    args = ("logdet", "--operator", "ggn", "--c", "0.1", "--method", "deflated", "--deflate", "3")
    assert main([*args, *common, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "deflated" and len(result["deflated_eigenvalues"]) == 3
    assert result["confidence_interval"][0] < result["logdet"] < result["confidence_interval"][1]
    ggn = digits_dense_ggn(40)
    sign, truth = torch.linalg.slogdet(ggn + 0.1 * torch.eye(ggn.shape[0], dtype=torch.float64))
    low, high = result["confidence_interval"]
    assert float(sign) == 1.0 and low - result.get("deflation_bias", 0.0) <= float(truth) <= high, (result, truth)
    assert result["settings"]["deflate"] == 3 and result["settings"]["confidence"] == 0.95
    out = tmp_path / "basin.json"
    assert main(["basin", "--c", "5", "--deflate", "2", "--confidence", "0.9", *common, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "deflated" and result["confidence"] == 0.9  # --deflate implies the method
    assert result["smallest_eigenvalue"] - result["smallest_eigenvalue_bound"] + 5 > 0
    assert result["confidence_interval"][0] < result["log_volume"] < result["confidence_interval"][1]
    exact = torch.linalg.eigvalsh(digits_dense_hessian(40))
    truth = result["log_unit_ball"] + result["log_threshold_term"] - 0.5 * float(torch.log(exact + 5).sum())
    low, high = result["confidence_interval"]
    slack = 0.5 * abs(result.get("deflation_bias", 0.0))
    assert low - slack <= truth <= high + slack, (result, truth)
    assert main(["basin", "--method", "slq", "--deflate", "2", *common]) == 2  # bad input


def test_cli_basin_takes_a_known_smallest_eigenvalue_and_refuses_an_unconverged_check(tmp_path, capsys):
    common = ("--num-examples", "40", "--dtype", "float64", "--no-progress")
    out = tmp_path / "basin.json"
    args = ("basin", "--operator", "ggn", "--c", "0.1", "--smallest-eigenvalue", "0", *common, "--out", str(out))
    assert main(list(args)) == 0
    result = json.loads(out.read_text())
    assert (result["smallest_eigenvalue"], result["smallest_eigenvalue_bound"]) == (0.0, 0.0)
    assert result["settings"]["smallest_eigenvalue"] == 0.0 and result["n_matvecs"] == result["logdet"]["n_matvecs"]
    assert "at least 0 (given)" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match="eigs stopped after 3 Lanczos steps"):
        assert main(["basin", "--c", "5", "--eigs-max-iters", "3", *common]) == 2
    assert "stopped after 3 steps without converging" in capsys.readouterr().err


def test_benchmark_smoke(tmp_path):
    """benchmarks/basin_volume.py end to end on its tiny MLP (12,342 parameters): a row per deflation with the
    widths by probe count, which shrink from 2 probes to 3 only by the noise, and the KFAC comparison."""
    from benchmarks.basin_volume import main as benchmark

    out = tmp_path / "basin.json"
    argv = [
        "--model",
        "tiny",
        "--num-examples",
        "4",
        "--deflate",
        "0",
        "2",
        "--probes",
        "3",
        "--probe-counts",
        "2",
        "3",
    ]
    benchmark([*argv, "--lanczos-steps", "4", "--kfac", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["deflate"] for row in result["rows"]] == [0, 2] and result["smallest_eigenvalue"] - result[
        "smallest_eigenvalue_bound"
    ] + result["c"] > 0
    for row in result["rows"]:
        low, high = row["noise_interval"]  # the probes' Student t interval, which width_by_probes measures
        assert row["width_by_probes"]["3"] == pytest.approx(high - low, rel=1e-12)  # all probes: the run's own
        assert row["confidence_interval"][1] == high and row["confidence_interval"][0] <= low
    assert len(result["rows"][1]["deflated_eigenvalues"]) == 2
    kfac = result["kfac"]
    assert kfac["n_params"] == 3072 * 4 + 4 + 4 * 10 + 10 and math.isfinite(kfac["kfac_logdet"])
