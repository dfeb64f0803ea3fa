"""Loss-landscape slices: the dataset loss (and the accuracy, for classifiers) on a line ``θ + a·d₁`` or a plane
``θ + a·d₁ + b·d₂`` through the model's parameters ``θ``, along eigenvectors of a curvature operator or random
filter-normalized directions (Li, Xu, Taylor, Studer & Goldstein, *Visualizing the Loss Landscape of Neural
Nets*, NeurIPS 2018).

The model is never written to: each point's parameters go through ``torch.func.functional_call``, so the
model's parameters are the same tensors, bit for bit, afterwards, also when an error or Ctrl-C ends the run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessops._arguments import integer, real
from hessops.analysis.eigenvectors import Eigenvectors, parameter_norms
from hessops.analysis.spectrum import Spectrum
from hessops.constants import LANDSCAPE_DIRECTIONS
from hessops.errors import InvalidArgumentError, NonFiniteLossError
from hessops.numerics import column_norms, norm
from hessops.operators.evaluation import dataset_loss
from hessops.operators.functional import (
    ParamTree,
    all_finite,
    check_train_mode,
    first_batch,
    normalize_device,
    select_parameters,
)
from hessops.operators.losses import loss_spec

RANDOM = LANDSCAPE_DIRECTIONS[0]  # random filter-normalized directions
PASS_BYTES = 2**30  # the parameter copies of the points one pass over the data evaluates, at most (by default)


@dataclass
class LandscapeSlice:
    """The loss on a line (``dims == 1``) or a plane (``dims == 2``) through the parameters.

    Attributes:
        coordinates: one ``(points,)`` float64 tensor per axis, symmetric about 0 (which is a grid point when
            ``points`` is odd).
        loss: ``(points,)`` or ``(points₁, points₂)`` (``loss[i, j]`` at ``a = coordinates[0][i]``,
            ``b = coordinates[1][j]``), the dataset loss as the operators define it (each batch's mean weighted by
            what it averages over).
        accuracy: the same shape for classifiers, else ``None``.
        center_loss: the loss at ``θ`` itself.
        center_accuracy: the accuracy at ``θ`` itself.
        directions: ``"eigen"``, ``"random"`` or ``"given"``.
        labels: one per axis.
        eigenvalues: the directions' eigenvalues (eigenvectors only).
        direction_norms: the directions' Euclidean norms.
        n_examples: the examples of one pass.
        n_points: the points evaluated (θ once).
        n_passes: the passes over the data they took.
        seconds: the wall time."""

    coordinates: list[Tensor]
    loss: Tensor
    accuracy: Tensor | None
    center_loss: float
    center_accuracy: float | None
    directions: str
    labels: list[str]
    eigenvalues: list[float] | None
    direction_norms: list[float]
    n_examples: int
    n_points: int
    n_passes: int
    seconds: float

    @property
    def dims(self) -> int:
        """1 for a line, 2 for a plane."""
        return len(self.coordinates)

    def to_dict(self) -> dict:
        """The slice as JSON-ready values.

        Returns:
            ``dims``, ``coordinates`` (one list per axis), ``loss`` and ``accuracy`` (nested lists, or ``null``),
            ``center_loss``, ``center_accuracy``, ``directions``, ``labels``, ``eigenvalues``, ``direction_norms``,
            ``n_examples``, ``n_points``, ``n_passes``, ``seconds``."""
        return {
            "dims": self.dims,
            "coordinates": [c.tolist() for c in self.coordinates],
            "loss": self.loss.tolist(),
            "accuracy": None if self.accuracy is None else self.accuracy.tolist(),
            "center_loss": self.center_loss,
            "center_accuracy": self.center_accuracy,
            "directions": self.directions,
            "labels": list(self.labels),
            "eigenvalues": self.eigenvalues,
            "direction_norms": self.direction_norms,
            "n_examples": self.n_examples,
            "n_points": self.n_points,
            "n_passes": self.n_passes,
            "seconds": self.seconds,
        }


def filter_normalized_direction(
    model: nn.Module, *, seed: int = 0, params: Sequence[Tensor] | None = None
) -> dict[str, Tensor]:
    """A random direction, filter-normalized (Li et al., 2018): for every parameter of two or more dimensions,
    a standard normal tensor of its shape whose each filter (slice along dim 0: a convolution's output channel,
    a linear layer's output unit) is rescaled to the norm of the same filter of the parameter. Parameters of one
    dimension or none (biases, normalization scales and shifts) get a zero direction, as in Li et al.'s
    plots, which leave them unperturbed. Drawn on the CPU from ``seed`` (the same direction on every device).

    Args:
        model: the model whose parameters set the filters' norms.
        seed: the seed of the draw.
        params: the parameters to draw for (default: the trainable ones).

    Returns:
        ``name -> tensor`` on the parameters' device, for the trainable parameters (or ``params``).

    Raises:
        InvalidArgumentError: ``seed`` is not a whole number, or ``model`` not a module.
        NoParametersError: no trainable parameters, or ``params`` names a tensor the model does not own."""
    seed = integer("seed", seed)
    names, tensors = select_parameters(model, params)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    direction = {}
    for name, p in zip(names, tensors):
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        scale = _filter_norms(p.detach()) / _filter_norms(d).clamp_min(torch.finfo(p.dtype).tiny)
        direction[name] = d.mul_(scale.reshape(-1, *([1] * (p.dim() - 1))))
    return direction


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Iterable,
    directions: Any = RANDOM,
    *,
    dims: int | None = None,
    span: float | tuple[float, float] = 1.0,
    points: int | tuple[int, int] = 21,
    seed: int = 0,
    params: Sequence[Tensor] | None = None,
    points_per_pass: int | None = None,
    progress: bool = False,
) -> LandscapeSlice:
    """The dataset loss (and, for a classifier, the accuracy) on a line or a plane through the parameters.

    ``directions``:

    - ``"random"`` (default): ``dims`` (default 2) independent :func:`filter_normalized_direction` draws from
      ``seed``, ``seed + 1``; the coordinates are then relative to each filter's norm (span 1: as far again as
      the weights).
    - eigenvectors: a :class:`~hessops.analysis.spectrum.Spectrum` (its flat vectors, in the layout of ``params``, the
      operator's) or the :class:`~hessops.analysis.eigenvectors.Eigenvectors` of
      :func:`~hessops.analysis.eigenvectors.load_eigenvectors`
      (matched by parameter name): the first ``dims`` (default: two, or one if there is one) vectors. Unit
      vectors: the coordinates are Euclidean distances in parameter space.
    - given: a flat tensor ``(n,)`` or ``(n, dims)`` in the layout of ``params``, or a dict ``name -> tensor``
      (or a list of one or two such dicts, with the same names), used as they are.

    The grid is ``points`` (an int, or one per axis) coordinates from ``-span`` to ``span`` (a float, or one per
    axis) on each axis. Each point costs a forward pass over ``data``, under ``torch.no_grad``, in the model's
    dtype; one pass over the data serves ``points_per_pass`` points (each batch evaluated at all of them while it
    is at hand; default: as many as 1 GiB of parameter copies hold), after a pass at θ alone. The loss is the
    operators' dataset loss (each batch's mean weighted by what it averages over: examples, counted targets or
    their class weights; a sum for ``reduction="sum"``), the accuracy is over counted targets where the outputs
    are class scores ``(B, C)`` and the targets class indices. The model is checked as the operators
    check it: eval mode (no Dropout or BatchNorm in training mode), a finite loss at ``θ``, data with examples.
    Points away from ``θ`` whose loss overflows are kept as inf or NaN, with a ``RuntimeWarning``.

    Args:
        model: the model, in eval mode.
        loss_fn: the loss, as for the operators.
        data: a re-iterable of ``(inputs, targets)`` batches.
        directions: ``"random"``, eigenvectors or given directions, as above.
        dims: 1 (a line) or 2 (a plane); the default as above.
        span: the grid's half-width, a float or one per axis.
        points: the grid's points, an int or one per axis.
        seed: the seed of the random directions.
        params: the parameters the directions move (default: the trainable ones).
        points_per_pass: the points one pass over the data serves.
        progress: show the passes as they go.

    Returns:
        The :class:`LandscapeSlice`.

    Raises:
        TrainModeError: Dropout or BatchNorm in training mode.
        InvalidArgumentError: an argument of the wrong type or out of range, or directions that do not fit the
            parameters.
        NonFiniteLossError: the loss at ``θ`` is not finite.
        EmptyDataError: the data yielded no example."""
    began = time.perf_counter()
    check_train_mode(model, False)
    spec = loss_spec(loss_fn)
    progress = bool(progress)
    names, axes, kind, labels, eigenvalues = _directions(model, directions, dims, seed, params)
    dims = len(axes)
    spans = _pair("span", span, dims, lambda name, v: real(name, v, positive=True))
    counts = _pair("points", points, dims, lambda name, v: integer(name, v, minimum=2))
    if points_per_pass is not None:
        points_per_pass = integer("points_per_pass", points_per_pass, minimum=1)
    coordinates = [s * (2 * torch.arange(p, dtype=torch.float64) - (p - 1)) / (p - 1) for s, p in zip(spans, counts)]
    first_batch(data)  # refuses a one-shot iterator before anything is computed: each point is a pass over data

    all_params = dict(model.named_parameters())
    center = tuple(all_params[name].detach() for name in names)
    device, dtype = normalize_device(center[0].device), center[0].dtype
    axes = [tuple(t.to(device=device, dtype=dtype) for t in axis) for axis in axes]
    norms = [float(norm(torch.stack([norm(t) for t in axis]))) for axis in axes]

    grid = torch.cartesian_prod(*coordinates).reshape(-1, dims)
    shape = tuple(counts)
    loss = torch.empty(grid.shape[0], dtype=torch.float64)
    accuracy = torch.empty(grid.shape[0], dtype=torch.float64)
    selected = [all_params[name] for name in names]

    def evaluate(points: list[ParamTree]) -> tuple[Tensor, Tensor, int]:
        result = dataset_loss(model, spec, data, points=points, params=selected)
        accuracy = torch.full_like(result.loss, float("nan")) if result.accuracy is None else result.accuracy
        return result.loss, accuracy, result.examples

    center_loss, center_accuracy, examples = _at_center(evaluate, center)
    origin = ~grid.bool().any(dim=1)  # θ itself, a grid point when every axis has an odd number of points
    loss[origin], accuracy[origin] = center_loss, center_accuracy
    todo = (~origin).nonzero().flatten().tolist()
    if points_per_pass is None:  # as many as PASS_BYTES of parameter copies hold
        points_per_pass = max(1, PASS_BYTES // (sum(t.numel() for t in center) * center[0].element_size()))
    bar = {"total": len(todo), "desc": f"loss landscape ({dims}-D)", "disable": not progress, "leave": False}
    passes = 1 + _sweep(evaluate, center, grid, axes, todo, points_per_pass, loss, accuracy, bar)
    bad = int((~torch.isfinite(loss)).sum())
    if bad:
        warnings.warn(
            f"the loss is NaN or infinite at {bad} of {grid.shape[0]} points (it overflows far from the parameters): "
            "they are kept as they are (null in JSON); a smaller span avoids them",
            RuntimeWarning,
            stacklevel=2,
        )
    classifier = not bool(torch.isnan(center_accuracy))
    return LandscapeSlice(
        coordinates=coordinates,
        loss=loss.reshape(shape),
        accuracy=accuracy.reshape(shape) if classifier else None,
        center_loss=float(center_loss),
        center_accuracy=float(center_accuracy) if classifier else None,
        directions=kind,
        labels=labels,
        eigenvalues=eigenvalues,
        direction_norms=norms,
        n_examples=examples,
        n_points=len(todo) + 1,
        n_passes=passes,
        seconds=time.perf_counter() - began,
    )


def _at_center(evaluate: Callable, center: ParamTree) -> tuple[Tensor, Tensor, int]:
    """The loss, the accuracy and the examples at the parameters themselves, where the loss must be finite."""
    losses, accuracies, examples = evaluate([center])
    center_loss, center_accuracy = losses[0], accuracies[0]
    if not torch.isfinite(center_loss):
        raise NonFiniteLossError(
            f"the loss at the model's parameters is {float(center_loss)}: check the data for NaN/inf, and the model "
            "for overflow (float64, or a checkpoint from before divergence)"
        )
    return center_loss, center_accuracy, examples


def _sweep(
    evaluate: Callable,
    center: ParamTree,
    grid: Tensor,
    axes: list[tuple[Tensor, ...]],
    todo: list[int],
    points_per_pass: int,
    loss: Tensor,
    accuracy: Tensor,
    bar: dict[str, Any],
) -> int:
    """Fill ``loss`` and ``accuracy`` at the grid points ``todo``, ``points_per_pass`` of them in a pass over the
    data, with a progress bar of options ``bar``; returns the passes made."""
    passes = 0
    with tqdm(**bar, unit="point") as progress:
        for start in range(0, len(todo), points_per_pass):
            chunk = todo[start : start + points_per_pass]
            moved = [
                tuple(_moved(p, [(float(c), axis[j]) for c, axis in zip(grid[i], axes)]) for j, p in enumerate(center))
                for i in chunk
            ]
            loss[chunk], accuracy[chunk], _ = evaluate(moved)
            passes += 1
            progress.update(len(chunk))
    return passes


def _moved(p: Tensor, steps: list[tuple[float, Tensor]]) -> Tensor:
    """``p + Σ c·d`` over the axes, skipping those at 0 (a new tensor; ``p`` is left alone)."""
    out = p
    for c, d in steps:
        if c != 0.0:
            out = torch.add(p, d, alpha=c) if out is p else out.add_(d, alpha=c)
    return out


def _filter_norms(t: Tensor) -> Tensor:
    """The norm of each filter (slice along dim 0) of ``t``."""
    return column_norms(t.reshape(t.shape[0], -1), dim=1)


def _pair(name: str, value: Any, dims: int, check: Callable[[str, Any], Any]) -> list:
    """``value`` for every axis: one value, or one per axis (a tuple or list of ``dims``)."""
    if isinstance(value, (tuple, list)):
        if len(value) != dims:
            raise InvalidArgumentError(f"{name}={value!r}: give one value, or one per axis ({dims})")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)] * dims


def _directions(
    model: nn.Module, directions: Any, dims: int | None, seed: int, params: Sequence[Tensor] | None
) -> tuple[tuple[str, ...], list[ParamTree], str, list[str], list[float] | None]:
    """``(names, axes, kind, labels, eigenvalues)``: the parameters the directions move, each direction as a
    tuple of tensors in that order, what kind they are, an axis label each, and their eigenvalues."""
    if dims is not None:
        dims = integer("dims", dims, minimum=1, maximum=2)
    if isinstance(directions, str):
        if directions != RANDOM:
            raise InvalidArgumentError(
                f"directions={directions!r}: pass 'random', a Spectrum, loaded Eigenvectors, a flat tensor or dicts"
            )
        seed = integer("seed", seed)
        names, _ = select_parameters(model, params)
        drawn = [filter_normalized_direction(model, seed=seed + i, params=params) for i in range(dims or 2)]
        axes = [tuple(d[name] for name in names) for d in drawn]
        if not any(bool(t.any()) for t in axes[0]):
            raise InvalidArgumentError(
                "every parameter has one dimension (biases, normalization), which random filter-normalized "
                "directions leave alone: pass directions of your own (a flat tensor or dicts)"
            )
        return names, axes, RANDOM, [f"random filter-normalized direction {i + 1}" for i in range(len(axes))], None
    if isinstance(directions, Eigenvectors):
        wanted = _wanted(dims, len(directions), "the loaded Eigenvectors")
        dicts = directions.as_dicts()[:wanted]
        names, axes = _named(model, dicts)
        _check_point(model, directions)
        values = directions.values[:wanted].tolist()
        return names, axes, "eigen", _eigen_labels(values), values
    if isinstance(directions, Spectrum):
        wanted = _wanted(dims, directions.vectors.shape[1], "the Spectrum")
        names, axes = _flat(model, directions.vectors[:, :wanted], params)
        values = directions.values[:wanted].tolist()
        return names, axes, "eigen", _eigen_labels(values), values
    if isinstance(directions, Tensor):
        flat = directions.reshape(-1, 1) if directions.dim() == 1 else directions
        names, axes = _flat(model, flat, params)
    elif isinstance(directions, Mapping) or (
        isinstance(directions, (list, tuple)) and directions and all(isinstance(d, Mapping) for d in directions)
    ):
        dicts = [directions] if isinstance(directions, Mapping) else list(directions)
        names, axes = _named(model, dicts)
    else:
        raise InvalidArgumentError(
            f"directions is a {type(directions).__name__}: pass 'random', a Spectrum (hessops.eigs), the Eigenvectors "
            "of hessops.load_eigenvectors, a flat tensor (n,) or (n, 2), or dicts parameter name -> tensor"
        )
    if not 1 <= len(axes) <= 2 or (dims is not None and dims != len(axes)):
        raise InvalidArgumentError(
            f"{len(axes)} directions given{f' for dims={dims}' if dims is not None else ''}: give one (a line) or two "
            "(a plane)"
        )
    return names, axes, "given", [f"direction {i + 1}" for i in range(len(axes))], None


def _wanted(dims: int | None, available: int, what: str) -> int:
    if dims is None:
        return min(2, available)
    if dims > available:
        raise InvalidArgumentError(
            f"dims={dims} needs {dims} eigenvectors; {what} holds {available}: compute more (eigs with k={dims}) "
            f"or pass dims={available}"
        )
    return dims


def _eigen_labels(values: list[float]) -> list[str]:
    return [f"eigenvector {i + 1} (λ = {v:.4g})" for i, v in enumerate(values)]


def _flat(model: nn.Module, flat: Tensor, params: Sequence[Tensor] | None) -> tuple[tuple[str, ...], list[ParamTree]]:
    """Columns of ``flat`` (n, d) as tuples of parameter-shaped tensors in the layout of ``params``."""
    names, tensors = select_parameters(model, params)
    n = sum(t.numel() for t in tensors)
    if flat.dim() != 2 or flat.shape[0] != n:
        raise InvalidArgumentError(
            f"the directions have shape {tuple(flat.shape)}, but the parameters they move have {n:,} entries: pass "
            "params= as the operator had them, or save the vectors with hessops.save_eigenvectors, which records "
            "the parameter names"
        )
    _check_finite(flat, "the directions")
    axes = []
    for column in flat.T:
        pieces = column.split([t.numel() for t in tensors])
        axes.append(tuple(piece.reshape(t.shape) for piece, t in zip(pieces, tensors)))
    return names, axes


def _named(model: nn.Module, dicts: list[Mapping[str, Tensor]]) -> tuple[tuple[str, ...], list[ParamTree]]:
    """Dicts ``name -> tensor`` as tuples in the model's parameter order, checked against its parameters."""
    shapes = {name: p.shape for name, p in model.named_parameters()}
    keys = set(dicts[0])
    for i, d in enumerate(dicts):
        if set(d) != keys:
            raise InvalidArgumentError(f"direction {i + 1} names other parameters than direction 1: give both the same")
    unknown = sorted(keys - set(shapes))
    if unknown:
        raise InvalidArgumentError(
            f"the directions name {unknown[:3]}{' ...' if len(unknown) > 3 else ''}, which are not parameters of the "
            f"model ({type(model).__name__}): they belong to another model; pass the model they were computed on"
        )
    names = tuple(name for name in shapes if name in keys)
    for name in names:
        for d in dicts:
            if not isinstance(d[name], Tensor) or d[name].shape != shapes[name]:
                raise InvalidArgumentError(
                    f"the direction of {name} has shape {tuple(getattr(d[name], 'shape', ()))}, the parameter "
                    f"{tuple(shapes[name])}: pass directions computed on this model"
                )
            _check_finite(d[name], f"the direction of {name}")
    return names, [tuple(d[name] for name in names) for d in dicts]


def _check_point(model: nn.Module, vectors: Eigenvectors) -> None:
    """Warn when the model's parameters are not those the eigenvectors were computed at (their norms differ
    beyond float32 rounding): a forgotten checkpoint, or the vectors of another run."""
    here = parameter_norms(model, vectors.names)
    there = vectors.parameter_norms
    differ = ~torch.isclose(here, there, rtol=1e-5, atol=0.0)
    if bool(differ.any()):
        i = int(differ.nonzero()[0])
        warnings.warn(
            f"the eigenvectors were computed at other parameter values than the model's (‖{vectors.names[i]}‖ is "
            f"{float(there[i]):.6g} there, {float(here[i]):.6g} here): the slice is not along this model's "
            "eigenvectors; load the parameters they were computed at (the same --checkpoint)",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_finite(t: Tensor, what: str) -> None:
    if not all_finite(t):
        raise InvalidArgumentError(f"{what} hold NaN or inf: pass finite directions")
