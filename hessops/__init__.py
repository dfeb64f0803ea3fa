"""hessops: the curvature of neural networks as CoLA linear operators.

Hessian, generalized Gauss-Newton and Fisher matrices of a model, a loss and a dataset, exact dataset means
streamed over a DataLoader, usable with ``cola.eig``, ``cola.linalg.logdet`` and ``cola.linalg.trace``.
"""

import warnings

with warnings.catch_warnings():
    # CoLA's torch backend, and torch's own forward-mode AD decompositions (loaded at the first jvp), call
    # torch.jit.script at import time, which torch >= 2.10 deprecates: noise for our users, so load both now.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    import cola  # noqa: F401
    import torch._decomp.decompositions_for_jvp  # noqa: F401

from hessops import errors
from hessops.errors import *  # noqa: F403 - every exception is public
from hessops.operators import GGN, CurvatureOperator, EmpiricalFisher, Hessian, MCFisher, Regularized
from hessops.dense import dense_hessian
from hessops.density import SpectralDensity, spectral_density
from hessops.spectrum import Spectrum, eigs
from hessops.trace import TraceEstimate, trace
from hessops.tracking import GradNormTracker, SharpnessTracker, evaluate, train
from hessops.volume import BasinVolume, LogdetEstimate, basin_volume, log_unit_ball_volume, logdet
from hessops.data import on_device

__version__ = "0.1.0"

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
