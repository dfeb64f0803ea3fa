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

__version__ = "0.1.0"

__all__ = ["Hessian", "GGN", "EmpiricalFisher", "MCFisher", "Regularized", "CurvatureOperator", *errors.__all__]
