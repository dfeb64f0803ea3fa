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

from hessops import errors
from hessops.errors import *  # noqa: F403 - every exception is public

if TYPE_CHECKING:  # what the lazy names are, for type checkers, IDEs and linters (tests/test_imports.py: = _LAZY)
    from hessops.blocks import BlockSpectra, block_spectra
    from hessops.data import on_device
    from hessops.dense import dense_hessian
    from hessops.density import SpectralDensity, spectral_density
    from hessops.landscape import LandscapeSlice, filter_normalized_direction, loss_landscape
    from hessops.lm import GPT, GPTConfig, gpt_config, load_hf_model
    from hessops.losses import next_token_cross_entropy
    from hessops.operators import GGN, CurvatureOperator, EmpiricalFisher, Hessian, MCFisher, Regularized
    from hessops.operators.evaluation import DatasetLoss, dataset_loss
    from hessops.spectrum import Spectrum, eigs
    from hessops.text import load_text
    from hessops.trace_estimation import TraceEstimate, trace
    from hessops.tracking import GradNormTracker, SharpnessTracker, evaluate, train
    from hessops.vectors import Eigenvectors, load_eigenvectors, save_eigenvectors
    from hessops.volume import BasinVolume, LogdetEstimate, basin_volume, log_unit_ball_volume, logdet

__version__ = "0.1.0"

# Each public name, by the module that defines it: loaded at first access.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Hessian", "GGN", "EmpiricalFisher", "MCFisher", "Regularized", "CurvatureOperator"), "operators"),
    **dict.fromkeys(("dataset_loss", "DatasetLoss"), "operators.evaluation"),
    **dict.fromkeys(("eigs", "Spectrum"), "spectrum"),
    **dict.fromkeys(("block_spectra", "BlockSpectra"), "blocks"),
    **dict.fromkeys(("spectral_density", "SpectralDensity"), "density"),
    **dict.fromkeys(("trace", "TraceEstimate"), "trace_estimation"),
    **dict.fromkeys(("logdet", "LogdetEstimate", "basin_volume", "BasinVolume", "log_unit_ball_volume"), "volume"),
    "dense_hessian": "dense",
    "on_device": "data",
    "next_token_cross_entropy": "losses",
    **dict.fromkeys(("GPT", "GPTConfig", "gpt_config", "load_hf_model"), "lm"),
    "load_text": "text",
    **dict.fromkeys(("loss_landscape", "LandscapeSlice", "filter_normalized_direction"), "landscape"),
    **dict.fromkeys(("save_eigenvectors", "load_eigenvectors", "Eigenvectors"), "vectors"),
    **dict.fromkeys(("SharpnessTracker", "GradNormTracker", "train", "evaluate"), "tracking"),
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
    "train",
    "evaluate",
    # errors
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    """A public name's value, imported from its module on first access (then cached here); a submodule
    (``hessops.data``, ``hessops.plot``, ...) imported on first access, as after ``import hessops.data``."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
