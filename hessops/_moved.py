"""The module paths of hessops 0.1 that moved when the package was cut into layers (operators, linalg,
analysis, zoo, cli): importing an old path still works for one minor release, returns the new module itself
(so ``monkeypatch``, ``isinstance`` and pickles see one module) and warns with a :class:`DeprecationWarning`
naming the new path. Installed by :mod:`hessops` as a meta-path finder; imports nothing heavy."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# Each old path, by the module it is now (docs/architecture.md). Private modules are listed too: old
# checkpoints of user code that reached into them keep loading while they migrate.
MOVED: dict[str, str] = {
    "hessops._functional": "hessops.operators.functional",
    "hessops.losses": "hessops.operators.losses",
    "hessops.distributed": "hessops.operators.distributed",
    "hessops._determinism": "hessops.operators._determinism",
    "hessops._autograd": "hessops.operators._autograd",
    "hessops.dense": "hessops.operators.dense",
    "hessops._written_out": "hessops.operators._written_out",
    "hessops.lanczos": "hessops.linalg.lanczos",
    "hessops.basis": "hessops.linalg.basis",
    "hessops.checkpoint": "hessops.linalg.checkpoint",
    "hessops.deflation": "hessops.linalg.deflation",
    "hessops.spectrum": "hessops.analysis.spectrum",
    "hessops.density": "hessops.analysis.density",
    "hessops.trace_estimation": "hessops.analysis.trace",
    "hessops.volume": "hessops.analysis.volume",
    "hessops.blocks": "hessops.analysis.blocks",
    "hessops.landscape": "hessops.analysis.landscape",
    "hessops.vectors": "hessops.analysis.eigenvectors",
    "hessops.tracking": "hessops.analysis.tracking",
    "hessops.models": "hessops.zoo.models",
    "hessops.data": "hessops.zoo.data",
    "hessops.lm": "hessops.zoo.lm",
    "hessops.text": "hessops.zoo.text",
}


class _MovedLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new path (imported, then returned as is)."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in the next minor release: import {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the new module ran when it was imported): only its own spec put back, which the
        import machinery replaced with the old path's."""
        module.__spec__ = self._spec


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths in :data:`MOVED`, and nothing else."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())  # before any other: an old path is never found as a file
