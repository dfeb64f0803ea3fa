"""The fixture grid: small models × losses × batchings, with their dense float64 references."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

import toy_networks  # noqa: E402
from reference import dense_empirical_fisher, dense_ggn, dense_hessian  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _tuning_cache(tmp_path_factory):
    """Keep the Hessian tuner's disk cache out of the user's home (hessops/operators/hvp_tuning.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HESSOPS_CACHE_DIR", str(tmp_path_factory.mktemp("hessops-cache")))
        yield


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
                self._cache[kind] = dense_hessian(self.model, self.loss_fn, self.data)
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


_GRID = [(m, loss, b) for m in ("mlp", "bn_mlp") for loss in ("ce", "mse") for b in ("one", "equal", "uneven")]


@pytest.fixture(scope="session", params=_GRID, ids=["-".join(p) for p in _GRID])
def case(request) -> Case:
    return make_case(*request.param)


@pytest.fixture(scope="session")
def cifar_case() -> Case:
    """The 5,100-parameter CIFAR CNN on 6 random images in batches of 4 and 2 (dense Hessian: ~20 s)."""
    torch.manual_seed(0)
    model = toy_networks.cifar_cnn_5k().double()
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    return Case("cifar-cnn-5k", model, nn.CrossEntropyLoss(), split(x, y, [4, 2]))


@pytest.fixture(scope="session")
def mnist_case() -> Case:
    """The 1,710-parameter MNIST CNN (log-softmax + NLL) on 10 random images in batches of 4, 4, 2."""
    torch.manual_seed(0)
    model = toy_networks.mnist_cnn_1710().double()
    x, y = torch.randn(10, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (10,))
    return Case(
        "mnist-cnn-1710",
        model,
        nn.NLLLoss(),
        split(x, y, [4, 4, 2]),
        ggn_model=model[:-1],
        ggn_loss=nn.CrossEntropyLoss(),
    )
