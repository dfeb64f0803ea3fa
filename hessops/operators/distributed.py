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
import pickle
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from hessops.constants import DEFAULT_TIMEOUT_S, TIMEOUT_ENV
from hessops.errors import DistributedError, InvalidArgumentError

AGREEMENT_RTOL = 1e-9  # checksums further apart than this (relative) mean the ranks hold different numbers
STATUS_BYTES = 4096  # room for one rank's pickled status; error messages are cut to fit
# The longest all_reduce waits for gloo's worker thread to let go of a tensor. The wait ends as soon as it
# does (about a millisecond when idle), so the bound only matters on a starved machine: generous, not a clock.
RELEASE_TIMEOUT_S = 60.0


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


def synchronize(
    acc: torch.Tensor, count: int, status: dict, setup: tuple[Any, int, int]
) -> tuple[torch.Tensor, int, list[dict]]:
    """Exchange every rank's status (examples seen, failure, first non-finite batch), then, if all went
    well, sum ``acc`` over the ranks. Raises :class:`DistributedError` on every rank when one failed or a
    collective broke (a rank died or exceeded the process group's timeout)."""
    group, rank, world = setup
    try:
        statuses = exchange_statuses({"count": count, **status}, acc.device, setup)
        failed = [(r, s["error"]) for r, s in enumerate(statuses) if s.get("error")]
        if failed:
            raise DistributedError(
                "; ".join(f"rank {r} failed: {message}" for r, message in failed)
                + ": the product was abandoned on every rank"
            )
        check_agreement(statuses)
        all_reduce(acc, group)
    except DistributedError:
        raise
    except RuntimeError as error:
        raise DistributedError(
            f"rank {rank}: a collective failed ({str(error).splitlines()[0]}): another rank died or did not answer "
            "within the process group's timeout (init_process_group(timeout=...))"
        ) from error
    return acc, sum(s["count"] for s in statuses), statuses


def fingerprint(params: tuple[torch.Tensor, ...], X: torch.Tensor) -> dict:
    """What every rank of a product must share, for the status exchange: the operator's size ``n``, and
    checksums ``(count, Σx, Σx²)`` in float64 of the flat parameters ``θ`` and of the block ``X`` (``(n,
    k)``): a pass over each and two host syncs, nothing next to a product."""
    return {
        "size": X.shape[0],
        "params": _checksum([p.detach().reshape(-1) for p in params]),
        "vectors": _checksum([X.detach().reshape(-1)]),
    }


def _checksum(tensors: list[torch.Tensor]) -> tuple[int, float, float]:
    flat = torch.cat([t.double() for t in tensors])
    return flat.numel(), float(flat.sum()), float((flat * flat).sum())


def check_agreement(statuses: list[dict]) -> None:
    """Raise :class:`DistributedError` (on every rank: each holds every status) when the ranks' fingerprints
    (:func:`fingerprint`) differ: operator sizes exactly, checksums beyond ``AGREEMENT_RTOL`` of their
    scale (room for sums taken in another order, on another thread count). Before the sum of the products,
    so that ranks of different sizes never enter a collective with different shapes (gloo aborts)."""
    if "size" not in statuses[0]:
        return
    causes = {
        "size": "the operators have different sizes: build the same model with the same params on every rank",
        "params": "the model's parameters differ: load the same checkpoint (and the same params=) on every rank",
        "vectors": "the vectors multiplied differ: pass the same seed (and start) to eigs, trace, logdet, "
        "spectral_density on every rank, and call them in the same order",
    }
    for key, cause in causes.items():
        values = [s[key] for s in statuses]
        groups: list[list[int]] = []
        for rank, value in enumerate(values):
            for group in groups:
                if _close(values[group[0]], value):
                    group.append(rank)
                    break
            else:
                groups.append([rank])
        if len(groups) > 1:
            seen = "; ".join(f"ranks {', '.join(map(str, g))}: {_shown(values[g[0]])}" for g in groups)
            raise DistributedError(f"the ranks disagree ({seen}): {cause}. The product was abandoned on every rank")


def _close(a, b) -> bool:
    """Equal sizes, or checksums ``(count, Σx, Σx²)`` within ``AGREEMENT_RTOL`` of their scales:
    ``√(count · Σx²) ≥ Σ|x|`` for the sum, ``Σx²`` for the sum of squares."""
    if isinstance(a, int) or a[0] != b[0]:
        return a == b
    squares = max(a[2], b[2])
    return abs(a[1] - b[1]) <= AGREEMENT_RTOL * (a[0] * squares) ** 0.5 and abs(a[2] - b[2]) <= AGREEMENT_RTOL * squares


def _shown(value) -> str:
    return (
        str(value)
        if isinstance(value, int)
        else f"{value[0]} numbers, sum {value[1]:.17g}, sum of squares {value[2]:.17g}"
    )


def exchange_statuses(status: dict, device: torch.device, setup: tuple[Any, int, int]) -> list[dict]:
    """Every rank's ``status`` dict, on every rank, in rank order, through one ``all_reduce``: rank r writes
    its pickled status into row r of a zeroed ``[world, STATUS_BYTES]`` byte table, and the sum of the tables
    holds every row.

    Not ``all_gather_object``: gloo's worker threads keep an ``all_gather``'s tensors until they run another
    collective, which :func:`all_reduce` below could not wait for; and one collective is cheaper than
    ``all_gather_object``'s two."""
    group, rank, world = setup
    payload = _pickled(status)
    table = torch.zeros(world, STATUS_BYTES, dtype=torch.uint8, device=device)
    table[rank, :8] = torch.tensor(list(len(payload).to_bytes(8, "little")), dtype=torch.uint8)
    table[rank, 8 : 8 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    all_reduce(table, group)
    rows = table.cpu().numpy()
    return [pickle.loads(row[8 : 8 + int.from_bytes(row[:8].tobytes(), "little")].tobytes()) for row in rows]


def all_reduce(tensor: torch.Tensor, group: Any) -> None:
    """``dist.all_reduce(tensor)`` (a sum, in place) that returns only once gloo's worker thread has let go of
    ``tensor``.

    The worker drops its reference a moment after the collective completes, and dropping it needs the GIL
    (torch keeps a tensor's Python object alive while C++ holds the tensor). If the process is exiting by
    then, the worker cannot take the GIL and the process aborts with "terminate called without an active
    exception" (pytorch/pytorch#190489): a rank that raised DistributedError and exited at once hit this in
    12 of 155 runs. Waiting here, with the GIL released, cost nothing measurable (a 4 kB sum over 2 ranks:
    660 µs per call with the wait, 791 µs without, 2,000 calls each). Other backends (NCCL) are not waited
    for: their watchdog keeps work for up to its polling interval."""
    before = sys.getrefcount(tensor)
    dist.all_reduce(tensor, group=group)
    if dist.get_backend(group) != "gloo":
        return
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while sys.getrefcount(tensor) > before and time.monotonic() < deadline:
        time.sleep(20e-6)


def _pickled(status: dict) -> bytes:
    """``status`` pickled into at most ``STATUS_BYTES - 8`` bytes, its error message shortened if need be."""
    payload = pickle.dumps(status)
    excess = len(payload) - (STATUS_BYTES - 8)
    if excess > 0 and status.get("error"):
        message = status["error"].encode()
        kept = message[: max(0, len(message) - excess - 32)].decode(errors="ignore")
        payload = pickle.dumps({**status, "error": kept + " [...]"})
    if len(payload) > STATUS_BYTES - 8:
        raise ValueError(
            f"a rank's status takes {len(payload)} bytes, more than the {STATUS_BYTES - 8} there is room for"
        )
    return payload


def default_timeout() -> float:
    """The process group's timeout, in seconds, where none is given: ``$HESSOPS_DIST_TIMEOUT`` when set,
    else ``DEFAULT_TIMEOUT_S`` (30 minutes). Raises ``InvalidArgumentError`` (a ``ValueError``) when the variable
    is not a positive number."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds < float("inf")):
        raise InvalidArgumentError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return seconds


def init_from_environment(device: str = "cpu", timeout_seconds: float | None = None) -> tuple[int, int, torch.device]:
    """Initialize the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): NCCL for CUDA, gloo for the CPU, with a timeout so
    that a rank that dies does not leave the others waiting forever (``timeout_seconds``; by default
    :func:`default_timeout`, 30 minutes or ``$HESSOPS_DIST_TIMEOUT``). Returns ``(rank, world_size, device)``;
    on CUDA each process takes GPU ``LOCAL_RANK``."""
    if timeout_seconds is None:
        timeout_seconds = default_timeout()
    use_cuda = torch.device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), target
