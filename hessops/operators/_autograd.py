"""Vector-Jacobian products on an ordinary autograd graph, for blocks of cotangents: not public API.

Why not ``torch.func.vjp``/``grad``: in torch 2.14 their first call imports ``torch._dynamo`` (1.5-3 s on 2
CPU cores), and ``torch.autograd.grad`` with a tensor ``grad_outputs`` imports sympy (0.8 s) on its first
call, both once per process. A user's first product should not wait for either. A single column of a small
problem is therefore differentiated through the scalar ``<outputs, cotangent>`` (the same numbers to rounding:
the backward of the sum and the product seeds the graph with the cotangent itself, and adds the same terms,
in another order; tests/operators/test_hvp.py),
and only a block of several columns uses ``is_grads_batched``, where batching pays.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor


def block_vjp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], retain_graph: bool
) -> list[Tensor]:
    """``[Σ_o (∂o/∂x)ᵀ u_o for each input x]`` for every column of the block: ``cotangents[i]`` has shape
    ``(c, *outputs[i].shape)`` and each result ``(c, *x.shape)``, zeros where an input is unused."""
    columns = cotangents[0].shape[0]
    live = [(o, u) for o, u in zip(outputs, cotangents) if o.requires_grad]
    if not live:
        return [x.new_zeros((columns, *x.shape)) for x in inputs]
    if columns == 1:
        return [g.unsqueeze(0) for g in column_vjp([o for o, _ in live], inputs, [u[0] for _, u in live], retain_graph)]
    grads = torch.autograd.grad(
        [o for o, _ in live],
        list(inputs),
        [u for _, u in live],
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=True,
    )  # not materialize_grads: its zeros for unused inputs lack the batch dimension
    return [x.new_zeros((columns, *x.shape)) if g is None else g for g, x in zip(grads, inputs)]


# Above this many cotangent elements the scalar form is not used: its backward materializes one copy of the
# cotangent (the seed of each product's backward), 0.5 GB for GPT-2 small, against which sympy's one-off import
# is nothing. Also not once sympy is loaded (by torch, or by an earlier product): then it costs nothing.
SCALAR_FORM_MAX_ELEMENTS = 10_000_000
_SYMPY_USER = "torch.fx.experimental.symbolic_shapes"


def column_vjp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], retain_graph: bool
) -> list[Tensor]:
    """``[Σ_o (∂o/∂x)ᵀ u_o for each input x]`` for one column (``cotangents[i]`` shaped like ``outputs[i]``),
    as the gradient of the scalar ``Σ_o <o, u_o>`` on small problems (see the module's docstring), else with
    the cotangents as ``grad_outputs``: the same numbers to rounding either way; zeros where an input is unused."""
    pairs = [(o, u) for o, u in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    if _SYMPY_USER in sys.modules or sum(u.numel() for _, u in pairs) > SCALAR_FORM_MAX_ELEMENTS:
        return list(
            torch.autograd.grad(
                [o for o, _ in pairs],
                list(inputs),
                [u for _, u in pairs],
                retain_graph=retain_graph,
                allow_unused=True,
                materialize_grads=True,
            )
        )
    live = [(o * u).sum() for o, u in pairs]
    total = live[0] if len(live) == 1 else torch.stack(live).sum()
    return list(
        torch.autograd.grad(total, list(inputs), retain_graph=retain_graph, allow_unused=True, materialize_grads=True)
    )


def gradient(loss: Tensor, inputs: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    """``∇ loss`` for a scalar ``loss`` (no tensor ``grad_outputs``), zeros where an input is unused."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    return list(
        torch.autograd.grad(loss, list(inputs), create_graph=create_graph, allow_unused=True, materialize_grads=True)
    )
