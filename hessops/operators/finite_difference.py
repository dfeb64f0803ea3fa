r"""The gradient-only Hessian-vector product, ``hvp_mode="finite-difference"``: two first-order gradients a column.

.. math:: D_\varepsilon v = \frac{\nabla L_b(\theta + \varepsilon v) - \nabla L_b(\theta - \varepsilon v)}
          {2\varepsilon}, \qquad
          \varepsilon = \frac{\varepsilon_{\mathrm{dtype}}^{1/3} \max(\lVert\theta\rVert, 1)}{\lVert v\rVert}

It needs no second derivative, so it runs through any kernel that has a backward (flash and memory-efficient
attention, fused kernels, code under ``torch.compile``) and any wrapper that supports ``backward()``. It is not
exact: its error is truncation, :math:`\tfrac{\varepsilon^2}{6} \nabla^3 L[v, v, \cdot]`, plus the rounding of
the two gradients, about :math:`\varepsilon_{\mathrm{dtype}} \lVert\nabla L\rVert / \varepsilon`; the step, a
relative shift of the parameters of :math:`\varepsilon_{\mathrm{dtype}}^{1/3}` (6e-6 in float64, 4.9e-3 in
float32), balances the two.

**The error, measured on first use** (:func:`estimate`, once per operator, on the first batch of its first
product, along :data:`DIRECTIONS` directions: the first column, then unit directions from a fixed seed): the
Richardson pair :math:`e_R = \lVert D_\varepsilon v - D_{2\varepsilon} v\rVert / \lVert D_\varepsilon v\rVert`
(three times the truncation of :math:`D_\varepsilon`, and at least its rounding), and, where double backward runs,
the exact product's distance :math:`e_X = \lVert D_\varepsilon v - Hv\rVert / \lVert Hv\rVert`, a second
opinion only: the operator's ``product_error`` is :data:`SAFETY` times the largest :math:`e_R`, relative to the
product's norm (where :math:`e_X` exceeds it, double backward is the one likely wrong, as through a backward
marked ``once_differentiable``, and ``exact_failure`` says so); since
:math:`\lVert Hv\rVert \le \max|\lambda|` for a unit :math:`v`, :func:`hessops.eigs` adds ``product_error`` times
``max|θ|`` to every error bound (hessops/linalg/bounds.py), so ``converged`` and the bounds stay honest.

Half precision is refused: there :math:`\varepsilon_{\mathrm{dtype}}^{1/3}` is 0.1-0.2 of the parameters, no
derivative at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hessops.errors import HvpFormulationError
from hessops.operators import _hvp, hvp_tuning
from hessops.operators import witness as first_order
from hessops.operators.functional import ParamTree, call_model

MODE = "finite-difference"
DIRECTIONS = 2  # directions the error is measured along on first use
# The error carried into bounds is this many times the largest measured: the estimate is along a few directions,
# and the truncation varies with the direction (its third derivative); the witness uses 10 likewise.
SAFETY = 10.0


def step(dtype: torch.dtype) -> float:
    """The relative step :math:`\\varepsilon_{\\mathrm{dtype}}^{1/3}` (6.1e-6 in float64, 4.9e-3 in float32)."""
    return torch.finfo(dtype).eps ** (1 / 3)


def refuse_low_precision(dtype: torch.dtype) -> None:
    """Raise :class:`HvpFormulationError` for a dtype whose finite differences are no derivative (half precision)."""
    if torch.finfo(dtype).eps > 1e-6:
        raise HvpFormulationError(
            f"hvp_mode='finite-difference' in {str(dtype).removeprefix('torch.')}: its step would shift the parameters "
            f"by {step(dtype):.2g} of their norm, which leaves no derivative. Use dtype=torch.float32 (hessops casts "
            "a copy) or an exact hvp_mode"
        )


@dataclass
class FiniteDifferenceError:
    """What :func:`estimate` measured: the relative step, each direction's Richardson error ``richardson`` and its
    distance to the exact product ``exact`` (``None`` where double backward cannot run), and ``error``, the relative
    error carried into bounds (:data:`SAFETY` times the largest of them)."""

    step: float
    richardson: list[float] = field(default_factory=list)
    exact: list[float] | None = field(default_factory=list)
    exact_failure: str | None = None
    error: float = math.nan
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def gradient(loss_of: Callable[[ParamTree], Tensor], params: ParamTree) -> tuple[ParamTree, Tensor]:
    """``(∇L_b(params), L_b(params))`` by one first-order backward."""
    with torch.enable_grad():
        p = tuple(t.detach().requires_grad_() for t in params)
        loss = loss_of(p)
        grads = torch.autograd.grad(loss, p, allow_unused=True, materialize_grads=True)
    return tuple(g.detach() for g in grads), loss.detach()


def _norm(tree: ParamTree) -> float:
    """The 2-norm of a tuple of tensors: each tensor's in its own dtype (no float64 copy of a parameter-sized
    vector), combined in float64."""
    if not tree:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).double() for t in tree])))


def _central(loss_of: Callable, params: ParamTree, column: ParamTree, relative_step: float, scale: float):
    """:math:`D_\\varepsilon v` for one column ``v`` with the relative step ``relative_step`` (zero for ``v = 0``),
    by the witness's central difference (in place in the first gradient: no parameter-sized temporaries)."""
    size = _norm(column)
    if size == 0.0:
        return tuple(torch.zeros_like(t) for t in column)
    h = relative_step * scale / size
    return first_order.central(lambda s: gradient(loss_of, first_order.shifted(params, column, s))[0], h)


def run(loss_of: Callable[[ParamTree], Tensor], params: ParamTree, blocks: list[ParamTree]):
    """The products ``[D_ε V]`` of one batch, column by column, and the batch loss (at ``params``)."""
    dtype = params[0].dtype
    scale = max(_norm(params), 1.0)
    products = []
    for block in blocks:
        columns = [
            _central(loss_of, params, tuple(t[c] for t in block), step(dtype), scale) for c in range(block[0].shape[0])
        ]
        products.append(tuple(torch.stack(parts) for parts in zip(*columns)))
    with torch.no_grad():
        loss = loss_of(params)
    return products, loss.detach()


def estimate(loss_of: Callable, exact: Callable[[ParamTree], ParamTree], params: ParamTree, first: ParamTree):
    """Measure the products' error on one batch (see the module's docstring): along ``first`` (a column) and
    :data:`DIRECTIONS` − 1 unit directions from a fixed seed; ``exact(column)`` is the double-backward product,
    which may raise (then the Richardson pairs alone count)."""
    began = time.perf_counter()
    dtype = params[0].dtype
    scale = max(_norm(params), 1.0)
    generator = torch.Generator().manual_seed(0)
    directions = [first] + [
        tuple(torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in first)
        for _ in range(DIRECTIONS - 1)
    ]
    report = FiniteDifferenceError(step(dtype))
    for column in directions:
        if _norm(column) == 0.0:
            continue
        one = _central(loss_of, params, column, report.step, scale)
        two = _central(loss_of, params, column, 2 * report.step, scale)
        size = _norm(one)
        report.richardson.append(_norm(tuple(a - b for a, b in zip(one, two))) / size if size else 0.0)
        if report.exact is not None:
            try:
                truth = exact(column)
            except Exception as error:  # noqa: BLE001 - no double backward here: the Richardson pairs alone count
                if hvp_tuning.interrupted(error):
                    raise KeyboardInterrupt from error
                report.exact, report.exact_failure = None, f"{type(error).__name__}: {str(error).splitlines()[0]}"
                continue
            reach = _norm(truth)
            report.exact.append(_norm(tuple(a - b for a, b in zip(one, truth))) / reach if reach else 0.0)
    # The first-order Richardson pairs decide the error: double backward is only a second opinion, and where torch's
    # second derivatives are wrong (a backward marked once_differentiable, weight norm) it is the one that is off.
    report.error = SAFETY * max(report.richardson) if report.richardson else math.nan
    if report.exact and max(report.exact) > report.error:
        report.exact_failure = (
            f"double backward is {max(report.exact):.2g} off the finite differences, beyond their measured error "
            f"{report.error:.2g}: torch's second derivatives are likely wrong through some layer of this model"
        )
    report.seconds = time.perf_counter() - began
    return report


def batch_loss(model: nn.Module, names, loss_fn: Callable, constants: dict, inputs: Any, targets: Any) -> Callable:
    """``p ↦ L_b(p)`` on one batch, in the model's own kernels (no switch to the math attention kernel)."""

    def loss_of(p: ParamTree) -> Tensor:
        return loss_fn(call_model(model, names, p, constants, inputs), targets)

    return loss_of


def exact_product(loss_of: Callable, params: ParamTree) -> Callable[[ParamTree], ParamTree]:
    """``v ↦ H_b v`` by double backward, the reference formulation (:func:`hessops.operators._hvp.run`, attention in
    the math kernel), for :func:`estimate`."""

    def product(column: ParamTree) -> ParamTree:
        block = tuple(t.unsqueeze(0) for t in column)
        products, _ = _hvp.run(_hvp.REFERENCE, lambda p: (loss_of(p),) * 2, params, [block], "error", {})
        return tuple(t[0] for t in products[0])

    return product
