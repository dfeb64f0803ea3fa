"""hessops: the curvature of neural networks as CoLA linear operators.

Hessian, generalized Gauss-Newton and Fisher matrices of a model, a loss and a dataset, exact dataset means
streamed over a DataLoader, usable with ``cola.eig``, ``cola.linalg.logdet`` and ``cola.linalg.trace``.

``import hessops`` itself is cheap (the version and the exceptions): the public names below load torch,
CoLA and every module on the first use of any of them, so that ``hessops --help`` answers at once.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from hessops import errors
from hessops.errors import *  # noqa: F403 - every exception is public

__version__ = "0.1.0"

# Each public name and the module it lives in.
_PUBLIC: dict[str, str] = {
    **dict.fromkeys(
        ("GGN", "CurvatureOperator", "EmpiricalFisher", "Hessian", "MCFisher", "Regularized"), "hessops.operators"
    ),
    "dense_hessian": "hessops.dense",
    **dict.fromkeys(("SpectralDensity", "spectral_density"), "hessops.density"),
    **dict.fromkeys(("Spectrum", "eigs"), "hessops.spectrum"),
    **dict.fromkeys(("TraceEstimate", "trace"), "hessops.trace"),
    **dict.fromkeys(("GradNormTracker", "SharpnessTracker", "evaluate", "train"), "hessops.tracking"),
    **dict.fromkeys(
        ("BasinVolume", "LogdetEstimate", "basin_volume", "log_unit_ball_volume", "logdet"), "hessops.volume"
    ),
    "on_device": "hessops.data",
}

__all__ = [
    # operators
    "Hessian", "GGN", "EmpiricalFisher", "MCFisher", "Regularized", "CurvatureOperator",
    # analysis
    "eigs", "Spectrum", "spectral_density", "SpectralDensity", "trace", "TraceEstimate", "logdet", "LogdetEstimate",
    "basin_volume", "BasinVolume", "log_unit_ball_volume", "dense_hessian",
    # data
    "on_device",
    # training
    "SharpnessTracker", "GradNormTracker", "train", "evaluate",
    # errors
    *errors.__all__,
]


def _load() -> None:
    """Import every module behind the public names and bind the names here (all at once, so that a name is
    never left bound to a submodule of the same name, such as ``hessops.trace``)."""
    with warnings.catch_warnings():
        # CoLA's torch backend, and torch's own forward-mode AD decompositions (loaded at the first jvp), call
        # torch.jit.script at import time, which torch >= 2.10 deprecates: noise for our users, so load both now.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        importlib.import_module("cola")
        importlib.import_module("torch._decomp.decompositions_for_jvp")
        modules = {module: importlib.import_module(module) for module in dict.fromkeys(_PUBLIC.values())}
    globals().update({name: getattr(modules[module], name) for name, module in _PUBLIC.items()})


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hessops' has no attribute {name!r}")
    _load()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
