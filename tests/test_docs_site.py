"""The documentation site builds as `make docs` builds it (mkdocs build --strict), with every page of docs/ in
its nav, so that a new page cannot be left out, and with the mathematics kept for MathJax."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mkdocs.yml"


def nav_pages(nav) -> list[str]:
    """The Markdown files a mkdocs nav names, in order, through nested sections."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for entry in nav for page in nav_pages(entry)]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG), "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def test_every_page_is_in_the_nav(config):
    pages = nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk, "docs/*.md and the nav of mkdocs.yml differ"
    assert len(pages) == len(set(pages)), "a page is in the nav twice"
    assert pages[0] == "index.md"


def test_site_has_every_page(config, site):
    for page in nav_pages(config["nav"]):
        html = site / Path(page).with_suffix(".html")  # use_directory_urls: false
        assert html.is_file(), f"{page} was not built into {html.name}"
        assert "<h1" in html.read_text(), f"{html.name} has no title"


def test_mathematics_is_left_to_mathjax(config, site):
    """$...$ and $$...$$ become arithmatex spans and divs; none is left as text for Markdown to mangle."""
    marked = 0
    for page in nav_pages(config["nav"]):
        html = (site / Path(page).with_suffix(".html")).read_text()
        marked += html.count('class="arithmatex"')
        prose = re.sub(r"<(pre|code)[^>]*>.*?</\1>", "", html, flags=re.DOTALL)
        assert "$$" not in prose, f"{page}: a $$ block was not recognized as mathematics"
    assert marked > 0
