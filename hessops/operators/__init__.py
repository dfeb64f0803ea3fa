"""Curvature operators: CoLA LinearOperators for a model, a loss and a dataset."""

from __future__ import annotations

import importlib

from hessops.constants import OPERATOR_CLASSES
from hessops.operators._base import Batch, CurvatureOperator
from hessops.operators.fisher import EmpiricalFisher, MCFisher
from hessops.operators.ggn import GGN
from hessops.operators.hessian import Hessian
from hessops.operators.regularized import Regularized

__all__ = ["CurvatureOperator", "Batch", "Hessian", "GGN", "EmpiricalFisher", "MCFisher", "Regularized", "OPERATORS"]


def _load(where: str) -> type[CurvatureOperator]:
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


# Every registered operator by name (hessops.constants.OPERATOR_CLASSES, the one registry; the CLI's --operator
# choices are its keys).
OPERATORS: dict[str, type[CurvatureOperator]] = {name: _load(where) for name, where in OPERATOR_CLASSES.items()}
