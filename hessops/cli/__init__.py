"""The ``hessops`` command line: :func:`main` parses (torch-free), checks, then runs one command of the
registry (:mod:`hessops.cli.commands`). Nothing in the library imports this package (tests/test_layers.py)."""

from __future__ import annotations

from hessops.cli.app import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, main

__all__ = ["main", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]
