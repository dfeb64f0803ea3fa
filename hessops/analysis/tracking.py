"""Curvature tracked during training, from any training loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hessops._arguments import boolean, integer, real
from hessops.analysis.spectrum import eigs
from hessops.errors import EmptyDataError, InvalidArgumentError
from hessops.numerics import norm
from hessops.operators.evaluation import LossMean, dataset_loss
from hessops.operators.functional import batch_size, call_model, split_batch
from hessops.operators.hessian import Hessian
from hessops.operators.losses import loss_spec, probe_mean

if TYPE_CHECKING:
    from hessops.analysis.update_curvature import UpdateCurvatureTracker


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block; its previous mode restored after, even on an error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """A measurement during training: ``model`` in eval mode (its mode restored after) and torch's random
    generators (CPU, and the model's CUDA devices) forked, so that the training run's later draws are unchanged."""
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with _eval_mode(model), torch.random.fork_rng(devices=cuda_devices):
        yield


@dataclass
class SharpnessRecord:
    """One sharpness measurement: the top eigenvalues at ``step`` (a step or an epoch, the tracker's unit), their
    residuals, and the products and seconds it took."""

    step: int
    values: list[float]
    residuals: list[float]
    n_matvecs: int
    seconds: float


class SharpnessTracker:
    """The top-``k`` Hessian eigenvalues (largest algebraic: the sharpness) on a fixed data subset, every
    ``every`` calls of :meth:`step`.

    Each measurement puts the model in eval mode for its duration (restoring the previous mode), builds the
    :class:`hessops.Hessian` at the current parameters and runs :func:`hessops.eigs` warm-started from the
    previous top eigenvectors' span, which usually cuts the Lanczos steps once training moves slowly.

    Measuring leaves torch's random number generators (CPU, and the model's CUDA devices) as it found them:
    iterating ``data`` (a shuffling DataLoader, say) inside a measurement does not change the training run's
    later shuffles, augmentations or dropout masks.

    Use ``tracker.step()`` once per optimizer step or per epoch (then pass ``unit="epoch"``).

    Args:
        model: the model being trained.
        loss_fn: the loss, as for the operators.
        data: the fixed data subset, a re-iterable of ``(inputs, targets)`` batches.
        every: measure on the first :meth:`step` and every ``every``-th after.
        k: how many of the top eigenvalues.
        unit: the x-axis label: ``"step"`` or ``"epoch"``.
        tol: :func:`hessops.eigs`' ``tol``.
        max_iters: :func:`hessops.eigs`' ``max_iters``.
        seed: :func:`hessops.eigs`' ``seed``.
        value_tol: :func:`hessops.eigs`' ``value_tol``: stop once each eigenvalue's verified error bound is
            within this (relative), e.g. ``1e-2`` for a sharpness curve; the bounds recorded stay verified.
        check: :func:`hessops.eigs`' ``check``: with ``False`` no check run, so a copy of a repeated top
            eigenvalue may go unseen (the values found and their bounds are still verified), for fewer products.
        **operator_kwargs: the :class:`hessops.Hessian`'s other keyword arguments.

    Raises:
        InvalidArgumentError: an argument of the wrong type or out of range, or ``model`` not a module."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Iterable,
        *,
        every: int = 1,
        k: int = 1,
        unit: str = "step",
        tol: float = 1e-4,
        max_iters: int | None = None,
        seed: int = 0,
        value_tol: float | None = None,
        check: bool = True,
        **operator_kwargs,
    ):
        every, k, seed = integer("every", every, minimum=1), integer("k", k, minimum=1), integer("seed", seed)
        tol = real("tol", tol, positive=True)
        if not isinstance(unit, str):
            raise InvalidArgumentError(f"unit={unit!r} must be a string (the x-axis label: 'step' or 'epoch')")
        if max_iters is not None:
            max_iters = integer("max_iters", max_iters, minimum=k)
        self.value_tol = None if value_tol is None else real("value_tol", value_tol, positive=True)
        self.check = boolean("check", check)
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.k, self.unit, self.tol, self.max_iters, self.seed = every, k, unit, tol, max_iters, seed
        self.operator_kwargs = operator_kwargs
        self.history: list[SharpnessRecord] = []
        self._calls = 0
        self._start: Tensor | None = None

    def step(self) -> SharpnessRecord | None:
        """Count one step; measure on the first call and every ``every``-th after.

        Returns:
            The new :class:`SharpnessRecord`, or ``None`` when this step measured nothing."""
        step, self._calls = self._calls, self._calls + 1
        return self.measure(step) if step % self.every == 0 else None

    def measure(self, step: int) -> SharpnessRecord:
        """Measure now and record it.

        Args:
            step: the step (or epoch) to record it under.

        Returns:
            The new :class:`SharpnessRecord`."""
        began = time.perf_counter()
        with measuring(self.model):
            H = Hessian(self.model, self.loss_fn, self.data, **self.operator_kwargs)
            start = self._start if self._start is not None and self._start.shape[0] == H.shape[0] else None
            spectrum = eigs(
                H,
                self.k,
                "LA",
                tol=self.tol,
                value_tol=self.value_tol,
                max_iters=self.max_iters,
                seed=self.seed,
                start=start,
                check=self.check,
            )
        self._start = spectrum.vectors.sum(1)
        record = SharpnessRecord(
            step, spectrum.values.tolist(), spectrum.residuals.tolist(), spectrum.n_matvecs, time.perf_counter() - began
        )
        self.history.append(record)
        return record

    def plot(self, path: str | Path | None = None, *, title: str | None = None, ax=None):
        """The recorded sharpness against steps (or epochs) (:func:`hessops.plot.plot_sharpness`).

        Args:
            path: the file to save the figure to, if any.
            title: the figure's title.
            ax: the matplotlib axes to draw into, when given.

        Returns:
            The matplotlib figure."""
        from hessops.plot import plot_sharpness

        return plot_sharpness(
            [r.step for r in self.history], [r.values for r in self.history], path, unit=self.unit, title=title, ax=ax
        )


@dataclass
class GradNormTracker:
    """Each parameter tensor's gradient Frobenius norm at every :meth:`step` (call it after
    ``loss.backward()``), averaged per epoch by :meth:`end_epoch`.

    Attributes:
        model: the model being trained.
        history: one dict per epoch: ``{"epoch": e, "steps": s, "norms": {name: mean norm}}``."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    _sums: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _steps: int = 0

    def __post_init__(self):
        if not isinstance(self.model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")

    def step(self) -> None:
        """Add the current gradients' norms (no host sync: they stay on the device until the epoch ends)."""
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                grad_norm = norm(p.grad.detach())
                self._sums[name] = self._sums[name] + grad_norm if name in self._sums else grad_norm
        self._steps += 1

    def end_epoch(self, epoch: int | None = None) -> dict:
        """Close an epoch: record the mean norm of each parameter over its steps.

        Args:
            epoch: the epoch's number (default: the count of epochs recorded so far).

        Returns:
            The record added to ``history``.

        Raises:
            EmptyDataError: no :meth:`step` since the last epoch closed."""
        if self._steps == 0:
            raise EmptyDataError("end_epoch() before any step(): call step() after each loss.backward()")
        epoch = len(self.history) if epoch is None else epoch
        record = {
            "epoch": epoch,
            "steps": self._steps,
            "norms": {k: float(v) / self._steps for k, v in self._sums.items()},
        }
        self.history.append(record)
        self._sums, self._steps = {}, 0
        return record

    def plot(self, path: str | Path | None = None, *, title: str | None = None, ax=None):
        """Each parameter's mean gradient norm per epoch (:func:`hessops.plot.plot_grad_norms`).

        Args:
            path: the file to save the figure to, if any.
            title: the figure's title.
            ax: the matplotlib axes to draw into, when given.

        Returns:
            The matplotlib figure."""
        from hessops.plot import plot_grad_norms

        names = list(self.history[0]["norms"]) if self.history else []
        series = {n: [h["norms"].get(n, float("nan")) for h in self.history] for n in names}
        return plot_grad_norms([h["epoch"] for h in self.history], series, path, title=title, ax=ax)


def train(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    loader: Iterable,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    sharpness: SharpnessTracker | None = None,
    grad_norms: GradNormTracker | None = None,
    update_curvature: UpdateCurvatureTracker | None = None,
    every: int = 1,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    r"""Plain SGD over ``loader`` for ``epochs`` (classification: outputs are logits or log-probabilities);
    sharpness measured before training and every ``every`` epochs, gradient norms every step.

    Args:
        model: the model to train, in place.
        loss_fn: the loss, as for the operators.
        loader: batches of ``(inputs, targets)`` or HuggingFace dicts with ``"labels"``.
        epochs: how many passes over ``loader``.
        lr: SGD's learning rate.
        momentum: SGD's momentum.
        weight_decay: SGD's weight decay.
        sharpness: a :class:`SharpnessTracker` to measure with, if any.
        grad_norms: a :class:`GradNormTracker` to record with, if any.
        update_curvature: an :class:`~hessops.analysis.update_curvature.UpdateCurvatureTracker`, stepped after
            every update (it measures on its own ``every``), if any.
        every: the sharpness's interval in epochs.
        progress: show a progress bar.
        on_epoch_end: ``on_epoch_end(epoch, record)`` is called after each epoch's measurements, the model in
            eval mode, with that epoch's record (add keys to it, e.g.
            ``record.update(test=evaluate(model, loss_fn, test_loader))``).

    Returns:
        Each epoch's record: its training loss, :math:`\frac1W \sum_b W_b L_b` over its steps' batches as the
        parameters moved (the dataset loss's rule, :class:`hessops.operators.evaluation.LossMean`: ignored
        targets and class weights count as the operators count them; the sum for ``reduction="sum"``; a batch
        whose targets are all ignored is skipped), and, for class scores, the accuracy over counted targets."""
    from tqdm.auto import tqdm

    spec = loss_spec(loss_fn)
    device = next(model.parameters()).device
    optimizer = _SGD(list(model.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    history, unknown = [], spec.kind is None
    if sharpness is not None:
        sharpness.measure(0)
    if update_curvature is not None:
        update_curvature.remember()
    for epoch in tqdm(range(1, epochs + 1), desc="training", disable=not progress, unit="epoch"):
        model.train()
        mean = LossMean(spec, device=device)
        for index, batch in enumerate(loader):
            inputs, targets = split_batch(batch, index)
            n_b = batch_size(inputs, index)
            weight = mean.count(targets, n_b)
            if weight == 0:  # every target ignored: no loss to descend, as the operators skip it
                continue
            optimizer.zero_grad()
            out = call_model(model, (), (), {}, inputs)
            if unknown:  # a loss hessops does not know: a mean over examples? (on the first counted batch)
                probe_mean(spec, out.detach(), targets, n_b)
                unknown = False
            loss = spec(out, targets)
            loss.backward()
            if grad_norms is not None:
                grad_norms.step()
            optimizer.step()
            mean.add(loss, out, targets, weight)
            if update_curvature is not None:
                update_curvature.step()
        model.eval()
        if grad_norms is not None:
            grad_norms.end_epoch(epoch)
        if sharpness is not None and epoch % every == 0:
            sharpness.measure(epoch)
        epoch_mean = mean.result()
        record = {"epoch": epoch, "loss": float(epoch_mean.loss[0])}
        if epoch_mean.accuracy is not None:
            record["accuracy"] = float(epoch_mean.accuracy[0])
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        history.append(record)
    return history


class _SGD:
    """``torch.optim.SGD``'s update (no dampening, no Nesterov: ``d = g + λθ``, ``b ← μb + d`` from ``b = d``,
    ``θ ← θ − η b``), the same numbers bit for bit (tests/analysis/test_tracking.py), without ``torch.optim``,
    whose first optimizer imports ``torch._dynamo`` (2 s on 2 CPU cores) into a process that may never compile."""

    def __init__(self, params: list[Tensor], *, lr: float, momentum: float, weight_decay: float) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: list[Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                if self.buffers[i] is None:
                    self.buffers[i] = d.clone()
                else:
                    self.buffers[i].mul_(self.momentum).add_(d)
                d = self.buffers[i]
            p.add_(d, alpha=-self.lr)


def evaluate(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Iterable) -> dict[str, float]:
    r"""The dataset loss of ``model`` over ``data``, the one its operators are the curvature of
    (:func:`hessops.operators.evaluation.dataset_loss`: :math:`\frac1W \sum_b W_b L_b`, each batch's mean
    weighted by what it averages over, its examples, elements, counted targets or their class weights; the
    dataset sum for ``reduction="sum"``) and, when the outputs are class scores ``(B, C)`` and the targets class
    indices, the accuracy over counted targets. Runs in eval mode without gradients and restores the model's mode.

    Args:
        model: the network.
        loss_fn: the batch loss (mean or sum), as the operators take it.
        data: an iterable of ``(inputs, targets)`` batches (or HuggingFace dicts with ``"labels"``).

    Returns:
        ``{"loss": L}``, with ``"accuracy"`` for class scores.

    Raises:
        EmptyDataError: the data hold no example, or every target is ignored.
    """
    with _eval_mode(model):
        result = dataset_loss(model, loss_fn, data)
    record = {"loss": float(result.loss[0])}
    if result.accuracy is not None:
        record["accuracy"] = float(result.accuracy[0])
    return record
