"""Every bad input gets a specific error that names the cause and the fix, never a wrong number."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_networks import bn_mlp, mlp

import hessops


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model, x, y = mlp(), torch.randn(10, 4), torch.randint(0, 3, (10,))
    return model, nn.CrossEntropyLoss(), [(x[:6], y[:6]), (x[6:], y[6:])]


ALL = [hessops.Hessian, hessops.GGN, hessops.EmpiricalFisher, hessops.MCFisher]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("module", [nn.BatchNorm1d(6), nn.Dropout(0.5)], ids=["batchnorm", "dropout"])
def test_train_mode_is_refused_with_the_fix(problem, cls, module):
    _, loss_fn, data = problem
    model = nn.Sequential(nn.Linear(4, 6), module, nn.Tanh(), nn.Linear(6, 3)).train()
    with pytest.raises(
        hessops.TrainModeError, match=r"module '1' \((BatchNorm1d|Dropout)\).*model.eval\(\).*allow_train_mode=True"
    ):
        cls(model, loss_fn, data)
    cls(model.eval(), loss_fn, data)  # the fix works


def test_train_mode_dropout_when_allowed_is_caught_by_check_deterministic(problem):
    _, loss_fn, data = problem
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).train()
    op = hessops.Hessian(model, loss_fn, data, allow_train_mode=True, check_determinism=False)  # else refused here
    with pytest.raises(hessops.NondeterministicOperatorError, match="model.eval"):
        op.check_deterministic()


def test_train_mode_batchnorm_when_allowed_leaves_running_stats_alone(problem):
    _, loss_fn, data = problem
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = hessops.Hessian(model, loss_fn, data, allow_train_mode=True)
    op.check_deterministic()  # batch statistics: random-free, so deterministic
    result = op @ torch.randn(op.shape[0])
    assert torch.isfinite(result).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_random_augmentation_is_caught_by_check_deterministic(problem):
    model, loss_fn, _ = problem

    class NoisyDataset(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.randn(4, generator=g) + 0.1 * torch.randn(4), i % 3  # "augmentation"

    op = hessops.GGN(model.eval(), loss_fn, torch.utils.data.DataLoader(NoisyDataset(), batch_size=4))
    with pytest.raises(hessops.NondeterministicOperatorError, match="random augmentation"):
        op.check_deterministic()


@pytest.mark.parametrize(
    "data", [[], [(torch.empty(0, 4), torch.empty(0, dtype=torch.long))]], ids=["no-batch", "empty-batch"]
)
@pytest.mark.parametrize("cls", ALL)
def test_empty_data(problem, cls, data):
    model, loss_fn, _ = problem
    with pytest.raises(hessops.EmptyDataError, match="non-empty"):
        op = cls(model, loss_fn, data)
        op @ torch.randn(op.shape[0])


@pytest.mark.parametrize(
    "data", [[], [(torch.empty(0, 4), torch.empty(0, dtype=torch.long))]], ids=["no-batch", "empty-batch"]
)
def test_empty_data_for_the_dense_hessian(problem, data):
    model, loss_fn, _ = problem
    with pytest.raises(hessops.EmptyDataError, match="pass a non-empty DataLoader"):
        hessops.dense_hessian(model, loss_fn, data)


def test_one_shot_iterator_is_refused(problem):
    model, loss_fn, data = problem
    with pytest.raises(TypeError, match="re-iterable"):
        hessops.Hessian(model, loss_fn, (batch for batch in data))


@pytest.mark.parametrize("cls", ALL)
def test_non_finite_loss_names_the_batch(problem, cls):
    model, loss_fn, data = problem
    x, y = data[1]
    x = x.clone()
    x[0, 0] = float("nan")
    op = cls(model, loss_fn, [data[0], (x, y)])
    with pytest.raises(hessops.NonFiniteLossError, match="batch 1 is nan"):
        op @ torch.randn(op.shape[0])


def test_non_finite_loss_after_an_empty_batch_names_the_right_batch(problem):
    model, loss_fn, data = problem
    x, y = data[1]
    x = x.clone()
    x[0, 0] = float("nan")
    empty = (torch.empty(0, 4), torch.empty(0, dtype=torch.long))
    op = hessops.Hessian(model, loss_fn, [data[0], empty, (x, y)])
    with pytest.raises(hessops.NonFiniteLossError, match="batch 2 is nan"):
        op @ torch.randn(op.shape[0])


def test_an_infinite_input_that_the_loss_hides_is_still_caught(problem):
    """tanh saturates an inf input, so the loss is finite while the product is not."""
    model, loss_fn, data = problem
    x, y = data[1]
    x = x.clone()
    x[0, 0] = float("inf")
    op = hessops.Hessian(model, loss_fn, [data[0], (x, y)])
    with pytest.raises(hessops.NonFiniteLossError, match="check the inputs"):
        op @ torch.randn(op.shape[0])


def test_inputs_on_another_device(problem):
    model, loss_fn, data = problem
    meta = [(x.to("meta"), y.to("meta")) for x, y in data]
    with pytest.raises(
        hessops.DeviceMismatchError, match=r"batch 0 inputs are on meta but the parameters are on cpu.*move"
    ):
        hessops.Hessian(model, loss_fn, meta)
    op = hessops.Hessian(model, loss_fn, data + meta)  # caught in the loop too
    with pytest.raises(hessops.DeviceMismatchError, match="batch 2 inputs"):
        op @ torch.randn(op.shape[0])


def test_inputs_of_another_dtype(problem):
    model, loss_fn, data = problem
    with pytest.raises(hessops.DtypeMismatchError, match=r"torch.float64 but the parameters have torch.float32.*cast"):
        hessops.GGN(model, loss_fn, [(x.double(), y) for x, y in data])


def test_vectors_of_another_dtype_or_device(problem):
    op = hessops.Hessian(*problem)
    with pytest.raises(hessops.DtypeMismatchError, match="dtype=torch.float64"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    with pytest.raises(hessops.DeviceMismatchError, match="operator is on cpu"):
        op @ torch.randn(op.shape[0], device="meta")


def test_no_parameters(problem):
    model, loss_fn, data = problem
    with pytest.raises(hessops.NoParametersError, match="params is empty"):
        hessops.Hessian(model, loss_fn, data, params=[])
    with pytest.raises(
        hessops.NoParametersError, match=r"params\[1\] \(shape \(3,\)\) is not a parameter of the model"
    ):
        hessops.Hessian(model, loss_fn, data, params=[model[0].weight, torch.zeros(3, requires_grad=True)])
    with pytest.raises(hessops.NoParametersError, match="listed twice"):
        hessops.Hessian(model, loss_fn, data, params=[model[0].weight, model[0].weight])
    model.requires_grad_(False)
    with pytest.raises(hessops.NoParametersError, match="no trainable parameters.*requires_grad"):
        hessops.Hessian(model, loss_fn, data)
    with pytest.raises(hessops.NoParametersError, match="no trainable parameters"):
        hessops.Hessian(nn.ReLU(), loss_fn, data)


def test_loss_that_is_not_a_batch_mean(problem):
    model, _, data = problem
    with pytest.raises(hessops.UnsupportedLossError, match="reduction='mean'"):
        hessops.Hessian(model, nn.CrossEntropyLoss(reduction="none"), data)


def test_loss_function_returning_a_vector(problem):
    model, _, data = problem
    op = hessops.Hessian(model, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), data)
    with pytest.raises(hessops.UnsupportedLossError, match=r"shape \(6,\), not a scalar"):
        op @ torch.randn(op.shape[0])


def test_ggn_of_nll_without_a_log_softmax_tail_is_refused(problem):
    model, _, data = problem
    with pytest.raises(hessops.UnsupportedLossError, match="CrossEntropyLoss"):
        hessops.GGN(model, nn.NLLLoss(), data)


def test_ggn_of_a_loss_linear_in_the_outputs_is_refused(problem):
    """A lambda NLL after a LogSoftmax: hessops cannot split it as it splits nn.NLLLoss, and its GGN was the
    zero matrix, silently. A lambda that is curved in the outputs (cross-entropy of logits) gives the GGN of
    nn.CrossEntropyLoss, exactly (float32: 1e-6); the Hessian of the linear one stays allowed."""
    model, _, data = problem
    model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    linear = lambda out, y: nn.functional.nll_loss(out, y)  # noqa: E731
    with pytest.raises(hessops.UnsupportedLossError, match="move the LogSoftmax into the loss"):
        hessops.GGN(model, linear, data) @ v
    assert torch.isfinite(hessops.Hessian(model, linear, data) @ v).all()
    curved = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731
    expected = hessops.GGN(model[0], nn.CrossEntropyLoss(), data) @ v
    torch.testing.assert_close(hessops.GGN(model[0], curved, data) @ v, expected, rtol=1e-6, atol=1e-7)


def test_mc_fisher_needs_a_likelihood(problem):
    model, _, data = problem
    with pytest.raises(hessops.UnsupportedLossError, match="L1Loss.*GGN"):
        hessops.MCFisher(model, nn.L1Loss(), data)
    with pytest.raises(hessops.UnsupportedLossError, match="label_smoothing"):
        hessops.MCFisher(model, nn.CrossEntropyLoss(label_smoothing=0.1), data)
    with pytest.raises(ValueError, match="samples"):
        hessops.MCFisher(model, nn.CrossEntropyLoss(), data, samples=0)


def test_batches_that_are_not_pairs(problem):
    model, loss_fn, data = problem
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pairs"):
        hessops.Hessian(model, loss_fn, [data[0][0]])


def test_micro_batches_are_refused_in_train_mode(problem):
    model, loss_fn, data = problem
    model = nn.Sequential(model[0], nn.BatchNorm1d(6), *model[1:]).train()
    with pytest.raises(ValueError, match="model.eval"):
        hessops.Hessian(model, loss_fn, data, allow_train_mode=True, micro_batch_size=2)


def test_bad_options(problem):
    with pytest.raises(ValueError, match="chunk_size"):
        hessops.Hessian(*problem, chunk_size=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        hessops.GGN(*problem, micro_batch_size=0)
    with pytest.raises(ValueError, match="hvp_mode"):
        hessops.Hessian(*problem, hvp_mode="finite-differences")
    with pytest.raises(hessops.DtypeMismatchError, match="floating"):
        hessops.Hessian(*problem, dtype=torch.int64)


def test_operators_refuse_to_move_without_their_model(problem):
    op = hessops.Hessian(*problem)
    assert op.to("cpu") is op
    with pytest.raises(hessops.DeviceMismatchError, match=r"model.to\('meta'\)"):
        op.to("meta")


def test_error_hierarchy():
    """Code that catches ValueError for bad input keeps working (every error of bad input is an InputError, a
    ValueError); a failed run is not bad input: DistributedError is a RuntimeError, OutputError an OSError. All
    derive from HessopsError."""
    errors = [getattr(hessops.errors, name) for name in hessops.errors.__all__]
    errors = [error for error in errors if not issubclass(error, Warning)]
    assert all(issubclass(error, hessops.HessopsError) for error in errors)
    failed_runs = {hessops.DistributedError, hessops.OutputError}
    assert {error for error in errors if not issubclass(error, hessops.InputError)} == {
        hessops.HessopsError,
        *failed_runs,
    }
    assert all(issubclass(error, ValueError) for error in errors if issubclass(error, hessops.InputError))
    assert not issubclass(hessops.HessopsError, ValueError)
    assert issubclass(hessops.DistributedError, RuntimeError) and not issubclass(hessops.DistributedError, ValueError)
    assert issubclass(hessops.OutputError, OSError) and not issubclass(hessops.OutputError, ValueError)
    assert issubclass(hessops.InvalidArgumentError, TypeError) and issubclass(hessops.DataFormatError, TypeError)
    assert issubclass(hessops.MissingDependencyError, ImportError)


def test_check_deterministic_passes_on_a_fixed_operator():
    torch.manual_seed(0)
    model, x, y = bn_mlp(), torch.randn(10, 4), torch.randn(10, 3)
    assert hessops.Hessian(model, nn.MSELoss(), [(x, y)]).check_deterministic() == 0.0
