"""The fixture grid: small models × losses × batchings, with their dense float64 references."""

from __future__ import annotations

import os

import pytest
import torch
import toy_networks
from cases import Case, make_case, split
from torch import nn

# `make test` runs the suite in two pytest-xdist workers, one per core: each computes on one thread (and so do the
# processes its tests start), so that the two never stall on a shared core. Run alone, pytest computes on two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _tuning_cache(tmp_path_factory):
    """Keep the Hessian tuner's disk cache out of the user's home (hessops/operators/hvp_tuning.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HESSOPS_CACHE_DIR", str(tmp_path_factory.mktemp("hessops-cache")))
        yield


_GRID = [(m, loss, b) for m in ("mlp", "bn_mlp") for loss in ("ce", "mse") for b in ("one", "equal", "uneven")]


@pytest.fixture(scope="session", params=_GRID, ids=["-".join(p) for p in _GRID])
def case(request) -> Case:
    return make_case(*request.param)


@pytest.fixture(scope="session")
def cifar_case() -> Case:
    """The 5,100-parameter CIFAR CNN on 6 random images in batches of 4 and 2 (its dense Hessian would take ~20 s:
    its test takes H V by double backward instead)."""
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
