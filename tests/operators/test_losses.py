"""Every loss form against a dense reference on the CONCATENATED dataset with the same loss, under several
batchings: a mean over concatenated data is what the loss means over the whole dataset (ignored targets and
class weights included), and for reduction="sum" the concatenated sum is the dataset sum.

Tolerance: 1e-10 relative (Frobenius of a block of 4 products), float64. Every path here is exact, so the
operators and the references differ only by rounding in sums of a few hundred terms (measured: 4.6e-16 at worst
over the whole grid);
1e-10 leaves room for other BLAS orders while any wrong weight (an ignored target counted: >= 1e-2) fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from reference import _flat_function, dense_ggn, reference_hessian, relative_error
from torch import Tensor, nn
from torch.func import functional_call, grad

import hessops

RTOL64 = 1e-10
N = 10
BATCHINGS = {"one": ([N], None), "uneven": ([1, 6, 3], None), "ones": ([1] * N, None), "micro": ([6, 4], 2)}
CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)


@dataclass
class LossCase:
    model: nn.Module
    loss_fn: Callable
    x: Tensor
    y: Tensor
    ggn_model: nn.Module | None = None  # the split the GGN uses (before a LogSoftmax), where it differs
    ggn_loss: Callable | None = None
    ignore_index: int | None = None  # for the per-example weights of the EF reference
    class_weight: Tensor | None = None
    reduction: str = "mean"


def _mlp(out: int = 3, tail: nn.Module | None = None) -> nn.Module:
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)]
    return nn.Sequential(*layers, *([tail] if tail is not None else [])).double()


def _labels(shape, ignored: list[int]) -> Tensor:
    """Class labels with the first example's targets ignored (so the uneven and size-1 batchings hold a
    batch whose targets are all ignored) and some others."""
    y = torch.randint(0, 3, shape)
    y.view(shape[0], -1)[ignored] = -100
    return y


def make(name: str) -> LossCase:
    torch.manual_seed(0)
    x = torch.randn(N, 4, dtype=torch.float64)
    y = _labels((N,), [0, 4, 7])
    w = CLASS_WEIGHT
    if name == "ce-module":
        return LossCase(_mlp(), nn.CrossEntropyLoss(), x, torch.randint(0, 3, (N,)))
    if name == "ce-ignore":
        return LossCase(_mlp(), nn.CrossEntropyLoss(), x, y, ignore_index=-100)
    if name == "ce-functional-ignore":
        return LossCase(_mlp(), F.cross_entropy, x, y, ignore_index=-100)
    if name == "ce-weight":
        return LossCase(_mlp(), nn.CrossEntropyLoss(weight=w), x, torch.randint(0, 3, (N,)), class_weight=w)
    if name == "ce-partial-weight-ignore":
        return LossCase(
            _mlp(),
            functools.partial(F.cross_entropy, weight=w, ignore_index=-100),
            x,
            y,
            ignore_index=-100,
            class_weight=w,
        )
    if name == "ce-smoothing-weight-ignore":
        loss = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
        return LossCase(_mlp(), loss, x, y, ignore_index=-100, class_weight=w)
    if name == "ce-sum-ignore":
        return LossCase(_mlp(), nn.CrossEntropyLoss(reduction="sum"), x, y, ignore_index=-100, reduction="sum")
    if name == "ce-sequence-ignore":  # (N, C, T) outputs, (N, T) targets; example 0 all ignored
        model = _mlp(6, nn.Unflatten(1, (3, 2)))
        ys = _labels((N, 2), [0])
        ys[3, 1] = ys[5, 0] = -100
        return LossCase(model, nn.CrossEntropyLoss(weight=w), x, ys, ignore_index=-100, class_weight=w)
    if name in ("nll-module-ignore", "nll-functional", "nll-partial-weight-ignore"):
        loss = {
            "nll-module-ignore": nn.NLLLoss(),
            "nll-functional": F.nll_loss,
            "nll-partial-weight-ignore": functools.partial(F.nll_loss, weight=w),
        }[name]
        weighted = name.endswith("weight-ignore")
        model = _mlp(3, nn.LogSoftmax(dim=1))
        ce = functools.partial(F.cross_entropy, weight=w if weighted else None)
        return LossCase(model, loss, x, y, model[:-1], ce, ignore_index=-100, class_weight=w if weighted else None)
    if name == "mse-module":
        return LossCase(_mlp(), nn.MSELoss(), x, torch.randn(N, 3, dtype=torch.float64))
    if name == "mse-partial-sum":
        return LossCase(
            _mlp(),
            functools.partial(F.mse_loss, reduction="sum"),
            x,
            torch.randn(N, 3, dtype=torch.float64),
            reduction="sum",
        )
    if name == "bce-logits":
        return LossCase(_mlp(), nn.BCEWithLogitsLoss(), x, torch.rand(N, 3, dtype=torch.float64).round())
    if name == "huber-sum":
        return LossCase(
            _mlp(), nn.HuberLoss(reduction="sum", delta=0.5), x, torch.randn(N, 3, dtype=torch.float64), reduction="sum"
        )
    if name == "lambda-mean":  # a callable hessops does not know, probed: a plain mean is accepted
        return LossCase(
            _mlp(), lambda out, t: ((out - t) ** 2).sum(dim=1).mean(), x, torch.randn(N, 3, dtype=torch.float64)
        )
    raise ValueError(name)


LOSSES = [
    "ce-module",
    "ce-ignore",
    "ce-functional-ignore",
    "ce-weight",
    "ce-partial-weight-ignore",
    "ce-smoothing-weight-ignore",
    "ce-sum-ignore",
    "ce-sequence-ignore",
    "nll-module-ignore",
    "nll-functional",
    "nll-partial-weight-ignore",
    "mse-module",
    "mse-partial-sum",
    "bce-logits",
    "huber-sum",
    "lambda-mean",
]


def batched(case: LossCase, batching: str) -> tuple[list, int | None]:
    sizes, micro = BATCHINGS[batching]
    return list(zip(case.x.split(sizes), case.y.split(sizes))), micro


def reference_empirical_fisher(case: LossCase) -> Tensor:
    r"""(1/W) Σ_n w_n g_n g_nᵀ (mean) or Σ_n g_n g_nᵀ (sum), g_n the gradient of example n's loss alone and
    w_n its counted targets times their class weights (1 for losses without targets to ignore)."""
    theta, unflatten = _flat_function(case.model, None)
    terms, total = [], 0.0
    for i in range(N):
        yi = case.y[i : i + 1]
        if case.ignore_index is None and case.class_weight is None:
            w_n = 1.0
        else:
            counted = yi != (-100 if case.ignore_index is None else case.ignore_index)
            cw = case.class_weight if case.class_weight is not None else torch.ones(3, dtype=torch.float64)
            w_n = float((counted * cw[yi.clamp(min=0)]).sum())
        total += w_n
        if case.reduction == "mean" and w_n == 0:
            continue  # the example's own loss is 0/0; it contributes nothing
        g = grad(lambda t: case.loss_fn(functional_call(case.model, unflatten(t), (case.x[i : i + 1],)), yi))(theta)
        terms.append((w_n if case.reduction == "mean" else 1.0) * torch.outer(g, g))
    result = torch.stack(terms).sum(0)
    return result / total if case.reduction == "mean" else result


_REFERENCES: dict[tuple[str, str], Tensor] = {}


def reference(name: str, kind: str) -> Tensor:
    if (name, kind) not in _REFERENCES:
        case, data = make(name), None
        data = [(case.x, case.y)]
        if kind == "hessian":
            value = reference_hessian(case.model, case.loss_fn, data)
        elif kind == "ggn":
            value = dense_ggn(case.ggn_model or case.model, case.ggn_loss or case.loss_fn, data)
        else:
            value = reference_empirical_fisher(case)
        _REFERENCES[name, kind] = value
    return _REFERENCES[name, kind]


OPERATORS = {
    "hessian": functools.partial(hessops.Hessian, hvp_mode="autograd"),
    "ggn": hessops.GGN,
    "ef": hessops.EmpiricalFisher,
}


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_form_is_the_curvature_of_the_dataset_loss(name, batching):
    case = make(name)
    data, micro = batched(case, batching)
    V = torch.randn(
        sum(p.numel() for p in case.model.parameters()),
        4,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )
    for kind, cls in OPERATORS.items():
        op = cls(case.model, case.loss_fn, data, micro_batch_size=micro)
        expected = reference(name, kind) @ V
        assert float(expected.norm()) > 1e-3, kind  # a zero matrix (NLL's GGN at the wrong split) would pass
        assert relative_error(op @ V, expected) < RTOL64, kind


@pytest.mark.parametrize("name", ["ce-ignore", "ce-sum-ignore", "mse-partial-sum", "lambda-mean"])
def test_dense_hessian_weights_batches_like_the_operators(name):
    case = make(name)
    data, _ = batched(case, "uneven")
    assert relative_error(hessops.dense_hessian(case.model, case.loss_fn, data), reference(name, "hessian")) < RTOL64


@pytest.mark.parametrize("name", ["ce-sequence-ignore-unweighted", "ce-ignore", "mse-partial-sum"])
def test_mc_fisher_converges_to_the_ggn(name):
    """MCFisher runs with ignored targets (a sequence and a flat batch) and sums, near the GGN (with 4,096
    samples within 5 %, relative Frobenius; the MC error is ~1/sqrt(samples) ≈ 2 %), and is a fixed matrix per
    seed. Loose by design, it would pass a 10 % bias: the exact test of E[MCFisher], padding and reduction="sum"
    included, is tests/operators/test_mcfisher.py."""
    case = make("ce-sequence-ignore" if name.startswith("ce-sequence") else name)
    loss = nn.CrossEntropyLoss() if name.startswith("ce-sequence") else case.loss_fn
    data, _ = batched(case, "uneven")
    ggn = hessops.GGN(case.model, loss, data).to_dense()
    op = hessops.MCFisher(case.model, loss, data, samples=4096, seed=1)
    assert relative_error(op.to_dense(), ggn) < 0.05
    assert hessops.MCFisher(case.model, loss, data, seed=2).check_deterministic() == 0.0


def test_sum_is_n_times_the_mean():
    """reduction='sum' is the curvature of the dataset sum: N times the mean's (no ignored targets)."""
    case = make("mse-module")
    data, _ = batched(case, "uneven")
    mean = hessops.GGN(case.model, nn.MSELoss(), data).to_dense()
    total = hessops.GGN(case.model, nn.MSELoss(reduction="sum"), data).to_dense()
    assert relative_error(total, 3 * N * mean) < RTOL64  # MSE's mean also divides by the 3 outputs


# -- refusals --------------------------------------------------------------------------------------------


def _classification():
    case = make("ce-module")
    return case.model, [(case.x[:6], case.y[:6]), (case.x[6:], case.y[6:])]


@pytest.mark.parametrize(
    "loss",
    [
        lambda out, y: F.cross_entropy(out, y, reduction="sum"),
        lambda out, y: F.cross_entropy(out, y).sum() * out.shape[0] / 3,
    ],
    ids=["sum", "scaled-by-batch"],
)
def test_a_callable_that_is_not_a_mean_is_refused(loss):
    model, data = _classification()
    with pytest.raises(hessops.UnsupportedLossError, match="concatenated with itself.*reduction='sum'"):
        hessops.Hessian(model, loss, data)
    with pytest.raises(hessops.UnsupportedLossError, match="concatenated with itself"):
        hessops.dense_hessian(model, loss, data)


def test_a_callable_with_hidden_weights_or_ignored_targets_is_refused():
    model, data = _classification()
    weighted = lambda out, y: F.cross_entropy(out, y, weight=CLASS_WEIGHT)  # noqa: E731
    with pytest.raises(hessops.UnsupportedLossError, match="not the mean of per-example losses.*nn.CrossEntropyLoss"):
        hessops.GGN(model, weighted, data)
    ignored = [(x, y.masked_fill(torch.arange(len(y)) % 2 == 0, -100)) for x, y in data]
    with pytest.raises(hessops.UnsupportedLossError, match="not the mean of per-example losses"):
        hessops.Hessian(model, lambda out, y: F.cross_entropy(out, y), ignored)
    hessops.Hessian(model, nn.CrossEntropyLoss(), ignored)  # the fix: a form hessops knows


@pytest.mark.parametrize(
    "loss", [nn.CrossEntropyLoss(reduction="none"), functools.partial(F.cross_entropy, reduction="none")]
)
def test_reduction_none_is_refused(loss):
    model, data = _classification()
    with pytest.raises(hessops.UnsupportedLossError, match="reduction='none'.*reduction='mean'.*reduction='sum'"):
        hessops.GGN(model, loss, data)


@pytest.mark.parametrize("loss", [nn.MSELoss(), functools.partial(F.l1_loss), nn.BCEWithLogitsLoss(reduction="sum")])
def test_broadcasting_shapes_are_refused(loss):
    torch.manual_seed(0)
    model, x, y = _mlp(1), torch.randn(N, 4, dtype=torch.float64), torch.rand(N, dtype=torch.float64).round()
    message = r"\(10, 1\).*\(10,\).*targets.view\(\(10, 1\)\)"
    for cls in (hessops.Hessian, hessops.GGN, hessops.EmpiricalFisher):
        with pytest.raises(hessops.TargetShapeError, match=message):  # the determinism check's forward
            cls(model, loss, [(x, y)])
        op = cls(model, loss, [(x, y)], check_determinism=False)
        with pytest.raises(hessops.TargetShapeError, match=message):  # else the first product
            op @ torch.randn(op.shape[0], dtype=torch.float64)
    with pytest.raises(hessops.TargetShapeError):
        hessops.dense_hessian(model, loss, [(x, y)])
    fixed = cls(model, loss, [(x, y[:, None])])  # the fix
    assert torch.isfinite(fixed @ torch.randn(fixed.shape[0], dtype=torch.float64)).all()


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_a_callable_that_broadcasts_is_refused_by_the_probe():
    torch.manual_seed(0)
    model, x, y = _mlp(1), torch.randn(N, 4, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    with pytest.raises(hessops.UnsupportedLossError, match=r"outputs \(10, 1\), targets \(10,\).*broadcasting"):
        hessops.Hessian(model, lambda out, t: F.mse_loss(out, t), [(x, y)])


def test_a_dataset_whose_targets_are_all_ignored_is_refused():
    model, data = _classification()
    ignored = [(x, torch.full_like(y, -100)) for x, y in data]
    op = hessops.GGN(model, nn.CrossEntropyLoss(), ignored)
    with pytest.raises(hessops.EmptyDataError, match="every target in the data equals ignore_index"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    with pytest.raises(hessops.EmptyDataError, match="ignore_index"):
        hessops.dense_hessian(model, nn.CrossEntropyLoss(), ignored)


def test_a_nan_batch_is_still_named_when_another_is_all_ignored():
    model, data = _classification()
    (x0, y0), (x1, y1) = data
    x1 = x1.clone()
    x1[0, 0] = float("nan")
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x0, torch.full_like(y0, -100)), (x1, y1)])
    with pytest.raises(hessops.NonFiniteLossError, match="batch 1 is nan"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)


def test_curvatures_that_a_loss_cannot_define_are_refused():
    model, data = _classification()
    with pytest.raises(hessops.UnsupportedLossError, match="class weights.*GGN"):
        hessops.MCFisher(model, functools.partial(F.cross_entropy, weight=CLASS_WEIGHT), data)
    with pytest.raises(hessops.UnsupportedLossError, match="nll_loss.*CrossEntropyLoss"):
        hessops.GGN(model, F.nll_loss, data)  # no LogSoftmax to split before
    with pytest.raises(hessops.UnsupportedLossError, match="KLDivLoss.*probability targets"):
        hessops.GGN(
            model,
            nn.KLDivLoss(reduction="batchmean"),
            [(x, torch.rand(len(x), 3, dtype=torch.float64)) for x, _ in data],
        )


def test_an_unknown_module_with_reduction_sum_must_be_a_sum():
    """A loss module hessops does not know, with reduction='sum', is probed as a sum and gives the curvature
    of the dataset sum (here PoissonNLLLoss, against the concatenated data)."""
    torch.manual_seed(0)
    model, x, y = _mlp(), torch.randn(N, 4, dtype=torch.float64), torch.poisson(torch.ones(N, 3, dtype=torch.float64))
    loss = nn.PoissonNLLLoss(reduction="sum")
    data = list(zip(x.split([3, 7]), y.split([3, 7])))
    expected = reference_hessian(model, loss, [(x, y)])
    assert relative_error(hessops.Hessian(model, loss, data, hvp_mode="autograd").to_dense(), expected) < RTOL64
