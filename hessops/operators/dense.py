"""The exact dense Hessian of a small model, as a reference independent of the operators' code path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessops.errors import EmptyDataError, WitnessError
from hessops.operators import _written_out
from hessops.operators import witness as first_order
from hessops.operators.functional import (
    announce_attention_kernels,
    batch_size,
    call_model,
    cast_floating,
    check_train_mode,
    differentiable_kernels,
    first_batch,
    flat_to_tree,
    select_parameters,
    split_batch,
)
from hessops.operators.hvp_tuning import tolerance
from hessops.operators.losses import check_counted, loss_spec, probe_mean


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Iterable,
    *,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = 256,
    witness: bool = True,
) -> Tensor:
    r"""The ``(n, n)`` Hessian of the dataset loss (:mod:`hessops.operators.losses`), accumulated batch by batch as
    :math:`\sum_b \frac{W_b}W \nabla^2 L_b` (:math:`\sum_b \nabla^2 L_b` for ``reduction="sum"``), by double
    backward: the gradient's graph is differentiated once per row (``chunk_size`` rows at a time,
    ``is_grads_batched``). Not ``jacrev(jacrev)`` nor ``torch.func.hessian``, which are 2-10 % off through
    LayerNorm, InstanceNorm and train-mode BatchNorm in torch 2.14 (docs/torch-pitfalls.md); weight norm, whose
    double backward torch gets wrong, is written out in plain operations (hessops/operators/_written_out.py). With
    ``witness`` (and unless ``HESSOPS_WITNESS=0``), :math:`Hd` for one random unit :math:`d` is then checked
    against central differences of the dataset gradient (four more gradient passes over ``data``; the rule of
    hessops/operators/witness.py), and a matrix that disagrees is refused with a ``WitnessError``. Same
    parameter order as the operators. Memory ``n²``: for models up to a few thousand parameters.

    Args:
        model: as for the operators (:class:`~hessops.CurvatureOperator`).
        loss_fn: as for the operators.
        data: as for the operators.
        params: as for the operators.
        dtype: as for the operators.
        chunk_size: rows differentiated together (``is_grads_batched``); ``None``: all at once.
        witness: check the matrix against central differences of the gradient, as above.

    Returns:
        The ``(n, n)`` Hessian, in ``dtype``.

    Raises:
        WitnessError: the matrix disagrees with the first-order witness (torch's second derivatives are wrong
            through a layer of the model).
        TrainModeError, EmptyDataError, UnsupportedLossError: as the operators raise them."""
    check_train_mode(model, False)
    announce_attention_kernels(model)
    spec = loss_spec(loss_fn)
    first_batch(data)
    names, tensors = select_parameters(model, params)
    dtype = tensors[0].dtype if dtype is None else dtype
    shapes = [p.shape for p in tensors]
    theta = torch.cat([p.detach().reshape(-1) for p in tensors]).to(dtype)
    constants = cast_floating(dict(model.named_buffers()), dtype)
    constants.update({k: p.detach().to(dtype) for k, p in model.named_parameters() if k not in names})

    def batches() -> Iterator[tuple[float, int, Callable[[Tensor], Tensor]]]:
        """``(W_b, n_b, flat θ ↦ L_b(θ))`` for each batch with examples; a loss hessops does not know is probed."""
        first = True
        for index, batch in enumerate(data):
            inputs, targets = split_batch(batch, index)
            n_b = batch_size(inputs, index)
            if n_b == 0:
                continue
            inputs, targets = cast_floating(inputs, dtype), cast_floating(targets, dtype)
            if first and spec.kind is None:  # a callable hessops does not know must be a mean
                with torch.no_grad():
                    point = tuple(t[0] for t in flat_to_tree(theta[None], shapes))
                    probe_mean(spec, call_model(model, names, point, constants, inputs), targets, n_b)
            first = False

            def loss(flat: Tensor, inputs=inputs, targets=targets) -> Tensor:
                params = tuple(t[0] for t in flat_to_tree(flat[None], shapes))
                return spec(call_model(model, names, params, constants, inputs), targets)

            yield spec.batch_weight(targets, n_b), n_b, loss

    total, examples, result = 0.0, 0, torch.zeros(theta.numel(), theta.numel(), dtype=dtype, device=theta.device)
    for weight, n_b, loss in batches():
        examples += n_b
        if weight == 0:
            continue
        with differentiable_kernels(), _written_out.written_out(model):  # no double backward, or a wrong one
            result += (weight if spec.mean else 1.0) * _double_backward(loss, theta, chunk_size or theta.numel())
        total += weight
    if examples == 0:
        raise EmptyDataError(EmptyDataError.NO_EXAMPLES)
    check_counted(total, examples)
    result = result / total if spec.mean else result
    if witness and first_order.enabled():
        _check(result, lambda point: _dataset_gradient(batches, spec.mean, point), theta, model)
    return result


def _dataset_gradient(batches: Callable, mean: bool, point: Tensor) -> Tensor:
    r""":math:`\nabla L` at the flat ``point``: first-order gradients of the batch losses, weighted as the dataset
    loss weights them."""
    total, gradient = 0.0, torch.zeros_like(point)
    for weight, _, loss in batches():
        if weight == 0:
            continue
        with differentiable_kernels(), torch.enable_grad():
            flat = point.detach().requires_grad_()
            (g,) = torch.autograd.grad(loss(flat), flat, allow_unused=True, materialize_grads=True)
        gradient += (weight if mean else 1.0) * g
        total += weight
    return gradient / total if mean else gradient


def _check(result: Tensor, gradient: Callable[[Tensor], Tensor], theta: Tensor, model: nn.Module) -> None:
    """Refuse ``result`` when :math:`Hd` disagrees with the first-order witness (hessops/operators/witness.py)."""
    d = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = (d / d.norm()).to(theta)
    step = torch.finfo(theta.dtype).eps ** (1 / 3) * max(float(theta.norm()), 1.0)
    one, two = (first_order.central(lambda s: gradient(theta + s * d), h) for h in (step, 2 * step))
    error, allowed, _ = first_order.agreement(result @ d, one, two, tolerance(theta.dtype))
    if error > allowed:
        raise WitnessError(
            f"dense_hessian's matrix is {error:.2g} off central finite differences of the gradient (tolerance "
            f"{allowed:.1g}): torch's second derivatives are wrong through some layer of this model"
            f"{first_order.suspects(model)}. Write "
            "that layer out in plain operations; witness=False skips this check at the risk of a wrong matrix"
        )


def _double_backward(loss: Callable[[Tensor], Tensor], theta: Tensor, chunk_size: int) -> Tensor:
    """The ``(n, n)`` Hessian of ``loss`` at ``theta``: rows ``e_i^T ∇²loss`` by ``torch.autograd.grad`` of
    the gradient, ``chunk_size`` rows at a time, attention in kernels with a double backward."""
    n = theta.numel()
    with differentiable_kernels(), torch.enable_grad():
        flat = theta.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(loss(flat), flat, create_graph=True)
        if not gradient.requires_grad:  # the loss is linear in theta
            return torch.zeros(n, n, dtype=theta.dtype, device=theta.device)
        rows = []
        for start in range(0, n, chunk_size):
            basis = torch.eye(n, dtype=theta.dtype, device=theta.device)[start : start + chunk_size]
            last = start + chunk_size >= n
            (block,) = torch.autograd.grad(gradient, flat, basis, retain_graph=not last, is_grads_batched=True)
            rows.append(block.detach())
    return torch.cat(rows)
