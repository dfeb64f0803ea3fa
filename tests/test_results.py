"""Results describe themselves: every result type has n_matvecs, seconds and a to_dict() whose values are the
fields', JSON-ready; the trace's running estimate is the mean of the samples drawn so far."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from toy_networks import mlp

import hessops
from hessops.linalg.lanczos import rademacher


@pytest.fixture(scope="module")
def hessian():
    """A float64 MLP Hessian (n = 59) and its dense matrix."""
    torch.manual_seed(0)
    model, x, y = (
        mlp(4, 8, 3).double(),
        torch.randn(30, 4, dtype=torch.float64),
        torch.randn(30, 3, dtype=torch.float64),
    )
    H = hessops.Hessian(model, nn.MSELoss(), [(x, y)])
    return H, H.to_dense()


def round_trip(result) -> dict:
    """to_dict(), checked to survive json.dumps/json.loads unchanged (strict JSON: no NaN in these cases)."""
    fields = {f.name for f in dataclasses.fields(result)}
    assert {"n_matvecs", "seconds"} <= fields
    assert isinstance(result.n_matvecs, int) and result.n_matvecs > 0
    assert isinstance(result.seconds, float) and result.seconds >= 0
    d = result.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["n_matvecs"] == result.n_matvecs and d["seconds"] == result.seconds
    return d


def test_spectrum_to_dict(hessian):
    H, _ = hessian
    s = hessops.eigs(H, 3, "LA")
    d = round_trip(s)
    assert set(d) == {
        "eigenvalues",
        "residuals",
        "error_bounds",
        "which",
        "converged",
        "verified",
        "lanczos_steps",
        "n_matvecs",
        "seconds",
        "basis",
        "check_runs",
        "block_size",
        "restarts",
    }
    assert (d["block_size"], d["restarts"]) == (s.block_size, s.restarts) == (1, 0)
    assert d["check_runs"] == s.checks >= 1  # the deflated restart check ran, and the dict says how often
    assert d["basis"] == s.basis == "device"  # auto: a small basis stays on the device
    assert d["eigenvalues"] == s.values.tolist() and d["residuals"] == s.residuals.tolist()
    assert d["error_bounds"] == s.error_bounds.tolist() and d["lanczos_steps"] == s.steps > 0
    assert (d["which"], d["converged"], d["verified"]) == ("LA", True, True)


def test_spectral_density_to_dict(hessian):
    H, dense = hessian
    result = hessops.spectral_density(H, num_probes=3, lanczos_steps=10, grid=50)
    d = round_trip(result)
    assert set(d) == {"grid", "density", "sigma", "moments", "nodes", "weights", "n_matvecs", "seconds", "basis"}
    assert d["grid"] == result.grid.tolist() and d["density"] == result.density.tolist() and d["sigma"] == result.sigma
    assert d["n_matvecs"] == result.quadrature.n_matvecs == 3 * 10
    assert d["nodes"] == result.quadrature.nodes.tolist() and len(d["weights"]) == 3
    assert d["moments"] == {"mean": result.quadrature.moment(1), "second": result.quadrature.moment(2)}


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_to_dict_and_history(hessian, method):
    H, _ = hessian
    t = hessops.trace(H, probes=30, method=method, seed=4)
    d = round_trip(t)
    assert set(d) == {"trace", "std_error", "method", "probes", "history", "n_matvecs", "seconds", "bias_bound"}
    assert (d["trace"], d["std_error"], d["method"], d["probes"]) == (t.estimate, t.std_error, method, 30)
    assert d["bias_bound"] == 0.0  # exact products
    history = d["history"]
    assert set(history) == {"probes", "estimate", "std_error"}
    first = 2 if method == "hutchinson" else 2 * (30 // 3) + 2  # Hutch++: the sketch's products come first
    assert history["probes"] == list(range(first, 31))
    assert history["estimate"][-1] == t.estimate and history["std_error"][-1] == t.std_error


def test_hutchinson_history_is_the_running_mean_of_its_samples(hessian):
    """Recompute the samples zᵢᵀHzᵢ from the same probes and the dense matrix: after m products the estimate is
    their mean and the error their standard deviation over √m (float64: agreement to 1e-10 relative)."""
    H, dense = hessian
    t = hessops.trace(H, probes=12, method="hutchinson", seed=7)
    Z = rademacher(H.shape[0], 12, torch.Generator().manual_seed(7), H)
    samples = (Z * (dense @ Z)).sum(0)
    for m, estimate, error in zip(t.history.probes, t.history.estimate, t.history.std_error):
        assert estimate == pytest.approx(float(samples[:m].mean()), rel=1e-10)
        assert error == pytest.approx(float(samples[:m].std() / math.sqrt(m)), rel=1e-10)


def test_exact_trace_history_is_one_point(hessian):
    H, dense = hessian
    t = hessops.trace(H, probes=100)  # n = 59 < 100: the exact trace
    assert t.method == "exact" and t.n_matvecs == H.shape[0] and t.probes == 100
    assert round_trip(t)["history"] == {"probes": [H.shape[0]], "estimate": [t.estimate], "std_error": [0.0]}
    assert t.estimate == pytest.approx(float(dense.trace()), rel=1e-12)


def test_logdet_to_dict(hessian):
    H, dense = hessian
    R = hessops.Regularized(H, float(-torch.linalg.eigvalsh(dense).min()) + 1.0)
    exact = hessops.logdet(R, method="dense")
    d = round_trip(exact)
    assert d == {
        "logdet": exact.estimate,
        "std_error": 0.0,
        "method": "dense",
        "n_matvecs": H.shape[0],
        "seconds": exact.seconds,
    }
    assert exact.quadrature is None and exact.eigenvalues.shape == (H.shape[0],)
    assert float(exact.eigenvalues.log().sum()) == pytest.approx(exact.estimate, rel=1e-14)
    slq = hessops.logdet(R, method="slq", probes=4, lanczos_steps=30)
    d = round_trip(slq)
    assert set(d) == {
        "logdet",
        "std_error",
        "method",
        "n_matvecs",
        "seconds",
        "quadrature",
        "confidence_interval",
        "confidence",
    }
    assert (d["logdet"], d["std_error"], d["method"]) == (slq.estimate, slq.std_error, "slq")
    low, high = d["confidence_interval"]
    assert d["confidence"] == 0.95 and low < slq.estimate < high
    assert d["quadrature"] == {
        "nodes": slq.quadrature.nodes.tolist(),
        "weights": slq.quadrature.weights.tolist(),
        "basis": "device",
    }
    assert slq.eigenvalues is None and d["n_matvecs"] == 4 * 30


def test_basin_volume_to_dict(hessian):
    H, dense = hessian
    c = float(-torch.linalg.eigvalsh(dense).min()) + 1.0
    b = hessops.basin_volume(H, threshold=2.0, c=c, method="slq", probes=4, lanczos_steps=30)
    d = round_trip(b)
    assert set(d) == {
        "log_volume",
        "log_unit_ball",
        "log_threshold_term",
        "half_logdet",
        "logdet_std_error",
        "n",
        "threshold",
        "c",
        "method",
        "n_matvecs",
        "seconds",
        "logdet",
        "confidence_interval",
        "confidence",
        "smallest_eigenvalue",
        "smallest_eigenvalue_bound",
    }
    assert d["logdet"] == b.logdet.to_dict() and d["method"] == "slq" == b.logdet.method
    low, high = d["logdet"]["confidence_interval"]  # the volume's interval is the log-determinant's, mapped
    volume_low, volume_high = d["confidence_interval"]
    assert volume_low == pytest.approx(d["log_unit_ball"] + d["log_threshold_term"] - 0.5 * high, rel=1e-14)
    assert volume_high == pytest.approx(d["log_unit_ball"] + d["log_threshold_term"] - 0.5 * low, rel=1e-14)
    smallest = float(torch.linalg.eigvalsh(dense).min())  # the check on c found it, within its bound
    assert abs(d["smallest_eigenvalue"] - smallest) <= d["smallest_eigenvalue_bound"] + 1e-12
    assert d["half_logdet"] == 0.5 * b.logdet.estimate and d["logdet_std_error"] == b.logdet.std_error
    assert d["log_volume"] == pytest.approx(d["log_unit_ball"] + d["log_threshold_term"] - d["half_logdet"], rel=1e-14)
    assert (d["n"], d["threshold"], d["c"]) == (H.shape[0], 2.0, c) and d["n_matvecs"] > b.logdet.n_matvecs
    assert b.seconds >= b.logdet.seconds
