"""Running an example as a user does (a subprocess), and importing it to call its functions, or its ``main``
on a command line, in-process."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

from repo_root import ROOT

EXAMPLES = ROOT / "examples"
# A guard against a hung run only: a quick run's work is bounded by its sizes, and a busy machine may take
# many times its quiet-machine minute, which must not fail a correct run.
HANG_SECONDS = 3600


def load_example(name: str) -> ModuleType:
    """``examples/NAME.py`` as a module (registered in ``sys.modules``: dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, out: Path) -> tuple[dict, Path]:
    """``python examples/NAME.py --quick --out OUT``; its ``result.json`` and ``out``."""
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
    )
    assert run.returncode == 0, run.stderr
    return json.loads((out / "result.json").read_text()), out


def exit_of(example: ModuleType, *argv: str) -> tuple[int, str]:
    """``example.main()`` in-process on the command line ``argv``, for the runs that end before any work (bad
    arguments, missing files): the exit status ``python examples/NAME.py ARGV`` would have and what it would
    write to stderr (a ``SystemExit`` message included, as the interpreter prints it)."""
    stderr = io.StringIO()
    code = None
    with mock.patch.object(sys, "argv", [f"{example.__name__}.py", *argv]), contextlib.redirect_stderr(stderr):
        try:
            example.main()
        except SystemExit as exit:
            code = exit.code
    if isinstance(code, str):
        return 1, stderr.getvalue() + code + "\n"
    return code or 0, stderr.getvalue()
