"""The generalized Gauss-Newton matrix."""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from hessops.errors import UnsupportedLossError
from hessops.operators._jacobian import JacobianSandwich


class GGN(JacobianSandwich):
    r"""The generalized Gauss-Newton matrix :math:`G = \frac1N \sum_n J_n^\top \, \nabla_f^2 \ell(f_n, y_n) \, J_n`
    of the dataset mean loss, as a ``PSD`` CoLA operator (PSD whenever the loss is convex in the model's
    outputs, as cross-entropy, MSE and BCE are).

    :math:`J_n` is the Jacobian of the model's output for example :math:`n`; the output Hessian
    :math:`\nabla_f^2\ell` (cross-entropy: :math:`\mathrm{diag}(p) - pp^\top`; MSE with mean over :math:`d`
    outputs: :math:`\tfrac2d I`) is applied exactly by automatic differentiation of ``loss_fn``, so any
    loss works. It equals the Hessian when the model is linear in :math:`\theta`.

    The split between model and loss matters: ``nn.NLLLoss`` is linear in log-probabilities, so its GGN
    would be zero. A ``nn.Sequential`` that ends in ``nn.LogSoftmax`` with ``nn.NLLLoss`` is therefore
    split before the ``LogSoftmax`` (logits and cross-entropy: the same loss); any other ``NLLLoss`` model
    is refused. Arguments as for :class:`hessops.Hessian`.
    """

    def __init__(self, model: nn.Module, loss_fn, data, **kwargs):
        super().__init__(model, loss_fn, data, **kwargs)
        if isinstance(loss_fn, nn.NLLLoss):
            tail = model[-1] if isinstance(model, nn.Sequential) and len(model) > 1 else None
            if not (isinstance(tail, nn.LogSoftmax) and tail.dim in (1, -1)):
                raise UnsupportedLossError(
                    "NLLLoss is linear in the model's log-probabilities, so the GGN at that split is zero: return "
                    "logits and use nn.CrossEntropyLoss (the same loss), or use an nn.Sequential ending in "
                    "nn.LogSoftmax(dim=1), which hessops splits before the LogSoftmax"
                )
            self.output_model = model[:-1]
            self.output_loss = nn.CrossEntropyLoss(ignore_index=loss_fn.ignore_index)

    def _output_operator(self, outputs: Tensor, targets, index: int, part: int = 0):
        loss_fn = self.output_loss
        _, hessian_vjp = vjp(grad(lambda o: loss_fn(o, targets)), outputs)
        return lambda u: vmap(hessian_vjp)(u)[0]
