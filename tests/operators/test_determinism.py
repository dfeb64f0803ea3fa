"""Randomness and batch dependence are caught by default (check_determinism=True), each with its cause named,
and pass with the opt-out; shuffling without drop_last is the same operator and is accepted.

Tolerance where a product is compared with the dense reference: relative 1e-10 in float64, as in
test_operators.py (a reordering of the same sums costs ~1e-15; a dropped or changed example ~1e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import reference_hessian, relative_error
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from toy_networks import mlp

import hessops
from hessops.operators._determinism import batch_fingerprint, fingerprint_change

RTOL64 = 1e-10
OPERATORS = [hessops.Hessian, hessops.GGN, hessops.EmpiricalFisher]


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    return model, x, y


def pairs(x, y, sizes=(4, 4, 2)):
    return list(zip(x.split(list(sizes)), y.split(list(sizes))))


class Augmented(Dataset):
    """Each item gets fresh noise (random augmentation), or a random horizontal flip of its 2x2 image, which
    leaves every value (and the sum of the batch) as it was."""

    def __init__(self, x, y, flip=False):
        self.x, self.y, self.flip = x, y, flip

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.flip:
            return (x.view(2, 2).flip(1).reshape(4) if torch.rand(()) < 0.5 else x), self.y[i]
        return x + 0.1 * torch.randn_like(x), self.y[i]


@pytest.mark.parametrize("flip", [False, True], ids=["noise", "flip"])
@pytest.mark.parametrize("cls", OPERATORS)
def test_random_augmentation_is_caught_at_the_second_product(problem, cls, flip):
    model, x, y = problem
    loader = DataLoader(Augmented(x, y, flip), batch_size=4)
    op = cls(model, nn.CrossEntropyLoss(), loader)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v  # the first product keeps the data's fingerprint
    with pytest.raises(
        hessops.NondeterministicOperatorError, match="data changed between two products.*random augmentation"
    ):
        op @ v
    unchecked = cls(model, nn.CrossEntropyLoss(), loader, check_determinism=False)
    first, second = unchecked @ v, unchecked @ v  # the opt-out: two products, no check
    assert first.shape == second.shape == v.shape


def test_eigs_on_randomly_augmented_data_fails_instead_of_converging(problem):
    """Without the check, Lanczos on this operator stopped with converged=True and residuals of 8-12% of λ."""
    model, x, y = problem
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), DataLoader(Augmented(x, y), batch_size=4))
    with pytest.raises(hessops.NondeterministicOperatorError, match="random augmentation"):
        hessops.eigs(op, k=2)


def test_shuffle_with_drop_last_is_caught(problem):
    model, x, y = problem
    loader = DataLoader(
        TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    op = hessops.GGN(model, nn.CrossEntropyLoss(), loader)
    with pytest.raises(hessops.NondeterministicOperatorError, match="hold other values.*drop_last=False"):
        hessops.eigs(op, k=2)


def test_shuffle_without_drop_last_is_the_same_operator_and_accepted(problem):
    model, x, y = problem
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), loader)
    dense = reference_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # three passes in three orders, each the dense operator
        assert relative_error(op @ V, dense @ V) < RTOL64
    spectrum = hessops.eigs(op, k=2, which="LA")  # residuals below 1e-5·max|θ| bound each value's error by that
    expected = torch.linalg.eigvalsh(dense)[-2:]
    assert torch.allclose(spectrum.values.sort().values, expected, rtol=1e-4, atol=0)


def test_the_fingerprint_ignores_order_and_batching_but_not_values(problem):
    """Float64 sums in another order agree to ~1e-16 relative, far inside the check's 1e-8."""
    _, x, y = problem
    whole = batch_fingerprint(x, y, 10)
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batched = sum(batch_fingerprint(xb, yb, len(yb)) for xb, yb in pairs(x[permutation], y[permutation], (3, 3, 4)))
    assert fingerprint_change(whole, batched) is None
    changed = x.clone()
    changed[3, 1] += 1e-6  # one value of one example
    assert "other values" in fingerprint_change(whole, batch_fingerprint(changed, y, 10))
    assert "from 10 to 9" in fingerprint_change(whole, batch_fingerprint(x[:9], y[:9], 9))


class DropoutInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), p=0.5, training=True))  # random even in eval mode


class SamplingInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x + 0.01 * torch.randn_like(x))


@pytest.mark.parametrize("model_cls", [DropoutInForward, SamplingInForward])
@pytest.mark.parametrize("cls", OPERATORS)
def test_a_random_model_is_refused_at_construction(problem, cls, model_cls):
    _, x, y = problem
    model = model_cls().double().eval()
    with pytest.raises(
        hessops.NondeterministicOperatorError, match=r"the model is random.*training=True.*check_determinism=False"
    ):
        cls(model, nn.CrossEntropyLoss(), pairs(x, y))
    cls(model, nn.CrossEntropyLoss(), pairs(x, y), check_determinism=False)  # the opt-out


def test_dropout_in_train_mode_allowed_is_still_refused_as_random(problem):
    _, x, y = problem
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double().train()
    with pytest.raises(hessops.NondeterministicOperatorError, match="the model is random"):
        hessops.Hessian(model, nn.CrossEntropyLoss(), pairs(x, y), allow_train_mode=True)


class Counter(nn.Module):
    """Updates a buffer in forward, which the output depends on: every product sees another function."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.a(x) * (1 + 0.1 * self.calls)


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["same-dtype", "cast"])
@pytest.mark.parametrize("cls", OPERATORS)
def test_a_buffer_updated_in_forward_is_named_and_left_as_it_was(problem, cls, dtype):
    _, x, y = problem
    model = Counter().eval()  # float32: with dtype=float64 the operator updates its cast copy of the buffer
    data = [(xb.float(), yb) for xb, yb in pairs(x, y)]
    with pytest.raises(hessops.NondeterministicOperatorError, match="changed its buffer 'calls'"):
        cls(model, nn.CrossEntropyLoss(), data, dtype=dtype)
    assert model.calls == 0
    cls(model, nn.CrossEntropyLoss(), data, dtype=dtype, check_determinism=False)


@pytest.mark.parametrize(
    "norm", [nn.BatchNorm1d(6, track_running_stats=False), nn.BatchNorm1d(6).eval()], ids=["no-stats", "stats-removed"]
)
@pytest.mark.parametrize("cls", OPERATORS)
def test_batch_statistics_in_eval_mode_are_treated_like_train_mode(problem, cls, norm):
    """BatchNorm without running statistics normalizes by the batch in eval mode: batches of 4, 4, 2 and one
    of 10 gave products 5-136% apart."""
    _, x, y = problem
    if norm.track_running_stats:
        norm.running_mean = norm.running_var = None
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3)).double().eval()
    with pytest.raises(
        hessops.TrainModeError, match=r"module '1' \(BatchNorm1d\) has no running statistics.*allow_train_mode=True"
    ):
        cls(model, nn.CrossEntropyLoss(), pairs(x, y))
    with pytest.raises(hessops.TrainModeError, match="track_running_stats"):
        hessops.dense_hessian(model, nn.CrossEntropyLoss(), pairs(x, y))
    cls(model, nn.CrossEntropyLoss(), pairs(x, y), allow_train_mode=True)  # batch statistics, deterministic


def test_per_example_normalization_in_eval_mode_is_accepted(problem):
    """InstanceNorm (even without running statistics), GroupNorm and LayerNorm normalize each example alone."""
    _, x, y = problem
    model = (
        nn.Sequential(
            nn.Unflatten(1, (2, 2)),
            nn.InstanceNorm1d(2, affine=True),
            nn.GroupNorm(1, 2),
            nn.Flatten(),
            nn.LayerNorm(4),
            nn.Linear(4, 3),
        )
        .double()
        .eval()
    )
    op = hessops.GGN(model, nn.CrossEntropyLoss(), pairs(x, y))
    assert op.check_deterministic() == 0.0
