r"""The curvature of the loss along the training update: one Hessian-vector product per measurement.

After an optimizer step moves the parameters by :math:`d = \theta_t - \theta_{t-1}`, the Rayleigh quotient

.. math:: q_t = \frac{d^\top H(\theta_t)\, d}{d^\top d}

is the loss's second derivative along the step's direction at the new point, on a fixed data subset. It is
exact (one product of :class:`hessops.Hessian`, plain double backward, witnessed against first derivatives on
the first measurement), and since every Rayleigh quotient lies in :math:`[\lambda_{\min}, \lambda_{\max}]`, it is
a **lower bound on the sharpness** :math:`\lambda_{\max}(H)`, never the sharpness itself: it tells how curved the
loss is where the optimizer actually moves, the quantity that the edge-of-stability and "critical sharpness"
studies (Kalra et al. 2026, a directional second difference along the update) compare with :math:`2/\eta`. It
costs one product (about three gradients on the subset) against a Lanczos run's ten to a hundred.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hessops._arguments import integer
from hessops.analysis.tracking import measuring
from hessops.errors import InvalidArgumentError
from hessops.numerics import column_dots
from hessops.operators.hessian import Hessian


@dataclass
class UpdateCurvatureRecord:
    r"""One measurement.

    Attributes:
        step: the step it was taken at (the count of :meth:`UpdateCurvatureTracker.step` calls, from 0).
        value: :math:`d^\top H d / d^\top d` at the new parameters, :math:`d` the last update.
        update_norm: :math:`\lVert d\rVert`.
        n_matvecs: the Hessian-vector products it took: one (the first measurement also runs the operator's
            first-order witness on a slice of a batch).
        seconds: its wall time."""

    step: int
    value: float
    update_norm: float
    n_matvecs: int
    seconds: float


class UpdateCurvatureTracker:
    """The loss's curvature along each update (:mod:`hessops.analysis.update_curvature`), a lower bound on the
    sharpness at one Hessian-vector product per measurement.

    Call :meth:`step` after every optimizer step (``hessops.train`` does, with ``update_curvature=``): it keeps
    a copy of the parameters to difference the next step against, and measures every ``every`` calls.

    Args:
        model: the model being trained.
        loss_fn: the loss, as for the operators.
        data: the fixed data subset, a re-iterable of ``(inputs, targets)`` batches.
        every: measure at every ``every``-th step (the first step that has an update before it included).
        **operator_kwargs: the :class:`hessops.Hessian`'s other keyword arguments.

    Raises:
        InvalidArgumentError: ``model`` is not a module, or ``every`` is not a positive integer."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Iterable,
        *,
        every: int = 1,
        **operator_kwargs,
    ):
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every = integer("every", every, minimum=1)
        self.operator_kwargs = operator_kwargs
        self.history: list[UpdateCurvatureRecord] = []
        self._steps = 0
        self._previous: Tensor | None = None
        self._witnessed = False

    def _flat(self) -> Tensor:
        """The trainable parameters as one new flat tensor (``torch.cat`` copies: no clone needed)."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters() if p.requires_grad])

    def remember(self) -> None:
        """Keep the current parameters as the point the next update starts from (``hessops.train`` calls it
        before training; :meth:`step` calls it after each measurement or count)."""
        self._previous = self._flat()

    def step(self) -> UpdateCurvatureRecord | None:
        """Count one optimizer step, measure when it is due, and remember the parameters.

        Returns:
            The new record, or ``None`` when nothing was measured (not due, no earlier parameters, or a
            zero update)."""
        current = self._flat()
        record = None
        if self._previous is not None and self._steps % self.every == 0:
            record = self._measure(current - self._previous)
        self._steps += 1
        self._previous = current
        return record

    def _measure(self, update: Tensor) -> UpdateCurvatureRecord | None:
        began = time.perf_counter()
        size = float(torch.linalg.vector_norm(update.double()))
        if size == 0.0:
            return None
        with measuring(self.model):  # eval mode, the training run's random streams left as they were
            kwargs = {"witness": not self._witnessed, **self.operator_kwargs}
            H = Hessian(self.model, self.loss_fn, self.data, **kwargs)
            direction = (update / size).to(H.dtype)
            product = H @ direction
            value = float(column_dots(direction[:, None], product.reshape(-1)[:, None])[0])
        self._witnessed = True
        record = UpdateCurvatureRecord(self._steps, value, size, 1, time.perf_counter() - began)
        self.history.append(record)
        return record

    def plot(self, path: str | Path | None = None, *, title: str | None = None, ax=None):
        """The recorded curvature along the updates against steps (:func:`hessops.plot.plot_sharpness`); the
        arguments and the figure returned are :meth:`hessops.SharpnessTracker.plot`'s."""
        from hessops.plot import plot_sharpness

        return plot_sharpness(
            [r.step for r in self.history], [[r.value] for r in self.history], path, unit="step", title=title, ax=ax
        )
