"""ruff's lint and format checks over the whole tree, with the configuration in pyproject.toml (docstrings on the
public API of hessops, pyflakes, import order, ...), as CI runs them."""

from __future__ import annotations

import ast
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


MAX_FUNCTION_LINES = 80


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, source_lines: list[str]) -> int:
    """The lines of ``function`` (its decorators and signature included), less blank lines, comment-only lines
    and its docstring."""
    first = min([function.lineno, *(d.lineno for d in function.decorator_list)])
    lines = set(range(first, function.end_lineno + 1))
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i in lines if source_lines[i - 1].strip() and not source_lines[i - 1].strip().startswith("#"))


def test_no_function_is_over_80_lines_of_code():
    """Small functions, composed: a long algorithm becomes a state object and its steps (docs/architecture.md).
    Nested functions count in their own right and in the function that holds them."""
    long = []
    for path in sorted((ROOT / "hessops").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = code_lines(node, lines)
                if count > MAX_FUNCTION_LINES:
                    long.append(f"{relative}:{node.lineno} {node.name}: {count} lines of code")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code (split them):\n" + "\n".join(long)


def test_the_line_count_leaves_out_blanks_comments_and_the_docstring():
    source = 'def f(x):\n    """Doc\n    string."""\n\n    # a comment\n    y = x + 1  # counted\n    return y\n'
    function = ast.parse(source).body[0]
    assert code_lines(function, source.splitlines()) == 3
