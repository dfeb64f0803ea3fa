"""Every ```python block in README.md and docs/*.md runs, in order, one namespace per file."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_pages_are_found():
    assert (ROOT / "README.md") in PAGES and len(PAGES) >= 3


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run(page, capsys, monkeypatch):
    """The blocks run as a user's script would: in a module of their own (registered, so that a dataclass
    defined there works), without this file's `from __future__` flags (dont_inherit)."""
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page.name} has no python block"
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page.name} block {i + 1}", "exec", dont_inherit=True), module.__dict__)
        except Exception as error:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{page.name}, python block {i + 1} failed: {error!r}\n{block}") from error
