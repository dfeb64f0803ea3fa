"""The ``hessops`` command line: :func:`main` parses (torch-free), checks, then runs one command. Nothing in the
library imports this package (tests/test_layers.py)."""

from __future__ import annotations

from hessops.cli.app import main

__all__ = ["main"]
