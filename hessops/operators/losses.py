r"""What a loss means over the whole dataset: its kind, reduction, ignored targets and class weights, and so
the weight of each batch in the dataset loss.

Every operator is the curvature of the **dataset loss** that the loss function itself defines when it is
applied to all the data at once. For a loss with ``reduction="mean"`` that is

.. math:: L(\theta) = \frac1W \sum_b W_b\, L_b(\theta), \qquad W = \sum_b W_b,

where :math:`L_b` is the loss of batch :math:`b` and :math:`W_b` what the loss divides by on that batch: the
number of targets not equal to ``ignore_index`` (cross-entropy, NLL), the sum of the class weights of those
targets (``weight=``), the number of elements (MSE, L1, Huber, BCE, ``KLDivLoss(reduction="mean")``) or of
examples (``KLDivLoss(reduction="batchmean")`` and callables hessops does not know). The result is the same
under any batching, micro-batching and sharding over ranks. For ``reduction="sum"`` it is
:math:`L = \sum_b L_b` (the dataset sum, as curvlinops defines it): its eigenvalues grow with the dataset.
``reduction="none"`` is refused.

For language models, :func:`next_token_cross_entropy` (or its module :class:`NextTokenCrossEntropy`) is the
mean token cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``; :math:`W_b` is the number of counted
shifted labels (not ``ignore_index``), so the dataset loss is the mean over every counted token of the
dataset, whatever the batching, the padding and the micro-batching.

A loss is recognized as a module (``nn.CrossEntropyLoss(...)``), its functional form
(``F.cross_entropy``) or a ``functools.partial`` of the functional form with keyword arguments. Anything
else (a lambda, a function, another module) is probed once on the first batch's outputs and accepted only
if it behaves as a plain mean over examples (:func:`probe_mean`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessops.constants import DEFAULT_IGNORE_INDEX
from hessops.errors import EmptyDataError, InvalidArgumentError, TargetShapeError, UnsupportedLossError
from hessops.numerics import digest
from hessops.operators.functional import _leaves, map_examples


def next_token_cross_entropy(
    logits: Tensor, labels: Tensor, *, ignore_index: int = DEFAULT_IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    r"""The next-token cross-entropy of a causal language model: position :math:`t` predicts label :math:`t+1`,

    .. math:: L = \frac1{|C|} \sum_{(n,t) \in C} -\log \operatorname{softmax}(z_{n,t})_{y_{n,t+1}}, \qquad
              C = \{(n, t) : t < T-1,\ y_{n,t+1} \ne \texttt{ignore\_index}\},

    for ``logits`` :math:`z` of shape ``(B, T, V)`` and integer ``labels`` :math:`y` of shape ``(B, T)`` (the
    sum over :math:`C` for ``reduction="sum"``). The shift is HuggingFace's (labels are the input ids, -100 at
    padding): the same loss as its causal LMs compute from ``labels``. Operators weight a batch by
    :math:`|C|`, its counted tokens (:class:`LossSpec`).

    Args:
        logits: :math:`z`, ``(B, T, V)``.
        labels: :math:`y`, integer ``(B, T)``.
        ignore_index: the label of positions not counted (HuggingFace's -100).
        reduction: ``"mean"`` over :math:`C`, or ``"sum"``.

    Returns:
        The scalar loss :math:`L`.

    Raises:
        TargetShapeError: ``logits`` and ``labels`` do not have the shapes above."""
    _check_next_token(logits, labels)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )


class NextTokenCrossEntropy(nn.Module):
    """:func:`next_token_cross_entropy` as a module, like ``nn.CrossEntropyLoss``."""

    def __init__(self, ignore_index: int = DEFAULT_IGNORE_INDEX, reduction: str = "mean") -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``logits`` ``(B, T, V)`` against ``labels`` ``(B, T)``."""
        return next_token_cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction=self.reduction)


def _check_next_token(logits: Any, labels: Any) -> None:
    """Logits ``(B, T, V)`` and integer labels ``(B, T)`` of the same ``B`` and ``T``."""
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TargetShapeError(
            f"next_token_cross_entropy takes logits and labels as tensors, got {type(logits).__name__} and "
            f"{type(labels).__name__}: return the logits from the model (an output with .logits is taken as them)"
        )
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or labels.is_floating_point():
        raise TargetShapeError(
            f"next_token_cross_entropy needs logits (B, T, V) and integer labels (B, T) of the same B and T; got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} ({labels.dtype}): pass the token ids "
            "(-100 where nothing is to be predicted) as labels, and the model's logits for every position"
        )


# kind -> (module class, functional form, keyword arguments that a partial may bind)
KINDS: dict[str, tuple[type, Callable, frozenset[str]]] = {
    "cross_entropy": (
        nn.CrossEntropyLoss,
        F.cross_entropy,
        frozenset({"weight", "ignore_index", "reduction", "label_smoothing"}),
    ),
    "nll": (nn.NLLLoss, F.nll_loss, frozenset({"weight", "ignore_index", "reduction"})),
    "mse": (nn.MSELoss, F.mse_loss, frozenset({"reduction"})),
    "l1": (nn.L1Loss, F.l1_loss, frozenset({"reduction"})),
    "huber": (nn.HuberLoss, F.huber_loss, frozenset({"reduction", "delta"})),
    "smooth_l1": (nn.SmoothL1Loss, F.smooth_l1_loss, frozenset({"reduction", "beta"})),
    "bce": (nn.BCELoss, F.binary_cross_entropy, frozenset({"weight", "reduction"})),
    "bce_logits": (
        nn.BCEWithLogitsLoss,
        F.binary_cross_entropy_with_logits,
        frozenset({"weight", "reduction", "pos_weight"}),
    ),
    "kl_div": (nn.KLDivLoss, F.kl_div, frozenset({"reduction", "log_target"})),
    "next_token": (NextTokenCrossEntropy, next_token_cross_entropy, frozenset({"ignore_index", "reduction"})),
}
CLASSIFICATION = ("cross_entropy", "nll")  # targets are class indices (or, for cross-entropy, probabilities)

NO_COUNTED_TARGETS = (
    "every target in the data equals ignore_index (or has class weight 0), so the mean loss has nothing to "
    "average: check the targets (padding only?), or pass data that hold at least one counted target"
)


@dataclass(frozen=True, eq=False)
class LossSpec:
    """A loss function with what hessops knows of it. Calling it checks the shapes and calls the loss.

    ``kind`` is a key of :data:`KINDS`, or ``None`` for a callable hessops does not know (then a mean over
    examples, verified by :func:`probe_mean`)."""

    fn: Callable[[Any, Any], Tensor]
    kind: str | None
    reduction: str = "mean"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The loss function's name, for messages."""
        return _name(self.fn)

    @property
    def mean(self) -> bool:
        """Whether the dataset loss divides by the total weight :math:`W` (any reduction but ``"sum"``)."""
        return self.reduction != "sum"

    @property
    def ignore_index(self) -> int | None:
        """The target value that is left out of the loss (classification losses; else ``None``)."""
        counted = self.kind in CLASSIFICATION or self.kind == "next_token"
        return self.options.get("ignore_index", DEFAULT_IGNORE_INDEX) if counted else None

    @property
    def weight(self) -> Tensor | None:
        """The per-class weights of a classification loss, or ``None``."""
        return self.options.get("weight") if self.kind in CLASSIFICATION else None

    @property
    def identity(self) -> str:
        """What defines this loss, as a string (a checkpoint's fingerprint compares it): a loss hessops knows by
        its kind and every option it takes, defaults filled in, so that ``nn.CrossEntropyLoss()``,
        ``F.cross_entropy`` and ``partial(F.cross_entropy, reduction="mean")`` are one loss
        (``cross_entropy(ignore_index=-100, label_smoothing=0.0, reduction='mean', weight=None)``; a tensor
        option by its SHA-256); any other callable by its qualified name and its reduction."""
        if self.kind is None:
            return f"{_qualified(self.fn)}(reduction={self.reduction!r})"
        _, functional, keywords = KINDS[self.kind]
        defaults = inspect.signature(functional).parameters
        options = {**{key: defaults[key].default for key in keywords}, **self.options, "reduction": self.reduction}
        shown = {key: f"sha256:{digest(v)[:16]}" if isinstance(v, Tensor) else repr(v) for key, v in options.items()}
        return f"{self.kind}({', '.join(f'{key}={value}' for key, value in sorted(shown.items()))})"

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        """The loss of ``outputs`` against ``targets``, after checking that their shapes match."""
        self.check_shapes(outputs, targets)
        return self.fn(outputs, targets)

    def check_shapes(self, outputs: Any, targets: Any) -> None:
        """Element-wise losses must get targets of the outputs' shape: torch would broadcast them; the
        next-token loss logits ``(B, T, V)`` and labels ``(B, T)``."""
        if self.kind == "next_token":
            _check_next_token(outputs, targets)
            return
        if self.kind in CLASSIFICATION or self.kind is None:
            return
        if isinstance(outputs, Tensor) and isinstance(targets, Tensor) and outputs.shape != targets.shape:
            fix = f"reshape one to the other's shape, e.g. targets.view({tuple(outputs.shape)}) or outputs.squeeze(-1)"
            raise TargetShapeError(
                f"{self.name}: outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} "
                f"would broadcast to another shape and average over the wrong pairs: {fix}"
            )

    def example_weights(self, targets: Any, n: int) -> Tensor:
        r"""``(n,)`` float64: :math:`w_n`, what example :math:`n` contributes to the batch's divisor (its
        counted targets, the class weights of those, its elements, or 1; for the next-token loss its counted
        shifted labels ``labels[n, 1:]``). :math:`W_b = \sum_n w_n`."""
        if self.kind == "next_token":
            return (targets[:, 1:] != self.ignore_index).to(torch.float64).reshape(n, -1).sum(dim=1)
        if self.kind in CLASSIFICATION and isinstance(targets, Tensor) and not targets.is_floating_point():
            counted = targets != self.ignore_index
            weights = counted.to(torch.float64)
            if self.weight is not None:
                classes = torch.where(counted, targets, torch.zeros_like(targets))
                weights = weights * self.weight.to(torch.float64)[classes]
            return weights.reshape(n, -1).sum(dim=1)
        if self.kind == "cross_entropy" and isinstance(targets, Tensor):  # class probabilities (n, C, *d)
            return torch.full((n,), float(math.prod(targets.shape[2:])), dtype=torch.float64, device=targets.device)
        per_element = self.kind is not None and not (self.kind == "kl_div" and self.reduction == "batchmean")
        if per_element and isinstance(targets, Tensor):
            return torch.full((n,), float(targets[0].numel()), dtype=torch.float64, device=targets.device)
        device = targets.device if isinstance(targets, Tensor) else None
        return torch.ones(n, dtype=torch.float64, device=device)

    def batch_weight(self, targets: Any, n: int) -> float:
        """:math:`W_b`: what this batch's mean loss divides by (0 when every target is ignored)."""
        return float(self.example_weights(targets, n).sum())

    def as_cross_entropy(self) -> LossSpec:
        """The cross-entropy of logits with the same options: the NLL of ``log_softmax`` of its input."""
        if self.kind != "nll":
            raise UnsupportedLossError(f"{self.name} is not an NLL loss")
        options = dict(self.options)
        return LossSpec(
            functools.partial(F.cross_entropy, reduction=self.reduction, **options),
            "cross_entropy",
            self.reduction,
            options,
        )


def loss_spec(loss_fn: Callable) -> LossSpec:
    """Recognize ``loss_fn``; refuse ``reduction="none"`` (and anything else that is not a scalar reduction)."""
    if isinstance(loss_fn, LossSpec):
        return loss_fn
    if not callable(loss_fn):
        raise InvalidArgumentError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    kind, options = _recognize(loss_fn)
    reduction = options.pop("reduction", "mean")
    allowed = ("mean", "sum", "batchmean") if kind == "kl_div" else ("mean", "sum")
    if reduction not in allowed:
        raise UnsupportedLossError(
            f"{_name(loss_fn)} with reduction='{reduction}' returns no scalar batch loss: use reduction='mean' "
            "(the curvature of the dataset mean) or reduction='sum' (of the dataset sum)"
        )
    return LossSpec(loss_fn, kind, reduction, options)


def _recognize(loss_fn: Callable) -> tuple[str | None, dict[str, Any]]:
    """``(kind, options)``; ``(None, {reduction})`` for a callable hessops does not know."""
    for kind, (module, functional, keywords) in KINDS.items():
        if isinstance(loss_fn, module):
            options = {"reduction": loss_fn.reduction}
            for key in keywords - {"reduction"}:
                value = getattr(loss_fn, key, None)
                if value is not None:
                    options[key] = value
            return kind, options
        if loss_fn is functional:
            return kind, {}
        if isinstance(loss_fn, functools.partial) and loss_fn.func is functional and not loss_fn.args:
            if set(loss_fn.keywords) <= keywords:
                return kind, dict(loss_fn.keywords)
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction", reduction)
    return None, {} if reduction is None else {"reduction": reduction}


def probe_mean(spec: LossSpec, outputs: Any, targets: Any, n: int, examples: int = 32) -> None:
    r"""Accept a loss hessops does not know only if it is a plain mean of per-example losses on the first
    batch (``outputs`` computed without gradients, ``n`` examples):

    - the loss of the batch concatenated with itself equals the batch's (a sum would double), and
    - the batch loss of the first ``examples`` examples equals the mean of their one-example losses (a class
      weight, an ignored target or a broadcast would break it).

    A module with ``reduction="sum"`` that hessops does not know must be a plain sum instead: doubled by
    the concatenation, and the sum of the one-example losses.

    Both to ``1000·eps`` relative in the outputs' dtype. A loss that does not return a scalar is left to the
    operators, which name its shape."""
    if spec.kind is not None:
        return
    first = spec.fn(outputs, targets)
    if not isinstance(first, Tensor) or first.dim() != 0:
        return
    dtype = first.dtype if first.is_floating_point() else torch.float64
    rtol = 1e3 * torch.finfo(dtype).eps
    doubled = spec.fn(
        map_examples(outputs, n, lambda t: torch.cat([t, t])), map_examples(targets, n, lambda t: torch.cat([t, t]))
    )
    k = min(n, examples)
    head = spec.fn(*(map_examples(obj, n, lambda t: t[:k]) for obj in (outputs, targets)))
    singles = torch.stack(
        [
            spec.fn(*(map_examples(obj, n, lambda t, i=i: t[i : i + 1]) for obj in (outputs, targets))).reshape(())
            for i in range(k)
        ]
    )
    singles = singles.mean() if spec.mean else singles.sum()

    def close(a: Tensor, b: Tensor) -> bool:
        scale = max(abs(float(a)), abs(float(b)), torch.finfo(dtype).tiny)
        return bool(torch.isfinite(a)) and bool(abs(a - b) <= rtol * scale)

    shapes = f"outputs {_shapes(outputs)}, targets {_shapes(targets)}"
    fix = (
        "pass a loss hessops knows (a module such as nn.CrossEntropyLoss(ignore_index=..., weight=...), its "
        "functional form, or functools.partial of it), or a callable that returns the mean of per-example losses"
    )
    expected, other = (1, 2) if spec.mean else (2, 1)  # what concatenating the batch with itself multiplies by
    if not close(doubled, expected * first):
        what = {1: "a mean", 2: "a sum"}[other] if close(doubled, other * first) else f"not a {spec.reduction}"
        raise UnsupportedLossError(
            f"{spec.name} looks like {what} over examples: on the first batch ({shapes}) it gives "
            f"{float(first):.6g}, and {float(doubled):.6g} on that batch concatenated with itself (a mean is "
            f"unchanged, a sum doubles). Curvature of the dataset loss needs to know how batches combine: {fix} "
            "(reduction='sum' for a sum)"
        )
    if not close(head, singles):
        raise UnsupportedLossError(
            f"{spec.name} is not the {spec.reduction} of per-example losses on the first batch ({shapes}): "
            f"{float(head):.6g} for {k} examples together, {float(singles):.6g} from each alone (class weights, "
            f"ignored targets or broadcasting shapes do this), so batches cannot be combined into the dataset "
            f"loss: {fix}"
        )


def check_counted(total_weight: float, examples: int) -> None:
    """After a pass over the data: examples were seen, but none counted (all targets ignored)."""
    if examples > 0 and total_weight == 0:
        raise EmptyDataError(NO_COUNTED_TARGETS)


def _shapes(obj: Any) -> str:
    shapes = [tuple(t.shape) for t in _leaves(obj)]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def _qualified(loss_fn: Callable) -> str:
    """``module.qualname`` of a function or of a module's class; a ``functools.partial`` with its keywords."""
    if isinstance(loss_fn, functools.partial):
        keywords = ", ".join(f"{k}={v!r}" for k, v in sorted(loss_fn.keywords.items()))
        return f"functools.partial({_qualified(loss_fn.func)}, {keywords})"
    named = loss_fn if hasattr(loss_fn, "__qualname__") else type(loss_fn)
    return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"


def _name(loss_fn: Callable) -> str:
    if isinstance(loss_fn, functools.partial):
        keywords = ", ".join(f"{k}={v!r}" for k, v in loss_fn.keywords.items())
        return f"functools.partial({_name(loss_fn.func)}, {keywords})"
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__name__
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__
