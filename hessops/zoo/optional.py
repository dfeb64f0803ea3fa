"""The one way the zoo imports an optional package (timm, transformers, scikit-learn, safetensors): at first
use, with a :class:`~hessops.errors.MissingDependencyError` that says what needs it and how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

from hessops.errors import MissingDependencyError


def optional_import(module: str, message: str) -> ModuleType:
    """Import ``module`` (a dotted name), or explain what is missing.

    Args:
        module: the module to import, e.g. ``"timm"`` or ``"safetensors.torch"``.
        message: what needs it and the command that installs it, shown when it is missing.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: ``module`` (or a package it needs) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(message) from error


def import_timm() -> ModuleType:
    """timm, which the ``timm:NAME`` models and the zoo's ViTs need."""
    return optional_import(
        "timm",
        "timm models need the optional package timm, which is not installed: "
        "pip install 'hessops[zoo]' (or pip install timm)",
    )
