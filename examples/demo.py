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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo/result.json"))
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    data = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)]

    H = hessops.Hessian(model, loss_fn, data)
    start = time.perf_counter()
    values, _ = cola.eig(H, args.k, which="LM", alg=cola.Lanczos(max_iters=60, tol=1e-8, key=0))
    seconds = time.perf_counter() - start
    top = sorted(values.real.tolist(), reverse=True)
    print(f"{H!r}: top-{args.k} eigenvalues of the training-loss Hessian ({seconds:.2f} s)")
    for i, value in enumerate(top, 1):
        print(f"  λ{i} = {value:.6f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"eigenvalues": top, "n_params": H.shape[0], "seconds": seconds}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
