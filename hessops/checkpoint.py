"""Resumable runs: a long computation saves its state to a file every so often and picks it up after a kill.

:class:`Checkpoint` writes atomically (a temporary file in the same folder, then ``os.replace``), at most
every ``every`` seconds and once at the end, with a fingerprint of the problem: the function and its
arguments, the operator's size, dtype, device type and kind, and a SHA-256 of the operator's parameters
where it has them (a hessops operator's model parameters, a dense matrix's entries). The data the operator
iterates over is not hashed (that would cost a pass over it): resume with the same data. Resuming from a
checkpoint whose fingerprint differs raises :class:`~hessops.errors.CheckpointMismatchError`. The state is
restored exactly (the basis, the recurrence's vectors, the random generator), so a resumed run gives the
bit-identical result of an uninterrupted one on the same machine.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hessops._arguments import real
from hessops._cola import cola
from hessops.errors import CheckpointMismatchError, InvalidArgumentError

FORMAT = "hessops-checkpoint"
VERSION = 1


class Checkpoint:
    """A checkpoint file at ``path`` for one run, saved at most every ``every`` seconds, identified by
    ``fingerprint`` (see :func:`fingerprint`; ``None``: no check)."""

    def __init__(self, path: str | os.PathLike, every: float = 60.0, *, fingerprint: dict[str, Any] | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentError(f"checkpoint must be a file path, got {type(path).__name__}")
        self.path = Path(path)
        if self.path.is_dir():
            raise InvalidArgumentError(f"checkpoint={str(path)!r} is a directory: give the path of a file")
        self.every = real("checkpoint_every", every, nonnegative=True)
        self.fingerprint = fingerprint or {}
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is no file yet; a file of another run is refused."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointMismatchError(
                f"checkpoint {self.path} cannot be read ({type(error).__name__}: {error}): delete it, or pass "
                "another path, to start afresh"
            ) from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("version") != VERSION:
            raise CheckpointMismatchError(
                f"{self.path} is not a hessops checkpoint (version {VERSION}): pass another path, or delete it to "
                "start afresh"
            )
        for field, value in self.fingerprint.items():
            if saved["fingerprint"].get(field) != value:
                raise CheckpointMismatchError(
                    f"checkpoint {self.path} belongs to another run: its {field} is {saved['fingerprint'].get(field)!r}"
                    f", this run's is {value!r}. Resume with the same settings, or pass another checkpoint path "
                    "(or delete the file) to start afresh"
                )
        return saved["state"]

    def due(self) -> bool:
        """Whether ``every`` seconds have passed since the last save (or the start)."""
        return time.monotonic() - self._last >= self.every

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(
                    {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "state": state}, file
                )
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._last = time.monotonic()

    def interrupted(self) -> KeyboardInterrupt:
        """The ``KeyboardInterrupt`` to raise after a Ctrl-C has been saved: one line on how to resume."""
        return KeyboardInterrupt(
            f"progress saved in {self.path}; run the same call again with checkpoint={str(self.path)!r} "
            f"(command line: --resume {self.path}) to continue"
        )


def fingerprint(function: str, op: Any, **arguments: Any) -> dict[str, Any]:
    """What identifies a run: ``function`` and its ``arguments`` (numbers, strings, ``None``), and the
    operator's ``n``, ``dtype``, ``device`` type, ``operator`` (its kind and wrappers: ``Regularized(c=…)``)
    and ``parameters`` (a SHA-256 of its parameters, or ``None`` where it has none that hessops knows)."""
    kinds, digest, found = [], hashlib.sha256(), False
    inner = op
    while inner is not None:
        c = getattr(inner, "c", None)
        kinds.append(type(inner).__name__ + (f"(c={float(c)!r})" if isinstance(c, (int, float)) else ""))
        problem = getattr(inner, "problem", None)
        tensors = []
        if problem is not None and hasattr(problem, "names"):
            named = dict(problem.model.named_parameters())
            tensors = [named[name] for name in problem.names]
        elif isinstance(getattr(inner, "A", None), torch.Tensor):
            tensors = [inner.A]
        for tensor in tensors:
            found = True
            digest.update(_bytes(tensor))
        inner = getattr(inner, "op", None)
        inner = inner if isinstance(inner, cola.ops.LinearOperator) else None
    return {
        "function": function,
        "arguments": dict(sorted(arguments.items())),
        "n": int(op.shape[0]),
        "dtype": str(op.dtype),
        "device": torch.device(op.device).type,
        "operator": " > ".join(kinds),
        "parameters": digest.hexdigest() if found else None,
    }


def tensor_digest(tensor: torch.Tensor) -> str:
    """A SHA-256 of a tensor's entries (for a start vector in a fingerprint)."""
    return hashlib.sha256(_bytes(tensor)).hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def open_checkpoint(
    path: str | os.PathLike | None, every: float, function: str, op: Any, **arguments: Any
) -> Checkpoint | None:
    """The :class:`Checkpoint` of a run of ``function`` on ``op`` with ``arguments``, or ``None`` without ``path``."""
    if path is None:
        return None
    return Checkpoint(path, every, fingerprint=fingerprint(function, op, **arguments))
