"""Small networks for the tests (not the library's zoo, hessops.models): the two of our users' studies among them."""

from __future__ import annotations

import torch
from torch import nn

from hessops.models import build_model


def mlp(d_in: int = 4, hidden: int = 6, d_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def bn_mlp(d_in: int = 4, hidden: int = 6, d_out: int = 3) -> nn.Module:
    """An MLP with BatchNorm, with non-trivial running statistics, put in eval mode."""
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, d_out))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def cifar_cnn_5k() -> nn.Module:
    """The 5,100-parameter CIFAR-10 CNN of the spectrum study, from the zoo."""
    return build_model("cnn-cifar-5k")


def mnist_cnn_1710() -> nn.Module:
    """The 1,710-parameter MNIST network of the basin-volume study (log-probabilities out), from the zoo."""
    return build_model("cnn-mnist-1710")
