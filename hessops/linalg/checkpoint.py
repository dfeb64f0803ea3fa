"""Resumable runs: a long computation saves its state to a file every so often and picks it up after a kill.

:class:`Checkpoint` writes atomically (a temporary file in the same folder, then ``os.replace``), at most
every ``every`` seconds and once at the end, with a fingerprint of the run (:func:`fingerprint`):

- the function and its arguments (a start vector by its SHA-256);
- the operator's size, dtype, device type and kind with its wrappers and options (``Regularized(c=…)``,
  ``MCFisher(samples=…, seed=…)``);
- for a hessops operator (:meth:`hessops.CurvatureOperator.identity`): the model's class; a SHA-256 of the
  differentiated parameters (names, dtypes, shapes and values); a SHA-256 of the floating buffers (BatchNorm's
  running statistics) and the frozen parameters; the loss: its kind and every option (reduction,
  ``ignore_index``, ``label_smoothing``, ``weight=`` by its SHA-256, ...), or a callable's qualified name;
- for a dense matrix, a SHA-256 of its entries;
- the data: the order-independent fingerprint of the examples (:mod:`hessops.operators._determinism`) that the
  operator's first product takes anyway for ``check_determinism``, recorded in the file when it is saved.

Resuming a run whose fingerprint differs raises :class:`~hessops.errors.CheckpointMismatchError` naming what
differs. Everything but the data is compared when the file is opened. The data cost a pass to fingerprint, so
they are compared without an extra one where a product follows: a Lanczos state that is not finished continues
with a product, and the resumed run's first product compares its data before it returns, so nothing is
computed from a mix of two datasets; a state that takes results from the file without a product (a finished
run; any other state) is compared at once, by one pass over the data without the model. With
``check_determinism=False`` (a random operator, by the user's choice) the data are not fingerprinted or
compared. Files of an earlier format (``VERSION``) are refused. The state is restored exactly (the basis, the
recurrence's vectors, the random generator), so a resumed run gives the bit-identical result of an
uninterrupted one on the same machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hessops._arguments import real
from hessops._cola import cola
from hessops._io import atomic_write
from hessops.errors import CheckpointMismatchError, InvalidArgumentError
from hessops.numerics import digest

FORMAT = "hessops-checkpoint"
VERSION = 2  # 2: loss, buffers, model, options and data in the fingerprint
HASHED = {  # fingerprint fields compared by SHA-256, and how a message names them
    "parameters": "parameters' values",
    "buffers": "buffers (floating buffers, e.g. BatchNorm's running statistics, and frozen parameters)",
}


class Checkpoint:
    """A checkpoint file at ``path`` for one run, saved at most every ``every`` seconds, identified by
    ``fingerprint`` (see :func:`fingerprint`; ``None``: no check) and by the data of ``operators`` (the hessops
    operators in the run's operator, whose :meth:`~hessops.CurvatureOperator.data_fingerprint` is saved)."""

    def __init__(
        self,
        path: str | os.PathLike,
        every: float = 60.0,
        *,
        fingerprint: dict[str, Any] | None = None,
        operators: Sequence[Any] = (),
    ):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentError(f"checkpoint must be a file path, got {type(path).__name__}")
        self.path = Path(path)
        if self.path.is_dir():
            raise InvalidArgumentError(f"checkpoint={str(path)!r} is a directory: give the path of a file")
        self.every = real("checkpoint_every", every, nonnegative=True)
        self.fingerprint = fingerprint or {}
        self.operators = tuple(operators)
        self._data: list[torch.Tensor | None] = [None] * len(self.operators)  # a resumed file's data fingerprints
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is no file yet.

        Returns:
            The state saved by :meth:`save`, or ``None``.

        Raises:
            CheckpointMismatchError: the file cannot be read, is of another format or version, or belongs to
                another run (a fingerprint field, or the data, differ: the message names which).
        """
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointMismatchError(
                f"checkpoint {self.path} cannot be read ({type(error).__name__}: {error}): delete it, or pass "
                "another path, to start afresh"
            ) from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{self.path} is not a hessops checkpoint: pass another path, or delete it to start afresh"
            )
        if saved.get("version") != VERSION:
            raise CheckpointMismatchError(
                f"checkpoint {self.path} was written by another version of hessops (format {saved.get('version')}; "
                f"this one reads {VERSION}), whose runs it cannot tell apart: delete it, or pass another path, to "
                "start afresh"
            )
        for field, value in self.fingerprint.items():
            if saved["fingerprint"].get(field) != value:
                raise self._mismatch(field, saved["fingerprint"].get(field), value)
        self._expect_data(saved["data"], saved["state"])
        return saved["state"]

    def _expect_data(self, data: list[torch.Tensor | None], state: Any) -> None:
        """Have each operator compare its data with the saved fingerprint: at its first product when ``state``
        continues with one (a Lanczos state with ``done`` false), else now, by a pass without the model."""
        now = not (isinstance(state, dict) and state.get("done") is False)
        for i, (op, saved) in enumerate(zip(self.operators, data)):
            if saved is None:  # saved before the first product finished: no result of the data is in the file
                continue
            self._data[i] = saved
            if now:
                op.data_fingerprint(take=True)
            op.expect_data(saved, lambda change: self._mismatch("data", None, None, change))

    def _mismatch(self, field: str, saved: Any, value: Any, change: str | None = None) -> CheckpointMismatchError:
        """The error for a fingerprint ``field`` (or the data) that differs from the saved run's."""
        if change is not None:
            what = f"its data differ from this run's ({change})"
        elif field in HASHED:
            what = f"its {HASHED[field]} differ from this run's"
        else:
            what = f"its {field} is {saved!r}, this run's is {value!r}"
        return CheckpointMismatchError(
            f"checkpoint {self.path} belongs to another run: {what}. Resume with the same model, data and settings, "
            "or pass another checkpoint path (or delete the file) to start afresh"
        )

    def due(self) -> bool:
        """Whether ``every`` seconds have passed since the last save (or the start)."""
        return time.monotonic() - self._last >= self.every

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically, with the fingerprint
        and the data fingerprint of each operator (its first product's, or the resumed file's before that)."""
        data = [op.data_fingerprint() for op in self.operators]
        data = [taken if taken is not None else saved for taken, saved in zip(data, self._data)]
        content = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "data": data, "state": state}
        atomic_write(self.path, lambda file: torch.save(content, file))
        self._last = time.monotonic()

    def interrupted(self) -> KeyboardInterrupt:
        """The ``KeyboardInterrupt`` to raise after a Ctrl-C has been saved: one line on how to resume."""
        return KeyboardInterrupt(
            f"progress saved in {self.path}; run the same call again with checkpoint={str(self.path)!r} "
            f"(command line: --resume {self.path}) to continue"
        )


def fingerprint(function: str, op: Any, **arguments: Any) -> dict[str, Any]:
    """What identifies a run, besides its data: ``function`` and its ``arguments`` (numbers, strings, ``None``),
    the operator's ``n``, ``dtype``, ``device`` type and ``operator`` (its kind, options and wrappers:
    ``Regularized(c=…) > MCFisher(samples=…, seed=…)``), and for the hessops operators in it their ``model``,
    ``parameters``, ``buffers`` and ``loss`` (:meth:`hessops.CurvatureOperator.identity`; several joined by
    ``" > "``); a dense matrix's entries count as its ``parameters``. Fields that do not apply are ``None``."""
    kinds, fields = [], {"model": [], "parameters": [], "buffers": [], "loss": []}
    for inner in _chain(op):
        identity = inner.identity() if hasattr(inner, "identity") and hasattr(inner, "problem") else {}
        c = getattr(inner, "c", None)
        kinds.append(identity.get("operator", type(inner).__name__) + (f"(c={float(c)!r})" if _number(c) else ""))
        if isinstance(getattr(inner, "A", None), torch.Tensor):
            identity = {"parameters": digest(inner.A)}
        for key, values in fields.items():
            if key in identity:
                values.append(identity[key])
    return {
        "function": function,
        "arguments": dict(sorted(arguments.items())),
        "n": int(op.shape[0]),
        "dtype": str(op.dtype),
        "device": torch.device(op.device).type,
        "operator": " > ".join(kinds),
        **{key: " > ".join(values) if values else None for key, values in fields.items()},
    }


def tensor_digest(tensor: torch.Tensor) -> str:
    """A SHA-256 of a tensor's dtype, shape and entries (for a start vector in a fingerprint)."""
    return digest(tensor)


def _chain(op: Any) -> list[Any]:
    """``op`` and the operators it wraps (``.op`` of a wrapper such as :class:`~hessops.Regularized`), outermost
    first."""
    chain = []
    while op is not None:
        chain.append(op)
        op = getattr(op, "op", None)
        op = op if isinstance(op, cola.ops.LinearOperator) else None
    return chain


def _number(c: Any) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def open_checkpoint(
    path: str | os.PathLike | None, every: float, function: str, op: Any, **arguments: Any
) -> Checkpoint | None:
    """The :class:`Checkpoint` of a run of ``function`` on ``op`` with ``arguments``, or ``None`` without ``path``."""
    if path is None:
        return None
    operators = [inner for inner in _chain(op) if hasattr(inner, "expect_data") and hasattr(inner, "problem")]
    return Checkpoint(path, every, fingerprint=fingerprint(function, op, **arguments), operators=operators)
