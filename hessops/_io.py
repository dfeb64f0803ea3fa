"""Files written whole or not at all: the one atomic write that results, figures, eigenvectors, checkpoints
and the tuner's cache go through. Torch-free."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hessops.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all.

    ``write`` fills a temporary file beside ``path``, which is flushed to disk and then replaces it
    (``os.replace``, atomic on POSIX and Windows): an interrupted or failed write leaves any old file as it was,
    and a concurrent reader sees the old file or the new one. The folder is made if missing; the file gets the
    usual permissions (0666 less the umask).

    Args:
        path: the file to write.
        write: called once with the temporary file, opened for binary writing.

    Raises:
        OutputError: the folder or the file could not be written (its message names the path and the cause).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):  # an OutputError is one already
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
        raise
