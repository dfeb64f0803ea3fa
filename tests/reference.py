"""Dense, obviously-correct references: every fast path in hessops is compared with these, in float64.

They work on the whole dataset at once (one concatenated batch), so they share nothing with the operators'
batch weighting, chunking or vmapping.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

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
    """∇²θ of loss_fn(model(X), Y) on the concatenated data, by double backward on the module itself
    (:func:`autograd_hessian`): not ``torch.func.hessian``, which torch 2.14 gets 2-10 % wrong through
    LayerNorm, InstanceNorm and train-mode BatchNorm (docs/torch-pitfalls.md)."""
    x, y = concat(data)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = None if params is None else [names[id(p)] for p in params]
    return autograd_hessian(model, loss_fn, x, y, chosen)


def autograd_hessian(
    model: nn.Module, loss_fn: Callable, inputs, targets, names: Sequence[str] | None = None
) -> Tensor:
    """∇²θ loss_fn(model(inputs), targets) by plain double backward on (a copy of) the module: no torch.func,
    no functional_call; row i is the gradient of (∇L)ᵢ. Parameters ``names`` in that order, default the
    trainable ones in ``model.parameters()`` order. Attention runs in torch's math kernel, the one with a
    double backward."""
    model = copy.deepcopy(model)  # train-mode BatchNorm updates its running statistics
    owned = dict(model.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad] if names is None else [owned[n] for n in names]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        if isinstance(inputs, dict):
            outputs = model(**inputs)
        else:
            outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        grads = torch.autograd.grad(
            loss_fn(outputs, targets), params, create_graph=True, allow_unused=True, materialize_grads=True
        )
        g = torch.cat([t.reshape(-1) for t in grads])
        rows = []
        for i in range(g.numel()):
            if not g[i].requires_grad:  # a gradient entry constant in θ: a zero row
                rows.append(torch.zeros_like(g))
                continue
            row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True, materialize_grads=True)
            rows.append(torch.cat([t.reshape(-1) for t in row]))
    return torch.stack(rows).detach()


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


def enumerated_fisher(
    model: nn.Module, inputs: Tensor, terms: Callable[[Tensor], Iterable[tuple[Tensor, Tensor]]], divisor: float
) -> Tensor:
    """The expectation of a Monte-Carlo Fisher, with every label enumerated: (1/W) Σ_(t, y) p_t(y) g_ty g_tyᵀ,
    where ``terms(model(inputs))`` yields, for every target t and every label y it can take, the pair
    (p_t(y), ℓ_t(y)): the label's probability under the model (no gradient flows through it) and the per-target
    loss whose parameter gradient is g_ty, by plain backward on the module. Continuous labels enter through an
    exact quadrature rule (for a loss quadratic in the label, two points per element match the Gaussian's
    first two moments, which is all E[g gᵀ] depends on). ``divisor``: W, the number of counted targets for a
    mean, 1 for a sum. Trainable parameters in ``model.parameters()`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    outputs = model(inputs)
    total = torch.zeros(sum(p.numel() for p in params), sum(p.numel() for p in params), dtype=outputs.dtype)
    for probability, loss in terms(outputs):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        g = torch.cat([t.reshape(-1) for t in grads])
        total += float(probability) * torch.outer(g, g)
    return total / divisor
