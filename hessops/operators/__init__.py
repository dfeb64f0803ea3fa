"""Curvature operators: CoLA LinearOperators for a model, a loss and a dataset."""

from hessops.operators._base import CurvatureOperator
from hessops.operators.fisher import EmpiricalFisher, MCFisher
from hessops.operators.ggn import GGN
from hessops.operators.hessian import Hessian
from hessops.operators.regularized import Regularized

__all__ = ["CurvatureOperator", "Hessian", "GGN", "EmpiricalFisher", "MCFisher", "Regularized"]
