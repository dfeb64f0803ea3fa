"""hessops: the curvature of neural networks as CoLA linear operators.

Hessian, generalized Gauss-Newton and Fisher matrices of a model, a loss and a dataset, exact dataset means
streamed over a DataLoader, usable with ``cola.eig``, ``cola.linalg.logdet`` and ``cola.linalg.trace``.

``import hessops`` is cheap: the public names below load their module (and torch, CoLA) at first use
(PEP 562), so that ``hessops --version`` and ``hessops --help`` import nothing heavy. The exceptions
(:mod:`hessops.errors`) are loaded at once, and import no torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from hessops import _moved, errors
from hessops.errors import *  # noqa: F403 - every exception is public

_moved.install()  # the module paths of 0.1 keep working, with a DeprecationWarning (hessops/_moved.py)

if TYPE_CHECKING:  # what the lazy names are, for type checkers, IDEs and linters (tests/test_imports.py: = _LAZY)
    from hessops.analysis.blocks import BlockSpectra, block_spectra
    from hessops.analysis.density import SpectralDensity, spectral_density
    from hessops.analysis.eigenvectors import Eigenvectors, load_eigenvectors, save_eigenvectors
    from hessops.analysis.landscape import LandscapeSlice, filter_normalized_direction, loss_landscape
    from hessops.analysis.logdet import LogdetEstimate, logdet
    from hessops.analysis.spectrum import Spectrum, eigs
    from hessops.analysis.trace import TraceEstimate, trace
    from hessops.analysis.tracking import GradNormTracker, SharpnessTracker, evaluate, train
    from hessops.analysis.update_curvature import UpdateCurvatureRecord, UpdateCurvatureTracker
    from hessops.analysis.volume import BasinVolume, basin_volume, log_unit_ball_volume
    from hessops.operators import GGN, CurvatureOperator, EmpiricalFisher, Hessian, MCFisher, Regularized
    from hessops.operators.dense import dense_hessian
    from hessops.operators.evaluation import DatasetLoss, dataset_loss
    from hessops.operators.losses import next_token_cross_entropy
    from hessops.zoo.data import on_device
    from hessops.zoo.lm import GPT, GPTConfig, gpt_config, load_hf_model
    from hessops.zoo.text import load_text

__version__ = "0.1.0"

# Each public name, by the module that defines it: loaded at first access.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Hessian", "GGN", "EmpiricalFisher", "MCFisher", "Regularized", "CurvatureOperator"), "operators"),
    **dict.fromkeys(("dataset_loss", "DatasetLoss"), "operators.evaluation"),
    **dict.fromkeys(("eigs", "Spectrum"), "analysis.spectrum"),
    **dict.fromkeys(("block_spectra", "BlockSpectra"), "analysis.blocks"),
    **dict.fromkeys(("spectral_density", "SpectralDensity"), "analysis.density"),
    **dict.fromkeys(("trace", "TraceEstimate"), "analysis.trace"),
    **dict.fromkeys(("logdet", "LogdetEstimate"), "analysis.logdet"),
    **dict.fromkeys(("basin_volume", "BasinVolume", "log_unit_ball_volume"), "analysis.volume"),
    "dense_hessian": "operators.dense",
    "on_device": "zoo.data",
    "next_token_cross_entropy": "operators.losses",
    **dict.fromkeys(("GPT", "GPTConfig", "gpt_config", "load_hf_model"), "zoo.lm"),
    "load_text": "zoo.text",
    **dict.fromkeys(("loss_landscape", "LandscapeSlice", "filter_normalized_direction"), "analysis.landscape"),
    **dict.fromkeys(("save_eigenvectors", "load_eigenvectors", "Eigenvectors"), "analysis.eigenvectors"),
    **dict.fromkeys(("SharpnessTracker", "GradNormTracker", "train", "evaluate"), "analysis.tracking"),
    **dict.fromkeys(("UpdateCurvatureTracker", "UpdateCurvatureRecord"), "analysis.update_curvature"),
}

__all__ = [
    # operators
    "Hessian",
    "GGN",
    "EmpiricalFisher",
    "MCFisher",
    "Regularized",
    "CurvatureOperator",
    "dataset_loss",
    "DatasetLoss",
    # analysis
    "eigs",
    "Spectrum",
    "block_spectra",
    "BlockSpectra",
    "spectral_density",
    "SpectralDensity",
    "trace",
    "TraceEstimate",
    "logdet",
    "LogdetEstimate",
    "basin_volume",
    "BasinVolume",
    "log_unit_ball_volume",
    "dense_hessian",
    # eigenvectors on disk and loss landscapes
    "save_eigenvectors",
    "load_eigenvectors",
    "Eigenvectors",
    "loss_landscape",
    "LandscapeSlice",
    "filter_normalized_direction",
    # data
    "on_device",
    # language models
    "next_token_cross_entropy",
    "GPT",
    "GPTConfig",
    "gpt_config",
    "load_hf_model",
    "load_text",
    # training
    "SharpnessTracker",
    "GradNormTracker",
    "UpdateCurvatureTracker",
    "UpdateCurvatureRecord",
    "train",
    "evaluate",
    # errors
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    """A public name's value, imported from its module on first access (then cached here); a submodule
    (``hessops.analysis``, ``hessops.plot``, ...) imported on first access, as after ``import hessops.plot``."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
