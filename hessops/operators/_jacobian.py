"""Shared machinery of the operators of the form Jᵀ M J (GGN, Fishers): not public API."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from hessops._cola import cola
from hessops._functional import ParamTree, call_model, differentiable_kernels
from hessops.operators._base import CurvatureOperator

OutputMatmat = Callable[[Tensor], Tensor]


class JacobianSandwich(CurvatureOperator):
    r"""A PSD operator :math:`\frac1W \sum_b W_b J_b^\top M_b J_b` (``reduction="mean"``; :math:`\sum_b J_b^\top M_b J_b`
    for ``"sum"``), with :math:`J_b` the Jacobian of batch :math:`b`'s outputs and :math:`M_b` a PSD matrix in
    output space that each subclass defines (:meth:`_output_operator`); :math:`W_b` as in
    :class:`CurvatureOperator`.

    Per batch: one forward with its ``vjp``; for each block of columns a ``vmap``'d ``jvp`` (:math:`U = JV`),
    the output-space product :math:`W = MU`, and a ``vmap``'d ``vjp`` (:math:`J^\top W`). No per-example
    gradient is ever stored. The model must return a single tensor.
    """

    def __init__(self, model: nn.Module, loss_fn, data, **kwargs):
        super().__init__(model, loss_fn, data, **kwargs)
        self.output_model = model
        self.output_loss = self.problem.loss_fn  # a hessops.losses.LossSpec
        self.annotations = self.annotations | {cola.PSD}

    def _output_operator(self, outputs: Tensor, targets: Any, index: int, part: int = 0) -> OutputMatmat:
        """``U ↦ M_b U`` for a block ``U`` of shape ``(c, *outputs.shape)``, where ``M_b`` belongs to the batch
        loss as the loss reduces it (a mean: the data loop multiplies by :math:`W_b`); ``part`` numbers the
        micro-batches of batch ``index``."""
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

        with differentiable_kernels():  # attention's fused kernels have no forward-mode derivative
            outputs, pullback = vjp(forward, params)
            loss = self.output_loss(outputs, targets)
            output_matmat = self._output_operator(outputs, targets, index, part)
            products = []
            for block in blocks:
                jv = vmap(lambda v: jvp(forward, (params,), (v,))[1], randomness=randomness)(block)
                products.append(vmap(pullback, randomness=randomness)(output_matmat(jv))[0])
        return products, loss

