"""The exact Hessian of the dataset mean loss."""

from __future__ import annotations

from typing import Any, Callable

import cola
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from hessops._functional import ParamTree, call_model
from hessops.operators._base import CurvatureOperator

HVP_MODES = ("forward-over-reverse", "reverse-over-forward", "reverse-over-reverse")


class Hessian(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the dataset mean loss
    :math:`L(\theta) = \frac1N \sum_n \ell(f(x_n;\theta), y_n)`, as a ``SelfAdjoint`` CoLA operator.

    It is symmetric but in general indefinite. Products are computed batch by batch with ``torch.func``
    (``hvp_mode``):

    - ``"forward-over-reverse"`` (default): ``jvp(grad(L_b))``; where torch cannot (in torch 2.14 it raises
      "ZeroTensors are immutable" for ``nn.MSELoss``), it falls back to reverse-over-forward by itself;
    - ``"reverse-over-forward"``: ``grad(v ↦ jvp(L_b)·v)``;
    - ``"reverse-over-reverse"``: the gradient's ``vjp``, one forward and backward shared by all columns.

    Each block of ``chunk_size`` columns is vectorized with ``vmap``. See :class:`CurvatureOperator` for the
    other arguments.
    """

    def __init__(self, model, loss_fn, data, *, hvp_mode: str = "forward-over-reverse", **kwargs):
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r}: choose one of {HVP_MODES}")
        super().__init__(model, loss_fn, data, **kwargs)
        self.hvp_mode = hvp_mode
        self.annotations = self.annotations | {cola.SelfAdjoint}

    def _batch_matmat(self, params, constants, inputs, targets, blocks, index):
        problem = self.problem
        randomness = "same" if problem.allow_train_mode else "error"

        def batch_loss(p: ParamTree) -> tuple[Tensor, Tensor]:
            loss = problem.loss_fn(call_model(problem.model, problem.names, p, constants, inputs), targets)
            if loss.dim() != 0:
                raise _not_scalar(loss)
            return loss, loss

        mode = problem.memo.get("hvp_mode", self.hvp_mode)
        if mode == "forward-over-reverse":
            try:
                return _forward_over_reverse(batch_loss, params, blocks, randomness)
            except RuntimeError as error:
                if "ZeroTensor" not in str(error):
                    raise
                problem.memo["hvp_mode"] = mode = "reverse-over-forward"
        if mode == "reverse-over-forward":
            return _reverse_over_forward(batch_loss, params, blocks, randomness)
        return _reverse_over_reverse(batch_loss, params, blocks, randomness)


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
