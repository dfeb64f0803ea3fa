"""The curvature along the training update (hessops.analysis.update_curvature) against tests/reference.py: the
Rayleigh quotient d̂ᵀHd̂ of the reference's float64 double-backward product along the update the tracker saw, and
the reference's dense spectrum for the promise that it is a lower bound on the sharpness; and SharpnessTracker's
cheaper settings (value_tol, check=False) within their verified bounds."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import hessian_product, reference_hessian
from torch import nn
from toy_networks import mlp

import hessops
from hessops.analysis.update_curvature import UpdateCurvatureTracker


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(60, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (60,), generator=g)
    torch.manual_seed(seed)
    model = mlp().double()
    return model, nn.CrossEntropyLoss(), [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]


def test_each_measurement_is_the_rayleigh_quotient_along_the_update_and_below_the_sharpness():
    """Float64: the value equals d̂ᵀ H d̂ from the reference's product to 1e-10 (rounding of a 3-batch mean), and
    lies within the reference Hessian's [λ_min, λ_max]."""
    model, loss_fn, data = problem()
    tracker = UpdateCurvatureTracker(model, loss_fn, data[:2])
    tracker.remember()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        update = [1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
        with torch.no_grad():
            for p, u in zip(model.parameters(), update):
                p.add_(u)
        record = tracker.step()
        d = torch.cat([u.reshape(-1) for u in update])
        unit = d / d.norm()
        truth = float(unit @ hessian_product(model, loss_fn, data[:2], unit))
        spectrum = torch.linalg.eigvalsh(reference_hessian(model, loss_fn, data[:2]))
        assert record is not None and record.value == pytest.approx(truth, rel=1e-10, abs=1e-12)
        assert record.update_norm == pytest.approx(float(d.norm()), rel=1e-12)
        assert float(spectrum[0]) - 1e-10 <= record.value <= float(spectrum[-1]) + 1e-10
    assert [r.step for r in tracker.history] == [0, 1, 2] and all(r.n_matvecs == 1 for r in tracker.history)


def test_in_training_it_measures_every_few_steps_and_leaves_the_run_unchanged(tmp_path):
    """Through hessops.train: one record per `every` steps; the trained parameters bit for bit those of the same
    run without the tracker (the tracker only reads the parameters, in eval mode, with the RNG forked)."""
    model, loss_fn, data = problem()
    twin = copy.deepcopy(model)
    tracker = UpdateCurvatureTracker(model, loss_fn, data[:1], every=2)
    hessops.train(model, loss_fn, data, epochs=2, lr=0.1, momentum=0.9, update_curvature=tracker, progress=False)
    hessops.train(twin, loss_fn, data, epochs=2, lr=0.1, momentum=0.9, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert [r.step for r in tracker.history] == [0, 2, 4]  # 6 steps (3 batches x 2 epochs), every second
    assert all(r.update_norm > 0 and r.value == r.value for r in tracker.history)
    tracker.plot(tmp_path / "along.png")
    assert (tmp_path / "along.png").stat().st_size > 10_000  # a drawn figure, not an empty file


def test_no_update_no_measurement_and_bad_input():
    model, loss_fn, data = problem()
    tracker = UpdateCurvatureTracker(model, loss_fn, data)
    assert tracker.step() is None  # nothing remembered before: no update to measure along
    assert tracker.step() is None  # the parameters did not move
    assert tracker.history == []
    with pytest.raises(hessops.InvalidArgumentError, match="torch.nn.Module"):
        UpdateCurvatureTracker(lambda x: x, loss_fn, data)
    with pytest.raises(hessops.InvalidArgumentError, match="every"):
        UpdateCurvatureTracker(model, loss_fn, data, every=0)


@pytest.mark.parametrize("settings", [{"value_tol": 1e-2}, {"value_tol": 1e-2, "check": False}])
def test_sharpness_tracker_cheaper_settings_stay_within_their_bounds(settings):
    """value_tol and check=False cut products; each recorded top eigenvalue is still within the bound eigs
    verified (residual-based: |value - truth| <= residual for the top one) against the reference spectrum."""
    model, loss_fn, data = problem()
    strict = hessops.SharpnessTracker(model, loss_fn, data)
    cheap = hessops.SharpnessTracker(model, loss_fn, data, **settings)
    truth = float(torch.linalg.eigvalsh(reference_hessian(model, loss_fn, data))[-1])
    s, c = strict.measure(0), cheap.measure(0)
    assert abs(s.values[0] - truth) <= 1e-6 * abs(truth)
    assert abs(c.values[0] - truth) <= c.residuals[0] + 1e-12
    assert c.n_matvecs < s.n_matvecs
