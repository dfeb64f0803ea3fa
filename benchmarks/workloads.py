"""The benchmark workloads: a model, a loss and fixed random CIFAR-shaped data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hessops.zoo.models import build_model


@dataclass
class Workload:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    data: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_examples(self) -> int:
        return sum(len(y) for _, y in self.data)


def mlp_100k() -> nn.Module:
    """3072-32-32-10 with ReLU: 99,722 parameters on 3×32×32 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def tiny_mlp() -> nn.Module:
    """For the smoke run: 3072-4-10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 4), nn.Tanh(), nn.Linear(4, 10))


MODELS = {
    "mlp": mlp_100k,
    "cnn": lambda: build_model("cnn-cifar-5k"),
    "resnet18": lambda: build_model("resnet18_cifar10"),
    "tiny": tiny_mlp,
}


def make_workload(
    name: str, *, num_examples: int, batch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Workload:
    """Random-initialized model ``name`` (seeded) and ``num_examples`` random 3×32×32 images with random
    labels (seeded), in batches of ``batch_size``, on ``device`` in ``dtype``; model in eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name]().to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_examples, 3, 32, 32, generator=generator, dtype=dtype)
    y = torch.randint(0, 10, (num_examples,), generator=generator)
    data = [
        (x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)) for i in range(0, num_examples, batch_size)
    ]
    return Workload(name, model, nn.CrossEntropyLoss(), data)
