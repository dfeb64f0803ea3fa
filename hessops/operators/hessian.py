"""The exact Hessian of the dataset mean loss."""

from __future__ import annotations

import time
import weakref
from typing import Callable

import cola
import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from hessops._functional import ParamTree, call_model
from hessops.operators._base import CurvatureOperator

HVP_MODES = ("auto", "autograd", "autograd-loop", "forward-over-reverse", "reverse-over-forward", "reverse-over-reverse")
# What "auto" times on the first batch, for single vectors and for blocks of columns.
CANDIDATES = {
    "single": ("autograd", "reverse-over-forward", "forward-over-reverse"),
    "block": ("autograd", "autograd-loop", "reverse-over-reverse", "forward-over-reverse"),
}
# The fastest mode found for a workload: model -> {(device, dtype, parameter names, single/block): mode}. Held
# weakly, so that a model's choice dies with it (an id() key would pass it on to a later model at the same address).
_TUNED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = weakref.WeakKeyDictionary()


class Hessian(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the dataset mean loss
    :math:`L(\theta) = \frac1N \sum_n \ell(f(x_n;\theta), y_n)`, as a ``SelfAdjoint`` CoLA operator.

    It is symmetric but in general indefinite. Products are computed batch by batch, each block of
    ``chunk_size`` columns at once, in one of these exact formulations (``hvp_mode``):

    - ``"autograd"``: double backward with ``torch.autograd.grad`` — the gradient's graph is built once per
      batch and differentiated again for all columns (``is_grads_batched``); freed before the next batch;
    - ``"autograd-loop"``: the same graph, differentiated once per column (wins where the device is busy with
      one column already, e.g. a ResNet on a few CPU cores);
    - ``"forward-over-reverse"``: ``vmap(jvp(grad(L_b)))``; where torch cannot run it (in torch 2.14 it raises
      "ZeroTensors are immutable" for ``nn.MSELoss``) it falls back to reverse-over-forward by itself;
    - ``"reverse-over-forward"``: ``vmap(grad(v ↦ jvp(L_b)·v))``;
    - ``"reverse-over-reverse"``: ``vmap`` over the ``vjp`` of ``grad(L_b)``;
    - ``"auto"`` (default): the first product of each kind (one column, or a block) runs the candidates
      on its first batch and first ``chunk_size`` columns (a warm-up, then the best of three timed runs; one
      timed run for those over a second), and keeps the fastest for this model, device and dtype. Which wins depends on the
      model and the device (benchmarks/RESULTS.md); all agree to rounding.

    See :class:`CurvatureOperator` for the other arguments.
    """

    def __init__(self, model, loss_fn, data, *, hvp_mode: str = "auto", **kwargs):
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r}: choose one of {HVP_MODES}")
        super().__init__(model, loss_fn, data, **kwargs)
        self.hvp_mode = hvp_mode
        self.annotations = self.annotations | {cola.SelfAdjoint}

    def _batch_matmat(self, params, constants, inputs, targets, blocks, index, part=0):
        problem = self.problem
        randomness = "same" if problem.allow_train_mode else "error"

        def batch_loss(p: ParamTree) -> tuple[Tensor, Tensor]:
            loss = problem.loss_fn(call_model(problem.model, problem.names, p, constants, inputs), targets)
            if loss.dim() != 0:
                raise _not_scalar(loss)
            return loss, loss

        if self.hvp_mode != "auto":
            return _run(self.hvp_mode, problem, batch_loss, params, blocks, randomness)
        kind = "single" if all(block[0].shape[0] == 1 for block in blocks) else "block"
        key = (str(self.device), self.dtype, problem.names, kind)
        tuned = _TUNED.setdefault(problem.model, {})
        if key in tuned:
            return _run(tuned[key], problem, batch_loss, params, blocks, randomness)
        timings, outcomes = {}, {}
        first = blocks[:1]  # candidates are timed on the first block of columns only
        for round_ in range(4):
            # Round 0 pays each formulation's first-call costs; round 1 times every candidate; rounds 2-3
            # time again those under a second, where noise matters (the minimum counts).
            for mode in CANDIDATES[kind]:
                if round_ and mode not in timings or round_ > 1 and timings[mode] > 1.0:
                    continue
                _synchronize(self.device)
                began = time.perf_counter()
                try:
                    outcome = _run(mode, problem, batch_loss, params, first, randomness)
                except RuntimeError as error:
                    if isinstance(error.__context__, KeyboardInterrupt) or "KeyboardInterrupt" in str(error):
                        raise KeyboardInterrupt from error  # Ctrl-C inside torch, wrapped: not a failed candidate
                    continue  # a formulation torch cannot run on this model: not a candidate
                _synchronize(self.device)
                elapsed = time.perf_counter() - began
                timings[mode] = elapsed if round_ < 2 else min(timings[mode], elapsed)
                outcomes[mode] = outcome
        if not timings:
            raise RuntimeError("no Hessian-vector product formulation ran on this model; pass hvp_mode= to see why")
        tuned[key] = best = min(timings, key=timings.get)
        products, loss = outcomes[best]  # the winner's own result: later products repeat it bit for bit
        if len(blocks) > 1:
            products = products + _run(best, problem, batch_loss, params, blocks[1:], randomness)[0]
        return products, loss


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(mode: str, problem, batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str):
    if mode in ("autograd", "autograd-loop"):
        return _autograd(batch_loss, params, blocks, batched=mode == "autograd")
    if mode == "forward-over-reverse" and problem.memo.get("forward_fails"):
        mode = "reverse-over-forward"
    if mode == "forward-over-reverse":
        try:
            return _forward_over_reverse(batch_loss, params, blocks, randomness)
        except RuntimeError as error:
            if "ZeroTensor" not in str(error):
                raise
            problem.memo["forward_fails"] = True
            mode = "reverse-over-forward"
    if mode == "reverse-over-forward":
        return _reverse_over_forward(batch_loss, params, blocks, randomness)
    return _reverse_over_reverse(batch_loss, params, blocks, randomness)


def _autograd(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], batched: bool = True):
    """Double backward: one graph of the gradient per batch, differentiated for every column (all columns of
    a block at once when ``batched``, else one after the other)."""
    with torch.enable_grad():
        p = tuple(t.detach().requires_grad_() for t in params)
        loss, _ = batch_loss(p)
        g = torch.autograd.grad(loss, p, create_graph=True, allow_unused=True, materialize_grads=True)
        live = [i for i, gi in enumerate(g) if gi.requires_grad]  # a gradient constant in θ has zero Hessian rows
        products = []
        for b, block in enumerate(blocks):
            columns = block[0].shape[0]
            out = [torch.zeros_like(t) for t in block]
            if live:
                keep = b < len(blocks) - 1
                outputs = [g[i] for i in live]
                cotangents = [block[i] for i in live]
                if columns == 1 or not batched:
                    per_column = []
                    for c in range(columns):
                        last_column = c == columns - 1
                        per_column.append(torch.autograd.grad(
                            outputs, p, [t[c] for t in cotangents], retain_graph=keep or not last_column,
                            allow_unused=True, materialize_grads=True,
                        ))
                    hv = [torch.stack(parts) for parts in zip(*per_column)]
                else:
                    hv = torch.autograd.grad(outputs, p, cotangents, retain_graph=keep, allow_unused=True, materialize_grads=True, is_grads_batched=True)
                out = [h.detach() for h in hv]
            products.append(tuple(out))
    return products, loss.detach()


def _not_scalar(loss: Tensor) -> Exception:
    from hessops.errors import UnsupportedLossError

    return UnsupportedLossError(
        f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar: it must return the batch mean "
        "(reduction='mean')"
    )


def _forward_over_reverse(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str):
    gradient = grad(batch_loss, has_aux=True)

    def hvp(v: ParamTree):
        _, product, loss = jvp(gradient, (params,), (v,), has_aux=True)
        return product, loss

    return _map_blocks(hvp, blocks, randomness)


def _reverse_over_forward(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str):
    def directional(p: ParamTree, v: ParamTree):
        _, derivative, loss = jvp(batch_loss, (p,), (v,), has_aux=True)
        return derivative, loss

    def hvp(v: ParamTree):
        return grad(directional, has_aux=True)(params, v)

    return _map_blocks(hvp, blocks, randomness)


def _map_blocks(hvp: Callable, blocks: list[ParamTree], randomness: str):
    """``vmap(hvp)`` over each block of columns; ``hvp(v)`` returns ``(Hv, loss)``."""
    products, loss = [], None
    for block in blocks:
        product, losses = vmap(hvp, randomness=randomness)(block)
        products.append(product)
        loss = losses[0] if loss is None else loss
    return products, loss


def _reverse_over_reverse(batch_loss: Callable, params: ParamTree, blocks: list[ParamTree], randomness: str):
    _, vjp_fn, loss = vjp(grad(batch_loss, has_aux=True), params, has_aux=True)
    products = [vmap(vjp_fn, randomness=randomness)(block)[0] for block in blocks]
    return products, loss
