"""The generalized Gauss-Newton matrix."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from hessops.errors import UnsupportedLossError
from hessops.operators import softmax_head
from hessops.operators import witness as first_order
from hessops.operators._autograd import block_vjp, gradient
from hessops.operators._base import Batch
from hessops.operators._jacobian import JacobianSandwich


class GGN(JacobianSandwich):
    r"""The generalized Gauss-Newton matrix :math:`G = \frac1W \sum_b W_b\, J_b^\top \, \nabla_f^2 L_b \, J_b` of
    the dataset mean loss (:math:`\sum_b J_b^\top \nabla_f^2 L_b J_b` for ``reduction="sum"``), as a ``PSD``
    CoLA operator (PSD whenever the loss is convex in the model's outputs, as cross-entropy, MSE and BCE are).
    For a plain per-example mean this is :math:`\frac1N \sum_n J_n^\top \nabla_f^2 \ell_n J_n`; with ignored
    targets or class weights :math:`w_n`, :math:`\frac1W \sum_n w_n J_n^\top \nabla_f^2 \ell_n J_n` over the
    counted targets (:mod:`hessops.operators.losses`).

    :math:`J_b` is the Jacobian of the model's outputs on batch :math:`b`; the output Hessian
    :math:`\nabla_f^2 L_b` (cross-entropy: :math:`\mathrm{diag}(p) - pp^\top` per target, label smoothing
    included; MSE with mean over :math:`d` outputs: :math:`\tfrac2d I`; L1: 0) is applied exactly by
    automatic differentiation of ``loss_fn``. It equals the Hessian when the model is linear in :math:`\theta`.

    The split between model and loss matters: the NLL (``nn.NLLLoss``, ``F.nll_loss`` or a ``partial`` of
    it) is linear in log-probabilities, so its GGN would be zero. A ``nn.Sequential`` that ends in
    ``nn.LogSoftmax`` with an NLL loss is therefore split before the ``LogSoftmax`` (logits and
    cross-entropy with the same ``ignore_index``, ``weight`` and reduction: the same loss); any other NLL
    model is refused, as is ``KLDivLoss`` (linear in its input too), and a loss hessops does not know (a
    ``lambda``) whose Hessian with respect to the outputs is zero on the first batch. The keyword arguments are
    :class:`~hessops.CurvatureOperator`'s.

    Args:
        model: as in :class:`~hessops.CurvatureOperator` (its outputs are :math:`f`).
        loss_fn: as in :class:`~hessops.CurvatureOperator`.
        data: as in :class:`~hessops.CurvatureOperator`.

    Raises:
        UnsupportedLossError: an NLL loss without a trailing ``LogSoftmax``, ``KLDivLoss``, or a callable linear
            in the outputs; and the other refusals of :class:`~hessops.CurvatureOperator`.
    """

    name = "ggn"  # its key in hessops.constants.OPERATOR_CLASSES

    def _setup(self) -> None:
        super()._setup()
        model, spec = self.problem.model, self.problem.loss_fn
        if spec.kind == "kl_div":
            raise UnsupportedLossError(
                f"{spec.name} is linear in the model's log-probabilities, so the GGN at that split is zero: return "
                "logits and use nn.CrossEntropyLoss with probability targets (the same curvature)"
            )
        if spec.kind == "nll":
            tail = model[-1] if isinstance(model, nn.Sequential) and len(model) > 1 else None
            if not (isinstance(tail, nn.LogSoftmax) and tail.dim in (1, -1)):
                raise UnsupportedLossError(
                    f"{spec.name} is linear in the model's log-probabilities, so the GGN at that split is zero: "
                    "return logits and use nn.CrossEntropyLoss (the same loss), or use an nn.Sequential ending in "
                    "nn.LogSoftmax(dim=1), which hessops splits before the LogSoftmax"
                )
            self.output_model = model[:-1]
            self.output_loss = spec.as_cross_entropy()

    def _output_witness(self, probe, batch: Batch, outputs: Tensor, u: Tensor, step: float) -> Tensor:
        r"""The central difference of the loss's output gradient along ``u``,
        :math:`(\nabla_f L_b(f + \eta u) - \nabla_f L_b(f - \eta u)) / 2\eta` with
        :math:`\eta = \mathrm{step} \cdot \max(\lVert f\rVert, 1) / \lVert u\rVert`: no second derivative."""
        size = float(u.norm())
        if size == 0.0:
            return torch.zeros_like(u)
        eta = step * max(float(outputs.norm()), 1.0) / size

        def output_gradient(s: float) -> Tensor:
            with torch.enable_grad():
                o = (outputs + s * u).detach().requires_grad_()
                return gradient(self.output_loss(o, batch.targets), [o])[0]

        return first_order.central(output_gradient, eta)

    @property
    def softmax_head(self) -> softmax_head.HeadCheck | None:
        """The first-use check of the closed-form softmax cross-entropy output matrix
        (hessops/operators/softmax_head.py): ``None`` before the first product or for a loss it does not write
        out; one that failed it is not used."""
        return self.problem.memo.get("softmax_head")

    def _output_operator(self, outputs: Tensor, batch: Batch):
        loss_fn, targets = self.output_loss, batch.targets
        refused = self.softmax_head is not None and not self.softmax_head.passed
        wanted = softmax_head.applies(loss_fn) and not refused  # a refused head's coefficients are not computed
        closed = softmax_head.output_hessian(loss_fn, outputs, targets) if wanted else None
        if closed is not None:
            if self.softmax_head is None:
                found = self._check_head(closed, outputs, batch)
                if found is not None:  # None: this batch decides nothing (the next one is tried)
                    self.problem.memo["softmax_head"] = found
            if self.softmax_head is not None and self.softmax_head.passed:
                return closed
        return self._plain_output_operator(outputs, batch)

    def _check_head(
        self, closed: Callable[[Tensor], Tensor], outputs: Tensor, batch: Batch
    ) -> softmax_head.HeadCheck | None:
        """The closed form against double backward of the loss along a random output direction of this batch (one
        column: a block would import sympy on a first product, hessops/operators/_autograd.py)."""
        generator = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn((1, *outputs.shape), generator=generator, dtype=outputs.dtype).to(outputs.device)
        return softmax_head.check(
            lambda: [(self._plain_output_operator(outputs, batch)(u),)],
            lambda: [(closed(u),)],
            outputs.dtype,
            examples=batch.size,
            columns=1,
        )

    def _plain_output_operator(self, outputs: Tensor, batch: Batch):
        """``U ↦ ∇²_f L_b U`` by double backward of the loss with respect to the outputs."""
        loss_fn, targets = self.output_loss, batch.targets
        with torch.enable_grad():
            o = outputs.detach().requires_grad_()
            (g,) = gradient(loss_fn(o, targets), [o], create_graph=True)

        def matmat(u: Tensor) -> Tensor:
            with torch.enable_grad():
                return block_vjp([g], [o], [u], retain_graph=True)[0].detach()

        if loss_fn.kind is None and "ggn_loss_is_curved" not in self.problem.memo:
            _refuse_a_linear_loss(matmat, o, loss_fn.name)
            self.problem.memo["ggn_loss_is_curved"] = True
        return matmat


def _refuse_a_linear_loss(matmat: Callable[[Tensor], Tensor], outputs: Tensor, name: str) -> None:
    """Refuse a loss that hessops does not know whose Hessian with respect to the model's outputs is zero on
    the first batch (applied to a random direction, it gives exactly zero), as a ``lambda o, t: F.nll_loss(o,
    t)`` after a ``LogSoftmax`` is: the GGN of such a loss is the zero matrix.

    Args:
        matmat: the batch's output-space product ``U ↦ ∇²_f L U``.
        outputs: the batch's outputs.
        name: the loss's name, for the message.

    Raises:
        UnsupportedLossError: the product is zero."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    direction = torch.randn((1, *outputs.shape), generator=generator, dtype=outputs.dtype).to(outputs.device)
    if bool((matmat(direction) == 0).all()):
        raise UnsupportedLossError(
            f"{name} is linear in the model's outputs on the first batch (its Hessian with respect to them is zero, "
            "as the NLL of log-probabilities is), so the GGN at that split is the zero matrix: move the LogSoftmax "
            "into the loss (return logits and use nn.CrossEntropyLoss, the same loss), or split the model before "
            "the LogSoftmax (an nn.Sequential ending in nn.LogSoftmax(dim=1) with nn.NLLLoss or F.nll_loss "
            "itself, which hessops splits there); for a piecewise-linear loss, use hessops.Hessian"
        )
