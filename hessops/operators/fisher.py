"""Fisher information matrices: empirical and Monte-Carlo."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessops.errors import InvalidArgumentError, UnsupportedLossError
from hessops.operators._autograd import gradient
from hessops.operators._base import Batch
from hessops.operators._jacobian import JacobianSandwich
from hessops.operators.losses import LossSpec, loss_spec

Sampler = Callable[[Tensor, Any, int, torch.Generator], Tensor]


def _summed_gradients(spec: LossSpec, outputs: Tensor, targets: Any, scale: float) -> Tensor:
    r""":math:`s_n = \nabla_{f_n} (\mathrm{scale} \cdot L_b)`, stacked like ``outputs``: with ``scale`` the batch's
    :math:`W_b` for a mean (1 for a sum), the gradient of the batch's summed (weighted) per-target losses
    that belong to example :math:`n`."""
    with torch.enable_grad():
        o = outputs.detach().requires_grad_()
        return gradient(scale * spec(o, targets), [o])[0]


def _outer_matmat(s: Tensor, coefficients: Tensor, divisor: float) -> Callable[[Tensor], Tensor]:
    """``U ↦ (1/divisor) Σ_s Σ_n c_n s_sn (s_snᵀ u_n)`` for ``s`` of shape ``(S, n_b, *out)``."""
    samples, n_b = s.shape[:2]
    c = coefficients.to(s.dtype)

    def matmat(u: Tensor) -> Tensor:
        # u: (c, n_b, *out) -> coefficients (S, c, n_b)
        s_flat, u_flat = s.reshape(samples, n_b, -1), u.reshape(u.shape[0], n_b, -1)
        projections = torch.einsum("sno,cno->scn", s_flat, u_flat) * c
        w = torch.einsum("scn,sno->cno", projections, s_flat)
        return (w / divisor).reshape(u.shape)

    return matmat


class EmpiricalFisher(JacobianSandwich):
    r"""The empirical Fisher with the data's own labels, as a ``PSD`` CoLA operator:

    .. math:: F = \frac1W \sum_n w_n\, g_n g_n^\top \quad (\texttt{reduction="mean"}), \qquad
              F = \sum_n g_n g_n^\top \quad (\texttt{reduction="sum"}),

    with :math:`g_n = \nabla_\theta\, \mathrm{loss\_fn}(f(x_n;\theta), y_n)` the gradient of example
    :math:`n`'s loss alone, :math:`w_n` its weight in the batch divisor (:mod:`hessops.operators.losses`: 1 per example
    for a plain mean, so :math:`F = \frac1N\sum_n g_n g_n^\top`; its counted targets, or their class weights,
    for cross-entropy with ``ignore_index``/``weight=``; its elements for MSE) and :math:`W = \sum_n w_n`.
    Examples whose targets are all ignored contribute nothing.

    Computed as :math:`J^\top (s s^\top / w) J` with :math:`s_n = w_n \nabla_f \ell_n` the output gradient of
    the batch's summed loss (no per-example parameter gradient is stored). The keyword arguments are
    :class:`~hessops.CurvatureOperator`'s.

    Args:
        model: as in :class:`~hessops.CurvatureOperator`.
        loss_fn: as in :class:`~hessops.CurvatureOperator`.
        data: as in :class:`~hessops.CurvatureOperator` (the labels :math:`y_n` are the data's own).

    Raises:
        UnsupportedLossError: and the other refusals of :class:`~hessops.CurvatureOperator`.
    """

    name = "ef"  # its key in hessops.constants.OPERATOR_CLASSES

    def _output_operator(self, outputs: Tensor, batch: Batch):
        spec, n_b, targets = self.output_loss, outputs.shape[0], batch.targets
        weights = spec.example_weights(targets, n_b).to(outputs.device)
        if not spec.mean:
            return _outer_matmat(
                _summed_gradients(spec, outputs, targets, 1.0).unsqueeze(0), torch.ones_like(weights), 1.0
            )
        total = float(weights.sum())
        coefficients = torch.where(weights > 0, 1 / weights.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        return _outer_matmat(_summed_gradients(spec, outputs, targets, total).unsqueeze(0), coefficients, total)


class MCFisher(JacobianSandwich):
    r"""The Monte-Carlo Fisher with labels :math:`\hat y \sim p(y \mid f(x;\theta))` sampled from the model,
    as a ``PSD`` CoLA operator:

    .. math:: \hat F = \frac1{WS} \sum_n \sum_{s=1}^S \hat s_{ns} \hat s_{ns}^\top, \qquad
              \hat s_{ns} = J_n^\top \sum_{t \in n} \nabla_{f_t}\, \ell_t(f_t, \hat y_{ts}),

    where :math:`t` runs over the counted targets (classification: positions whose target is not
    ``ignore_index``) or elements of example :math:`n`, :math:`\ell_t` is the per-target (per-element) loss, and
    :math:`W` the dataset divisor of :mod:`hessops.operators.losses` (the number of counted targets or elements; 1 for
    ``reduction="sum"``). Sampled targets of one example are independent, so the cross terms vanish in
    expectation and :math:`\mathbb E\hat F` is the true Fisher, which for these losses equals the GGN.

    The likelihood follows the loss: cross-entropy (categorical on softmax logits), NLL (categorical on
    log-probabilities), the next-token cross-entropy (each counted label :math:`t+1` drawn from the softmax of
    position :math:`t`'s logits, :func:`hessops.operators.losses.next_token_cross_entropy`), BCE with logits and BCE
    (Bernoulli), MSE (Gaussian of variance 1/2 per element, at which the summed squared error is the negative
    log-likelihood), as modules, functional forms or
    ``partial``\ s. Class ``weight=``, ``pos_weight`` and ``label_smoothing`` define no likelihood and are
    refused (use :class:`GGN`, the expectation).

    The labels of batch :math:`b` (micro-batch :math:`m`) are drawn from a generator seeded by
    ``(seed, rank, b, m)``, so the operator is a fixed matrix as long as the data come in a fixed order
    (``shuffle=False``). The other keyword arguments are :class:`~hessops.CurvatureOperator`'s.

    Args:
        model: as in :class:`~hessops.CurvatureOperator`.
        loss_fn: as in :class:`~hessops.CurvatureOperator`; one that defines a likelihood, above.
        data: as in :class:`~hessops.CurvatureOperator`.
        samples: ``S``, the labels drawn per target, at least 1.
        seed: the seed of the labels' generators.

    Raises:
        InvalidArgumentError: ``samples`` below 1.
        UnsupportedLossError: a loss that defines no likelihood (L1, class ``weight=``, ``pos_weight``,
            ``label_smoothing``); and the other refusals of :class:`~hessops.CurvatureOperator`.
    """

    name = "mcfisher"  # its key in hessops.constants.OPERATOR_CLASSES

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Iterable,
        *,
        samples: int = 1,
        seed: int = 0,
        params: Sequence[Tensor] | None = None,
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        micro_batch_size: int | None = None,
        progress: bool = False,
        allow_train_mode: bool = False,
        batch_size_fn: Callable[[Any], int] | None = None,
        unpack_inputs: bool = True,
        check_determinism: bool = True,
        distributed: bool | None = None,
        group: Any = None,
        witness: bool = True,
    ):
        if samples < 1:
            raise InvalidArgumentError(f"samples must be at least 1, got {samples}")
        self._sampler_for(loss_spec(loss_fn))
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            dtype=dtype,
            chunk_size=chunk_size,
            micro_batch_size=micro_batch_size,
            progress=progress,
            allow_train_mode=allow_train_mode,
            batch_size_fn=batch_size_fn,
            unpack_inputs=unpack_inputs,
            check_determinism=check_determinism,
            distributed=distributed,
            group=group,
            witness=witness,
        )
        self.samples = samples
        self.seed = seed

    def _options(self) -> dict[str, Any]:
        """The labels drawn per target and their seed: each pair is another matrix."""
        return {"samples": self.samples, "seed": self.seed}

    @staticmethod
    def _sampler_for(spec: LossSpec) -> Sampler:
        """``(outputs, targets, S, generator) -> labels`` of shape ``(S, *targets.shape)`` (classification:
        ``(S, n_b, *d)``), ignored targets kept ignored."""
        if spec.kind in ("cross_entropy", "nll"):
            if spec.options.get("label_smoothing"):
                raise UnsupportedLossError(
                    f"{spec.name} with label_smoothing is not the negative log-likelihood of a distribution "
                    "over labels, so there is nothing to sample from: use label_smoothing=0 (or GGN)"
                )
            if spec.weight is not None:
                raise UnsupportedLossError(
                    f"{spec.name} with class weights is not the negative log-likelihood of a distribution over "
                    "labels, so there is nothing to sample from: use GGN (the Fisher's expectation without "
                    "weights is the GGN) or EmpiricalFisher, or drop weight="
                )
            to_probs = (lambda out: out.softmax(dim=1)) if spec.kind == "cross_entropy" else (lambda out: out.exp())

            def categorical(out: Tensor, targets: Any, s: int, gen: torch.Generator) -> Tensor:
                drawn = _sample_categorical(to_probs(out), s, gen)
                if isinstance(targets, Tensor) and not targets.is_floating_point():
                    drawn = torch.where(targets == spec.ignore_index, targets, drawn)
                return drawn

            return categorical
        if spec.kind == "next_token":

            def next_tokens(out: Tensor, targets: Tensor, s: int, gen: torch.Generator) -> Tensor:
                # position t's logits draw label t+1; position 0 and ignored labels stay ignored
                drawn = _sample_categorical(out[:, :-1].movedim(-1, 1).softmax(dim=1), s, gen)
                ignored = torch.full_like(drawn[..., :1], spec.ignore_index)
                drawn = torch.cat([ignored, drawn], dim=-1)
                return torch.where(targets == spec.ignore_index, targets, drawn)

            return next_tokens
        if spec.kind in ("bce_logits", "bce"):
            if spec.options.get("pos_weight") is not None or spec.options.get("weight") is not None:
                raise UnsupportedLossError(
                    f"{spec.name} with weight or pos_weight has no Bernoulli likelihood: drop them"
                )
            to_probs = (lambda out: out.sigmoid()) if spec.kind == "bce_logits" else (lambda out: out.clamp(0, 1))
            return lambda out, targets, s, gen: torch.bernoulli(
                _sanitized(to_probs(out)).expand(s, *out.shape), generator=gen
            )
        if spec.kind == "mse":

            def gaussian(out: Tensor, targets: Any, s: int, gen: torch.Generator) -> Tensor:
                # (f − y)² is exactly the NLL of N(f, 1/2), up to a constant, per element.
                noise = torch.randn((s, *out.shape), generator=gen, dtype=out.dtype, device=out.device)
                return out + math.sqrt(0.5) * noise

            return gaussian
        raise UnsupportedLossError(
            f"MCFisher samples labels from the likelihood the loss defines; it knows cross-entropy, NLL, next-token "
            f"cross-entropy, BCE, BCE with logits and MSE (modules, functional forms or partials), not {spec.name}: "
            "use GGN (its expectation) or EmpiricalFisher"
        )

    def _output_operator(self, outputs: Tensor, batch: Batch):
        # one stream per (seed, rank, batch, micro-batch); a whole batch (part 0) keeps its stream
        stream = (self.seed * 1_000_003 + self.problem.rank) * 1_000_033 + batch.index + (batch.part << 40)
        targets = batch.targets
        generator = torch.Generator(device=outputs.device).manual_seed(stream % 2**63)
        spec = self.output_loss
        sampled = self._sampler_for(spec)(outputs.detach(), targets, self.samples, generator)
        total = spec.batch_weight(targets, outputs.shape[0]) if spec.mean else 1.0
        s = torch.stack([_summed_gradients(spec, outputs, y, total) for y in sampled])
        return _outer_matmat(s, torch.ones(outputs.shape[0], device=outputs.device), total * self.samples)


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
