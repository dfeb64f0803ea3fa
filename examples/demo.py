"""The demo: the top-5 Hessian eigenvalues of a small MLP trained for a moment on generated data.

    python examples/demo.py --out demo/result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cola
import torch
from torch import nn

import hessops


def make_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 10 dimensions, labelled by blob."""
    generator = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(3, 10, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return centers[labels] + torch.randn(n, 10, generator=generator), labels


def trained_problem() -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """An MLP trained for 200 full-batch SGD steps; its loss and the data in batches of 128."""
    torch.manual_seed(0)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model.eval(), loss_fn, [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)]


def top_eigenvalues(k: int) -> tuple[list[float], int, float]:
    """The k largest eigenvalues of the training-loss Hessian by CoLA's Lanczos, n, and the seconds taken."""
    H = hessops.Hessian(*trained_problem())
    start = time.perf_counter()
    values, _ = cola.eig(H, k, which="LM", alg=cola.Lanczos(max_iters=80, tol=1e-8, key=0))
    return sorted(values.real.tolist(), reverse=True), H.shape[0], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo/result.json"))
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()

    top, n, seconds = top_eigenvalues(args.k)
    print(f"top-{args.k} eigenvalues of the training-loss Hessian, n = {n} parameters ({seconds:.2f} s):")
    for i, value in enumerate(top, 1):
        print(f"  λ{i} = {value:.6f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"eigenvalues": top, "n_params": n, "seconds": seconds}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
