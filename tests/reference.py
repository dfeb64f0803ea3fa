"""Dense, obviously-correct references: every fast path in hessops is compared with these, in float64.

They work on the whole dataset at once (one concatenated batch), so they share nothing with the operators'
batch weighting, chunking or vmapping.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev


def concat(data: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*data)
    return torch.cat(xs), torch.cat(ys)


def _flat_function(model: nn.Module, params: Sequence[Tensor] | None):
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    chosen_names = [names[id(p)] for p in chosen]
    shapes = [p.shape for p in chosen]
    theta = torch.cat([p.detach().reshape(-1) for p in chosen])

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        parts = flat.split([s.numel() for s in shapes])
        return {n: t.reshape(s) for n, t, s in zip(chosen_names, parts, shapes)}

    return theta, unflatten


def dense_hessian(model: nn.Module, loss_fn: Callable, data, params=None) -> Tensor:
    """∇²θ of loss_fn(model(X), Y) on the concatenated data: torch.func.hessian."""
    x, y = concat(data)
    theta, unflatten = _flat_function(model, params)
    return hessian(lambda t: loss_fn(functional_call(model, unflatten(t), (x,)), y))(theta)


def dense_ggn(model: nn.Module, loss_fn: Callable, data, params=None) -> Tensor:
    """Jᵀ (∂²L/∂f²) J on the concatenated data, with J from jacrev and the output Hessian from hessian."""
    x, y = concat(data)
    theta, unflatten = _flat_function(model, params)
    out = functional_call(model, unflatten(theta), (x,))
    jac = jacrev(lambda t: functional_call(model, unflatten(t), (x,)).reshape(-1))(theta)
    out_hessian = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return jac.T @ out_hessian @ jac


def dense_empirical_fisher(model: nn.Module, loss_fn: Callable, data, params=None) -> Tensor:
    """(1/N) Σ g_n g_nᵀ with g_n the gradient of example n's loss alone, one example at a time."""
    x, y = concat(data)
    theta, unflatten = _flat_function(model, params)
    grads = [
        grad(lambda t: loss_fn(functional_call(model, unflatten(t), (x[i : i + 1],)), y[i : i + 1]))(theta)
        for i in range(len(x))
    ]
    g = torch.stack(grads)
    return g.T @ g / len(x)


def relative_error(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))
