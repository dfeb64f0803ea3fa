r"""Operations whose second derivatives torch gets wrong, written out in plain operations for the curvature
products: not public API.

**Weight norm.** ``nn.utils.parametrizations.weight_norm`` and the legacy ``nn.utils.weight_norm`` hook compute
:math:`w = g \cdot v / \lVert v \rVert` (the norm over every dimension but ``dim``; over the whole tensor for
``dim=None``) with ``torch._weight_norm``, which for ``dim=0`` and the last dimension runs a fused kernel. Its
first derivative is right, but torch 2.14.1 differentiates it twice as if :math:`\lVert v \rVert` were a
constant, in every formulation (double backward, ``torch.func``'s transforms): Hessian-vector products of a
small weight-normed MLP are 5-36 % off central finite differences of the gradient and the Hessian is
asymmetric (docs/torch-pitfalls.md). :func:`written_out` runs a model with each such call replaced by
``v * (g / sqrt(sum(v * v, other dims)))``, plain operations whose derivatives of every order torch has right,
through a ``TorchFunctionMode`` (thread-local, entered only around a product, and only for a model that holds
weight norm, so other models pay nothing). The forward values agree with torch's kernel to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    r""":math:`g \cdot v / \lVert v \rVert`, the norm taken over every dimension of ``v`` but ``dim`` (over all of
    ``v`` for ``dim=-1``, as ``torch._weight_norm`` and ``torch.norm_except_dim`` define it), in plain operations."""
    if dim == -1:
        norm = (v * v).sum().sqrt()
    else:
        keep = dim % v.dim()
        norm = (v * v).sum([d for d in range(v.dim()) if d != keep], keepdim=True).sqrt()
    return v * (g / norm)


class _WrittenOut(TorchFunctionMode):
    """Replaces ``torch._weight_norm`` by :func:`weight_norm`; every other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            return weight_norm(*args, **kwargs)
        return func(*args, **kwargs)


def weight_norm_layers(model: nn.Module) -> list[str]:
    """``["'name' (weight norm of 'weight', dim=0)", ...]``: the modules of ``model`` whose weight is
    reparametrized by weight norm (``torch.nn.utils.parametrizations.weight_norm`` or the legacy hook)."""
    found = []
    for name, module in model.named_modules():
        label = name or type(model).__name__
        for tensor, parametrizations in getattr(module, "parametrizations", {}).items():
            for p in parametrizations:
                if type(p).__name__ == "_WeightNorm":
                    found.append(f"'{label}' (weight norm of '{tensor}', dim={_dim(p.dim)})")
        for hook in getattr(module, "_forward_pre_hooks", {}).values():
            if isinstance(hook, WeightNorm):
                found.append(f"'{label}' (legacy weight norm of '{hook.name}', dim={_dim(hook.dim)})")
    return found


def _dim(dim: int) -> int | None:
    """The ``dim`` the user passed: both forms store ``dim=None`` (the whole tensor's norm) as -1."""
    return None if dim == -1 else dim


@contextlib.contextmanager
def written_out(model: nn.Module, enabled: bool = True) -> Iterator[list[str]]:
    """Within it, ``model``'s weight norm runs as :func:`weight_norm` (when ``enabled`` and the model holds
    any; yields the layers written out, ``[]`` when none)."""
    layers = weight_norm_layers(model) if enabled else []
    if not layers:
        yield []
        return
    with _WrittenOut():
        yield layers
