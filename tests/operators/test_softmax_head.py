"""The closed-form softmax cross-entropy head (hessops/operators/softmax_head.py) against tests/reference.py.

Every cross-entropy variant torch offers (class weights, ignore_index with ignored targets present, label
smoothing, both together, probability targets, a spatial class dimension, reduction="sum") and the next-token
loss (padding, tied embeddings, a HuggingFace model), on the Hessian in both double-backward formulations and
the GGN, under uneven batching and micro-batches, against plain double backward of the whole dataset in float64
(no hessops code). Tolerances: float64 1e-10 relative Frobenius (the same sums in another order, ~1e-15, with room
for conditioning; a wrong coefficient or a missing p pᵀ term is 1e-2 or more); float32 2e-4 against the float64
truth of the same weights (tests/operators/test_grid.py's budget). Each operator is also checked to have *used*
the head (its first-use check recorded and passed), so a silent fall-back to the plain path cannot pass these.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_checkpoints import tiny_hf
from reference import (
    as_float64,
    autograd_hessian,
    concat,
    dense_ggn,
    hessian_product,
    next_token_loss,
    reference_hessian,
)
from reference import relative_error as reference_error
from torch import Tensor, nn

import hessops
from hessops.errors import HvpFormulationWarning
from hessops.operators import softmax_head
from hessops.operators.losses import loss_spec, next_token_cross_entropy
from hessops.zoo.lm import GPT, GPTConfig

RTOL64, RTOL32 = 1e-10, 2e-4
CLASSES, N = 4, 9


def weights() -> Tensor:
    return torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)


def probabilities(n: int) -> Tensor:
    return torch.softmax(torch.randn(n, CLASSES, generator=torch.Generator().manual_seed(3)), 1).double()


def class_targets(n: int) -> Tensor:
    t = torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(4))
    t[::3] = 2  # class 2 is ignore_index in some losses: ignored targets present in every batching
    return t


# name -> (loss, targets of N examples)
LOSSES = {
    "plain": (nn.CrossEntropyLoss(), class_targets(N)),
    "weight": (nn.CrossEntropyLoss(weight=weights()), class_targets(N)),
    "ignore_index": (nn.CrossEntropyLoss(ignore_index=2), class_targets(N)),
    "smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), class_targets(N)),
    "smoothing+weight+ignore": (
        functools.partial(F.cross_entropy, weight=weights(), label_smoothing=0.1, ignore_index=2),
        class_targets(N),
    ),
    "probabilities": (nn.CrossEntropyLoss(), probabilities(N)),
    "probabilities+smoothing+weight": (nn.CrossEntropyLoss(weight=weights(), label_smoothing=0.3), probabilities(N)),
    "sum": (nn.CrossEntropyLoss(reduction="sum", ignore_index=2), class_targets(N)),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double()


def batches(targets: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    x = torch.randn(N, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    edges = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [(x[a:b], targets[a:b]) for a, b in zip(edges, edges[1:])]


def dense(operator) -> Tensor:
    return operator @ torch.eye(operator.shape[0], dtype=operator.dtype)


def probes(n: int, columns: int = 6) -> Tensor:
    """Gaussian columns: ``A V = R V`` tests every entry of ``A - R`` (a difference is missed only on a null set)."""
    return torch.randn(n, columns, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def used_head(operator) -> bool:
    check = operator.softmax_head
    return check is not None and check.passed


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("operator", ["autograd", "autograd-loop", "ggn", "micro-batches"])
def test_every_cross_entropy_variant_is_exact(name, operator):
    loss, targets = LOSSES[name]
    model, data = mlp(), batches(targets, [2, 4, 3])
    if operator == "ggn":
        op, truth = hessops.GGN(model, loss, data), dense_ggn(model, loss, data)
    else:
        mode, micro = ("autograd", 2) if operator == "micro-batches" else (operator, None)
        op = hessops.Hessian(model, loss, data, hvp_mode=mode, micro_batch_size=micro)
        truth = reference_hessian(model, loss, data)
    assert reference_error(dense(op), truth) < RTOL64
    assert used_head(op)


def test_a_spatial_class_dimension_is_exact():
    """Logits (N, C, L) against targets (N, L): the class dimension is 1, as torch reads it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, CLASSES, 3, padding=1), nn.Tanh(), nn.Conv1d(CLASSES, CLASSES, 1)).double()
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (5, 6), generator=torch.Generator().manual_seed(1))
    y[0, :3] = -100
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    op = hessops.Hessian(model, loss, data)
    assert reference_error(dense(op), reference_hessian(model, loss, data)) < RTOL64
    assert used_head(op)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=4)).double().eval()


def padded_tokens() -> list[tuple[Tensor, Tensor]]:
    """Right-padded sequences (labels -100 at padding), in batches of uneven sizes."""
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 2, 4, 6, 3])
    labels = torch.where(torch.arange(6) < lengths[:, None], ids, -100)
    return [(ids[:2], labels[:2]), (ids[2:], labels[2:])]


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_tied_gpt_with_padding_is_exact(kind):
    """The output layer shares its weight with the token embedding: the head's term and the embedding's meet in
    one parameter."""
    model, data = tiny_gpt(), padded_tokens()
    assert model.lm_head.weight is model.wte.weight
    if kind == "hessian":
        op = hessops.Hessian(model, next_token_cross_entropy, data)
        V = probes(op.shape[0])
        truth = torch.stack([hessian_product(model, next_token_loss, data, v) for v in V.T], dim=1)
    else:
        op = hessops.GGN(model, next_token_cross_entropy, data)
        V = probes(op.shape[0])
        truth = dense_ggn(model, next_token_loss, data) @ V
    assert reference_error(op @ V, truth) < RTOL64
    assert used_head(op)


def test_a_huggingface_model_with_dict_batches_is_exact():
    model = tiny_hf()
    ids = torch.randint(0, 8, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(6) < torch.tensor([[6], [3], [5], [2]])).long()
    labels = torch.where(mask.bool(), ids, -100)
    data = [{"input_ids": ids[a:b], "attention_mask": mask[a:b], "labels": labels[a:b]} for a, b in ((0, 3), (3, 4))]
    op = hessops.Hessian(model, next_token_cross_entropy, data)
    V = probes(op.shape[0])
    truth = torch.stack([hessian_product(model, next_token_loss, data, v) for v in V.T], dim=1)
    assert reference_error(op @ V, truth) < RTOL64
    assert used_head(op)


def test_float32_is_within_its_rounding_of_the_float64_truth():
    loss, targets = functools.partial(F.cross_entropy, label_smoothing=0.1, ignore_index=2), class_targets(N)
    model, data = mlp(), batches(targets, [2, 4, 3])
    truth = reference_hessian(model, loss, data)
    op = hessops.Hessian(model.float(), loss, [(x.float(), y) for x, y in data])
    assert reference_error(dense(op).double(), truth) < RTOL32
    assert used_head(op)


@pytest.mark.parametrize("name", ["weight", "probabilities+smoothing+weight"])
def test_the_head_loss_has_the_users_value_and_gradient(name):
    """The value and the first derivative are torch's own: only the second derivative is written out."""
    loss, targets = LOSSES[name]
    spec = loss_spec(loss)
    logits = torch.randn(N, CLASSES, dtype=torch.float64, requires_grad=True)
    value = softmax_head.head_loss(spec)(logits, targets)
    (gradient,) = torch.autograd.grad(value, logits)
    plain = loss(logits, targets)
    assert torch.equal(value, plain.detach())
    assert torch.equal(gradient, torch.autograd.grad(plain, logits)[0])


def test_the_coefficients_are_the_losses_second_derivative():
    """s_t (diag p_t - p_t p_tᵀ) against torch.autograd's Hessian of the loss in the logits, per variant."""
    for name, (loss, targets) in LOSSES.items():
        logits = torch.randn(N, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        truth = torch.autograd.functional.hessian(lambda z: loss(z, targets), logits).reshape(N * CLASSES, -1)
        s, dim = softmax_head.coefficients(loss_spec(loss), logits, targets)
        eye = torch.eye(N * CLASSES, dtype=torch.float64).reshape(-1, N, CLASSES)
        mine = softmax_head.hessian_product(logits, s, dim, eye).reshape(N * CLASSES, -1)
        assert reference_error(mine, truth) < 1e-13, name


def test_a_head_that_disagrees_is_dropped_with_a_warning(monkeypatch):
    """A wrong closed form (here: the p pᵀ term left out) fails the first-use check: a warning, and every product
    is plain double backward, exact."""
    monkeypatch.setattr(softmax_head, "hessian_product", lambda logits, s, dim, u: u * s)
    loss, targets = LOSSES["plain"]
    model = mlp()
    model[0].weight.data.mul_(1.0001)  # a model this process has not checked yet
    data = batches(targets, [9])
    op = hessops.Hessian(model, loss, data)
    with pytest.warns(HvpFormulationWarning, match="closed-form softmax"):
        product = dense(op)
    assert op.softmax_head.passed is False and op.softmax_head.error > 1e-3
    assert reference_error(product, reference_hessian(model, loss, data)) < RTOL64


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("HESSOPS_SOFTMAX_HEAD", "0")
    loss, targets = LOSSES["plain"]
    model, data = mlp(), batches(targets, [9])
    op = hessops.Hessian(model, loss, data)
    assert reference_error(dense(op), reference_hessian(model, loss, data)) < RTOL64
    assert op.softmax_head is None


def test_losses_it_does_not_know_keep_the_plain_path():
    model = mlp()
    x, y = concat(batches(class_targets(N), [9]))
    for loss in (lambda out, t: F.cross_entropy(out, t), nn.MSELoss()):
        targets = y if not isinstance(loss, nn.MSELoss) else torch.randn(N, CLASSES, dtype=torch.float64)
        op = hessops.Hessian(model, loss, [(x, targets)])
        truth = autograd_hessian(model, loss, x, targets)
        assert reference_error(dense(op), truth) < RTOL64
        assert op.softmax_head is None


def test_an_nll_model_split_before_its_log_softmax_uses_the_head_in_the_ggn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, CLASSES), nn.LogSoftmax(dim=1)).double()
    data = as_float64(batches(class_targets(N), [4, 5]))
    op = hessops.GGN(model, nn.NLLLoss(ignore_index=2), data)
    truth = dense_ggn(model[:-1], nn.CrossEntropyLoss(ignore_index=2), data)
    assert reference_error(dense(op), truth) < RTOL64
    assert used_head(op)


@pytest.mark.parametrize("cls", [hessops.Hessian, hessops.GGN])
def test_a_first_batch_that_decides_nothing_defers_the_check(cls):
    """A first batch whose targets are all ignored has zero products: they cannot judge the closed form, so the
    check waits for a batch that counts a target (a vacuous pass would vouch for nothing)."""
    loss, targets = nn.CrossEntropyLoss(ignore_index=2), class_targets(N).clone()
    targets[:2] = 2
    model, data = mlp(), batches(targets, [2, 4, 3])
    op = cls(model, loss, data)
    truth = reference_hessian(model, loss, data) if cls is hessops.Hessian else dense_ggn(model, loss, data)
    assert reference_error(dense(op), truth) < RTOL64
    assert used_head(op) and op.softmax_head.examples == 4  # checked on the second batch


def test_a_slice_that_decides_nothing_leaves_the_plain_path():
    """The check's slice (the first 8 examples) counts no target while the batch does (its 9th example): zero
    products decide nothing, so the head is not used, and the products are exact all the same."""
    loss, targets = nn.CrossEntropyLoss(ignore_index=2), class_targets(N).clone()
    targets[:8], targets[8] = 2, 0
    model, data = mlp(), batches(targets, [9])
    op = hessops.Hessian(model, loss, data)
    assert reference_error(dense(op), reference_hessian(model, loss, data)) < RTOL64
    assert op.softmax_head is None  # one slice tried; after TRIES of them the plain loss is kept for good
    for _ in range(softmax_head.TRIES - 1):
        op @ torch.ones(op.shape[0], 1, dtype=torch.float64)
    assert op.softmax_head.passed is False and not used_head(op)
    assert reference_error(dense(op), reference_hessian(model, loss, data)) < RTOL64


def test_the_head_path_agrees_with_finite_differences_of_the_gradient():
    """The last witness is first-order: the tied GPT's products through the closed-form head against Richardson
    central differences of the gradient (tests/reference.py; no second derivative anywhere), float64. Measured
    8e-9 and 6e-8 relative (the differences' own error on this GPT); 1e-6 leaves room for it and still catches any
    wrong coefficient or missing term (>= 1e-3)."""
    from reference import richardson_hessian_product

    model, data = tiny_gpt(), padded_tokens()
    op = hessops.Hessian(model, next_token_cross_entropy, data)
    for v in probes(op.shape[0], columns=2).T:
        truth = richardson_hessian_product(model, next_token_loss, data, v)
        assert reference_error((op @ v.unsqueeze(1)).squeeze(1), truth) < 1e-6
    assert used_head(op)


def test_a_vector_in_the_null_space_does_not_fail_the_heads_check():
    """All ones on a linear model under softmax cross-entropy shifts every logit alike, so H·1 = 0 and both products
    are rounding: judged on them, the check failed (1.9 relative) and dropped the head with a false warning. It
    runs on its own random directions now."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", HvpFormulationWarning)
        product = op @ torch.ones(8, dtype=torch.float64)
    assert op.softmax_head.passed and product.abs().max() < 1e-14
