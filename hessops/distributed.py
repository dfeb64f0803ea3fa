"""Data-parallel curvature on torch.distributed: each rank streams its shard, one collective sums.

A distributed operator is the exact curvature of the mean loss over the union of all ranks' data:
rank r computes :math:`A_r = \\sum_{b \\in r} n_b C_b V` and :math:`N_r = \\sum_{b\\in r} n_b`, and every rank
receives :math:`(\\sum_r A_r) / \\sum_r N_r`, the same on every rank, whatever the shard sizes (an empty shard
included). Algorithms on top (Lanczos, SLQ, Hutch++) then run unchanged and in lock-step, because every
rank draws the same seeded probe vectors.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from hessops.errors import DistributedError


def resolve(distributed: bool | None, group: Any) -> tuple[Any, int, int] | None:
    """``(group, rank, world_size)`` when the operator is distributed, else ``None``.

    ``distributed=None`` (the default) means: distributed exactly when a ``group`` is given or
    ``torch.distributed`` is initialized."""
    if distributed is None:
        distributed = group is not None or (dist.is_available() and dist.is_initialized())
    if not distributed:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "distributed=True but torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(torchrun sets up the environment for it) before building the operator"
        )
    group = group or dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def shard(dataset: Dataset, *, group: Any = None) -> Subset:
    """This rank's contiguous shard of a map-style dataset: rank r of W gets indices
    ``[⌊rN/W⌋, ⌊(r+1)N/W⌋)``, so the shards are disjoint, cover every example once, and differ in size by
    at most one. Deterministic: the same on every run. Outside torch.distributed, the whole dataset."""
    if not (dist.is_available() and dist.is_initialized()):
        return Subset(dataset, range(len(dataset)))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = len(dataset)
    return Subset(dataset, range(rank * n // world, (rank + 1) * n // world))


def synchronize(acc: torch.Tensor, count: int, status: dict, setup: tuple[Any, int, int]) -> tuple[torch.Tensor, int, list[dict]]:
    """Exchange every rank's status (examples seen, failure, first non-finite batch), then, if all went
    well, sum ``acc`` over the ranks. Raises :class:`DistributedError` on every rank when one failed or a
    collective broke (a rank died or exceeded the process group's timeout)."""
    group, rank, world = setup
    statuses: list[Any] = [None] * world
    try:
        dist.all_gather_object(statuses, {"count": count, **status}, group=group)
        failed = [(r, s["error"]) for r, s in enumerate(statuses) if s.get("error")]
        if failed:
            raise DistributedError(
                "; ".join(f"rank {r} failed: {message}" for r, message in failed)
                + ": the product was abandoned on every rank"
            )
        dist.all_reduce(acc, group=group)
    except DistributedError:
        raise
    except RuntimeError as error:
        raise DistributedError(
            f"rank {rank}: a collective failed ({str(error).splitlines()[0]}): another rank died or did not answer "
            "within the process group's timeout (init_process_group(timeout=...))"
        ) from error
    return acc, sum(s["count"] for s in statuses), statuses


def init_from_environment(device: str = "cpu", timeout_seconds: float = 600.0) -> tuple[int, int, torch.device]:
    """Initialize the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): NCCL for CUDA, gloo for the CPU, with a timeout so
    that a rank that dies does not leave the others waiting forever. Returns ``(rank, world_size, device)``;
    on CUDA each process takes GPU ``LOCAL_RANK``."""
    use_cuda = torch.device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), target
