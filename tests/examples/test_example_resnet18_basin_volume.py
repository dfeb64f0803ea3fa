"""examples/resnet18_basin_volume.py: its --quick mode run as a user runs it and checked through result.json and
its figure (the terms, the interval, the c check, the deflated eigenvalues),
and its refusals in-process."""

from __future__ import annotations

import math

import examples_runner
import pytest
from scipy.stats import t as student_t

MODEL = "resnet18_cifar10"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return examples_runner.run_quick("resnet18_basin_volume", tmp_path_factory.mktemp("resnet18_basin"))


def test_quick_settings_and_figure(quick):
    result, out = quick
    assert result["mode"] == "quick" and result["model"] == MODEL and result["test_examples"] == 1
    assert result["checkpoint"]["source"] == "written by --quick" and result["hvp_mode"] == "autograd"
    png = (out / "basin.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_quick_basin_log_volume_and_its_interval(quick):
    result, _ = quick
    volume, logdet = result["basin_volume"], result["basin_volume"]["logdet"]
    n, c, threshold = volume["n"], volume["c"], volume["threshold"]
    assert n == 11_173_962 and volume["method"] == logdet["method"] == "deflated"
    # the terms: the unit ball exactly, the threshold term, and the log-determinant's half
    assert volume["log_unit_ball"] == pytest.approx(0.5 * n * math.log(math.pi) - math.lgamma(n / 2 + 1), rel=1e-12)
    assert volume["log_threshold_term"] == pytest.approx(0.5 * n * math.log(2 * threshold), rel=1e-12)
    assert volume["log_volume"] == pytest.approx(
        volume["log_unit_ball"] + volume["log_threshold_term"] - 0.5 * logdet["logdet"], rel=1e-12
    )
    # the interval: Student t over 2 probes (noise_interval), its low end lowered by the two biases; the volume's
    # from the log-determinant's, which holds the estimate
    low, high = logdet["confidence_interval"]
    assert low < logdet["logdet"] < high and volume["confidence"] == logdet["confidence"] == 0.95
    noise_low, noise_high = logdet["noise_interval"]
    assert (noise_high - noise_low) / 2 == pytest.approx(student_t.ppf(0.975, 1) * logdet["std_error"], rel=1e-9)
    biases = logdet["quadrature_bias"] + logdet["deflation_bias"]
    assert (low, high) == pytest.approx((noise_low - biases, noise_high), rel=1e-12)
    v_low, v_high = volume["confidence_interval"]
    assert v_high - v_low == pytest.approx((high - low) / 2, rel=1e-9) and v_low < volume["log_volume"] < v_high
    # the c check passed: c exceeds |λ_min| by more than the bound; every eigenvalue of H + cI then exceeds
    # λ_min − bound + c > 0, so log det(H + cI) > n · log(that)
    smallest, bound = volume["smallest_eigenvalue"], volume["smallest_eigenvalue_bound"]
    assert smallest < 0 and smallest - bound + c > 0 and bound < 0.1 * abs(smallest)
    assert low > n * math.log(smallest - bound + c)
    # the deflated eigenvalues: the top 2 of H + cI, above c, descending; the bias bound is reported
    top = logdet["deflated_eigenvalues"]
    assert len(top) == result["deflate"] == 2 and top[0] >= top[1] > c
    assert 0 <= logdet["deflation_bias"] < high - low
    assert 0 < logdet["quadrature_decay"] < 1
    # products: the c check, the top-2 eigs (with its verification block) and 2 probes × 5 Lanczos steps
    assert volume["n_matvecs"] > logdet["n_matvecs"] > 2 * 5 + 2


def test_full_mode_needs_weights(tmp_path):
    example = examples_runner.load_example("resnet18_basin_volume")
    status, stderr = examples_runner.exit_of(example, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert status == 2 and "--checkpoint FILE, or --pretrained" in stderr
