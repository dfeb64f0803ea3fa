"""torch.compile of a forward-over-reverse HVP against hessops' tuned H @ v, CIFAR CNN (5,100 params), N=256,
batch 128, on the CPU: ``python -m benchmarks.compile_trial`` (set TORCHINDUCTOR_CACHE_DIR to a new folder for a
cold compile). Prints medians of 7 interleaved repeats and the agreement; results in benchmarks/RESULTS.md."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

import hessops
from hessops.numerics import norm
from hessops.zoo.models import build_model

N, BATCH, REPEATS = 256, 128, 7


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(N, 3, 32, 32), torch.randint(0, 10, (N,))
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    model = build_model("cnn-cifar-5k").eval()
    loss_fn = nn.CrossEntropyLoss()
    params = {name: p.detach() for name, p in model.named_parameters()}
    H = hessops.Hessian(model, loss_fn, batches, progress=False)
    v = torch.randn(H.shape[0])
    tangents = dict(zip(params, v.split([p.numel() for p in params.values()])))
    tangents = {name: t.view_as(params[name]) for name, t in tangents.items()}

    def batch_hvp(params: dict, tangents: dict, xb: Tensor, yb: Tensor) -> dict:
        def batch_loss(p: dict) -> Tensor:
            return loss_fn(functional_call(model, p, (xb,)), yb)

        return jvp(grad(batch_loss), (params,), (tangents,))[1]

    def dataset_hvp(hvp: Callable) -> Tensor:
        """The mean over the dataset: each batch's product weighted by its size."""
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for xb, yb in batches:
            for name, t in hvp(params, tangents, xb, yb).items():
                total[name] += t * len(yb)
        return torch.cat([(total[name] / N).reshape(-1) for name in params])

    def gradient() -> None:
        for xb, yb in batches:
            torch.autograd.grad(loss_fn(model(xb), yb), list(model.parameters()))

    compiled = torch.compile(batch_hvp)
    began = time.perf_counter()
    dataset_hvp(compiled)
    print(f"compile + first product: {time.perf_counter() - began:.1f} s", flush=True)
    methods = {
        "grad": gradient,
        "hessops H@v (auto)": lambda: H @ v,
        "eager jvp(grad)": lambda: dataset_hvp(batch_hvp),
        "compiled jvp(grad)": lambda: dataset_hvp(compiled),
    }
    for method in methods.values():  # warm-up, and hessops' tuning
        method()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(REPEATS):
        for name, method in methods.items():
            began = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name}: {median * 1e3:.1f} ms  ({median / medians['grad']:.2f}x grad)")
    reference = H @ v
    print("compiled vs hessops rel diff:", float(norm(dataset_hvp(compiled) - reference) / norm(reference)))
    print("torch", torch.__version__)


if __name__ == "__main__":
    main()
