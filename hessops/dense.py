"""The exact dense Hessian of a small model, as a reference independent of the operators' code path."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import jacrev

from hessops._functional import (
    batch_size,
    call_model,
    cast_floating,
    check_loss,
    check_train_mode,
    first_batch,
    flat_to_tree,
    select_parameters,
    split_batch,
)
from hessops.errors import EmptyDataError


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Iterable,
    *,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = 256,
) -> Tensor:
    r"""The ``(n, n)`` Hessian of the dataset mean loss :math:`\frac1N\sum_n \ell_n`, accumulated batch by
    batch as :math:`\sum_b \frac{n_b}N \nabla^2 L_b` with ``jacrev(jacrev(L_b))`` (``chunk_size`` rows at a
    time). Same parameter order as the operators. Memory ``n²``: for models up to a few thousand parameters."""
    check_train_mode(model, False)
    check_loss(loss_fn)
    first_batch(data)
    names, tensors = select_parameters(model, params)
    dtype = tensors[0].dtype if dtype is None else dtype
    shapes = [p.shape for p in tensors]
    theta = torch.cat([p.detach().reshape(-1) for p in tensors]).to(dtype)
    constants = cast_floating(dict(model.named_buffers()), dtype)
    constants.update({k: p.detach().to(dtype) for k, p in model.named_parameters() if k not in names})

    total, result = 0, torch.zeros(theta.numel(), theta.numel(), dtype=dtype, device=theta.device)
    for index, batch in enumerate(data):
        inputs, targets = split_batch(batch, index)
        n_b = batch_size(inputs, index)
        if n_b == 0:
            continue
        inputs, targets = cast_floating(inputs, dtype), cast_floating(targets, dtype)

        def loss(flat: Tensor, inputs=inputs, targets=targets) -> Tensor:
            params = tuple(t[0] for t in flat_to_tree(flat[None], shapes))
            return loss_fn(call_model(model, names, params, constants, inputs), targets)

        result += n_b * jacrev(jacrev(loss), chunk_size=chunk_size)(theta)
        total += n_b
    if total == 0:
        raise EmptyDataError(EmptyDataError.NO_EXAMPLES)
    return result / total
