"""The torch pitfalls of docs/torch-pitfalls.md that no other test states: `jacrev(jacrev(·))` and
`torch.func.hessian` of a flat parameter vector are 2-10 % off through affine LayerNorm, affine InstanceNorm and
batch-statistics BatchNorm, while plain double backward (tests/reference.py) agrees with central finite differences of
the gradient there. If torch fixes them, these tests fail, and the page must say so."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_hessian
from torch import nn
from torch.func import functional_call, hessian, jacrev


def layered(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "layernorm":
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(8, 4)
    elif name == "instancenorm":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True), nn.Flatten(), nn.Linear(18, 3))
        x = torch.randn(8, 2, 8)
    else:
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(8, 4)
    with torch.no_grad():  # affine parameters away from their (1, 0) start, as after training
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.InstanceNorm1d, nn.BatchNorm1d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.double(), x.double(), torch.randint(0, 3, (8,))


def flat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        tree, start = {}, 0
        for name, shape in zip(names, shapes):
            tree[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return nn.functional.cross_entropy(functional_call(model, tree, (x,)), y)

    return loss, theta


def finite_difference_column(model, x, y, direction: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """(∇L(θ + h d) − ∇L(θ − h d)) / 2h, first derivatives only."""
    loss, theta = flat_loss(model, x, y)

    def gradient(at):
        at = at.clone().requires_grad_(True)
        return torch.autograd.grad(loss(at), at)[0]

    return (gradient(theta + h * direction) - gradient(theta - h * direction)) / (2 * h)


@pytest.mark.parametrize("name", ["layernorm", "instancenorm", "batchnorm-batch-statistics"])
def test_flat_vector_hessians_of_torch_func_are_off_where_double_backward_is_right(name):
    """Tolerances: double backward against central differences with h = 1e-5, whose truncation error is about
    h² · (third derivatives) ≈ 1e-9 here: 1e-6 relative. torch.func's two dense Hessians: at least 1 % off
    (measured 2-10 %), far beyond both."""
    model, x, y = layered(name)
    truth = autograd_hessian(model, nn.CrossEntropyLoss(), x, y)
    direction = torch.randn(truth.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    witness = finite_difference_column(model, x, y, direction)
    assert torch.linalg.norm(truth @ direction - witness) <= 1e-6 * torch.linalg.norm(witness)
    loss, theta = flat_loss(model, x, y)
    for wrong in (jacrev(jacrev(loss))(theta), hessian(loss)(theta)):
        error = float(torch.linalg.matrix_norm(wrong - truth) / torch.linalg.matrix_norm(truth))
        assert error > 1e-2, f"{name}: torch.func's dense Hessian is now within {error:.1e}: update the docs"
