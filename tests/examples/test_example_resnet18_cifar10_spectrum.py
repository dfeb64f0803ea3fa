"""examples/resnet18_cifar10_spectrum.py: its --quick mode run as a user runs it and checked through
result.json, its figures and the checkpoint it wrote and loaded; its full-mode test-set path (CIFAR-10 files,
the checkpoint's normalization) run in-process on small generated files; and its messages when the weights
cannot be had."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from types import ModuleType

import examples_runner
import pytest
import torch
from dataset_files import write_cifar
from torch import nn

import hessops
import hessops.zoo.data
from hessops.zoo.models import build_model, load_checkpoint, model_spec

MODEL = "resnet18_cifar10"


def load_example() -> ModuleType:
    return examples_runner.load_example("resnet18_cifar10_spectrum")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    return examples_runner.run_quick("resnet18_cifar10_spectrum", tmp_path_factory.mktemp("resnet18_quick"))


def test_quick_settings_and_figures(quick):
    result, out = quick
    assert result["mode"] == "quick" and result["model"] == MODEL and result["n_params"] == 11_173_962
    assert result["test_examples"] == 8 and result["hvp_mode"] == "autograd"
    assert result["study"] == {"lanczos_steps": 30, "seconds": 900, "device": "a GPU"}
    for name in ("eigenvalues", "density"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, name


def test_quick_evaluates_the_checkpoint_it_wrote(quick):
    """The reported loss and accuracy are those of the checkpoint's weights, which differ from the seed-0
    model the example builds before loading them."""
    result, out = quick
    checkpoint = Path(result["checkpoint"]["path"])
    assert checkpoint == out / "checkpoint.pt" and result["checkpoint"]["source"] == "written by --quick"
    example = load_example()
    test_images = example.random_images(8, seed=1)
    batches = [test_images.tensors]
    loaded = load_checkpoint(build_model(MODEL, seed=0), checkpoint).eval()
    mine = hessops.evaluate(loaded, nn.CrossEntropyLoss(), batches)
    assert mine["loss"] == pytest.approx(result["test"]["loss"], rel=1e-5)
    assert mine["accuracy"] == result["test"]["accuracy"]
    fresh = hessops.evaluate(build_model(MODEL, seed=0), nn.CrossEntropyLoss(), batches)
    assert abs(fresh["loss"] - mine["loss"]) > 1e-3  # without the checkpoint, another model
    state, init = loaded.state_dict(), build_model(MODEL, seed=1).state_dict()
    assert not torch.equal(state["layer1.0.conv1.weight"], init["layer1.0.conv1.weight"])  # SGD steps taken
    assert not torch.equal(state["bn1.running_mean"], init["bn1.running_mean"])  # in train mode


def test_quick_eigenvalues_and_density(quick):
    result, _ = quick
    eigs, density = result["eigs"], result["density"]
    values, radius = eigs["values"], abs(eigs["values"][0])
    assert eigs["k"] == len(values) == 2 and eigs["which"] == "LM" and eigs["converged"]
    assert [abs(v) for v in values] == sorted((abs(v) for v in values), reverse=True)
    for residual in eigs["residuals"]:
        assert residual <= 10 * eigs["tol"] * radius  # eigs' stopping test, on the true residuals
    # SLQ: 8 Lanczos steps on one probe, each step one product; each probe's weights sum to one and the density
    # integrates to one on its grid
    assert density["n_matvecs"] == density["num_probes"] * density["lanczos_steps"] == 8
    assert result["n_matvecs"] == eigs["n_matvecs"] + density["n_matvecs"]
    for weights in density["weights"]:
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)
    grid, values_on_grid = torch.tensor(density["grid"]), torch.tensor(density["density"])
    assert float(torch.trapezoid(values_on_grid, grid)) == pytest.approx(1.0, abs=1e-6)
    # Ritz values lie within the spectrum, and the largest |eigenvalue| bounds it: the two runs agree, up to
    # eigs' error (at most its residual) and float32 rounding
    nodes = torch.tensor(density["nodes"])
    assert float(nodes.abs().max()) <= radius + eigs["residuals"][0] + 1e-4 * radius


def test_full_mode_test_set_uses_the_checkpoints_normalization(tmp_path, monkeypatch):
    """CIFAR-10's test batch read by the real loader from a file the test writes (20 images), normalized with
    the std the published weights were trained with, not the dataset's."""
    write_cifar(tmp_path)
    example = load_example()
    # the files are not the published ones, so their MD5 sums differ: read them unverified
    monkeypatch.setattr(example, "load_dataset", functools.partial(hessops.zoo.data.load_dataset, verify=False))
    data = example.load_test_set(argparse.Namespace(quick=False, data_dir=tmp_path))
    spec = model_spec(MODEL)
    assert len(data) == 20 and spec.std == (0.2023, 0.1994, 0.2010)
    x, y = data[0]
    # pixel (0, 0) of the test batch's first image is (R, G, B) = (255, 0, 51) and its label 5 (test_data.py)
    expected = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.2), spec.mean, spec.std)]
    assert x[:, 0, 0].tolist() == pytest.approx(expected, abs=1e-6) and int(y) == 5


# The full mode's refusals, in-process (a subprocess would add only its start-up): the exit status and the
# message a user sees.
def test_full_mode_needs_weights(tmp_path):
    status, stderr = examples_runner.exit_of(
        load_example(), "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")
    )
    assert status == 2 and "--checkpoint FILE, or --pretrained" in stderr


def test_full_mode_missing_checkpoint_and_offline_pretrained(tmp_path, monkeypatch):
    example, out = load_example(), ["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    status, stderr = examples_runner.exit_of(example, "--checkpoint", str(tmp_path / "none.pt"), *out)
    assert status == 1 and "none.pt not found" in stderr
    # a proxy on a closed port makes the download fail whether or not this machine is online
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    status, stderr = examples_runner.exit_of(example, "--pretrained", *out)
    assert status == 1 and "could not fetch the published resnet18_cifar10 weights" in stderr
    assert "--checkpoint FILE" in stderr
    assert not list((tmp_path / "hub").rglob("*.bin"))  # no partial file left to be taken for the weights
