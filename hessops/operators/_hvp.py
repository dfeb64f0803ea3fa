"""The exact Hessian-vector product formulations, as pure functions of one mini-batch's loss.

Each takes ``batch_loss(p) -> (loss, loss)`` (the batch-mean loss at parameters ``p``, twice: value and aux),
the parameters ``params`` (a tuple of tensors) and ``blocks`` (a list of tuples of ``(c, *shape)`` tensors,
``c`` columns each), and returns ``([H_b V for each block], loss)``. All are exact; which is fastest depends
on the model and the device. ``reverse-over-forward`` is wrong through some layers in torch 2.14
(:data:`KNOWN_WRONG`; docs/torch-pitfalls.md), so hessops validates every formulation but ``autograd``
before trusting it (hessops/operators/hvp_tuning.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from hessops.constants import HVP_MODES
from hessops.operators._autograd import block_vjp, column_vjp
from hessops.operators.functional import differentiable_kernels

ParamTree = tuple[Tensor, ...]

REFERENCE = "autograd"  # plain double backward: what every other formulation is checked against
FORMULATIONS = HVP_MODES[1:]  # every hvp_mode but "auto"


def _batch_statistics(module: nn.Module) -> bool:
    """BatchNorm that normalizes by the batch's statistics (train mode, or no running statistics)."""
    return module.training or not module.track_running_stats


# Formulations measured wrong through a module type (torch 2.14.1, float64, relative error of H v against
# double backward on small models; docs/torch-pitfalls.md): reverse-over-forward is 11-42 % off through
# LayerNorm (affine or not), 43-100 % through InstanceNorm (affine or not), 11-66 % through BatchNorm using
# batch statistics. Measured right: GroupNorm, RMSNorm, eval-mode BatchNorm, attention (math kernel).
# Each entry: (module type, predicate on the module, what it is called in messages).
KNOWN_WRONG: dict[str, tuple[tuple[type, Callable[[nn.Module], bool], str], ...]] = {
    "reverse-over-forward": (
        (nn.LayerNorm, lambda m: True, "LayerNorm"),
        (nn.modules.instancenorm._InstanceNorm, lambda m: True, "InstanceNorm"),
        (nn.modules.batchnorm._BatchNorm, _batch_statistics, "BatchNorm with batch statistics"),
    ),
}

# Normalization layers: where a formulation that disagrees with double backward most likely goes wrong.
SUSPECT_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.batchnorm._BatchNorm,
)


def known_wrong_on(mode: str, model: nn.Module) -> list[str]:
    """``["name (LayerNorm)", ...]``: the modules of ``model`` through which ``mode`` is known to be wrong."""
    found = []
    for name, module in model.named_modules():
        for kind, applies, label in KNOWN_WRONG.get(mode, ()):
            if isinstance(module, kind) and applies(module):
                found.append(f"'{name or type(model).__name__}' ({label})")
    return found


def suspect_modules(model: nn.Module) -> list[str]:
    """The distinct types of normalization layer in ``model`` (empty when it has none)."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, SUSPECT_TYPES)})


def run(mode: str, batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str, memo: dict):
    """``mode``'s products ``[H_b V]`` and the batch loss. ``forward-over-reverse`` that torch cannot run
    ("ZeroTensors are immutable", e.g. ``nn.MSELoss`` in torch 2.14) falls back to double backward, which is
    right on every model, and ``memo["forward_fails"]`` remembers it."""
    if mode not in FORMULATIONS or mode in ("compiled", "finite-difference"):  # their own modules run those
        raise ValueError(f"_hvp.run has no formulation {mode!r}")
    with differentiable_kernels():
        if mode == "forward-over-reverse" and not memo.get("forward_fails"):
            try:
                return forward_over_reverse(batch_loss, params, blocks, randomness)
            except RuntimeError as error:
                if "ZeroTensor" not in str(error):
                    raise
                memo["forward_fails"] = True
        if mode in ("autograd", "autograd-loop", "forward-over-reverse"):
            return autograd(batch_loss, params, blocks, batched=mode != "autograd-loop")
        if mode == "reverse-over-forward":
            return reverse_over_forward(batch_loss, params, blocks, randomness)
        return reverse_over_reverse(batch_loss, params, blocks, randomness)


def autograd(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], batched: bool = True):
    """Double backward: one graph of the gradient per batch, differentiated for every column (all columns of
    a block at once with ``is_grads_batched`` when ``batched``, else one after the other, each as the gradient
    of ``<∇L_b, v>``)."""
    with torch.enable_grad():
        p = tuple(t.detach().requires_grad_() for t in params)
        loss, _ = batch_loss(p)
        g = torch.autograd.grad(loss, p, create_graph=True, allow_unused=True, materialize_grads=True)
        live = [i for i, gi in enumerate(g) if gi.requires_grad]  # a gradient constant in θ has zero Hessian rows
        products = []
        for b, block in enumerate(blocks):
            columns = block[0].shape[0]
            if not live:
                products.append(tuple(torch.zeros_like(t) for t in block))
                continue
            keep = b < len(blocks) - 1
            outputs = [g[i] for i in live]
            cotangents = [block[i] for i in live]
            if columns == 1:  # a view, not a stacked copy
                hv = [h.unsqueeze(0) for h in column_vjp(outputs, p, [t[0] for t in cotangents], retain_graph=keep)]
            elif not batched:
                per_column = [
                    column_vjp(outputs, p, [t[c] for t in cotangents], retain_graph=keep or c < columns - 1)
                    for c in range(columns)
                ]
                hv = [torch.stack(parts) for parts in zip(*per_column)]
            else:
                hv = block_vjp(outputs, p, cotangents, retain_graph=keep)
            products.append(tuple(h.detach() for h in hv))
    return products, loss.detach()


def forward_over_reverse(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str):
    """``vmap(v ↦ jvp(grad(L_b), θ, v))``."""
    gradient = grad(batch_loss, has_aux=True)

    def hvp(v: ParamTree):
        _, product, loss = jvp(gradient, (params,), (v,), has_aux=True)
        return product, loss

    return _map_blocks(hvp, blocks, randomness)


def reverse_over_forward(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str):
    """``vmap(v ↦ grad(θ ↦ jvp(L_b, θ, v)))``: wrong through the layers in :data:`KNOWN_WRONG`."""

    def directional(p: ParamTree, v: ParamTree):
        _, derivative, loss = jvp(batch_loss, (p,), (v,), has_aux=True)
        return derivative, loss

    def hvp(v: ParamTree):
        return grad(directional, has_aux=True)(params, v)

    return _map_blocks(hvp, blocks, randomness)


def reverse_over_reverse(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str):
    """``vmap`` over the ``vjp`` of ``grad(L_b)``."""
    _, vjp_fn, loss = vjp(grad(batch_loss, has_aux=True), params, has_aux=True)
    products = [vmap(vjp_fn, randomness=randomness)(block)[0] for block in blocks]
    return products, loss


def _map_blocks(hvp: Callable, blocks: list[ParamTree], randomness: str):
    """``vmap(hvp)`` over each block of columns; ``hvp(v)`` returns ``(Hv, loss)``."""
    products, loss = [], None
    for block in blocks:
        product, losses = vmap(hvp, randomness=randomness)(block)
        products.append(product)
        loss = losses[0] if loss is None else loss
    return products, loss
