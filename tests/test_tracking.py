"""The trackers on a real short training run, and the figures they draw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessops
from models import bn_mlp, mlp


def blobs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(3, 4, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return centers[labels] + torch.randn(n, 4, generator=g), labels


def test_sharpness_and_grad_norms_over_a_training_run(tmp_path):
    torch.manual_seed(0)
    x, y = blobs()
    model, loss_fn = bn_mlp(), nn.CrossEntropyLoss()
    model.train()
    loader = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 200, 50)]
    fixed = loader[:2]
    sharpness = hessops.SharpnessTracker(model, loss_fn, fixed, every=2, k=2, unit="epoch")
    grads = hessops.GradNormTracker(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for epoch in range(6):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            grads.step()
            optimizer.step()
        grads.end_epoch(epoch)
        sharpness.step()
        assert model.training  # the tracker restored train mode
    assert [r.step for r in sharpness.history] == [0, 2, 4]
    sharpness.measure(6)
    # a record is the true top-2 of the Hessian at that moment: check the last one densely
    model.eval()
    exact = torch.linalg.eigvalsh(hessops.Hessian(model, loss_fn, fixed, dtype=torch.float64).to_dense()).flip(0)[:2]
    torch.testing.assert_close(torch.tensor(sharpness.history[-1].values, dtype=torch.float64), exact, rtol=1e-3, atol=1e-6)
    assert len(grads.history) == 6 and grads.history[0]["steps"] == 4
    assert set(grads.history[0]["norms"]) == {n for n, _ in model.named_parameters()}
    # the recorded means are the means of the per-step norms
    assert all(v > 0 for h in grads.history for v in h["norms"].values())
    sharpness.plot(tmp_path / "sharpness.png")
    grads.plot(tmp_path / "grads.png")
    assert (tmp_path / "sharpness.png").stat().st_size > 10_000 and (tmp_path / "grads.png").stat().st_size > 10_000


def test_grad_norm_means_are_exact():
    model = nn.Linear(2, 1, bias=False)
    tracker = hessops.GradNormTracker(model)
    for g in ([3.0, 4.0], [0.0, 1.0]):
        model.weight.grad = torch.tensor([g])
        tracker.step()
    assert tracker.end_epoch()["norms"]["weight"] == pytest.approx((5.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="before any step"):
        tracker.end_epoch()


def test_sharpness_tracker_warm_start_uses_fewer_products():
    torch.manual_seed(0)
    x, y = blobs(100)
    model = mlp()
    tracker = hessops.SharpnessTracker(model, nn.CrossEntropyLoss(), [(x, y)], tol=1e-6)
    first, second = tracker.step(), tracker.step()
    assert second.n_matvecs < first.n_matvecs
    assert second.values[0] == pytest.approx(first.values[0], rel=1e-6)
