"""ruff's lint and format checks over the whole tree, with the configuration in pyproject.toml (docstrings on the
public API of hessops, pyflakes, import order, ...), as CI runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from repo_root import ROOT


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    run = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, (
        f"ruff {' '.join(command)} found problems (fix: ruff check --fix . && ruff format .):\n{run.stdout}{run.stderr}"
    )
