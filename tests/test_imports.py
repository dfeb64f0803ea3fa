"""Library manners at import: ``import hessops`` (and its torch-free modules) imports no torch; the public
names load at first use; CoLA's import-time deprecation noise stays silenced whichever module loads it first,
and hessops leaves no warnings filter of its own behind (torch and SciPy install some of theirs at import)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap

import pytest

import hessops

# One subprocess (importing torch and CoLA costs seconds): a fresh interpreter, FutureWarnings turned into
# errors, so that an unsilenced `torch.jit.script` deprecation from importing CoLA fails the run.
_FRESH = textwrap.dedent(
    """
    import sys, warnings
    heavy = ("torch", "cola", "numpy", "matplotlib")
    import hessops, hessops.constants, hessops.zoo, hessops.errors
    assert hessops.__version__ and hessops.UnknownModelError
    assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
    assert sorted(hessops.zoo.MODELS) and "hessian" in hessops.constants.OPERATOR_NAMES
    assert not [m for m in heavy if m in sys.modules], "reading the registry imported " + str(heavy)
    from hessops.analysis.spectrum import eigs  # a heavy module first, not through hessops.__getattr__
    import torch
    from torch import nn
    model = nn.Sequential(nn.Linear(3, 2)).double()
    G = hessops.GGN(model, nn.CrossEntropyLoss(), [(torch.randn(4, 3, dtype=torch.float64), torch.arange(4) % 2)])
    G @ torch.ones(8, dtype=torch.float64)  # the first jvp
    ours = [f for f in warnings.filters if f[1] is not None and "jit.script" in f[1].pattern]
    assert not ours, "hessops left its import-time filter installed: " + str(ours)
    print("ok")
    """
)


def test_import_hessops_is_torch_free_and_cola_loads_quietly():
    run = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", _FRESH], capture_output=True, text=True, timeout=3600
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    assert "Warning" not in run.stderr, run.stderr[-3000:]


def test_public_names_resolve_lazily_to_their_modules():
    assert set(hessops.__all__) <= set(dir(hessops))
    for name in hessops.__all__:
        value = getattr(hessops, name)
        assert value.__name__ == name, name
    from hessops import Hessian, trace
    from hessops.analysis.trace import trace as trace_function
    from hessops.operators import Hessian as defined

    assert Hessian is defined and trace is trace_function
    assert hessops.zoo.data.load_dataset.__module__ == "hessops.zoo.data"  # a submodule, imported on first access
    with pytest.raises(AttributeError, match="no_such_name"):
        hessops.no_such_name  # noqa: B018 - the attribute access is what is tested


def test_the_names_type_checkers_see_are_the_lazy_ones():
    """hessops/__init__.py's `if TYPE_CHECKING:` imports (what IDEs and linters read) name the same modules as
    the table that __getattr__ loads from."""
    tree = ast.parse(inspect.getsource(hessops))
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    )
    seen = {alias.name: node.module.removeprefix("hessops.") for node in block.body for alias in node.names}
    assert seen == hessops._LAZY


# A user's first products: each operator's single-column product, on a fresh interpreter, must not import
# torch._dynamo (1.5-3 s on 2 cores, through torch.func.grad/vjp) nor sympy (0.8 s, through a tensor
# grad_outputs); hessops/operators/_autograd.py says why. Checked by the modules imported, not by time.
_FIRST_PRODUCTS = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import hessops
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    data = [(torch.randn(6, 3), torch.arange(6) % 2), (torch.randn(5, 3), torch.arange(5) % 2)]
    for name in ("Hessian", "GGN", "EmpiricalFisher", "MCFisher"):
        op = getattr(hessops, name)(model, nn.CrossEntropyLoss(), data)
        hessops.Regularized(op, 0.1) @ torch.ones(op.shape[0])
        hessops.eigs(op, 1, "LA", max_iters=8)
        heavy = [m for m in ("torch._dynamo", "sympy") if m in sys.modules]
        assert not heavy, f"{name}'s first products imported {heavy}"
    print("ok")
    """
)


def test_first_products_import_neither_dynamo_nor_sympy():
    run = subprocess.run([sys.executable, "-c", _FIRST_PRODUCTS], capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
