"""The code in README.md and docs/*.md runs, and what it says it prints is what it prints.

**Fences.** Every fenced block of a page is collected, and each must be marked with its language: ```python
blocks run (in order, one namespace per page); ```text, ```bash, ```console, ```json, ```toml and ```yaml blocks
are shown, not run. Anything else fails: an unmarked fence, ```py, ```python3, ``` python, an indented fence (a
block the runner would silently skip). Python that cannot run in the tests (a `torchrun` script, say) is a
```python block preceded by the line `<!-- docs-test: no-run: <why> -->`; a shown-only block that parses as
Python with an import, a definition or an assignment in it fails, so that such code is not hidden as ```text.

**Shown output.** A `print(...)` line whose comment starts with `# ->` states what it prints:

    print(spectrum.n_matvecs, spectrum.converged)  # -> 58 True
    print(dense.shape)  # -> torch.Size([212, 212])  # a remark after two spaces and a second `#` is prose
    print(matrix)
    # -> tensor([[1., 0.],
    # ->         [0., 1.]])

Each `# -> ` line after a print (inline, then the comment lines right below it) is one line of its output, in
order; a print in a loop consumes the lines one call after another, and every shown line must be printed by the
end of its block. `ruff format` formats these blocks and moves a comment that overflows 120 columns: put long shown
lines below the print. A printed line matches a shown line when their text without the numbers agrees (whitespace
ignored) and each number agrees to the precision shown: `4.343` accepts anything that rounds to it (within half a
unit of the last digit shown, |printed - 4.343| <= 0.0005), `58` only 58, `2e-16` anything in [1.5e-16, 2.5e-16].
A shown line with `...` in it matches text pieces in order, any text in between (doctest's ELLIPSIS), with the
numbers compared as text. A `# ->` anywhere else (not after a print) fails. Results that depend on the machine
(timings, a GPU's rounding) are not shown this way: the prose says so, or the block asserts a bound.

**Refusals.** A block that shows an error catches it with `try/except` and an `else: raise AssertionError(...)`,
so that it fails when nothing is raised; a `try` with handlers and no raising `else` fails the test.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from repo_root import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHOWN_ONLY = {"text", "bash", "console", "json", "toml", "yaml"}
NO_RUN = re.compile(r"^<!-- docs-test: no-run: \S.* -->$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
ARROW = "# ->"


@dataclass
class Block:
    language: str  # "python", or one of SHOWN_ONLY
    code: str
    line: int  # the page's line number of the block's first line (after the fence)
    run: bool


def collect(page: Path) -> list[Block]:
    """Every fenced block of the page; a fence the runner would not recognize raises (AssertionError)."""
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        where = f"{page.name}:{i + 1}"
        info = match["info"].strip()
        assert not match["indent"], f"{where}: an indented fence ({lines[i]!r}); fences start in column 1"
        assert match["info"] == info, f"{where}: a space in the fence's info string ({lines[i]!r})"
        assert info == "python" or info in SHOWN_ONLY, (
            f"{where}: fence {lines[i]!r} is neither ```python (run) nor one of {sorted(SHOWN_ONLY)} (shown only)"
        )
        closing = re.compile(rf"^{re.escape(match['fence'][0])}{{{len(match['fence'])},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        assert end is not None, f"{where}: the fence is never closed"
        run = info == "python" and not (i > 0 and NO_RUN.match(lines[i - 1]))
        blocks.append(Block(info, "\n".join(lines[i + 1 : end]) + "\n", i + 2, run))
        i = end + 1
    return blocks


def looks_like_python(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AugAssign, ast.AnnAssign)
    return any(isinstance(node, kinds) for node in ast.walk(tree))


@dataclass
class Shown:
    """The lines a print says it prints, consumed as it prints them."""

    where: str
    lines: list[str]
    printed: list[str] = field(default_factory=list)

    def __call__(self, *args, **kwargs):
        buffer = io.StringIO()
        print(*args, **kwargs, file=buffer)
        sys.stdout.write(buffer.getvalue())
        if not self.lines and not self.printed:  # a print without `# ->`: nothing shown, nothing checked
            return
        for line in buffer.getvalue().removesuffix("\n").split("\n"):
            assert self.lines, f"{self.where}: printed {line!r}, beyond the lines shown (after {self.printed})"
            shown = self.lines.pop(0)
            assert matches(line, shown), f"{self.where}: printed\n  {line!r}\nbut the page shows\n  {shown!r}"
            self.printed.append(line)


def matches(printed: str, shown: str) -> bool:
    """The convention of the module docstring: numbers to the precision shown, whitespace ignored, `...` any text."""
    if "..." in shown:
        pattern = ".*".join(re.escape(re.sub(r"\s+", "", piece)) for piece in shown.split("..."))
        return re.fullmatch(pattern, re.sub(r"\s+", "", printed), re.DOTALL) is not None
    words = [re.sub(r"\s+", "", piece) for piece in NUMBER.split(printed)]
    if words != [re.sub(r"\s+", "", piece) for piece in NUMBER.split(shown)]:
        return False
    for got, want in zip(NUMBER.findall(printed), NUMBER.findall(shown), strict=True):
        mantissa, _, exponent = want.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        unit = 10.0 ** (int(exponent or 0) - decimals)
        if abs(float(got) - float(want)) > 0.5 * unit * (1 + 1e-9):
            return False
    return True


def instrument(block: Block, page: Path) -> tuple[str, list[Shown]]:
    """The block's code with each annotated `print(` replaced by a checking call (line numbers kept)."""
    lines = block.code.split("\n")
    checks: list[Shown] = []
    current = None  # the Shown of the print just above, while only `# ->` lines follow it
    for k, line in enumerate(lines):
        where = f"{page.name}:{block.line + k}"
        stripped = line.strip()
        if stripped.startswith(ARROW):
            assert current is not None, f"{where}: a `{ARROW}` line that does not follow a print"
            current.lines.append(shown_text(stripped[len(ARROW) :]))
            continue
        current = None
        code, arrow, text = line.partition(f"  {ARROW}")
        if re.match(r"\s*print\(", line):
            current = Shown(where, [shown_text(text)] if arrow else [])
            checks.append(current)
            lines[k] = line.replace("print(", f"__docs_shown__[{len(checks) - 1}](", 1)
        else:
            assert ARROW not in line, f"{where}: `{ARROW}` on a line that is not a print: {line.strip()!r}"
    return "\n".join(lines), checks


def shown_text(text: str) -> str:
    return text.removeprefix(" ").split("  # ")[0].rstrip()


def refusals_checked(code: str, where: str):
    """A `try` with handlers has an `else:` that raises, so that the block fails when nothing is refused."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Try) and node.handlers:
            raises = any(isinstance(n, ast.Raise) for statement in node.orelse for n in ast.walk(statement))
            assert raises, f"{where}, line {node.lineno}: a try/except without an `else:` that raises"


def test_pages_are_found():
    assert (ROOT / "README.md") in PAGES and len(PAGES) >= 3


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_fences_are_marked(page):
    """Every fence is one the runner recognizes; Python is not hidden in a shown-only block."""
    for block in collect(page):
        if block.language != "python":
            assert not looks_like_python(block.code), (
                f"{page.name}:{block.line - 1}: a ```{block.language} block of Python: make it ```python "
                "(preceded by `<!-- docs-test: no-run: <why> -->` if it cannot run in the tests)"
            )


def test_collector_refuses_unknown_fences(tmp_path):
    for fence in ["```py", "```python3", "``` python", "  ```python", "```", "~~~Python"]:
        page = tmp_path / "page.md"
        page.write_text(f"text\n\n{fence}\nprint(1)\n```\n")
        with pytest.raises(AssertionError):
            collect(page)
    page.write_text("```text\nimport torch\nx = 1\n```\n")
    assert not collect(page)[0].run and looks_like_python(collect(page)[0].code)


def test_shown_output_convention():
    assert matches("tensor([ 0.4985,  0.4502], dtype=torch.float64)", "tensor([0.4985, 0.4502], dtype=torch.float64)")
    assert matches("4.343217 0.21812", "4.343 0.218") and not matches("4.3436", "4.343")
    assert matches("58 True", "58") is False and not matches("59 True", "58 True")
    assert matches("2.1e-16", "2e-16") and not matches("3.1e-16", "2e-16")
    assert matches("the ranks disagree (ranks 0: a; ranks 1: b): load it", "the ranks disagree ... load it")
    code, checks = instrument(
        Block("python", "for i in range(2):\n    print(i)  # -> 0  # remark\n    # -> 1\nprint(2)\n", 1, True),
        Path("page.md"),
    )
    assert "__docs_shown__[0](i)" in code and checks[0].lines == ["0", "1"]
    with pytest.raises(AssertionError, match="not a print"):
        instrument(Block("python", "x = 1  # -> 1\n", 1, True), Path("page.md"))
    with pytest.raises(AssertionError, match="does not follow a print"):
        instrument(Block("python", "x = 1\n# -> 1\n", 1, True), Path("page.md"))
    with pytest.raises(AssertionError, match="without an `else:` that raises"):
        refusals_checked("try:\n    f()\nexcept ValueError as e:\n    print(e)\n", "page.md")


def run_page(page: Path, monkeypatch):
    """The page's blocks run as a user's script would: in a module of their own (registered, so that a dataclass
    defined there works), without this file's `from __future__` flags (dont_inherit). Tracebacks give the
    page's line numbers."""
    blocks = [block for block in collect(page) if block.run]
    assert blocks, f"{page.name} has no python block"
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        where = f"{page.name}, the python block at line {block.line}"
        code, checks = instrument(block, page)
        refusals_checked(code, where)
        module.__dict__["__docs_shown__"] = checks
        try:
            exec(compile("\n" * (block.line - 1) + code, page.name, "exec", dont_inherit=True), module.__dict__)
        except Exception as error:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{where} failed: {error!r}\n{block.code}") from error
        for check in checks:
            assert not check.lines, f"{check.where}: shown but never printed: {check.lines}"


def test_shown_output_is_checked(tmp_path, monkeypatch, capsys):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 0.1 + 0.2\nprint(x)  # -> 0.3\nfor i in range(2):\n    print(i)\n    # -> 0\n    # -> 1\n```\n"
    )
    run_page(page, monkeypatch)
    assert capsys.readouterr().out == "0.30000000000000004\n0\n1\n"
    for bad, error in [
        ("print(0.36)  # -> 0.3", "but the page shows"),
        ("print(1, 2)  # -> 1", "but the page shows"),
        ("print(1)\nprint(2)  # -> 2\n# -> 3", "shown but never printed"),
        ("if False:\n    print(1)  # -> 1", "shown but never printed"),
        ("try:\n    pass\nexcept ValueError as e:\n    print(e)", "without an `else:` that raises"),
    ]:
        page.write_text(f"```python\n{bad}\n```\n")
        with pytest.raises(AssertionError, match=re.escape(error)):
            run_page(page, monkeypatch)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run(page, capsys, monkeypatch):
    run_page(page, monkeypatch)
