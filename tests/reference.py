"""Dense, obviously-correct references: every fast path in hessops is compared with these, in float64.

They work on the whole dataset at once (one concatenated batch), so they share nothing with the operators'
batch weighting, chunking or vmapping, and import nothing from hessops. Batches are ``(inputs, targets)`` pairs or
dicts of keyword inputs with the targets under ``"labels"`` (HuggingFace style); a model may return a tensor or an
object with ``.logits``.

The double-backward references are checked against central finite differences of the gradient
(:func:`fd_hessian_product`, first derivatives only) in tests/test_reference.py. Where they are wrong: through
torch's weight norm (``nn.utils.weight_norm``, and ``parametrizations.weight_norm`` over a dimension: its fused
kernel), whose double backward torch gets 5-40 % wrong; there the finite differences are the truth
(tests/operators/test_witness.py). ``parametrizations.weight_norm(dim=None)`` runs plain ops and is right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev


def concat(data) -> tuple:
    """The whole dataset as one batch: ``(x, y)`` from pairs, or ``(inputs, labels)`` from dict batches (every key
    but ``"labels"`` is a keyword input)."""
    batches = list(data)
    if batches and isinstance(batches[0], dict):
        whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        labels = whole.pop("labels")
        return whole, labels
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def as_float64(data) -> list:
    """Batches with their floating-point tensors in float64 (integer inputs and labels as they are)."""

    def cast(t):
        return t.double() if isinstance(t, Tensor) and t.is_floating_point() else t

    return [{k: cast(v) for k, v in b.items()} if isinstance(b, dict) else tuple(cast(t) for t in b) for b in data]


def call(model: nn.Module, inputs):
    """model(inputs) for a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def logits_of(outputs) -> Tensor:
    return outputs if isinstance(outputs, Tensor) else outputs.logits


def next_token_loss(outputs, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits[:, t] predicting labels[:, t + 1] over the counted (not -100) targets of the
    whole batch, written out here (the loss hessops.operators.losses.next_token_cross_entropy computes)."""
    logits = logits_of(outputs)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="mean"
    )


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


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Put the buffers back after (train-mode BatchNorm updates its running statistics). Not a deepcopy: the legacy
    ``nn.utils.weight_norm`` module holds a non-leaf tensor that deepcopy refuses."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def reference_hessian(model: nn.Module, loss_fn: Callable, data, params=None) -> Tensor:
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
    """∇²θ loss_fn(model(inputs), targets) by plain double backward on the module (buffers put back after): no
    torch.func, no functional_call; row i is the gradient of (∇L)ᵢ. Parameters ``names`` in that order, default the
    trainable ones in ``model.parameters()`` order. Attention runs in torch's math kernel, the one with a
    double backward."""
    owned = dict(model.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad] if names is None else [owned[n] for n in names]
    with _buffers_kept(model), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        outputs = call(model, inputs)
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


def hessian_product(model: nn.Module, loss_fn: Callable, data, v: Tensor) -> Tensor:
    """H v on the concatenated data by plain double backward (∇(∇L · v)) on the module (buffers put back after):
    for models whose dense Hessian is too costly to build here."""
    inputs, targets = concat(data)
    params = [p for p in model.parameters() if p.requires_grad]
    with _buffers_kept(model), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        grads = torch.autograd.grad(
            loss_fn(call(model, inputs), targets), params, create_graph=True, allow_unused=True, materialize_grads=True
        )
        g = torch.cat([t.reshape(-1) for t in grads])
        hv = torch.autograd.grad(g @ v, params, allow_unused=True, materialize_grads=True)
    return torch.cat([t.reshape(-1) for t in hv]).detach()


def gradient_at(model: nn.Module, loss_fn: Callable, inputs, targets, point: Tensor) -> Tensor:
    """∇L at the trainable parameters set to ``point`` (one ``loss.backward()``: first derivatives of the module as
    written, no double backward); the parameters are put back after."""
    params = [p for p in model.parameters() if p.requires_grad]
    theta = nn.utils.parameters_to_vector(params).detach().clone()
    nn.utils.vector_to_parameters(point, params)
    try:
        model.zero_grad()
        loss_fn(call(model, inputs), targets).backward()
        return torch.cat([torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1) for p in params])
    finally:
        nn.utils.vector_to_parameters(theta, params)
        model.zero_grad()


def fd_hessian_product(
    model: nn.Module, x, y, v: Tensor, loss_fn: Callable = F.cross_entropy, step: float = 1e-5
) -> Tensor:
    """(∇L(θ + hv) − ∇L(θ − hv)) / 2h for L = loss_fn(model(x), y) on all of (x, y), h = ``step``: error
    ~h²·|∇³L| (truncation) + eps·|∇L|/h (rounding) in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    theta = nn.utils.parameters_to_vector(params).detach().clone()
    plus = gradient_at(model, loss_fn, x, y, theta + step * v)
    minus = gradient_at(model, loss_fn, x, y, theta - step * v)
    return (plus - minus) / (2 * step)


def richardson_hessian_product(model: nn.Module, loss_fn: Callable, data, v: Tensor, step: float = 1e-4) -> Tensor:
    """Central differences at h and h/2 combined as (4 D(h/2) − D(h)) / 3, which cancels the h² term: error
    ~h⁴·|∇⁵L| + eps·|∇L|/h ≈ 1e-12 relative at h = 1e-4 in float64 on models with derivatives of order one."""
    x, y = concat(data)
    coarse = fd_hessian_product(model, x, y, v, loss_fn, step)
    fine = fd_hessian_product(model, x, y, v, loss_fn, step / 2)
    return (4 * fine - coarse) / 3


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
