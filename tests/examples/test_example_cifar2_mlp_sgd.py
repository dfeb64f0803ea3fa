"""examples/cifar2_mlp_sgd.py: its --quick mode run as a user runs it and checked through result.json, and its
full-mode code path (CIFAR-2 from files in CIFAR-10's format, the 0.9 / 0.1 split, the 1,643,234-parameter
MLP on the zoo) run in-process on small generated files."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from types import ModuleType

import examples_runner
import pytest
import torch
from dataset_files import write_cifar

import hessops.zoo.data

GRID = [[0.0, 0.0], [0.0, 0.01], [0.9, 0.001], [0.8, 0.01]]


def load_example() -> ModuleType:
    return examples_runner.load_example("cifar2_mlp_sgd")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    return examples_runner.run_quick("cifar2_mlp_sgd", tmp_path_factory.mktemp("cifar2_quick"))


def test_quick_runs_the_grid_and_learns(quick):
    result, out = quick
    assert result["mode"] == "quick" and result["lr"] == 0.01 and result["batch_size"] == 4
    assert result["split"] == {"fractions": [0.9, 0.1], "seed": 123}
    assert [[r["momentum"], r["weight_decay"]] for r in result["runs"]] == GRID
    digits = hessops.zoo.data.load_dataset("digits")
    n_images = int(torch.isin(digits.labels, torch.tensor([3, 8])).sum())  # the digits 3 and 8 of the train split
    assert result["n_train"] + result["n_val"] == n_images and abs(result["n_train"] - 0.9 * n_images) <= 1
    for r in result["runs"]:
        assert r["n_params"] == 2762 and len(r["history"]) == result["epochs"] == 15
        # near a minimum: the training loss far below chance's ln 2 = 0.69 (measured: 0.03 or less), the accuracy
        # far from the 0.5 of a constant guess (measured: 0.996 or more); the curvature below is that of a minimum
        assert r["history"][-1]["loss"] < 0.1 * r["history"][0]["loss"]
        assert r["train"]["loss"] < 0.1 and r["train"]["accuracy"] > 0.95
        assert all(0.0 <= r[split]["accuracy"] <= 1.0 for split in ("train", "val", "test"))
        # weight decay w adds (w/2)‖θ‖² to the objective, w·I to its Hessian
        assert r["regularized"]["top_eigenvalue"] == pytest.approx(r["top_eigenvalue"] + r["weight_decay"])
        assert r["regularized"]["trace"] == pytest.approx(r["trace"] + r["weight_decay"] * r["n_params"])
    assert (out / "curvature.png").stat().st_size > 20_000


def test_quick_curvature_agrees_with_the_dense_spectrum(quick):
    result, _ = quick
    tol = result["eigs_settings"]["tol"]
    for r in result["runs"]:
        dense, top = r["dense"], r["top_eigenvalue"]
        # eigs' convergence test: residual ‖Hv − θv‖ ≤ 10·tol·|θ|; for a unit v some eigenvalue then lies within
        # the residual of θ (Bauer-Fike), and the dense spectrum says it is the top one. 1e-5·|λ| allows for
        # the float32 products against the float64 reference.
        assert r["converged"] and r["residual"] <= 10 * tol * abs(top)
        assert abs(top - dense["top_eigenvalue"]) <= r["residual"] + 1e-5 * abs(dense["top_eigenvalue"])
        assert dense["second_eigenvalue"] < dense["top_eigenvalue"]
        # Hutch++ within 3 of its reported standard errors (a fixed seed, so no flakiness), plus float32 rounding
        assert r["trace_std_error"] > 0 and r["trace_n_matvecs"] == result["trace_settings"]["probes"] == 60
        assert abs(r["trace"] - dense["trace"]) <= 3 * r["trace_std_error"] + 1e-4 * abs(dense["trace"])


def test_full_mode_path_on_cifar_format_files(tmp_path, monkeypatch):
    """The real loaders on files written in CIFAR-10's format (20 images per batch, label (i + j) mod 10: 4 of
    each batch are airplanes or birds), the zoo's 1.6M-parameter MLP, one grid point at small settings."""
    write_cifar(tmp_path)
    example = load_example()
    # the files are not the published ones, so their MD5 sums differ: read them unverified
    monkeypatch.setattr(example, "load_dataset", functools.partial(hessops.zoo.data.load_dataset, verify=False))
    args = argparse.Namespace(
        quick=False,
        data_dir=tmp_path,
        seed=0,
        epochs=1,
        batch_size=8,
        eval_batch_size=64,
        probes=6,
        tol=1e-2,
        device=torch.device("cpu"),
    )
    train, val, test = example.datasets(args)
    assert (len(train), len(val), len(test)) == (18, 2, 4)  # 0.9 / 0.1 of the 20 training airplanes and birds
    assert sorted(train.indices + val.indices) == list(range(20))
    assert {int(y) for _, y in [*train, *val, *test]} == {0, 1} and train[0][0].shape == (3, 32, 32)
    r = example.study(args, 0.9, 0.001, (train, val, test))
    assert r["n_params"] == 1_643_234 and len(r["history"]) == 1
    assert r["converged"] and r["residual"] <= 10 * args.tol * abs(r["top_eigenvalue"])
    assert r["trace_n_matvecs"] == 6 and r["trace_std_error"] > 0
