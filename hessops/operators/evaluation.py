r"""The dataset loss the operators are the curvature of, evaluated: one pass over the data without gradients.

Every operator is the curvature of the dataset loss that :mod:`hessops.operators.losses` defines,

.. math:: L(\theta) = \frac1W \sum_b W_b\, L_b(\theta), \qquad W = \sum_b W_b \quad (\texttt{reduction="mean"}),
          \qquad L(\theta) = \sum_b L_b(\theta) \quad (\texttt{reduction="sum"}),

with :math:`L_b` the loss of batch :math:`b` and :math:`W_b` what it divides by
(:meth:`hessops.operators.losses.LossSpec.batch_weight`: its examples, elements, counted targets or their class
weights).
It is the loss of the whole dataset in one call, whatever the batching: the mean over counted tokens with
``ignore_index`` padding, the class-weighted mean with ``weight=``, the dataset sum with ``reduction="sum"``.
:class:`LossMean` combines batch losses by this rule, in one place, for :func:`dataset_loss` (and through it
:func:`hessops.evaluate` and :func:`hessops.loss_landscape`) and for :func:`hessops.train`'s epoch loss, whose
batches are evaluated at the moving parameters of each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hessops.errors import EmptyDataError, InvalidArgumentError
from hessops.operators.functional import (
    ParamTree,
    batch_size,
    call_model,
    cast_floating,
    check_batch,
    check_train_mode,
    model_constants,
    normalize_device,
    select_parameters,
    split_batch,
)
from hessops.operators.losses import CLASSIFICATION, LossSpec, check_counted, loss_spec, probe_mean


@dataclass
class DatasetLoss:
    r"""The dataset loss at one or more parameter values.

    Attributes:
        loss: float64 ``(P,)`` on the CPU, :math:`L` at each of the ``P`` points (``P = 1``: at the model's
            parameters).
        accuracy: ``(P,)``, the fraction of counted targets (not ``ignore_index``) whose class scores' argmax is
            the target, where the outputs are class scores ``(B, C)`` and the targets class indices, else ``None``.
        examples: :math:`N`, the examples of the data.
        weight: :math:`W = \sum_b W_b`."""

    loss: Tensor
    accuracy: Tensor | None
    examples: int
    weight: float

    def to_dict(self) -> dict:
        """The result as JSON-ready values.

        Returns:
            ``loss`` and ``accuracy`` (lists, or ``null``), ``examples`` and ``weight``."""
        return {
            "loss": self.loss.tolist(),
            "accuracy": None if self.accuracy is None else self.accuracy.tolist(),
            "examples": self.examples,
            "weight": self.weight,
        }


class LossMean:
    r"""Batch losses combined into the dataset loss: :math:`\frac1W \sum_b W_b L_b` for a mean,
    :math:`\sum_b L_b` for ``reduction="sum"`` (:mod:`hessops.operators.evaluation`), at ``points`` parameter
    values, with the accuracy over counted targets where the outputs are class scores.

    For each batch call :meth:`count` (its :math:`W_b`; 0 when every target is ignored: skip it), then
    :meth:`add` once per point; :meth:`result` at the end. The sums stay on ``device`` (no host sync per
    batch)."""

    def __init__(self, spec: LossSpec, points: int = 1, device: torch.device | str | None = None) -> None:
        self.spec = spec
        self.sums = torch.zeros(points, dtype=torch.float64, device=device)
        self.hits = torch.zeros(points, dtype=torch.float64, device=device)
        self.counted = torch.zeros((), dtype=torch.float64, device=device)
        self.weight, self.examples, self.classifier = 0.0, 0, True

    def count(self, targets: Any, n_b: int) -> float:
        """Count a batch of ``n_b`` examples; returns its weight :math:`W_b`."""
        self.examples += n_b
        weight = self.spec.batch_weight(targets, n_b) if n_b else 0.0
        self.weight += weight
        return weight

    def add(self, loss: Tensor, outputs: Any, targets: Any, weight: float, point: int = 0) -> None:
        """Add a counted batch's loss :math:`L_b` (``loss_fn(outputs, targets)``) at ``point``, weighted by
        ``weight`` (its :meth:`count`) for a mean."""
        loss = loss.detach().reshape(()).to(dtype=torch.float64, device=self.sums.device)
        self.sums[point] += weight * loss if self.spec.mean else loss
        self.classifier = self.classifier and _class_scores(outputs, targets)
        if self.classifier:
            counted = _counted(self.spec, targets)
            self.hits[point] += ((outputs.detach().argmax(1) == targets) & counted).sum().to(self.hits.device)
            if point == 0:
                self.counted += counted.sum().to(self.counted.device)

    def result(self) -> DatasetLoss:
        """The dataset loss at each point.

        Raises:
            EmptyDataError: no examples were counted, or every target was ignored.
        """
        if self.examples == 0:
            raise EmptyDataError(EmptyDataError.NO_EXAMPLES)
        check_counted(self.weight, self.examples)
        loss = (self.sums / self.weight if self.spec.mean else self.sums).cpu()
        accuracy = (self.hits / self.counted).cpu() if self.classifier else None
        return DatasetLoss(loss, accuracy, self.examples, self.weight)


@torch.no_grad()
def dataset_loss(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Iterable,
    *,
    points: Sequence[Sequence[Tensor]] | None = None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    unpack_inputs: bool = True,
) -> DatasetLoss:
    r"""The dataset loss :math:`L(\theta)` that the operators built from the same arguments are the curvature
    of (:mod:`hessops.operators.evaluation`), in one pass over ``data`` without gradients, each batch evaluated
    at every point while it is at hand.

    ``model``, ``loss_fn``, ``data``, ``params``, ``dtype``, ``batch_size_fn`` and ``unpack_inputs`` are the
    operators' (:class:`~hessops.CurvatureOperator`): batches of ``(inputs, targets)`` or HuggingFace dicts
    with ``"labels"``, the model evaluated in ``dtype`` (default the parameters') in eval mode. ``points``:
    parameter values, each a sequence of tensors laid out like ``params`` (default: the model's own).

    Args:
        model: the network, in eval mode.
        loss_fn: the batch loss, reduced as the operators accept (a loss hessops knows, or a callable verified to
            be a mean over examples on the first batch: :func:`hessops.operators.losses.probe_mean`).
        data: an iterable of batches; one pass is made (a one-shot iterator will do).
        points: parameter values at which to evaluate; default one, the model's parameters.
        params: the parameters the points give values to; default the trainable ones.
        dtype: the dtype to evaluate in; default the parameters'.
        batch_size_fn: the number of examples of a batch's inputs, where they share no first dimension.
        unpack_inputs: ``model(*inputs)``/``model(**inputs)`` (default), or ``model(inputs)``.

    Returns:
        A :class:`DatasetLoss`: the loss (and accuracy) at each point, the examples and :math:`W`.

    Raises:
        TrainModeError: Dropout or BatchNorm in training mode (call ``model.eval()``).
        EmptyDataError: the data hold no example, or every target is ignored.
        InvalidArgumentError: a point whose tensors do not match ``params``.
        UnsupportedLossError: a loss that is neither a mean nor a sum over examples.
    """
    check_train_mode(model, False)
    spec = loss_spec(loss_fn)
    names, tensors = select_parameters(model, params)
    model_dtype, device = tensors[0].dtype, normalize_device(tensors[0].device)
    dtype = model_dtype if dtype is None else dtype
    values = [tuple(t.detach().to(dtype) for t in tensors)] if points is None else _points(points, tensors, dtype)
    constants = model_constants(model, names, model_dtype, dtype)
    mean = LossMean(spec, len(values), device)
    for index, raw in enumerate(data):
        inputs, targets = split_batch(raw, index)
        check_batch(inputs, targets, index, device, model_dtype)
        if dtype != model_dtype:
            inputs, targets = cast_floating(inputs, dtype), cast_floating(targets, dtype)
        n_b = batch_size(inputs, index, batch_size_fn)
        probe = mean.weight == 0 and spec.kind is None  # the first batch with a counted target
        weight = mean.count(targets, n_b)
        if weight == 0:
            continue
        for i, point in enumerate(values):
            outputs = call_model(model, names, point, constants, inputs if unpack_inputs else (inputs,))
            if probe and i == 0:
                probe_mean(spec, outputs, targets, n_b)
            mean.add(spec(outputs, targets), outputs, targets, weight, i)
    return mean.result()


def _points(points: Sequence[Sequence[Tensor]], tensors: Sequence[Tensor], dtype: torch.dtype) -> list[ParamTree]:
    """Each point as a tuple of ``dtype`` tensors, checked against the parameters' shapes."""
    shapes = [tuple(t.shape) for t in tensors]
    values = []
    for i, point in enumerate(points):
        point = tuple(point)
        if [tuple(getattr(t, "shape", ())) for t in point] != shapes:
            raise InvalidArgumentError(
                f"points[{i}] must hold one tensor per parameter, of shapes {shapes}: lay it out like params"
            )
        values.append(tuple(t.detach().to(dtype) for t in point))
    return values


def _class_scores(outputs: Any, targets: Any) -> bool:
    """Whether ``outputs`` are class scores ``(B, C)`` and ``targets`` class indices ``(B,)``."""
    return (
        isinstance(outputs, Tensor)
        and isinstance(targets, Tensor)
        and outputs.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
    )


def _counted(spec: LossSpec, targets: Tensor) -> Tensor:
    """The targets that count: all but ``ignore_index`` for a classification loss."""
    if spec.kind in CLASSIFICATION and spec.ignore_index is not None:
        return targets != spec.ignore_index
    return torch.ones_like(targets, dtype=torch.bool)
