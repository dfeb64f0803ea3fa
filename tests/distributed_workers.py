"""Worker functions for tests/operators/test_distributed.py, run in spawned processes (gloo on the CPU)."""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn
from toy_networks import mlp

import hessops
from hessops.operators.distributed import default_timeout

N_EXAMPLES = 23


def problem():
    torch.manual_seed(0)
    model = mlp(4, 8, 3).double()
    x, y = torch.randn(N_EXAMPLES, 4, dtype=torch.float64), torch.randint(0, 3, (N_EXAMPLES,))
    return model, nn.CrossEntropyLoss(), x, y


def uneven_shards(world: int) -> list[list[int]]:
    """Batch sizes per rank, uneven on purpose; with 3 ranks the last one has no data at all."""
    return {1: [[5, 7, 11]], 2: [[5, 7], [11]], 3: [[5, 7, 1], [10], []]}[world]


def my_shard(rank: int, world: int) -> tuple:
    """``(model, loss_fn, batches)``: the problem with this rank's batches of :func:`uneven_shards` (none for an
    empty shard)."""
    model, loss_fn, x, y = problem()
    sizes = uneven_shards(world)
    start = sum(sum(s) for s in sizes[:rank])
    mine = sizes[rank]
    xs, ys = x[start : start + sum(mine)], y[start : start + sum(mine)]
    return model, loss_fn, list(zip(xs.split(mine), ys.split(mine))) if mine else []


def directions(model: nn.Module) -> torch.Tensor:
    """The three vectors the products are taken on, the same in every process."""
    n = sum(p.numel() for p in model.parameters())
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def single_process_results() -> dict:
    model, loss_fn, x, y = problem()
    data = [(x, y)]
    V = directions(model)
    H, G = hessops.Hessian(model, loss_fn, data), hessops.GGN(model, loss_fn, data)
    return {"HV": H @ V, "GV": G @ V, "top5": hessops.eigs(H, 5, "LM", tol=1e-10).values, "V": V}


def _init(rank: int, world: int, store: str) -> None:
    """Join the gloo group with the library's timeout ($HESSOPS_DIST_TIMEOUT, else 30 minutes): long enough for
    a rank that a loaded machine slows down; no test waits for it (a failing or dead rank ends the others at
    once, which the tests check by the collectives each rank ran, not by the clock). One thread per rank: two or
    three ranks of two threads each on a 2-core machine wait on each other's spinning threads."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=default_timeout()),
    )


def _count_collectives() -> dict:
    """Count this process's calls to ``torch.distributed.all_reduce`` (hessops' only collective) into the
    returned dict's ``"calls"``, a failed call included."""
    counter = {"calls": 0}
    original = dist.all_reduce

    def counted(*args, **kwargs):
        counter["calls"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted
    return counter


def products(rank: int, world: int, store: str, out_dir: str) -> None:
    _init(rank, world, store)
    try:
        model, loss_fn, data = my_shard(rank, world)
        V = directions(model)  # not single_process_results()'s: its products and eigs would all be wasted here
        H, G = hessops.Hessian(model, loss_fn, data), hessops.GGN(model, loss_fn, data)
        assert H.problem.distributed is not None
        result = {"HV": H @ V, "GV": G @ V, "top5": hessops.eigs(H, 5, "LM", tol=1e-10).values}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def finite_differences(rank: int, world: int, store: str, out_dir: str) -> None:
    """hvp_mode="finite-difference" on uneven shards (with 3 ranks, one has no data): products, the error every rank
    carries, and eigs in lock-step."""
    _init(rank, world, store)
    try:
        model, loss_fn, data = my_shard(rank, world)
        H = hessops.Hessian(model, loss_fn, data, hvp_mode="finite-difference")
        result = {"HV": H @ directions(model), "error": H.product_error}
        result["top3"] = hessops.eigs(H, 3, "LM", tol=1e-7).values
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def failing(rank: int, world: int, store: str, out_dir: str) -> None:
    """Rank 1's data holds a batch the model cannot take; every rank must end with an error naming rank 1,
    after the one status exchange of the product (no sum, no wait for the timeout)."""
    import json

    _init(rank, world, store)
    collectives = _count_collectives()
    try:
        model, loss_fn, x, y = problem()
        data = [(x[:5], y[:5])] if rank == 0 else [(x[5:10], y[5:10]), (torch.randn(4, 7, dtype=torch.float64), y[:4])]
        H = hessops.Hessian(model, loss_fn, data)
        try:
            H @ torch.randn(H.shape[0], dtype=torch.float64)
            message = "no error"
        except Exception as error:  # noqa: BLE001 - the test reads what each rank saw
            message = f"{type(error).__name__}: {error}"
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"message": message, "collectives": collectives["calls"]}, f)
    finally:
        dist.destroy_process_group()


def dying(rank: int, world: int, store: str, out_dir: str) -> None:
    """Rank 1 dies before the product; rank 0 must end with an error at its first collective (rank 1's
    connections closed with it), or at worst after the process group's timeout."""
    import json

    _init(rank, world, store)
    collectives = _count_collectives()
    model, loss_fn, x, y = problem()
    H = hessops.Hessian(model, loss_fn, [(x, y)])
    if rank == 1:
        os._exit(3)
    try:
        H @ torch.randn(H.shape[0], dtype=torch.float64)
        message = "no error"
    except Exception as error:  # noqa: BLE001
        message = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=1)}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"message": message, "collectives": collectives["calls"]}, f)


def releasing(rank: int, world: int, store: str, out_dir: str) -> None:
    """200 sums through hessops.operators.distributed.all_reduce: each must be right and, once it returns, no longer
    held by gloo's worker thread (the tensor's Python reference count is back where it was)."""
    import sys

    from hessops.operators.distributed import all_reduce

    _init(rank, world, store)
    try:
        held, wrong = 0, 0
        for i in range(200):
            tensor = torch.full((1000,), float(rank + i))
            before = sys.getrefcount(tensor)
            all_reduce(tensor, None)
            held += sys.getrefcount(tensor) > before
            wrong += not torch.equal(tensor, torch.full((1000,), float(sum(r + i for r in range(world)))))
        torch.save({"held": held, "wrong": wrong}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def disagreeing(rank: int, world: int, store: str, out_dir: str) -> None:
    """Three ways for ranks to disagree, one after the other in one process group: rank 1's model differs
    (a perturbed weight), each rank passes its own eigs seed, rank 1's operator is smaller (other params).
    Each must end every rank with a DistributedError, the group still usable for the next."""
    import json

    _init(rank, world, store)
    try:
        model, loss_fn, x, y = problem()
        data = [(x[rank::world], y[rank::world])]
        messages = {}

        def attempt(name, fn):
            try:
                fn()
                messages[name] = "no error"
            except Exception as error:  # noqa: BLE001 - the test reads what each rank saw
                messages[name] = f"{type(error).__name__}: {error}"

        perturbed = mlp(4, 8, 3).double()
        perturbed.load_state_dict(model.state_dict())
        if rank == 1:
            with torch.no_grad():
                perturbed[0].weight[0, 0] += 1e-6
        V = torch.ones(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
        attempt("params", lambda: hessops.Hessian(perturbed, loss_fn, data) @ V)
        H = hessops.Hessian(model, loss_fn, data)
        attempt("seed", lambda: hessops.eigs(H, 2, "LA", seed=rank))
        params = list(model.parameters()) if rank == 0 else [model[2].weight, model[2].bias]
        small = hessops.Hessian(model, loss_fn, data, params=params)
        attempt("size", lambda: hessops.eigs(small, 2, "LA"))
        attempt("agreeing", lambda: H @ V)  # the group survived the three refusals
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(messages, f)
    finally:
        dist.destroy_process_group()
