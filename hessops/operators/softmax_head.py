r"""The softmax cross-entropy's curvature in closed form, so that no product differentiates twice through the
vocabulary.

For the softmax cross-entropy of logits :math:`z_t` (one row per counted target :math:`t`, classes along one
dimension) every variant torch offers (class weights, ``ignore_index``, label smoothing, probability targets)
and hessops' next-token loss is

.. math:: L = \sum_t \bigl(s_t \operatorname{lse}(z_t) - q_t^\top z_t\bigr), \qquad
          \nabla_{z_t} L = s_t p_t - q_t, \qquad \nabla^2_{z_t} L = s_t \bigl(\mathrm{diag}(p_t) - p_t p_t^\top\bigr),

with :math:`p_t = \operatorname{softmax}(z_t)`, :math:`q_t` the target weights and :math:`s_t = \sum_c q_{tc}`
the token's coefficient (:func:`coefficients`). So the loss's share of a second derivative is a few element-wise
operations on one copy of the logits, where double backward through ``log_softmax`` and ``nll_loss`` builds and
differentiates a graph of several logit-sized tensors (a GPT with GPT-2's 50,257-token vocabulary spends most
of a product there).

- The Hessian (``hvp_mode`` ``"autograd"`` and ``"autograd-loop"``, the default's): :func:`head_loss` is the
  same loss with a custom backward whose own backward is :math:`\nabla^2_z L\, u` above; the loss value and
  its gradient are torch's own (a first-order backward of the user's loss), only the second derivative is
  written out. The model below the logits keeps its exact double backward.
- The GGN: :func:`output_hessian` applies :math:`\nabla^2_f L` directly.

Like every fast path (issue 11's rule) it is validated on first use: the operator's first products on a slice
of its first batch are computed both ways and compared to :func:`~hessops.operators.hvp_tuning.tolerance` of
the dtype (:class:`HeadCheck`, ``op.softmax_head``); a disagreement drops it, with a warning, for the plain
computation. ``HESSOPS_SOFTMAX_HEAD=0`` turns it off. Losses it does not know (a ``lambda``, MSE, NLL of
log-probabilities) keep the plain computation.
"""

from __future__ import annotations

import math
import os
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hessops.errors import HvpFormulationWarning
from hessops.operators.hvp_tuning import tolerance
from hessops.operators.witness import gram_diagonal

KINDS = ("cross_entropy", "next_token")  # the losses written out here (an NLL after a split is cross_entropy)
TRIES = 3  # slices that decide nothing (no counted target) before the Hessian keeps the plain loss unchecked
FORMULATIONS = ("autograd", "autograd-loop")  # the Hessian's formulations that use it (double backward)
# The verdict for a model in this process: model -> {key: HeadCheck}, held weakly (it dies with the model).
_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, HeadCheck]] = weakref.WeakKeyDictionary()


@dataclass
class HeadCheck:
    """The first-use validation of the closed-form softmax head: ``passed``, the relative Frobenius ``error`` of
    its products against the plain ones on the slice, the ``tolerance`` it had to meet, the ``seconds`` it cost
    and what was compared (``examples``, ``columns``)."""

    passed: bool
    error: float
    tolerance: float
    examples: int = 0
    columns: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def check(
    plain: Callable[[], list], head: Callable[[], list], dtype: torch.dtype, *, examples: int, columns: int
) -> HeadCheck | None:
    """Compare ``head()``'s products (the closed form) with ``plain()``'s (the user's loss differentiated twice)
    on the same slice: passed when within :func:`~hessops.operators.hvp_tuning.tolerance` of ``dtype``; ``None``
    when the plain products decide nothing (all zero: every target of the slice ignored; or not finite: a NaN
    in the batch, which the operator reports itself), and the next batch is tried. An error
    raised by ``plain`` is the user's and propagates; one raised by the closed form fails the check. A failed
    check warns (:class:`~hessops.errors.HvpFormulationWarning`)."""
    began = time.perf_counter()
    reference = plain()
    if not _decisive(reference):
        return None
    try:
        error = relative_error(head(), reference)
    except (RuntimeError, TypeError, ValueError, IndexError) as failure:
        error, why = math.inf, f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
    else:
        why = ""
    found = HeadCheck(error <= tolerance(dtype), error, tolerance(dtype), examples, columns, 0.0)
    found.seconds = time.perf_counter() - began
    if not found.passed:
        warnings.warn(
            f"the closed-form softmax cross-entropy head disagrees with double backward on the first batch "
            f"({why or f'{error:.2g} relative, tolerance {found.tolerance:.1g}'}): hessops uses plain double "
            "backward for this model (slower on large vocabularies). Please report it; HESSOPS_SOFTMAX_HEAD=0 "
            "skips the check",
            HvpFormulationWarning,
            stacklevel=6,
        )
    return found


def _decisive(products: list) -> bool:
    """Whether products can judge another computation: finite, and not all zero."""
    tensors = [t for block in products for t in block]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and any(bool(t.any()) for t in tensors)


def earlier(model: nn.Module, key: tuple) -> HeadCheck | None:
    """This process's verdict for ``model`` and ``key`` (device, dtype, parameters, loss), or ``None``."""
    return _CHECKED.get(model, {}).get(key)


def remember(model: nn.Module, key: tuple, found: HeadCheck) -> None:
    """Keep ``found`` as this process's verdict for ``model`` and ``key``."""
    _CHECKED.setdefault(model, {})[key] = found


def enabled() -> bool:
    """``False`` when the environment sets ``HESSOPS_SOFTMAX_HEAD=0`` (also ``false``, ``no``, ``off``)."""
    return os.environ.get("HESSOPS_SOFTMAX_HEAD", "1").strip().lower() not in ("0", "false", "no", "off")


def applies(spec) -> bool:
    """Whether ``spec`` (a :class:`~hessops.operators.losses.LossSpec`) is a softmax cross-entropy written out
    here, and the environment allows it."""
    return spec.kind in KINDS and spec.reduction in ("mean", "sum") and enabled()


def coefficients(spec, logits: Tensor, targets: Any) -> tuple[Tensor, int] | None:
    r"""``(s, dim)``: each target's coefficient :math:`s_t` of :math:`\nabla^2_z L = s_t(\mathrm{diag}(p_t) -
    p_t p_t^\top)`, shaped like ``logits`` with the class dimension ``dim`` of size 1, in the logits' dtype; the
    batch's divisor (``reduction="mean"``) included, as torch divides. ``None`` where the loss, or these outputs
    and targets, are not a softmax cross-entropy written out here.

    Args:
        spec: the loss (:class:`~hessops.operators.losses.LossSpec`).
        logits: the model's outputs.
        targets: the batch's targets.

    Returns:
        ``(s, dim)``, or ``None``."""
    if not (isinstance(logits, Tensor) and logits.is_floating_point() and isinstance(targets, Tensor)):
        return None
    if spec.kind == "next_token":
        counted = (targets[:, 1:] != spec.ignore_index).to(logits.dtype)
        s = torch.zeros(*targets.shape, 1, dtype=logits.dtype, device=logits.device)
        s[:, :-1, 0] = counted / _divisor(spec, counted.sum())
        return s, logits.dim() - 1
    if spec.kind != "cross_entropy" or logits.dim() == 0:
        return None
    dim = 1 if logits.dim() >= 2 else 0
    classes = logits.shape[dim]
    smoothing = float(spec.options.get("label_smoothing", 0.0) or 0.0)
    weight = spec.weight.to(device=logits.device, dtype=logits.dtype) if spec.weight is not None else None
    if targets.is_floating_point():  # class probabilities, shaped like the logits
        if targets.shape != logits.shape:
            return None
        q = targets.to(logits.dtype) * (1 - smoothing) + smoothing / classes
        if weight is not None:
            q = q * weight.reshape([classes if d == dim else 1 for d in range(logits.dim())])
        count = logits.numel() // classes  # torch's mean divides by the targets' count, not their weights
        return q.sum(dim, keepdim=True) / _divisor(spec, torch.tensor(float(count), dtype=logits.dtype)), dim
    counted = targets != spec.ignore_index
    omega = counted.to(logits.dtype)
    if weight is not None:
        omega = omega * weight[torch.where(counted, targets, torch.zeros_like(targets))]
    total = weight.sum() if weight is not None else torch.tensor(float(classes), dtype=logits.dtype)
    s = (1 - smoothing) * omega + (smoothing / classes) * counted.to(logits.dtype) * total.to(logits.device)
    return (s / _divisor(spec, omega.sum())).unsqueeze(dim), dim


def _divisor(spec, total: Tensor) -> Tensor:
    """What the batch loss divides by: its total weight for a mean (1 where it is 0: nothing counted), else 1."""
    if not spec.mean:
        return torch.ones((), dtype=total.dtype, device=total.device)
    return torch.where(total > 0, total, torch.ones_like(total))


def head_loss(spec) -> Callable[[Any, Any], Tensor]:
    r"""``spec`` as a callable ``(outputs, targets) -> loss`` with the same value and gradient whose second
    derivative with respect to the outputs is the closed form :math:`s_t(\mathrm{diag}(p_t) - p_t p_t^\top)`
    (double backward only: torch.func transforms keep the plain loss). Outputs and targets it does not write
    out (:func:`coefficients` is ``None``) get ``spec`` itself."""

    def loss(outputs: Any, targets: Any) -> Tensor:
        found = coefficients(spec, outputs, targets)
        if found is None or not outputs.requires_grad:
            return spec(outputs, targets)
        spec.check_shapes(outputs, targets)
        s, dim = found
        return _SoftmaxCrossEntropy.apply(outputs, s, dim, spec.fn, targets)

    return loss


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """The loss ``fn(logits, targets)``: forward and gradient are torch's; the gradient's own derivative is
    :class:`_Gradient`'s closed form."""

    @staticmethod
    def forward(ctx, logits: Tensor, s: Tensor, dim: int, fn: Callable, targets: Tensor) -> Tensor:  # noqa: D102
        with torch.enable_grad():
            z = logits.detach().requires_grad_()
            value = fn(z, targets)
            (g,) = torch.autograd.grad(value, z)
        ctx.save_for_backward(logits, g, s)
        ctx.dim = dim
        return value.detach()

    @staticmethod
    def backward(ctx, upstream: Tensor):  # noqa: D102
        logits, g, s = ctx.saved_tensors
        return _Gradient.apply(logits, g, s, upstream, ctx.dim), None, None, None, None


class _Gradient(torch.autograd.Function):
    """``upstream · ∇_z L`` as a function of the logits (and of ``upstream``), whose backward is
    :math:`\\nabla^2_z L\\, u`: one softmax and three element-wise operations on logit-sized tensors."""

    @staticmethod
    def forward(ctx, logits: Tensor, g: Tensor, s: Tensor, upstream: Tensor, dim: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(logits, g, s, upstream)
        ctx.dim = dim
        return g * upstream

    @staticmethod
    @once_differentiable
    def backward(ctx, u: Tensor):  # noqa: D102
        logits, g, s, upstream = ctx.saved_tensors
        hu = hessian_product(logits, s * upstream, ctx.dim, u) if ctx.needs_input_grad[0] else None
        to_upstream = (u * g).sum().reshape(upstream.shape) if ctx.needs_input_grad[3] else None
        return hu, None, None, to_upstream, None


def hessian_product(logits: Tensor, s: Tensor, dim: int, u: Tensor) -> Tensor:
    r""":math:`s_t(\mathrm{diag}(p_t) - p_t p_t^\top) u_t` for every target :math:`t`, :math:`p_t` the softmax of
    ``logits`` along ``dim``; ``u`` is shaped like ``logits``, or has leading dimensions more (columns)."""
    extra = u.dim() - logits.dim()
    p = torch.softmax(logits, dim)
    pu = p * u
    # two logit-sized tensors and in-place updates: a fresh logit-sized temporary costs as much as the arithmetic
    return pu.addcmul_(p, pu.sum(dim + extra, keepdim=True), value=-1).mul_(s)


def output_hessian(spec, outputs: Tensor, targets: Any) -> Callable[[Tensor], Tensor] | None:
    r"""``U ↦ ∇²_f L_b U`` for a block ``U`` of ``(c, *outputs.shape)`` columns in closed form (the GGN's output
    matrix), or ``None`` where :func:`coefficients` does not write the loss out."""
    found = coefficients(spec, outputs, targets)
    if found is None:
        return None
    s, dim = found
    logits = outputs.detach()
    return lambda u: hessian_product(logits, s, dim, u)


def relative_error(products: list, reference: list) -> float:
    """The relative Frobenius distance between two lists of parameter trees (blocks of products), summed in float64
    a slab at a time (:func:`~hessops.operators.witness.gram_diagonal`)."""
    num = den = 0.0
    for block, ref_block in zip(products, reference):
        for t, r in zip(block, ref_block):
            num += float(gram_diagonal((t - r).reshape(1, -1)).sum())
            den += float(gram_diagonal(r.reshape(1, -1)).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5
