"""Shared machinery, not public API: checks of the arguments of public functions, each raising
:class:`hessops.errors.InvalidArgumentError` with a message that names the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from hessops._cola import cola
from hessops.errors import InvalidArgumentError


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` when it is an integer (``bool`` is not) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name}={value!r} must be an integer, not {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{name}={value} must be at most {maximum}")
    return value


def real(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite ``float`` (``bool`` is not a number here), positive or non-negative on request."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name}={value!r} must be a real number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name}={value} must be finite")
    if positive and not value > 0:
        raise InvalidArgumentError(f"{name}={value:g} must be positive")
    if nonnegative and not value >= 0:
        raise InvalidArgumentError(f"{name}={value:g} must be non-negative")
    return value


def boolean(name: str, value: Any) -> bool:
    """``value`` when it is a ``bool`` (a 0/1 or a string would hide a mistaken argument order)."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name}={value!r} must be True or False, not {type(value).__name__}")
    return value


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name}={value!r}: choose one of {tuple(choices)}")
    return value


def linear_operator(name: str, value: Any) -> cola.ops.LinearOperator:
    """``value`` when it is a CoLA ``LinearOperator`` (a hessops operator, or any of CoLA's)."""
    if not isinstance(value, cola.ops.LinearOperator):
        raise InvalidArgumentError(f"{name} must be a CoLA LinearOperator, got {type(value).__name__}")
    return value
