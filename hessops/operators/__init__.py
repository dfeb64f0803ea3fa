"""Curvature operators: CoLA LinearOperators for a model, a loss and a dataset."""

from __future__ import annotations

from hessops.constants import OPERATOR_NAMES
from hessops.operators._base import Batch, CurvatureOperator
from hessops.operators.fisher import EmpiricalFisher, MCFisher
from hessops.operators.ggn import GGN
from hessops.operators.hessian import Hessian
from hessops.operators.regularized import Regularized

__all__ = ["CurvatureOperator", "Batch", "Hessian", "GGN", "EmpiricalFisher", "MCFisher", "Regularized", "OPERATORS"]

# The one table of operators by name (the CLI's --operator choices are its keys).
OPERATORS: dict[str, type[CurvatureOperator]] = dict(
    zip(OPERATOR_NAMES, (Hessian, GGN, EmpiricalFisher, MCFisher), strict=True)
)
