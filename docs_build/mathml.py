"""An mkdocs hook that typesets the documentation's mathematics at build time, as MathML, so that the site
needs no script and no network to show it (browsers render MathML Core natively: Chromium 109+, Firefox,
Safari).

pymdownx.arithmatex (``generic: true``) keeps ``$...$`` and ``$$...$$`` away from Markdown and marks them as
``<span class="arithmatex">\\(...\\)</span>`` and ``<div class="arithmatex">\\[...\\]</div>``; this hook
converts each with latex2mathml. A formula latex2mathml cannot convert fails the build, naming the page and
the formula: latex2mathml raises on malformed LaTeX, and writes a command it does not know as text (``\\foo``),
which is refused here.
"""

from __future__ import annotations

import html
import itertools
import re
import unicodedata
import xml.etree.ElementTree as ET

from latex2mathml.converter import convert_to_element
from mkdocs.exceptions import PluginError

MARKED = re.compile(r'<(span|div) class="arithmatex">\\[(\[](.*?)\\[)\]]</\1>', re.DOTALL)

# MathML Core honours mathvariant only as "normal" on <mi>; the other styles latex2mathml writes (\mathbb,
# \mathbf, \mathcal, ...) are spelled with Unicode's mathematical alphanumeric characters instead.
STYLES = {
    "bold": "BOLD",
    "italic": "ITALIC",
    "bold-italic": "BOLD ITALIC",
    "double-struck": "DOUBLE-STRUCK",
    "script": "SCRIPT",
    "fraktur": "FRAKTUR",
    "sans-serif": "SANS-SERIF",
    "monospace": "MONOSPACE",
}
# Letters Unicode had before its mathematical block (ℝ, ℬ, ℭ) keep their older names.
OLDER_STYLE_NAMES = {"FRAKTUR": "BLACK-LETTER"}


# Operator names (\\log, \\det, \\operatorname{tr}) that latex2mathml writes as <mi>log</mi> or <mo>det</mo>; MathML
# Core spaces neither as TeX does, and an <mo> it does not know gets the wide spacing of a relation.
FUNCTION_NAME = re.compile(r"[A-Za-z]{2,}")
SCRIPTED = {"msub", "msup", "msubsup", "munder", "mover", "munderover"}
SEQUENCES = {"math", "mrow", "mstyle", "msqrt", "mtd"}  # elements whose children are read left to right
THIN_SPACE = "0.1667em"
SIGNS = {"+", "−", "±", "∓"}  # binary between operands, a sign after an operator: x = −1, (−1)
CLOSING = {")", "]", "}", "|", "‖", "⟩"}  # after these a sign is binary again: f(x) − 1
# How many children each layout element has; latex2mathml writes one short when an argument is missing (\\frac{1}).
ARITY = {"mfrac": 2, "mroot": 2, "msub": 2, "msup": 2, "munder": 2, "mover": 2, "msubsup": 3, "munderover": 3}
GREEK_CAPITALS = re.compile("[\u0391-\u03a9]")  # upright in TeX; MathML Core slants any single-letter <mi>


class FormulaError(ValueError):
    """A formula that latex2mathml cannot turn into MathML."""


def styled(char: str, style: str) -> str:
    """``char`` in the mathematical alphanumeric ``style`` (a STYLES value); anything but a letter or digit as it is."""
    if not char.isalnum():
        return char
    shape = re.sub(r"^(LATIN|GREEK) (CAPITAL|SMALL) LETTER ", r"\2 ", unicodedata.name(char, ""))
    for name in (f"MATHEMATICAL {style} {shape}", f"{OLDER_STYLE_NAMES.get(style, style)} {shape}"):
        try:
            return unicodedata.lookup(name)
        except KeyError:
            continue
    raise FormulaError(f"Unicode has no {style.lower()} {char!r}")


def check_braces(latex: str) -> None:
    """Raise FormulaError unless the groups ``{...}`` of ``latex`` are balanced (latex2mathml lets it pass)."""
    depth = 0
    for char in re.sub(r"\\\\|\\[{}]", "", latex):  # \\, \{ and \} are not groups
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            raise FormulaError("a } closes no {")
    if depth:
        raise FormulaError(f"{depth} {{ not closed")


def to_mathml(latex: str, display: bool) -> str:
    """The MathML of one LaTeX formula, without mathvariant styles MathML Core ignores.

    Raises FormulaError when latex2mathml fails on the formula or leaves a command it does not know.
    """
    check_braces(latex)
    try:
        math = convert_to_element(latex, display="block" if display else "inline")
    except Exception as error:  # latex2mathml's own exceptions have no common base
        raise FormulaError(f"latex2mathml failed: {error!r}") from error
    for element in math.iter():
        if len(element) != ARITY.get(element.tag, len(element)):
            raise FormulaError(f"<{element.tag}> has {len(element)} of its {ARITY[element.tag]} arguments")
        if element.text:
            if "\\" in element.text:
                raise FormulaError(f"latex2mathml does not know {element.text.strip()}")
            # latex2mathml writes characters as references (&#x003B8;) into the text, for its own serializer.
            element.text = html.unescape(element.text)
        style = element.attrib.get("mathvariant", "normal")
        if style != "normal":
            if style not in STYLES:
                raise FormulaError(f"no Unicode characters for mathvariant {style!r}")
            element.text = "".join(styled(char, STYLES[style]) for char in element.text or "")
            del element.attrib["mathvariant"]
        if element.tag == "mi" and GREEK_CAPITALS.fullmatch(element.text or ""):
            element.set("mathvariant", "normal")
    space_operator_names(math)
    mark_signs(math)
    return ET.tostring(math, encoding="unicode")


def mark_signs(math: ET.Element) -> None:
    """Mark a + or − that follows an operator as a sign (``form="prefix"``, set tight as TeX sets it), where MathML
    Core would space it as the binary operator it is between two operands."""
    for parent in math.iter():
        if parent.tag not in SEQUENCES:
            continue
        for before, element in itertools.pairwise(parent):
            if element.tag == "mo" and element.text in SIGNS and before.tag == "mo" and before.text not in CLOSING:
                element.set("form", "prefix")


def operator_name(element: ET.Element) -> bool:
    """Whether ``element`` is an operator name such as log or det, or one with scripts (``\\max_x``)."""
    if element.tag in SCRIPTED and len(element):
        element = element[0]
    return element.tag in ("mi", "mo") and bool(FUNCTION_NAME.fullmatch(element.text or ""))


def space_operator_names(math: ET.Element) -> None:
    """Space operator names as TeX does: a thin space between a name and an ordinary neighbour (``\\log V``,
    ``x \\log``), none against an operator or a delimiter (``\\log(x)``, ``-\\log``). A bare name becomes an
    <mi> (upright, and spaced by nothing else), also under scripts (``\\max_x``)."""
    for parent in math.iter():
        if parent.tag not in SEQUENCES:
            continue
        children = list(parent)
        spaced: list[ET.Element] = []
        for i, child in enumerate(children):
            if operator_name(child):
                name = child[0] if child.tag in SCRIPTED else child
                if name.tag == "mo":
                    name.tag, name.attrib = "mi", {}
                if i > 0 and children[i - 1].tag != "mo":
                    spaced.append(ET.Element("mspace", width=THIN_SPACE))
                spaced.append(child)
                if i + 1 < len(children) and children[i + 1].tag != "mo" and not operator_name(children[i + 1]):
                    spaced.append(ET.Element("mspace", width=THIN_SPACE))
            else:
                spaced.append(child)
        parent[:] = spaced


def typeset(content: str, where: str) -> str:
    """``content`` (a page's HTML) with every arithmatex formula replaced by its MathML; display formulas are
    wrapped in ``<div class="math-display">`` (which scrolls when wider than the page)."""

    def replace(match: re.Match) -> str:
        tag, latex = match.group(1), html.unescape(match.group(2))
        try:
            math = to_mathml(latex, display=tag == "div")
        except FormulaError as error:
            raise PluginError(
                f"{where}: cannot typeset the formula {latex!r}: {error}. Write it with commands latex2mathml "
                "knows (https://github.com/roniemartinez/latex2mathml) or extend docs_build/mathml.py."
            ) from error
        return f'<div class="math-display">{math}</div>' if tag == "div" else math

    return MARKED.sub(replace, content)


def on_page_content(content: str, page, config, files) -> str:
    """mkdocs hook: typeset the page's mathematics."""
    return typeset(content, page.file.src_uri)
