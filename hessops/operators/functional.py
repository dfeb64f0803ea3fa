"""Shared machinery, not public API: parameters <-> flat vectors, functional model calls, batch checks.

The flat parameter vector of an operator is the concatenation of ``p.reshape(-1)`` over the selected
parameters, in the order given (default: ``model.parameters()`` with ``requires_grad``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessops.errors import (
    AttentionKernelWarning,
    BatchSizeError,
    DataFormatError,
    DeviceMismatchError,
    DtypeMismatchError,
    EmptyDataError,
    InvalidArgumentError,
    NoParametersError,
    TrainModeError,
)

ParamTree = tuple[Tensor, ...]

# Modules whose forward differs between train and eval mode: batch statistics, random masks, random slopes.
_TRAIN_MODE_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.RReLU,
)
_TRAIN_MODE_NAME_HINTS = ("Dropout", "DropPath", "DropBlock", "BatchNorm", "StochasticDepth")


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything an operator needs besides its dtype and device: held by reference, so the copies that
    CoLA makes of an operator (annotation wrappers, ``.to``) share it."""

    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    data: Iterable
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    model_dtype: torch.dtype
    chunk_size: int | None
    micro_batch_size: int | None
    progress: bool
    allow_train_mode: bool
    batch_size_fn: Callable[[Any], int] | None = None  # inputs -> number of examples (default: their shared dim 0)
    unpack_inputs: bool = True  # model(*tuple) / model(**mapping), or model(inputs) when False
    check_determinism: bool = True
    witness: bool = True  # check the first product against first derivatives (hessops/operators/witness.py)
    distributed: tuple | None = None  # (group, rank, world size) when data-parallel
    memo: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """This process's rank among the data-parallel ranks (0 without them)."""
        return 0 if self.distributed is None else self.distributed[1]

    @property
    def numel(self) -> int:
        """The number of parameters differentiated (the operator's size)."""
        return sum(s.numel() for s in self.shapes)


def normalize_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so that CoLA's device equality checks hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def select_parameters(model: nn.Module, params: Sequence[Tensor] | None) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Names and tensors of the parameters to differentiate, in the flat vector's order."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise NoParametersError(
                "the model has no trainable parameters (every parameter has requires_grad=False): "
                "unfreeze some with p.requires_grad_(True), or pass params=[...] explicitly"
            )
    else:
        params = list(params)
        if not params:
            raise NoParametersError("params is empty: pass at least one parameter of the model, or params=None")
        by_id = {id(p): name for name, p in named}
        chosen, seen = [], set()
        for i, p in enumerate(params):
            if id(p) not in by_id:
                raise NoParametersError(
                    f"params[{i}] (shape {tuple(getattr(p, 'shape', ()))}) is not a parameter of the model: "
                    "pass tensors from model.parameters() (not copies)"
                )
            if id(p) in seen:
                raise NoParametersError(f"params[{i}] ({by_id[id(p)]}) is listed twice")
            seen.add(id(p))
            chosen.append((by_id[id(p)], p))
    dtypes = {p.dtype for _, p in chosen}
    devices = {normalize_device(p.device) for _, p in chosen}
    if len(dtypes) > 1:
        raise DtypeMismatchError(
            f"the parameters have several dtypes {sorted(map(str, dtypes))}: cast the model, e.g. model.double()"
        )
    if len(devices) > 1:
        raise DeviceMismatchError(
            f"the parameters lie on several devices {sorted(map(str, devices))}: move the model with model.to(device)"
        )
    if not next(iter(dtypes)).is_floating_point:
        raise DtypeMismatchError(f"the parameters have dtype {next(iter(dtypes))}; curvature needs floating point")
    return tuple(n for n, _ in chosen), tuple(p for _, p in chosen)


def check_train_mode(model: nn.Module, allow: bool) -> None:
    """Refuse modules whose output is random or batch-dependent (unless ``allow``): Dropout, BatchNorm and
    similar in training mode, and BatchNorm without running statistics (``track_running_stats=False``), which
    normalizes by the batch's statistics in eval mode too."""
    if allow:
        return
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training and module.running_mean is None:
            raise TrainModeError(
                f"module '{name or type(model).__name__}' ({kind}) has no running statistics "
                "(track_running_stats=False), so it normalizes by each batch's statistics even in eval mode, which "
                "makes the operator depend on how data is batched: use a BatchNorm with track_running_stats=True "
                "(or GroupNorm/LayerNorm, which are per example), or pass allow_train_mode=True if you really want "
                "the batch-statistics curvature"
            )
        if not module.training:
            continue
        stateful = isinstance(module, _TRAIN_MODE_TYPES) or any(h in kind for h in _TRAIN_MODE_NAME_HINTS)
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            stateful = module.track_running_stats
        if stateful:
            raise TrainModeError(
                f"module '{name or type(model).__name__}' ({kind}) is in training mode, which makes the operator "
                "random or dependent on how data is batched (and breaks torch.func): call model.eval() first, "
                "or pass allow_train_mode=True if you really want the train-mode curvature"
            )


def split_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """A batch is ``(inputs, targets)``; inputs are a tensor, a tuple of positional tensors or a mapping of
    keyword tensors (any ``collections.abc.Mapping``, returned as a plain ``dict``). A mapping that holds
    ``"labels"`` (a HuggingFace batch) is ``(the other entries as a dict, batch["labels"])``."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise DataFormatError(
                f"batch {index} is a mapping with keys {list(batch)} but no 'labels': a HuggingFace-style batch "
                "holds its targets under 'labels'; for another key, wrap the loader, "
                "hessops.zoo.data.labels_from(loader, key='labels')"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataFormatError(f"batch {index} is a {type(batch).__name__}: data must yield (inputs, targets) pairs")
    inputs = dict(batch[0]) if isinstance(batch[0], Mapping) and not isinstance(batch[0], dict) else batch[0]
    return inputs, batch[1]


def _leaves(obj: Any) -> list[Tensor]:
    """The tensors in a nest of tuples, lists and mappings, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for value in obj.values() for t in _leaves(value)]
    if isinstance(obj, (tuple, list)):
        return [t for value in obj for t in _leaves(value)]
    return []


def batch_size(inputs: Any, index: int, batch_size_fn: Callable[[Any], int] | None = None) -> int:
    """The number of examples in a batch: ``batch_size_fn(inputs)`` when given, else the leading dimension
    that the input tensors share (0-d tensors are constants, not examples)."""
    if batch_size_fn is not None:
        n_b = batch_size_fn(inputs)
        if isinstance(n_b, Tensor) and n_b.dim() == 0 and not n_b.is_floating_point():
            n_b = int(n_b)
        if isinstance(n_b, bool) or not isinstance(n_b, int) or n_b < 0:
            raise BatchSizeError(
                f"batch_size_fn returned {n_b!r} for batch {index}: it must return the number of examples in the "
                "batch's inputs, an int >= 0"
            )
        return n_b
    leaves = _leaves(inputs)
    if not leaves:
        raise DataFormatError(f"batch {index} has no tensor inputs")
    sizes = {tuple(t.shape)[0] for t in leaves if t.dim() > 0}
    if len(sizes) != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves)
        what = "only 0-d tensors" if not sizes else "tensors whose first dimensions differ"
        raise BatchSizeError(
            f"batch {index}'s inputs are {what} ({shapes}), so the examples in it cannot be counted from their "
            "first dimension: pass batch_size_fn=lambda inputs: <number of examples> to the operator"
        )
    return sizes.pop()


def split_examples(inputs: Any, targets: Any, n_b: int, size: int | None) -> list[tuple[Any, Any, int]]:
    """``[(inputs, targets, n_m)]``: the batch cut along dim 0 into consecutive pieces of at most ``size``
    examples (the whole batch when ``size`` is ``None`` or not smaller). Every tensor whose first dimension
    is ``n_b`` is cut; anything else is passed to every piece unchanged."""
    if size is None or n_b <= size:
        return [(inputs, targets, n_b)]

    def cut(obj: Any, start: int) -> Any:
        return map_examples(obj, n_b, lambda t: t[start : start + size])

    return [(cut(inputs, start), cut(targets, start), min(size, n_b - start)) for start in range(0, n_b, size)]


def map_examples(obj: Any, n: int, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor of ``obj`` whose leading dimension is the ``n`` examples; anything else
    (constants, 0-d tensors) is left as it is."""
    return torch.utils._pytree.tree_map(
        lambda t: fn(t) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else t, obj
    )


def check_batch(inputs: Any, targets: Any, index: int, device: torch.device, model_dtype: torch.dtype) -> None:
    """Inputs and targets must be on the parameters' device, floating tensors of the parameters' dtype."""
    for role, obj in (("inputs", inputs), ("targets", targets)):
        for t in _leaves(obj):
            if normalize_device(t.device) != device:
                raise DeviceMismatchError(
                    f"batch {index} {role} are on {t.device} but the parameters are on {device}: wrap the loader, "
                    f"hessops.zoo.data.on_device(loader, '{device}'), or move the model"
                )
            if t.is_floating_point() and t.dtype != model_dtype:
                raise DtypeMismatchError(
                    f"batch {index} {role} have dtype {t.dtype} but the parameters have {model_dtype}: "
                    f"cast the data (x.to({model_dtype})) or the model (model.to({t.dtype}))"
                )


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor in a pytree to ``dtype`` (no copy when it already has it)."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, obj
    )


def model_constants(
    model: nn.Module, names: Sequence[str], model_dtype: torch.dtype, dtype: torch.dtype
) -> dict[str, Tensor]:
    """What ``functional_call`` must be given besides the parameters ``names`` to evaluate ``model`` in
    ``dtype``: nothing in the model's dtype; else the other parameters and the buffers, floating ones cast."""
    if dtype == model_dtype:
        return {}
    selected = set(names)
    constants = {n: p.detach().to(dtype) for n, p in model.named_parameters() if n not in selected}
    constants.update({n: cast_floating(b, dtype) for n, b in model.named_buffers()})
    return constants


def model_state(problem: Problem, dtype: torch.dtype) -> tuple[ParamTree, dict[str, Tensor]]:
    """The current values of the selected parameters (detached, as ``dtype``) and of everything else the
    model holds (other parameters and buffers), cast too when ``dtype`` is not the model's."""
    model = problem.model
    all_params = dict(model.named_parameters())
    params = tuple(all_params[n].detach().to(dtype) for n in problem.names)
    constants = model_constants(model, problem.names, problem.model_dtype, dtype)
    if problem.allow_train_mode:
        # Train-mode BatchNorm normalizes by batch statistics and updates its running statistics in place,
        # which torch.func forbids; hiding the running statistics (None) skips the update and leaves the
        # user's buffers untouched, without changing the output.
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
                prefix = f"{name}." if name else ""
                constants.update({prefix + b: None for b in ("running_mean", "running_var", "num_batches_tracked")})
    return params, constants


def call_model(
    model: nn.Module, names: Sequence[str], params: ParamTree, constants: dict[str, Tensor], inputs: Any
) -> Any:
    """``model(inputs)`` with the given parameter values, through ``torch.func.functional_call``:
    ``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``. An
    output object with a tensor ``.logits`` (HuggingFace's ``ModelOutput``) is taken as its logits. Embeddings
    with ``sparse=True`` run with dense gradients (:func:`dense_embeddings`)."""
    state = dict(constants)
    state.update(zip(names, params))
    with dense_embeddings(model):
        if isinstance(inputs, Mapping):
            outputs = functional_call(model, state, (), dict(inputs))
        elif isinstance(inputs, (tuple, list)):
            outputs = functional_call(model, state, tuple(inputs))
        else:
            outputs = functional_call(model, state, (inputs,))
    logits = None if isinstance(outputs, Tensor) else getattr(outputs, "logits", None)
    return logits if isinstance(logits, Tensor) else outputs


@contextlib.contextmanager
def dense_embeddings(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s ``nn.Embedding`` modules with ``sparse=False`` inside the block, and give each its
    ``sparse`` back after it. ``sparse`` chooses only the layout of the weight's gradient
    (for sparse optimizers), not the function, so the curvature is the same; torch's sparse gradients have
    no reshape or double backward, which every product needs."""
    sparse = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    for module in sparse:
        module.sparse = False
    try:
        yield
    finally:
        for module in sparse:
            module.sparse = True


def flat_to_tree(rows: Tensor, shapes: Sequence[torch.Size]) -> ParamTree:
    """(c, n) -> tuple of (c, *shape) tensors, views where possible."""
    sizes = [s.numel() for s in shapes]
    return tuple(part.reshape(rows.shape[0], *shape) for part, shape in zip(rows.split(sizes, dim=1), shapes))


def add_tree_(flat: Tensor, tree: ParamTree, alpha: float = 1.0) -> None:
    """``flat += alpha · tree`` for ``flat`` of shape (c, n) and ``tree`` a tuple of (c, *shape) tensors in the
    flat order, in place, without concatenating the tree (one copy of the parameters, 0.5 GB for GPT-2 small)."""
    start = 0
    for t in tree:
        size = t[0].numel()
        flat[:, start : start + size].add_(t.reshape(t.shape[0], size), alpha=alpha)
        start += size


def write_tree_(flat: Tensor, tree: ParamTree, alpha: float = 1.0) -> None:
    """``flat = alpha · tree``, as :func:`add_tree_` writes it: the first batch's products start the sum without a
    zeroed buffer to add them to (a parameter-sized fill and pass less per product)."""
    start = 0
    for t in tree:
        size = t[0].numel()
        torch.mul(t.reshape(t.shape[0], size), alpha, out=flat[:, start : start + size])
        start += size


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite. A sum is non-finite whenever an element is (NaN and ±inf
    propagate), so a finite sum settles it without a boolean copy of ``t``; a non-finite sum (that, or an
    overflow of finite values) is decided element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def first_batch(data: Iterable) -> Any:
    """The first batch of ``data``, after checking that ``data`` can be iterated again (each product is one
    pass): a generator, or an object whose ``__iter__`` hands out one stored iterator, is refused before
    anything is consumed from it."""
    try:
        iterator = iter(data)
    except TypeError:
        raise DataFormatError(
            f"data must be a re-iterable of (inputs, targets) batches, got {type(data).__name__}"
        ) from None
    # A DataLoader is re-iterable; with persistent workers it hands out the same (reset) iterator each time.
    if iterator is data or (not isinstance(data, torch.utils.data.DataLoader) and iter(data) is iterator):
        raise DataFormatError(
            f"data ({type(data).__name__}) is a one-shot iterator (a generator, or an object whose __iter__ returns "
            "one stored iterator): every matmat is a pass over the data, so pass a re-iterable such as a "
            "DataLoader, a list of (inputs, targets) batches, or an object whose __iter__ starts a new pass"
        )
    try:
        return next(iterator)
    except StopIteration:
        raise EmptyDataError(
            "data yielded no batch: pass a non-empty DataLoader or list of (inputs, targets)"
        ) from None


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Run attention in kernels that torch can differentiate twice: the math kernel of
    ``scaled_dot_product_attention`` (the flash and memory-efficient kernels have no double backward, nor
    forward-mode derivatives) and ``nn.MultiheadAttention`` without its fused inference fast path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


_ATTENTION_SAID: list[str] = []  # the fused-attention modules named in this process's one message


def fused_attention(model: nn.Module) -> list[str]:
    """The modules of ``model`` that run attention in a fused kernel when left alone: timm's attention layers
    with ``fused_attn`` (``scaled_dot_product_attention``), ``nn.MultiheadAttention`` (its inference fast
    path, and the SDPA inside), and HuggingFace models configured with ``attn_implementation="sdpa"``."""
    found = []
    for name, module in model.named_modules():
        hf = getattr(getattr(module, "config", None), "_attn_implementation", None) == "sdpa" and not name
        if getattr(module, "fused_attn", False) is True or isinstance(module, nn.MultiheadAttention) or hf:
            found.append(f"'{name or type(model).__name__}' ({type(module).__name__})")
    return found


def announce_attention_kernels(model: nn.Module) -> None:
    """Say once per process, with an :class:`~hessops.errors.AttentionKernelWarning`, that products run the
    attention of ``model`` in torch's math kernel (:func:`differentiable_kernels`), when it has fused attention."""
    if _ATTENTION_SAID:
        return
    found = fused_attention(model)
    if not found:
        return
    _ATTENTION_SAID.extend(found)
    more = f" and {len(found) - 2} more" if len(found) > 2 else ""
    warnings.warn(
        f"the model runs attention in fused kernels ({', '.join(found[:2])}{more}: scaled_dot_product_attention's "
        "flash and memory-efficient kernels, MultiheadAttention's fast path), which have no second derivatives: "
        "hessops runs each product in torch's math attention kernel with the fast path off, and restores your kernel "
        "settings after it (outputs agree with the fused kernels' to rounding). Said once per process",
        AttentionKernelWarning,
        stacklevel=4,
    )
