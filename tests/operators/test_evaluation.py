"""One dataset-mean evaluator (hessops.operators.evaluation.dataset_loss): the loss the operators are the curvature
of, against a plain reference that concatenates the whole dataset, computes the loss with reduction="sum" and
divides by the counted targets (or the sum of their class weights); and evaluate, train's epoch loss and the
landscape, which report it."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_networks import mlp

import hessops
from hessops.operators.evaluation import dataset_loss
from hessops.operators.losses import next_token_cross_entropy
from hessops.zoo.lm import GPT, GPTConfig

# float64 sums of the same terms in another order (batch by batch, not in one call): ~1e-16 relative each.
RTOL = 1e-12
SIZES = [7, 13, 3, 17, 10, 10]  # uneven batches of 60 examples
C = 5


def problem(ignored: float = 0.4):
    """A float64 classifier and 60 examples, a fraction ``ignored`` of the targets -100 (padding)."""
    torch.manual_seed(0)
    model = mlp(4, 8, C).double().eval()
    x = torch.randn(60, 4, dtype=torch.float64)
    y = torch.randint(0, C, (60,))
    y[torch.randperm(60)[: int(ignored * 60)]] = -100
    return model, x, y


def batched(x, y, sizes=SIZES):
    return list(zip(x.split(sizes), y.split(sizes)))


def reference(model, x, y, **options) -> float:
    """The whole dataset in one call, summed, divided by the counted targets (their class weights with weight=)."""
    with torch.no_grad():
        total = F.cross_entropy(model(x), y, reduction="sum", **options)
    counted = y != -100
    weight = options.get("weight")
    return float(total / (weight[y[counted]].sum() if weight is not None else counted.sum()))


CASES = {
    "ignore_index": {},
    "class weights": {"weight": torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)},
    "label smoothing": {"label_smoothing": 0.3},
    "smoothing and weights": {"label_smoothing": 0.1, "weight": torch.linspace(0.5, 2.0, C, dtype=torch.float64)},
}


@pytest.mark.parametrize("case", CASES)
def test_the_dataset_loss_is_the_whole_datasets_mean(case):
    """Uneven batches of ignored targets (40 %), class weights, label smoothing: the batches' means weighted by
    what each averages over, which is the whole dataset's loss in one call; not the batch-size-weighted mean."""
    model, x, y = problem()
    options = CASES[case]
    loss_fn = nn.CrossEntropyLoss(**options)
    expected = reference(model, x, y, **options)
    result = dataset_loss(model, loss_fn, batched(x, y))
    assert float(result.loss[0]) == pytest.approx(expected, rel=RTOL)
    assert result.examples == 60
    with torch.no_grad():
        by_size = sum(len(b) * float(loss_fn(model(a), b)) for a, b in batched(x, y)) / 60
    assert abs(by_size - expected) > 1e3 * RTOL * expected  # the old weighting is measurably off here
    counted = y != -100
    weight = options.get("weight")
    assert result.weight == pytest.approx(float(weight[y[counted]].sum()) if weight is not None else 36.0)


def test_reduction_sum_is_the_dataset_sum():
    model, x, y = problem()
    result = dataset_loss(model, nn.CrossEntropyLoss(reduction="sum"), batched(x, y))
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y, reduction="sum"))
    assert float(result.loss[0]) == pytest.approx(expected, rel=RTOL)
    functional = dataset_loss(model, functools.partial(F.cross_entropy, reduction="sum"), batched(x, y))
    assert float(functional.loss[0]) == pytest.approx(expected, rel=RTOL)


def test_a_batch_of_ignored_targets_only_counts_nothing_and_the_accuracy_is_over_counted_targets():
    model, x, y = problem(ignored=0.2)
    y[:10] = -100  # the first batch (of 10) is padding only
    result = dataset_loss(model, nn.CrossEntropyLoss(), batched(x, y, [10, 25, 25]))
    assert float(result.loss[0]) == pytest.approx(reference(model, x, y), rel=RTOL)
    counted = y != -100
    with torch.no_grad():
        hits = (model(x).argmax(1) == y)[counted].double().mean()
    assert float(result.accuracy[0]) == pytest.approx(float(hits), abs=1e-15)


def test_language_model_dict_batches_are_the_mean_over_counted_tokens():
    """A tiny GPT, HuggingFace-style dict batches of right-padded sequences (labels -100 at padding) in uneven
    batches: the mean of the next-token loss over every counted shifted label of the dataset."""
    torch.manual_seed(0)
    T, V = 6, 8
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=4)).double().eval()
    ids = torch.randint(0, V, (9, T), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 3, 5, 2, 6, 4, 1, 6, 2])
    labels = torch.where(torch.arange(T) < lengths[:, None], ids, -100)
    batches = [{"input_ids": i, "labels": t} for i, t in zip(ids.split([2, 4, 3]), labels.split([2, 4, 3]))]
    with torch.no_grad():
        total = next_token_cross_entropy(model(ids), labels, reduction="sum")
    counted = int((labels[:, 1:] != -100).sum())
    result = dataset_loss(model, next_token_cross_entropy, batches)
    assert float(result.loss[0]) == pytest.approx(float(total) / counted, rel=RTOL)
    assert result.weight == counted and result.accuracy is None
    assert hessops.evaluate(model, next_token_cross_entropy, batches)["loss"] == float(result.loss[0])


def test_evaluate_train_and_the_landscape_report_that_loss():
    model, x, y = problem()
    loss_fn = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, C, dtype=torch.float64))
    expected = reference(model, x, y, weight=loss_fn.weight)
    data = batched(x, y)
    evaluated = hessops.evaluate(model, loss_fn, data)
    assert evaluated["loss"] == pytest.approx(expected, rel=RTOL)
    landscape = hessops.loss_landscape(model, loss_fn, data, dims=1, points=3, span=0.1)
    assert landscape.center_loss == pytest.approx(expected, rel=RTOL)
    assert landscape.center_accuracy == evaluated["accuracy"]
    (epoch,) = hessops.train(model, loss_fn, data, epochs=1, lr=0.0, progress=False)  # lr 0: θ stays
    assert epoch["loss"] == pytest.approx(expected, rel=RTOL)
    assert epoch["accuracy"] == evaluated["accuracy"]


def test_the_operators_are_the_curvature_of_that_loss():
    """The second central difference of dataset_loss along v is vᵀHv of the Hessian operator built from the same
    arguments (and the GGN's, for a loss whose Hessian in the outputs carries the weights the same way). Step
    1e-3 in float64: truncation ~h²·|L''''| ≈ 1e-7 and rounding ~eps·L/h² ≈ 1e-10, so 1e-5 relative."""
    model, x, y = problem()
    loss_fn = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, C, dtype=torch.float64), label_smoothing=0.1)
    data = batched(x, y)
    H = hessops.Hessian(model, loss_fn, data)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    h = 1e-3
    shapes = [p.shape for p in model.parameters()]

    def tree(flat):
        return [part.reshape(shape) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]

    points = [tree(theta + h * v), tree(theta), tree(theta - h * v)]
    plus, center, minus = dataset_loss(model, loss_fn, data, points=points).loss.tolist()
    assert center == pytest.approx(reference(model, x, y, weight=loss_fn.weight, label_smoothing=0.1), rel=RTOL)
    assert (plus - 2 * center + minus) / h**2 == pytest.approx(float(v @ (H @ v)), rel=1e-5)


def test_a_wider_dtype_and_points_of_the_wrong_shape():
    model, x, y = problem()
    model32 = mlp(4, 8, C).eval()
    model32.load_state_dict(model.state_dict())
    model32.float()
    data32 = batched(x.float(), y)
    wide = dataset_loss(model32, nn.CrossEntropyLoss(), data32, dtype=torch.float64)
    with torch.no_grad():
        exact = F.cross_entropy(model32.double()(x.float().double()), y)
    assert float(wide.loss[0]) == pytest.approx(float(exact), rel=RTOL)
    with pytest.raises(hessops.InvalidArgumentError, match="points\\[0\\]"):
        dataset_loss(model, nn.CrossEntropyLoss(), batched(x, y), points=[[torch.zeros(3)]])


def test_train_skips_a_batch_of_padding_only_and_probes_a_loss_it_does_not_know():
    """A batch whose targets are all ignored has no loss to descend (torch's mean is 0/0, whose NaN gradient would
    ruin the parameters): skipped, as the operators skip it. A callable hessops does not know is probed on the
    first batch, as the operators probe it: a hidden sum is refused."""
    model, x, y = problem(ignored=0.2)
    y[:10] = -100
    (epoch,) = hessops.train(model, nn.CrossEntropyLoss(), batched(x, y, [10, 50]), epochs=1, lr=0.1, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()) and epoch["loss"] == epoch["loss"]
    with pytest.raises(hessops.UnsupportedLossError, match="looks like a sum"):
        hessops.train(
            model,
            lambda o, t: F.cross_entropy(o, t, reduction="sum"),
            batched(x[10:], y[10:], [25, 25]),
            epochs=1,
            lr=0.1,
            progress=False,
        )
