"""The architecture, checked (docs/architecture.md): each layer imports only the layers below it, no module
cycle (deferred imports inside functions count), and private (underscore) modules and names are used only
inside their own folder. Read from the source with ``ast``: nothing is imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from repo_root import ROOT

PACKAGE = ROOT / "hessops"

# The layers, by module prefix (the longest matching prefix wins), and what each may import.
CORE = ("hessops", "hessops.errors", "hessops.constants", "hessops.numerics", "hessops._arguments", "hessops._cola")
LAYERS: dict[str, str] = {
    **dict.fromkeys(CORE, "core"),
    "hessops._io": "core",
    "hessops._moved": "core",
    "hessops.__main__": "entry",
    "hessops.operators": "operators",
    "hessops.linalg": "linalg",
    "hessops.zoo": "zoo",
    "hessops.plot": "plot",
    "hessops.analysis": "analysis",
    "hessops.demo": "demo",
    "hessops.cli": "cli",
}
MAY_IMPORT: dict[str, set[str]] = {
    "core": {"core"},
    "operators": {"core", "operators"},
    "linalg": {"core", "linalg"},
    "zoo": {"core", "zoo"},
    "plot": {"core"},
    "analysis": {"core", "linalg", "operators", "plot", "analysis"},
    "demo": {"core", "operators", "linalg", "zoo", "plot", "analysis", "demo"},
    "cli": {"core", "operators", "linalg", "zoo", "plot", "analysis", "demo", "cli"},
    "entry": {"cli"},
}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer(module: str) -> str:
    """The layer of ``module``: that of its longest prefix in :data:`LAYERS`."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py and docs/architecture.md")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for each runtime import of a hessops module by ``name``. ``from
    package import submodule`` counts as importing the submodule; a public name of ``hessops`` (loaded lazily
    from its module) as importing that module."""
    import hessops

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "hessops"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "hessops":
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.append((f"{base}.{alias.name}", None))
                elif base == "hessops" and alias.name in hessops._LAZY:
                    found.append((f"hessops.{hessops._LAZY[alias.name]}", None))
                else:
                    found.append((base, alias.name))
    return found


def graph(extra: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Module -> the hessops modules it imports at run time (plus ``extra`` edges, for the tests below)."""
    known = modules()
    edges = {name: {m for m, _ in imports(name, path, known) if m != name} for name, path in known.items()}
    for source, targets in (extra or {}).items():
        edges.setdefault(source, set()).update(targets)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _private(name: str) -> bool:
    """A private module or name: one underscore, not a dunder."""
    return name.startswith("_") and not name.startswith("__")


def _folder(module: str, known: dict[str, Path]) -> str:
    """The package a module lives in (a package's ``__init__`` lives in that package)."""
    return module if known[module].name == "__init__.py" else module.rpartition(".")[0]


def test_each_layer_imports_only_the_layers_below_it():
    known = modules()
    wrong = [
        f"{name} ({layer(name)}) imports {target} ({layer(target)})"
        for name, path in known.items()
        for target, _ in imports(name, path, known)
        if target in known and layer(target) not in MAY_IMPORT[layer(name)]
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_in_the_library_imports_the_cli():
    edges = graph()
    wrong = sorted(
        f"{name} imports {t}"
        for name, targets in edges.items()
        for t in targets
        if layer(t) == "cli" and layer(name) not in ("cli", "entry")
    )
    assert not wrong, wrong


def test_no_module_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    "edge",
    [
        ("hessops.cli.commands", "hessops.cli.app"),  # cli <-> _commands (timm_options), before this layout
        ("hessops.zoo.registry", "hessops.zoo.models"),  # models <-> zoo (_import_timm)
        ("hessops.analysis.eigenvectors", "hessops.cli.commands"),  # spectrum -> vectors -> _commands -> ...
        ("hessops.operators.functional", "hessops.operators._base"),  # any back edge inside a layer
    ],
)
def test_the_cycle_check_finds_a_cycle_when_one_is_made(edge):
    """Each of the cycles of 0.1 (an import deferred into a function), put back as one edge, is found; the
    layer rule finds those that cross layers too."""
    source, target = edge
    edges = graph()
    assert target in edges and source in edges
    made = cycles(graph({source: {target}}))
    cross_layer = layer(source) != layer(target) and layer(target) not in MAY_IMPORT[layer(source)]
    assert made or cross_layer, f"adding {source} -> {target} made no cycle"


def privacy_violations(extra: list[tuple[str, str, str | None]] = ()) -> list[str]:
    """Each import of a private module from outside its folder, or of a private name from outside the folder of
    the module defining it (plus ``extra`` imports ``(importer, module, name)``, for the test below)."""
    known = modules()
    found = [
        (name, target, imported) for name, path in known.items() for target, imported in imports(name, path, known)
    ]
    wrong = []
    for name, target, imported in [*found, *extra]:
        if target not in known:
            continue
        home, _, last = target.rpartition(".")
        if _private(last) and not (name == home or name.startswith(home + ".")):
            wrong.append(f"{name} imports the private module {target}")
        folder = _folder(target, known)
        if imported and _private(imported) and not (name == folder or name.startswith(folder + ".")):
            wrong.append(f"{name} imports the private name {target}.{imported}")
    return wrong


def test_private_modules_and_names_stay_in_their_folder():
    wrong = privacy_violations()
    assert not wrong, "\n".join(wrong)


def test_the_privacy_check_finds_a_private_module_or_name_used_outside_its_folder():
    extra = [
        ("hessops.analysis.spectrum", "hessops.operators._base", None),  # a private module from another folder
        ("hessops.cli.app", "hessops.zoo.models", "_timm_name"),  # a private name from another folder
        ("hessops.operators.losses", "hessops.operators.functional", "_leaves"),  # inside its folder: allowed
    ]
    found = set(privacy_violations(extra)) - set(privacy_violations())
    assert found == {
        "hessops.analysis.spectrum imports the private module hessops.operators._base",
        "hessops.cli.app imports the private name hessops.zoo.models._timm_name",
    }


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)
