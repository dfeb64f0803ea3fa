"""Fisher information matrices: empirical and Monte-Carlo."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from hessops.errors import UnsupportedLossError
from hessops.operators._jacobian import JacobianSandwich


def _output_gradients(loss_fn: Callable, outputs: Tensor, targets: Any) -> Tensor:
    """Per-example output gradients :math:`r_n = \\nabla_{f_n} \\ell(f_n, y_n)`, stacked like ``outputs``:
    the gradient of ``n_b · loss_fn`` (the batch sum) w.r.t. the outputs, for a loss that is a mean of
    per-example terms."""
    n_b = outputs.shape[0]
    return grad(lambda o: n_b * loss_fn(o, targets))(outputs)


def _outer_matmat(r: Tensor, n_b: int) -> Callable[[Tensor], Tensor]:
    """``U ↦ (1/(S·n_b)) Σ_s Σ_n r_sn (r_snᵀ u_n)`` for ``r`` of shape ``(S, n_b, *out)``."""
    samples = r.shape[0]

    def matmat(u: Tensor) -> Tensor:
        # u: (c, n_b, *out) -> coefficients (S, c, n_b)
        r_flat, u_flat = r.reshape(samples, n_b, -1), u.reshape(u.shape[0], n_b, -1)
        coefficients = torch.einsum("sno,cno->scn", r_flat, u_flat)
        w = torch.einsum("scn,sno->cno", coefficients, r_flat)
        return (w / (samples * n_b)).reshape(u.shape)

    return matmat


class EmpiricalFisher(JacobianSandwich):
    r"""The empirical Fisher :math:`F = \frac1N \sum_n g_n g_n^\top`, :math:`g_n = \nabla_\theta \ell(f(x_n;\theta), y_n)`,
    with the data's own labels, as a ``PSD`` CoLA operator.

    Computed as :math:`J^\top (r r^\top) J` with :math:`r_n = \nabla_f \ell_n` (no per-example parameter
    gradient is stored). ``loss_fn`` must be a mean of per-example terms (true of every standard loss).
    Arguments as for :class:`hessops.Hessian`.
    """

    def _output_operator(self, outputs: Tensor, targets, index: int, part: int = 0):
        r = _output_gradients(self.output_loss, outputs, targets)
        return _outer_matmat(r.unsqueeze(0), outputs.shape[0])


class MCFisher(JacobianSandwich):
    r"""The Monte-Carlo Fisher :math:`\hat F = \frac1{NS} \sum_n \sum_{s=1}^S \hat g_{ns} \hat g_{ns}^\top`,
    :math:`\hat g_{ns} = \nabla_\theta \ell(f(x_n;\theta), \hat y_{ns})`, with labels
    :math:`\hat y_{ns} \sim p(y \mid f(x_n;\theta))` sampled from the model, as a ``PSD`` CoLA operator.

    Its expectation is the true Fisher, which for these losses equals the GGN. The likelihood follows the
    loss: ``CrossEntropyLoss`` (categorical on softmax logits), ``NLLLoss`` (categorical on log-probabilities),
    ``BCEWithLogitsLoss`` (Bernoulli), ``MSELoss`` (Gaussian of variance :math:`d/2` for :math:`d` outputs per
    example, the variance at which the mean-reduced MSE is the negative log-likelihood). Their functional
    forms (``F.cross_entropy``, ...) work too. Where the loss also averages over :math:`d` elements of one
    example (BCE with several outputs, cross-entropy over pixels), :math:`\hat g \hat g^\top` is scaled by
    :math:`d`, so that the expectation is still the GGN.

    The labels of batch :math:`b` (micro-batch :math:`m`) are drawn from a generator seeded by ``(seed, rank, b, m)``, so the operator is a fixed
    matrix as long as the data come in a fixed order (``shuffle=False``). Other arguments as for
    :class:`hessops.Hessian`.
    """

    def __init__(self, model: nn.Module, loss_fn, data, *, samples: int = 1, seed: int = 0, **kwargs):
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        self._sampler_for(loss_fn)
        super().__init__(model, loss_fn, data, **kwargs)
        self.samples = samples
        self.seed = seed

    @staticmethod
    def _sampler_for(loss_fn: Callable) -> Callable[[Tensor, int, torch.Generator], tuple[Tensor, float]]:
        """``(outputs, S, generator) -> (labels (S, *targets.shape), scale)``. ``scale`` undoes the mean over the
        ``d`` elements of one example that the loss takes (the per-example loss is then ``NLL / d``, whose
        expected gradient outer product is ``1/d`` times its Hessian)."""
        if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
            if getattr(loss_fn, "label_smoothing", 0.0):
                raise UnsupportedLossError(
                    "CrossEntropyLoss with label_smoothing is not the negative log-likelihood of a distribution "
                    "over labels, so there is nothing to sample from: use label_smoothing=0 (or GGN)"
                )
            return lambda out, s, gen: (_sample_categorical(out.softmax(dim=1), s, gen), math.prod(out.shape[2:]))
        if isinstance(loss_fn, nn.NLLLoss) or loss_fn is F.nll_loss:
            return lambda out, s, gen: (_sample_categorical(out.exp(), s, gen), math.prod(out.shape[2:]))
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
            if getattr(loss_fn, "pos_weight", None) is not None or getattr(loss_fn, "weight", None) is not None:
                raise UnsupportedLossError("BCEWithLogitsLoss with weight or pos_weight has no Bernoulli likelihood: drop them")
            return lambda out, s, gen: (
                torch.bernoulli(_sanitized(out.sigmoid()).expand(s, *out.shape), generator=gen),
                out[0].numel(),
            )
        if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
            def gaussian(out: Tensor, s: int, gen: torch.Generator) -> tuple[Tensor, float]:
                # (1/d)·||y − f||² is exactly the NLL of N(f, (d/2)·I), up to a constant: no rescaling.
                std = math.sqrt(out[0].numel() / 2)
                noise = torch.randn((s, *out.shape), generator=gen, dtype=out.dtype, device=out.device)
                return out + std * noise, 1.0
            return gaussian
        raise UnsupportedLossError(
            f"MCFisher samples labels from the likelihood the loss defines; it knows CrossEntropyLoss, NLLLoss, "
            f"BCEWithLogitsLoss and MSELoss (modules or functional forms), not {getattr(loss_fn, '__name__', type(loss_fn).__name__)}: "
            "use GGN (its expectation) or EmpiricalFisher"
        )

    def _output_operator(self, outputs: Tensor, targets, index: int, part: int = 0):
        # one stream per (seed, rank, batch, micro-batch); a whole batch (part 0) keeps its stream
        stream = (self.seed * 1_000_003 + self.problem.rank) * 1_000_033 + index + (part << 40)
        generator = torch.Generator(device=outputs.device).manual_seed(stream % 2**63)
        sampled, scale = self._sampler_for(self.output_loss)(outputs.detach(), self.samples, generator)
        r = torch.stack([_output_gradients(self.output_loss, outputs, y) for y in sampled])
        return _outer_matmat(r * math.sqrt(scale), outputs.shape[0])


def _sample_categorical(probs: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """Class indices ``(S, n_b, *rest)`` drawn from ``probs`` of shape ``(n_b, C, *rest)``."""
    classes = probs.shape[1]
    flat = _sanitized(probs.movedim(1, -1).reshape(-1, classes))
    drawn = torch.multinomial(flat, samples, replacement=True, generator=generator)  # (n_b·rest, S)
    return drawn.T.reshape(samples, probs.shape[0], *probs.shape[2:])


def _sanitized(probs: Tensor) -> Tensor:
    """Non-finite probabilities (from a non-finite output) made drawable, so that sampling does not crash
    before the data loop's check names the batch whose loss is not finite."""
    return torch.nan_to_num(probs, nan=1.0, posinf=1.0, neginf=0.0)
