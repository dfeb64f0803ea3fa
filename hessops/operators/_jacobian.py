"""Shared machinery of the operators of the form Jᵀ M J (GGN, Fishers): not public API."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vmap

from hessops._cola import cola
from hessops.errors import InvalidArgumentError
from hessops.operators import witness as first_order
from hessops.operators._autograd import block_vjp
from hessops.operators._base import Batch, CurvatureOperator
from hessops.operators.functional import ParamTree, differentiable_kernels

OutputMatmat = Callable[[Tensor], Tensor]


class JacobianSandwich(CurvatureOperator):
    r"""A PSD operator :math:`\frac1W \sum_b W_b J_b^\top M_b J_b` (``reduction="mean"``;
    :math:`\sum_b J_b^\top M_b J_b` for ``"sum"``), with :math:`J_b` the Jacobian of batch :math:`b`'s outputs
    and :math:`M_b` a PSD matrix in output space that each subclass defines (:meth:`_output_operator`);
    :math:`W_b` as in :class:`CurvatureOperator`.

    Per batch: one forward with its autograd graph; for each block of columns a ``vmap``'d ``jvp``
    (:math:`U = JV`), the output-space product :math:`W = MU`, and a batched backward (:math:`J^\top W`). No per-example
    gradient is ever stored. The model must return a single tensor.
    """

    def _setup(self) -> None:
        self.output_model = self.problem.model
        self.output_loss = self.problem.loss_fn  # a hessops.operators.losses.LossSpec
        self.annotations = self.annotations | {cola.PSD}

    def _output_operator(self, outputs: Tensor, batch: Batch) -> OutputMatmat:
        """``U ↦ M_b U`` for a block ``U`` of shape ``(c, *outputs.shape)``, where ``M_b`` belongs to the batch
        loss as the loss reduces it (a mean: the data loop multiplies by :math:`W_b`)."""
        raise NotImplementedError

    def _first_order(self, probe, batch: Batch, direction: ParamTree, step: float) -> Tensor:
        r""":math:`J^\top M \tilde u`, :math:`\tilde u = (f(\theta + hd) - f(\theta - hd)) / 2h` the central
        difference of the outputs (:math:`h = \mathrm{step} \cdot \max(\lVert\theta\rVert, 1)`), :math:`M` as
        :meth:`_output_witness` applies it, :math:`J^\top` one first-order backward."""
        h = step * max(first_order.tree_norm(batch.params), 1.0)
        model, at = self.output_model, lambda s: first_order.shifted(batch.params, direction, s)
        u = first_order.central(lambda s: probe.outputs(batch, at(s), model), h)
        outputs = probe.linearized(batch, model)
        return probe.pullback(self._output_witness(probe, batch, outputs, u, step))

    def _output_witness(self, probe, batch: Batch, outputs: Tensor, u: Tensor, step: float) -> Tensor:
        """:math:`M_b u` for the witness, from first derivatives only: the subclass's own output-space matrix,
        which for the Fishers is built from the loss's first derivatives."""
        return self._output_operator(outputs, batch)(u.unsqueeze(0))[0]

    def _matmat_batch(self, batch: Batch, blocks: list[ParamTree]) -> tuple[list[ParamTree], Tensor]:
        randomness = "same" if self.problem.allow_train_mode else "error"

        def forward(p: ParamTree) -> Tensor:
            outputs = batch.outputs(p, self.output_model)
            if not isinstance(outputs, Tensor):
                raise InvalidArgumentError(
                    f"{type(self).__name__} needs a model that returns one tensor, got {type(outputs).__name__}"
                )
            return outputs

        with differentiable_kernels(), torch.enable_grad():  # attention's fused kernels: no forward-mode rule
            params = tuple(t.detach().requires_grad_() for t in batch.params)
            outputs = forward(params)
            loss = self.output_loss(outputs.detach(), batch.targets)
            output_matmat = self._output_operator(outputs.detach(), batch)
            products = []
            for b, block in enumerate(blocks):
                jv = vmap(lambda v: jvp(forward, (batch.params,), (v,))[1], randomness=randomness)(block)
                products.append(
                    tuple(block_vjp([outputs], params, [output_matmat(jv)], retain_graph=b < len(blocks) - 1))
                )
        return products, loss
