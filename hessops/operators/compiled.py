"""The ``"compiled"`` Hessian-vector product: forward-over-reverse (``jvp(grad(L_b))``) under ``torch.compile``.

What it buys, and what it costs (benchmarks/RESULTS.md, "A compiled formulation"): on a GPT with GPT-2's
vocabulary (2 layers of width 192, 2 x 64 tokens, float32, 2 CPU cores) a compiled product costs about 2.2
gradients against 3.25 for double backward with the closed-form head, but compiling it took about 60 s with an
empty inductor cache (about 7 s with a warm one), and **every new shape of a batch compiles again** (the batch
dimension stays static under ``torch.func``'s transforms even with ``dynamic=True``: measured, torch 2.14.1),
so a loader whose last batch is smaller compiles twice. It repays itself only over hundreds of products: a
density, a tracker, a long eigenvalue run.

So ``"auto"`` tries it late (:func:`due`): once the single products of an operator have taken long enough that
:data:`~hessops.operators.hvp_tuning.TUNING_BUDGET` of their seconds covers the expected compile (the last one
measured for the same model on disk, else :data:`COMPILE_SECONDS_GUESS`). The trial runs on the batch at hand,
whole: double backward (the product used if the trial fails), the tuned formulation when it is another, then the
compiled product twice (the first call compiles); it is kept when it agrees with double backward to
:func:`~hessops.operators.hvp_tuning.tolerance` and its second run is faster. ``hvp_mode="compiled"`` asks for it
by name, checked the same way against double backward on the first batch, whole (a slice would be one more
shape to compile).

Each model gets its own copy of the compiled function's code, so that torch's per-code limit on recompilations
(8 in torch 2.14) counts its shapes only, not every model of a process; past that limit torch runs the function
uncompiled, which is still exact, only slower.
"""

from __future__ import annotations

import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp
from torch.utils._pytree import tree_leaves

from hessops.errors import HvpFormulationError
from hessops.operators import hvp_tuning
from hessops.operators.functional import ParamTree, call_model, differentiable_kernels

MODE = "compiled"
# What a first compile is expected to cost before one was measured for the model: 58-64 s measured for the GPT
# above with an empty inductor cache, 7-13 s for a 3-layer MLP (2 CPU cores, AMD EPYC family 25).
COMPILE_SECONDS_GUESS = 60.0
# model -> {(names, loss identity): _Compiled}; held weakly, so that the compiled code dies with its model.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Compiled]] = weakref.WeakKeyDictionary()


class _Compiled:
    """One model's compiled product, and the shapes it has compiled for (each first call compiles)."""

    def __init__(self, names: tuple[str, ...], loss_fn: Callable) -> None:
        # The model is an argument, not a closure's: this entry, kept while the model lives, must not keep it alive.
        def product(model: nn.Module, params: ParamTree, column: ParamTree, constants: dict, inputs: Any, targets: Any):
            def batch_loss(p: ParamTree):
                loss = loss_fn(call_model(model, names, p, constants, inputs), targets)
                return loss, loss

            _, hv, loss = jvp(grad(batch_loss, has_aux=True), (params,), (column,), has_aux=True)
            return hv, loss

        own = types.FunctionType(product.__code__.replace(), product.__globals__, "product", None, product.__closure__)
        self.function = torch.compile(own, dynamic=False)
        self.shapes: set[tuple] = set()
        self.compiles = 0
        self.compile_seconds = 0.0


def _signature(params: ParamTree, inputs: Any, targets: Any) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tree_leaves((params, inputs, targets)) if isinstance(t, Tensor))


def compiled_for(model: nn.Module, names: tuple[str, ...], loss_fn: Callable) -> _Compiled:
    """The compiled product of ``model`` with ``loss_fn`` in this process (made on first request)."""
    entries = _COMPILED.setdefault(model, {})
    key = (names, getattr(loss_fn, "identity", id(loss_fn)))
    if key not in entries:
        entries[key] = _Compiled(names, loss_fn)
    return entries[key]


def run(
    model: nn.Module,
    names: tuple[str, ...],
    loss_fn: Callable,
    params: ParamTree,
    constants: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    blocks: list[ParamTree],
) -> tuple[list[ParamTree], Tensor]:
    """The products ``[H_b V]`` of one batch and its loss, column by column through the compiled function.

    Raises:
        HvpFormulationError: torch.compile failed on this model (chained to torch's error).
    """
    compiled = compiled_for(model, names, loss_fn)
    signature = _signature(params, inputs, targets)
    first = signature not in compiled.shapes
    began = time.perf_counter()
    products, loss = [], None
    with differentiable_kernels(), torch.enable_grad():
        for block in blocks:
            columns = []
            for c in range(block[0].shape[0]):
                try:
                    column = tuple(t[c] for t in block)
                    hv, loss = compiled.function(model, params, column, constants, inputs, targets)
                except Exception as error:
                    if hvp_tuning.interrupted(error):
                        raise KeyboardInterrupt from error
                    raise HvpFormulationError(
                        f"torch.compile could not compile this model's Hessian-vector product ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}): use hvp_mode='auto' or 'autograd'"
                    ) from error
                columns.append(hv)
                if first:
                    compiled.shapes.add(signature)
                    compiled.compiles += 1
                    compiled.compile_seconds += time.perf_counter() - began
                    first = False
            products.append(tuple(torch.stack(parts).detach() for parts in zip(*columns)))
    return products, loss.detach()


def stats(model: nn.Module) -> dict[str, float]:
    """``{"compiles": n, "compile_seconds": s}`` over the compiled products of ``model`` in this process."""
    entries = _COMPILED.get(model, {}).values()
    return {
        "compiles": sum(e.compiles for e in entries),
        "compile_seconds": sum(e.compile_seconds for e in entries),
    }


def record_key(entry: str) -> str:
    """The key of the compile trial's record in the tuner's disk cache, beside the choice's ``entry``."""
    return f"{entry}/{MODE}"


def expected_seconds(record: Any) -> float:
    """The compile expected for a model: the last one measured (its disk ``record``), else the guess."""
    if isinstance(record, dict) and isinstance(record.get("compile_seconds"), (int, float)):
        return float(record["compile_seconds"])
    return COMPILE_SECONDS_GUESS


def due(spent: float, tuned: float, record: Any) -> bool:
    """Whether ``"auto"`` should try the compiled product now: single products have taken ``spent`` seconds, the
    tuner ``tuned`` of them, and what is left of its budget (:data:`~hessops.operators.hvp_tuning.TUNING_BUDGET`
    of ``spent``) covers the expected compile; never again for a model where an earlier trial (its disk
    ``record``) found it slower or wrong."""
    if isinstance(record, dict) and record.get("kept") is False:
        return False
    return hvp_tuning.TUNING_BUDGET * spent - tuned >= expected_seconds(record)
