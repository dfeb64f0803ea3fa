"""An mkdocs hook that adds the stylesheet of the code highlighting to the site, written by the Pygments that
highlighted the code (pymdownx.highlight with ``use_pygments: true``), so the two always agree and nothing
is loaded from a CDN."""

from __future__ import annotations

from mkdocs.structure.files import File, Files
from pygments.formatters import HtmlFormatter

STYLESHEET = "css/pygments.css"  # named in mkdocs.yml's extra_css
STYLE = "default"  # its background, #f8f8f8, is the one the readthedocs theme gives code blocks


def on_files(files: Files, config) -> Files:
    """mkdocs hook: add css/pygments.css, the rules for pymdownx.highlight's ``.highlight`` spans."""
    files.append(File.generated(config, STYLESHEET, content=HtmlFormatter(style=STYLE).get_style_defs(".highlight")))
    return files
