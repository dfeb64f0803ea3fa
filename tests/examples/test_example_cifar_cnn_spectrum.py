"""examples/cifar_cnn_spectrum.py: its --quick mode run as a user runs it and checked through result.json and
its figures; its full-mode data path (CIFAR-10 files, the training-only augmentation) run in-process on small
generated files in CIFAR-10's format; and its message when CIFAR-10 is missing."""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path
from types import ModuleType

import examples_runner
import pytest
import torch
from dataset_files import write_cifar

import hessops.zoo.data
from hessops.zoo.data import CIFAR10_MEAN, CIFAR10_STD

FLOAT32_EPS = torch.finfo(torch.float32).eps


def load_example() -> ModuleType:
    return examples_runner.load_example("cifar_cnn_spectrum")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    return examples_runner.run_quick("cifar_cnn_spectrum", tmp_path_factory.mktemp("cifar_cnn_quick"))


def test_quick_settings_and_training(quick):
    result, out = quick
    assert result["mode"] == "quick" and result["hvp_mode"] == "autograd"
    cnn = result["cnn"]
    assert cnn["model"] == "cnn-cifar-5k" and cnn["n_params"] == 5100
    assert (cnn["lr"], cnn["momentum"], cnn["batch_size"], cnn["train_examples"]) == (0.01, 0.9, 100, 500)
    losses = [h["loss"] for h in cnn["history"]]
    assert len(losses) == cnn["epochs"] == 20
    assert losses[-1] < 0.8 * losses[0]  # SGD has learned: the spectrum below is that of a trained network
    # ... far below chance (ln 10 = 2.30) on the un-augmented images (measured: 0.94, accuracy 0.67)
    assert cnn["train"]["loss"] < 0.5 * math.log(10) and cnn["train"]["accuracy"] > 0.5
    for name in ("one_batch_eigenvalues", "top_eigenvalue", "resnet_sharpness"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, name


def test_quick_one_batch_lanczos_agrees_with_the_dense_hessian(quick):
    result, _ = quick
    batch = result["one_batch"]
    assert (batch["examples"], batch["n"], batch["params"], batch["dtype"]) == (50, 690, "conv1+fc2", "float32")
    dense, lanczos = batch["dense"], batch["lanczos"]
    assert dense["smallest"] == sorted(dense["smallest"]) and dense["largest"] == sorted(dense["largest"], reverse=True)
    assert dense["smallest"][0] < 0 < dense["largest"][0]  # indefinite: both ends are worth finding
    scale = max(abs(dense["smallest"][0]), abs(dense["largest"][0]))
    assert lanczos["converged"] and lanczos["n_matvecs"] > 10
    differences = []
    for end in ("smallest", "largest"):
        for value, exact, residual in zip(lanczos[end], dense[end], lanczos["residuals"][end]):
            # For a unit v, some eigenvalue lies within ‖Hv − θv‖ of θ (Kahan), and the ten are well separated,
            # so it is this one; n·ε·max|λ| bounds the float32 rounding of the dense reference and the products.
            # eigs stopped at residual ≤ tol·max|θ| (checked true residuals: allow 10×).
            assert residual <= 10 * lanczos["tol"] * scale
            assert abs(value - exact) <= residual + batch["n"] * FLOAT32_EPS * scale
            differences.append(abs(value - exact))
    assert batch["max_abs_difference"] == pytest.approx(max(differences)) and batch["within_tolerance"]


def test_quick_top_eigenvalue_lanczos_and_power_iteration(quick):
    result, _ = quick
    top = result["top_eigenvalue"]
    lanczos, power = top["lanczos"], top["power_iteration"]
    assert top["examples"] == 500 and top["batches"] == 5 and top["n"] == 5100
    assert lanczos["converged"] and lanczos["residual"] <= 10 * lanczos["tol"] * lanczos["value"]
    assert lanczos["batch_hvps"] == lanczos["n_matvecs"] * top["batches"]
    assert power["batch_hvps"] == len(power["quotients"]) == power["passes"] * top["batches"]
    # vᵀHv ≤ λ_max for every unit v (Courant-Fischer): the power iteration's vector cannot beat Lanczos, beyond
    # Lanczos' own error (at most its residual) and float32 rounding
    slack = lanczos["residual"] + 1e-5 * lanczos["value"]
    assert power["rayleigh_quotient"] <= lanczos["value"] + slack
    # ... and it has found the top direction: its Rayleigh quotient is within 2% of λ_max
    assert power["rayleigh_quotient"] >= 0.98 * lanczos["value"]
    # the notebook's estimate averages one-batch quotients vᵀH_b v over a pass; with v near the top eigenvector
    # their mean is near vᵀHv, up to how v turns between batches: within 10%
    assert abs(top["relative_difference"]) <= 0.10
    assert top["relative_difference"] == pytest.approx((power["estimate"] - lanczos["value"]) / lanczos["value"])


def test_quick_resnet_sharpness(quick):
    result, _ = quick
    resnet = result["resnet"]
    assert resnet["model"] == "resnet18" and resnet["n_params"] == 11_689_512
    assert resnet["train_examples"] == 16 and resnet["sharpness_examples"] == 4 and len(resnet["train_loss"]) == 2
    assert [h["epoch"] for h in resnet["history"]] == [0, 2]
    for h in resnet["history"]:
        assert h["value"] > 0 and h["residual"] <= 10 * resnet["tol"] * h["value"] and h["n_matvecs"] >= 2
    assert result["study_sharpness"] == {"0": 59950.0, "10": 99.8, "100": 5.35}


def test_full_mode_data_path_on_cifar_format_files(tmp_path, monkeypatch):
    """CIFAR-10 read by the real loader (files the test writes: 100 training images), normalized, never augmented;
    the training loader's images are crops of the padded image, flipped or not, and only they are random."""
    write_cifar(tmp_path)
    example = load_example()
    # the files are not the published ones, so their MD5 sums differ: read them unverified
    monkeypatch.setattr(example, "load_dataset", functools.partial(hessops.zoo.data.load_dataset, verify=False))
    args = argparse.Namespace(
        quick=False, data_dir=tmp_path, train_examples=None, seed=0, batch_size=10, device=torch.device("cpu")
    )
    data, fill = example.training_set(args)
    reference = hessops.zoo.data.load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert len(data) == 100 and torch.equal(data[7][0], reference[7][0]) and torch.equal(data[7][0], data[7][0])
    assert fill == pytest.approx([-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)])  # a black pixel, normalized
    x, y = next(iter(example.training_loader(data, fill, args)))
    assert x.shape == (10, 3, 32, 32) and y.shape == (10,)

    augmented = example.Augmented(data, fill)
    image = data[3][0]
    padded = torch.tensor(fill).view(3, 1, 1).expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = image
    crops = {}
    for top in range(9):
        for left in range(9):
            crop = padded[:, top : top + 32, left : left + 32]
            crops[top, left, False], crops[top, left, True] = crop, crop.flip(-1)
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        drawn = augmented[3][0]
        matches = [key for key, crop in crops.items() if torch.equal(drawn, crop)]
        assert matches, "an augmented image is not a crop of the padded image, flipped or not"
        seen.update(matches)
    assert len(seen) > 10 and {flip for _, _, flip in seen} == {False, True}


def test_full_mode_without_cifar10_says_how_to_get_it(tmp_path):
    """In-process (a subprocess would add only its start-up): the exit status and message a user sees."""
    status, stderr = examples_runner.exit_of(
        load_example(), "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--device", "cpu"
    )
    assert status == 1 and "cifar10 not found" in stderr and "hessops download cifar10" in stderr
