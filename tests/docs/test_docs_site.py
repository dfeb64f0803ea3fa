"""The documentation site builds as `make docs` builds it (mkdocs build --strict), with every page of docs/ in
its nav, and works offline: its mathematics is MathML written at build time (docs_build/mathml.py), nothing
is loaded from another host, and, opened in headless Chromium, the mathematics is typeset and the search,
served from 127.0.0.1, finds the operators page."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from headless_chromium import INSTALL_HINT, Chromium, find_chromium
from repo_root import ROOT

CONFIG = ROOT / "mkdocs.yml"
# Hang guards only, about an hour (the build takes seconds, a page or a search well under one; tests bound
# work, not time): a hung build, browser or search fails the test instead of stalling the suite. The search
# poll ends as soon as the search answers, results or "No results found"; its guard is below the browser's,
# so a search that never answers fails with its own message.
BUILD_TIMEOUT_S = 3600
BROWSER_TIMEOUT_S = 3600
SEARCH_TIMEOUT_MS = 3_000_000


def nav_pages(nav) -> list[str]:
    """The Markdown files a mkdocs nav names, in order, through nested sections."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for entry in nav for page in nav_pages(entry)]


def built(site: Path, page: str) -> Path:
    """The HTML file of a docs page (use_directory_urls: false)."""
    return site / Path(page).with_suffix(".html")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG), "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


@pytest.fixture(scope="module")
def mathml() -> ModuleType:
    """docs_build/mathml.py, the build hook (mkdocs loads it by path; it is not a package)."""
    spec = importlib.util.spec_from_file_location("mathml", ROOT / "docs_build" / "mathml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:
        """No line on stderr per request."""


@pytest.fixture(scope="module")
def served(site):
    """The built site served over HTTP on 127.0.0.1, as `python -m http.server` does (the search needs HTTP: a
    web worker cannot be started from file://); its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium; without one the browser tests fail under CI (CI=true) and are skipped elsewhere."""
    binary = find_chromium()
    if binary is None:
        message = f"the documentation tests open the site in headless Chromium, and there is none: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    with Chromium(binary, timeout=BROWSER_TIMEOUT_S) as chromium:
        yield chromium


def test_every_page_is_in_the_nav(config):
    pages = nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk, "docs/*.md and the nav of mkdocs.yml differ"
    assert len(pages) == len(set(pages)), "a page is in the nav twice"
    assert pages[0] == "index.md"


@pytest.mark.parametrize(
    ("listing", "section", "prefix"),
    [("README.md", "## Documentation", "docs/"), ("docs/index.md", "## The pages", "")],
)
def test_every_page_is_listed(config, listing, section, prefix):
    """The list of pages in README.md and on the home page names every other page of the docs."""
    text = (ROOT / listing).read_text()
    assert section in text, f"{listing} has no section {section!r}"
    listed = text.split(section, 1)[1].split("\n## ", 1)[0]
    missing = [page for page in nav_pages(config["nav"])[1:] if f"]({prefix}{page})" not in listed]
    assert not missing, f"the list of pages in {listing} ({section}) leaves out {missing}"


def test_site_has_every_page(config, site):
    for page in nav_pages(config["nav"]):
        html = built(site, page)
        assert html.is_file(), f"{page} was not built into {html.name}"
        assert "<h1" in html.read_text(), f"{html.name} has no title"


def test_nothing_is_loaded_from_another_host(site):
    """No <script> or <link> of any page points off the site: no CDN (MathJax, highlight.js, fonts)."""
    for html in site.rglob("*.html"):
        for tag in re.findall(r"<(?:script|link)\b[^>]*>", html.read_text()):
            assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", tag), f"{html.name}: {tag}"


def test_mathematics_is_mathml(config, site):
    """Every $...$ and $$...$$ became MathML at build time: no arithmatex mark and no $$ is left."""
    formulas = 0
    for page in nav_pages(config["nav"]):
        html = built(site, page).read_text()
        assert 'class="arithmatex"' not in html, f"{page}: a formula was left for a script to typeset"
        formulas += html.count("<math ")
        prose = re.sub(r"<(pre|code)[^>]*>.*?</\1>", "", html, flags=re.DOTALL)
        assert "$$" not in prose, f"{page}: a $$ block was not recognized as mathematics"
    assert formulas > 0


def test_code_is_highlighted_at_build_time(site):
    html = built(site, "getting-started.md").read_text()
    assert '<div class="highlight">' in html and '<span class="kn">import</span>' in html
    assert ".highlight .kn" in (site / "css" / "pygments.css").read_text()


def test_mathml_of_the_docs_idioms(mathml):
    """What MathML Core leaves to the author: ℝ as a character (mathvariant is ignored), upright capital Greek,
    TeX's thin space after log and det but not before a parenthesis, and a minus after = as a sign."""
    assert "<mi>ℝ</mi>" in mathml.to_mathml(r"U \in \mathbb R^{d}", display=False)
    assert '<mi mathvariant="normal">Γ</mi>' in mathml.to_mathml(r"\Gamma", display=False)
    spaced = mathml.to_mathml(r"\log V - \log\det(H)", display=True)
    thin = '<mspace width="0.1667em" />'
    assert f"<mi>log</mi>{thin}<mi>V</mi>" in spaced
    assert f"<mi>log</mi>{thin}<mi>det</mi><mo" in spaced
    assert 'display="block"' in spaced
    assert '<mo>=</mo><mo form="prefix">−</mo><mn>3</mn><mo>−</mo>' in mathml.to_mathml("x = -3 - y", display=False)


@pytest.mark.parametrize(
    ("latex", "reason"),
    [
        (r"\foo x", r"does not know \foo"),
        (r"\frac{1", "not closed"),
        (r"x^", "latex2mathml failed"),
        ("a}", "closes no"),
    ],
)
def test_a_formula_that_cannot_be_converted_fails_the_build(mathml, latex, reason):
    """The build stops with the page and the formula named, rather than show the reader broken mathematics."""
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match=re.escape(reason)) as error:
        mathml.typeset(f'<p>A <span class="arithmatex">\\({latex}\\)</span>.</p>', "analysis.md")
    assert "analysis.md" in str(error.value) and repr(latex) in str(error.value)


def test_mathematics_is_typeset_in_the_browser(browser, served):
    """Chromium lays every formula of the analysis page out as MathML, and none is left as LaTeX source."""
    page = browser.open(f"{served}/analysis.html")
    formulas = browser.evaluate(
        page,
        """[...document.querySelectorAll('[role=main] math')].map(m => [
            getComputedStyle(m).display, m.getBoundingClientRect().height, m.textContent.trim().length])""",
    )
    blocks = (ROOT / "docs" / "analysis.md").read_text().count("$$") // 2
    typeset = sum(display == "block math" for display, _, _ in formulas)
    assert typeset == blocks, f"{typeset} of the {blocks} display formulas of analysis.md are typeset as MathML"
    assert any(display == "math" for display, _, _ in formulas), "no inline formula is typeset as MathML"
    for display, height, characters in formulas:
        assert display in ("math", "block math"), f"a formula is not laid out as MathML (display: {display})"
        assert height > 0 and characters > 0, "an empty formula"
    prose = browser.evaluate(
        page,
        """(() => { const main = document.querySelector('[role=main]');
            main.querySelectorAll('pre, code').forEach(e => e.remove()); return main.innerText; })()""",
    )
    for raw in ("$$", "\\(", "\\[", "\\)", "\\]", "\\frac", "\\log"):
        assert raw not in prose, f"{raw!r} is left in the rendered text of the analysis page"
    assert all(url.startswith(served) for url in browser.requests(page)), browser.requests(page)


@pytest.mark.parametrize("width", [390, 1280])
@pytest.mark.parametrize(
    ("page", "too_wide_for_a_phone"),
    [("operators.html", {"TABLE", "CODE"}), ("analysis.html", {"CODE"})],
    ids=["operators", "analysis"],
)
def test_wide_tables_and_code_scroll_inside_the_column(browser, served, page, too_wide_for_a_phone, width):
    """On a phone (390 CSS pixels) and a laptop, the page does not scroll sideways and no table, code block,
    display formula or figure sticks out of the content column; on the phone, the wide ones scroll inside it."""
    tab = browser.open(f"{served}/{page}", width=width)
    layout = browser.evaluate(
        tab,
        """(() => {
            const main = document.querySelector('[role=main]').getBoundingClientRect();
            const blocks = [...document.querySelectorAll('[role=main] :is(table, pre, .math-display, img)')];
            const scrolls = b => b.scrollWidth > b.clientWidth
                                 && ['auto', 'scroll'].includes(getComputedStyle(b).overflowX);
            return {
                page: document.documentElement.scrollWidth, window: window.innerWidth,
                out: blocks.filter(b => { const r = b.getBoundingClientRect();
                                          return r.right > main.right + 1 || r.left < main.left - 1; })
                           .map(b => b.outerHTML.slice(0, 80)),
                scrolling: [...document.querySelectorAll('[role=main] :is(table, pre code)')].filter(scrolls)
                           .map(b => b.tagName),
            };
        })()""",
    )
    assert layout["page"] <= layout["window"], f"{page} scrolls sideways at {width} px: {layout}"
    assert not layout["out"], f"{page} at {width} px: these stick out of the content column: {layout['out']}"
    if width < 500:
        assert too_wide_for_a_phone <= set(layout["scrolling"]), (
            f"{page} at {width} px scrolls only {layout['scrolling']}"
        )


def test_search_finds_the_operators_page(browser, served):
    """The theme's search page, served over HTTP, lists the operators page (its index runs in a web worker) for
    a word that is on several pages."""
    query = "Regularized"
    page = browser.open(f"{served}/search.html?q={query}")
    links = browser.evaluate(
        page,
        f"""new Promise(resolve => {{
            const results = document.getElementById('mkdocs-search-results'), start = Date.now();
            (function poll() {{
                if (results.children.length > 0 || Date.now() - start > {SEARCH_TIMEOUT_MS})
                    resolve([...results.querySelectorAll('article a')].map(a => a.getAttribute('href')));
                else setTimeout(poll, 20);
            }})();
        }})""",
    )
    assert links, f"the search for {query!r} found nothing (or did not answer within {SEARCH_TIMEOUT_MS} ms)"
    assert "operators.html" in {link.split("#")[0].removeprefix("./") for link in links}, links
