"""Small networks for the tests (not the library's zoo, hessops.zoo.models): the two of our users' studies among them;
a test operator, and an interrupted one; networks with torch's weight norm, in each of its forms."""

from __future__ import annotations

import contextlib
import warnings

import cola
import torch
from torch import nn
from torch.nn.utils import parametrizations

from hessops.zoo.models import build_model


class Attention(nn.Module):
    """Self-attention through nn.MultiheadAttention (its fast path and flash kernel lack double backward)."""

    def __init__(self):
        super().__init__()
        self.attention, self.out = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.attention(x, x, x, need_weights=False)[0].mean(1))


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


def hidden_bottom(low: float = -10.0, n: int = 600) -> tuple[cola.ops.LinearOperator, torch.Tensor]:
    """A float64 operator with eigenvalues ``low`` and n − 1 spread over [0, 300], whose eigenvector of ``low`` has
    weight 1e-8 on eigs' start (randn of seed 0), with its spectrum. Lanczos from that start sees the bulk first:
    after 40 steps its smallest Ritz value is 0.25 with error bound 1.4 (not converged), far above ``low``, as a
    short run on a large model can stop above a large negative eigenvalue."""
    start = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = start / torch.linalg.vector_norm(start)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).Q
    Q[:, 0] = Q[:, 0] - (Q[:, 0] @ start) * start + 1e-8 * start
    Q = torch.linalg.qr(Q).Q
    spectrum = torch.cat([torch.tensor([low]), torch.linspace(0, 300, n - 1)]).double()
    return cola.SelfAdjoint(cola.ops.Dense(Q @ torch.diag(spectrum) @ Q.T)), spectrum


@contextlib.contextmanager
def interrupted_at(op: cola.ops.LinearOperator, after: int):
    """``op`` raising KeyboardInterrupt (as Ctrl-C does) at its ``after``-th product, inside the block (the
    operator itself, so that the checkpoint's fingerprint is the same as the resumed run's)."""
    original, calls = op._matmat, []

    def product(X):
        calls.append(1)
        if len(calls) == after:
            raise KeyboardInterrupt
        return original(X)

    op._matmat = product
    try:
        yield op
    finally:
        del op._matmat


def legacy_weight_norm(module: nn.Module, dim: int) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy hook is deprecated, and still used (HiFi-GAN)
        return nn.utils.weight_norm(module, dim=dim)


WEIGHT_NORMS = {
    "parametrization-dim0": lambda m: parametrizations.weight_norm(m, dim=0),
    "parametrization-dim1": lambda m: parametrizations.weight_norm(m, dim=1),
    "parametrization-whole": lambda m: parametrizations.weight_norm(m, dim=None),  # torch's unfused path
    "legacy-dim0": lambda m: legacy_weight_norm(m, 0),
    "legacy-dim1": lambda m: legacy_weight_norm(m, 1),
}


def weight_normed(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A small float64 network with one weight-normed layer (an MLP, or a convolution), and 6 inputs for it."""
    torch.manual_seed(0)
    if kind == "conv":  # HuggingFace's wav2vec2 normalizes its positional convolution over the kernel (dim=2)
        model = nn.Sequential(
            parametrizations.weight_norm(nn.Conv1d(2, 3, 3), dim=0),
            nn.Tanh(),
            legacy_weight_norm(nn.Conv1d(3, 2, 2), dim=2),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        return model.double(), torch.randn(6, 2, 5, dtype=torch.float64)
    model = nn.Sequential(WEIGHT_NORMS[kind](nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    return model.double(), torch.randn(6, 4, dtype=torch.float64)
