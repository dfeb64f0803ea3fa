"""Shared machinery of the operators of the form Jᵀ M J (GGN, Fishers): not public API."""

from __future__ import annotations

from typing import Any, Callable

import cola
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from hessops._functional import ParamTree, call_model
from hessops.operators._base import CurvatureOperator

OutputMatmat = Callable[[Tensor], Tensor]


class JacobianSandwich(CurvatureOperator):
    r"""A PSD operator :math:`\frac1N \sum_n J_n^\top M_n J_n`, with :math:`J_n = \partial f(x_n;\theta)/\partial\theta`
    and :math:`M_n` a PSD matrix in output space that each subclass defines (:meth:`_output_operator`).

    Per batch: one forward with its ``vjp``; for each block of columns a ``vmap``'d ``jvp`` (:math:`U = JV`),
    the output-space product :math:`W = MU`, and a ``vmap``'d ``vjp`` (:math:`J^\top W`). No per-example
    gradient is ever stored. The model must return a single tensor.
    """

    def __init__(self, model: nn.Module, loss_fn, data, **kwargs):
        super().__init__(model, loss_fn, data, **kwargs)
        self.output_model = model
        self.output_loss = loss_fn
        self.annotations = self.annotations | {cola.PSD}

    def _output_operator(self, outputs: Tensor, targets: Any, index: int, part: int = 0) -> OutputMatmat:
        """``U ↦ M U`` for a block ``U`` of shape ``(c, *outputs.shape)``, where ``M`` belongs to the batch-mean
        loss (so ``M`` of example ``n`` enters as ``M_n / n_b``); ``part`` numbers the micro-batches of batch
        ``index``."""
        raise NotImplementedError

    def _batch_matmat(self, params, constants, inputs, targets, blocks, index, part=0):
        problem = self.problem
        randomness = "same" if problem.allow_train_mode else "error"

        def forward(p: ParamTree) -> Tensor:
            outputs = call_model(self.output_model, problem.names, p, constants, inputs)
            if not isinstance(outputs, Tensor):
                raise TypeError(
                    f"{type(self).__name__} needs a model that returns one tensor, got {type(outputs).__name__}"
                )
            return outputs

        outputs, pullback = vjp(forward, params)
        loss = self.output_loss(outputs, targets)
        output_matmat = self._output_operator(outputs, targets, index, part)
        products = []
        for block in blocks:
            jv = vmap(lambda v: jvp(forward, (params,), (v,))[1], randomness=randomness)(block)
            products.append(vmap(pullback, randomness=randomness)(output_matmat(jv))[0])
        return products, loss

