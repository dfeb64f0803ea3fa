"""The trackers on a real short training run, and the figures they draw."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import reference_hessian
from torch import nn
from toy_networks import bn_mlp, mlp

import hessops


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
    per_step = []  # each epoch's per-step gradient norms, computed here
    for epoch in range(6):
        per_step.append({n: [] for n, _ in model.named_parameters()})
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            for n, p in model.named_parameters():
                per_step[-1][n].append(float(p.grad.norm()))
            grads.step()
            optimizer.step()
        grads.end_epoch(epoch)
        sharpness.step()
        assert model.training  # the tracker restored train mode
    assert [r.step for r in sharpness.history] == [0, 2, 4]
    sharpness.measure(6)
    # a record is the true top-2 of the Hessian at that moment: check the last one densely (tests/reference.py on a
    # float64 copy, in eval mode as the tracker measures)
    model.eval()
    model64 = copy.deepcopy(model).double()
    fixed64 = [(xb.double(), yb) for xb, yb in fixed]
    exact = torch.linalg.eigvalsh(reference_hessian(model64, loss_fn, fixed64)).flip(0)[:2]
    torch.testing.assert_close(
        torch.tensor(sharpness.history[-1].values, dtype=torch.float64), exact, rtol=1e-3, atol=1e-6
    )
    assert len(grads.history) == 6 and grads.history[0]["steps"] == 4
    assert set(grads.history[0]["norms"]) == {n for n, _ in model.named_parameters()}
    # the recorded means are the means of the per-step norms (float32 norms summed: 1e-6 relative)
    for h, norms in zip(grads.history, per_step):
        assert h["norms"] == pytest.approx({n: sum(v) / len(v) for n, v in norms.items()}, rel=1e-6)
        assert all(v > 0 for v in h["norms"].values())
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


def test_a_measurement_leaves_the_training_runs_random_draws_alone():
    # A shuffling loader draws its order from torch's global generator; without fork_rng in measure(), the
    # training run's next shuffle, augmentation or dropout mask would change because sharpness was measured.
    x, y = blobs(64)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    tracker = hessops.SharpnessTracker(mlp(), nn.CrossEntropyLoss(), shuffled, tol=1e-4)
    torch.manual_seed(1)
    expected = torch.rand(5)
    torch.manual_seed(1)
    record = tracker.measure(0)
    assert record.n_matvecs > 1  # the loader was iterated several times, each drawing from the generator
    assert torch.equal(torch.rand(5), expected)


def test_evaluate_is_the_mean_over_examples_and_the_accuracy():
    torch.manual_seed(0)
    x, y = blobs(70)
    model, loss_fn = bn_mlp(), nn.CrossEntropyLoss()
    model.train()
    uneven = [(x[:50], y[:50]), (x[50:], y[50:])]  # batch means weighted by size, not averaged equally
    result = hessops.evaluate(model, loss_fn, uneven)
    assert model.training  # its mode is restored
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert result["loss"] == pytest.approx(float(loss_fn(out, y)), rel=1e-6)
    assert result["accuracy"] == int((out.argmax(1) == y).sum()) / 70


def test_evaluate_reports_no_accuracy_for_regression_and_refuses_empty_data():
    x = torch.randn(12, 3)
    model = nn.Linear(3, 2)
    result = hessops.evaluate(model, nn.MSELoss(), [(x, torch.zeros(12, 2))])
    assert set(result) == {"loss"}
    assert result["loss"] == pytest.approx(float(model(x).detach().pow(2).mean()), rel=1e-6)
    with pytest.raises(hessops.EmptyDataError, match="no examples"):
        hessops.evaluate(model, nn.MSELoss(), [])


def test_train_calls_the_epoch_hook_in_eval_mode_with_the_epochs_record():
    torch.manual_seed(0)
    x, y = blobs(60)
    model, loss_fn = bn_mlp(), nn.CrossEntropyLoss()
    loader = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]
    seen = []

    def hook(epoch, record):
        seen.append((epoch, record["epoch"], model.training))
        record["val"] = hessops.evaluate(model, loss_fn, loader)

    history = hessops.train(model, loss_fn, loader, epochs=3, lr=0.1, progress=False, on_epoch_end=hook)
    assert seen == [(1, 1, False), (2, 2, False), (3, 3, False)]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["val"]["loss"] < history[0]["val"]["loss"]  # it trained
    assert history[-1]["val"] == hessops.evaluate(model, loss_fn, loader)  # recorded at the end of its epoch


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "dtype"),
    [(0.0, 0.0, torch.float32), (0.9, 0.0, torch.float32), (0.9, 5e-4, torch.float32), (0.5, 1e-2, torch.float64)],
)
def test_train_is_torch_optim_sgd_bit_for_bit(momentum, weight_decay, dtype):
    """hessops.train's own SGD update against torch.optim.SGD's, on BatchNorm (buffers, parameters) and a
    frozen layer (no gradient: skipped by both)."""
    x, y = blobs(60)
    x = x.to(dtype)
    loader = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    ours = bn_mlp().to(dtype)
    ours[0].bias.requires_grad_(False)
    theirs = bn_mlp().to(dtype)
    theirs.load_state_dict(ours.state_dict())
    theirs[0].bias.requires_grad_(False)
    hessops.train(ours, loss_fn, loader, epochs=3, lr=0.1, momentum=momentum, weight_decay=weight_decay, progress=False)
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    theirs.train()
    for _ in range(3):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(theirs(xb), yb).backward()
            optimizer.step()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
