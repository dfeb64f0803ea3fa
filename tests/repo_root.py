"""The repository's root, for the tests that read or run what lies outside tests/ (found from this module, which
stays at tests/ whichever folder a test file moves to)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
