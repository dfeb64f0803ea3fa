"""The fixture grid's cases (tests/conftest.py): a small model, a loss and batched data, with lazily computed dense
float64 references (tests/reference.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import toy_networks
from reference import dense_empirical_fisher, dense_ggn, reference_hessian
from torch import Tensor, nn


@dataclass
class Case:
    """A model, a loss and batched data, with lazily computed dense references."""

    name: str
    model: nn.Module
    loss_fn: Callable
    data: list[tuple[Tensor, Tensor]]
    ggn_model: nn.Module | None = None  # the split the GGN uses, where it differs from `model`
    ggn_loss: Callable | None = None

    def __post_init__(self):
        self._cache: dict[str, Tensor] = {}

    def dense(self, kind: str) -> Tensor:
        if kind not in self._cache:
            if kind == "hessian":
                self._cache[kind] = reference_hessian(self.model, self.loss_fn, self.data)
            elif kind == "ggn":
                self._cache[kind] = dense_ggn(self.ggn_model or self.model, self.ggn_loss or self.loss_fn, self.data)
            elif kind == "ef":
                self._cache[kind] = dense_empirical_fisher(self.model, self.loss_fn, self.data)
        return self._cache[kind]


def split(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(x.split(sizes), y.split(sizes)))


def make_case(model_name: str, loss_name: str, batching: str) -> Case:
    torch.manual_seed(0)
    n = 11
    sizes = {"one": [n], "equal": [4, 4, 3], "uneven": [1, 7, 3]}[batching]
    if model_name == "mlp":
        model, x = toy_networks.mlp().double(), torch.randn(n, 4, dtype=torch.float64)
    elif model_name == "bn_mlp":
        model, x = toy_networks.bn_mlp().double(), torch.randn(n, 4, dtype=torch.float64)
    else:
        raise ValueError(model_name)
    if loss_name == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (n,))
    else:
        loss_fn, y = nn.MSELoss(), torch.randn(n, 3, dtype=torch.float64)
    return Case(f"{model_name}-{loss_name}-{batching}", model, loss_fn, split(x, y, sizes))
