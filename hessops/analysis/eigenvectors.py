"""Eigenvectors on disk: :func:`save_eigenvectors` writes a :class:`~hessops.analysis.spectrum.Spectrum`'s vectors
with the parameter layout of the operator they are eigenvectors of; :func:`load_eigenvectors` reads them back as
parameter-shaped dicts (``name -> tensor``) or as the flat ``(n, k)`` matrix.

The file is one ``torch.save`` of a dict of tensors, strings and numbers (loadable with
``torch.load(weights_only=True)``, so loading runs no pickled code): ``format`` ("hessops.eigenvectors"),
``version``, ``values`` (k,), ``vectors`` (k, n) (one row per vector, so each parameter-shaped piece is a
view), ``names`` and ``shapes`` (the flat vector's layout: ``torch.cat([p.reshape(-1) for p in params])`` in
that order), ``parameter_norms`` (each parameter's norm where the vectors were computed: a fingerprint of the
point), ``residuals``, ``error_bounds``, ``which``, ``operator`` (its class name) and ``hessops_version``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hessops import __version__
from hessops._arguments import linear_operator
from hessops._cola import cola
from hessops._io import atomic_write
from hessops.errors import EigenvectorsFileError, InvalidArgumentError
from hessops.numerics import norm
from hessops.operators.functional import Problem, flat_to_tree

if TYPE_CHECKING:  # Spectrum.save calls this module: no import back at run time (tests/test_layers.py)
    from hessops.analysis.spectrum import Spectrum

FORMAT = "hessops.eigenvectors"
VERSION = 1


@dataclass
class Eigenvectors:
    """Eigenpairs read by :func:`load_eigenvectors`; the vectors through :meth:`as_dicts` and :meth:`flat`.

    Attributes:
        values: ``(k,)`` the eigenvalues.
        rows: ``(k, n)``: one vector per row.
        names: the names of the parameters the vectors live on (the flat vector's order).
        shapes: those parameters' shapes.
        which: as :func:`hessops.eigs` reported it.
        residuals: as :func:`hessops.eigs` reported them.
        error_bounds: as :func:`hessops.eigs` reported them.
        operator: the class name of the operator the vectors are of.
        parameter_norms: float64, each parameter's norm at the point the vectors are of."""

    values: Tensor
    rows: Tensor  # (k, n): one vector per row
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    which: str
    residuals: Tensor
    error_bounds: Tensor
    operator: str
    parameter_norms: Tensor

    def __len__(self) -> int:
        return self.rows.shape[0]

    def flat(self) -> Tensor:
        """The vectors as one matrix.

        Returns:
            The ``(n, k)`` matrix of :attr:`hessops.Spectrum.vectors` (a view)."""
        return self.rows.T

    def as_dicts(self) -> list[dict[str, Tensor]]:
        """The vectors by parameter.

        Returns:
            The ``k`` vectors, each a dict ``parameter name -> tensor of that parameter's shape`` (views)."""
        pieces = flat_to_tree(self.rows, self.shapes)
        return [{name: piece[i] for name, piece in zip(self.names, pieces)} for i in range(len(self))]


def save_eigenvectors(path: str | os.PathLike, spectrum: Spectrum, op: cola.ops.LinearOperator) -> Path:
    """Write ``spectrum``'s eigenpairs to ``path``, with the parameter layout of ``op``.

    The file is written whole or not at all (a temporary file beside it, renamed).

    Args:
        path: the file to write.
        spectrum: a :class:`~hessops.analysis.spectrum.Spectrum` from :func:`hessops.eigs`.
        op: the hessops curvature operator (or a ``Regularized`` one) they were computed from.

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: ``spectrum`` is not a ``Spectrum``, ``op`` not a hessops operator, or the vectors'
            length not ``op``'s size.
        OutputError: the file could not be written."""
    problem = _problem(op)
    n = problem.numel
    if not (
        isinstance(getattr(spectrum, "values", None), Tensor) and isinstance(getattr(spectrum, "vectors", None), Tensor)
    ):
        raise InvalidArgumentError(
            f"spectrum must be the Spectrum hessops.eigs returned, got {type(spectrum).__name__}"
        )
    vectors, values = spectrum.vectors, spectrum.values
    if vectors.dim() != 2 or vectors.shape[0] != n or vectors.shape[1] != values.shape[0]:
        raise InvalidArgumentError(
            f"spectrum.vectors has shape {tuple(vectors.shape)}, but {type(op).__name__} has {n:,} parameters: pass "
            "the operator that eigs ran on"
        )
    record = {
        "format": FORMAT,
        "version": VERSION,
        "values": values.detach().cpu().clone(),
        "vectors": vectors.detach().T.cpu().clone(memory_format=torch.contiguous_format),
        "names": list(problem.names),
        "shapes": [list(shape) for shape in problem.shapes],
        "parameter_norms": parameter_norms(problem.model, problem.names),
        "which": spectrum.which,
        "residuals": spectrum.residuals.detach().cpu().clone(),
        "error_bounds": spectrum.error_bounds.detach().cpu().clone(),
        "operator": type(op).__name__,
        "hessops_version": __version__,
    }
    path = Path(path)
    atomic_write(path, lambda file: torch.save(record, file))
    return path


def load_eigenvectors(path: str | os.PathLike) -> Eigenvectors:
    """The eigenpairs :func:`save_eigenvectors` wrote to ``path``, read back.

    Args:
        path: the file :func:`save_eigenvectors` wrote.

    Returns:
        The :class:`Eigenvectors`, on the CPU.

    Raises:
        EigenvectorsFileError: no such file, a file of another kind or of another format version (the message
            names what it found)."""
    path = Path(path)
    if not path.is_file():
        raise EigenvectorsFileError(
            f"{path}: no such file: pass a file written by hessops.save_eigenvectors or `hessops eigs --save-vectors`"
        )
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        reason = " ".join(str(error).split())[:200]
        raise EigenvectorsFileError(
            f"{path} is not a file of eigenvectors that torch.load(weights_only=True) can read ({reason}): pass a "
            "file written by hessops.save_eigenvectors or `hessops eigs --save-vectors`"
        ) from None
    kind = record.get("format") if isinstance(record, dict) else None
    if kind != FORMAT:
        what = f"format {kind!r}" if kind is not None else f"a {type(record).__name__}"
        hint = " (a model's state_dict? pass it as --checkpoint)" if isinstance(record, dict) and kind is None else ""
        raise EigenvectorsFileError(
            f"{path} holds {what}{hint}, not hessops eigenvectors: pass a file written by hessops.save_eigenvectors "
            "or `hessops eigs --save-vectors`"
        )
    if record.get("version") != VERSION:
        raise EigenvectorsFileError(
            f"{path} is hessops eigenvectors of format version {record.get('version')!r} (written by hessops "
            f"{record.get('hessops_version', '?')}); this hessops {__version__} reads version {VERSION}: save them "
            "again with this version (`hessops eigs --save-vectors`)"
        )
    shapes = tuple(torch.Size(shape) for shape in record["shapes"])
    rows = record["vectors"]
    if rows.shape != (record["values"].shape[0], sum(s.numel() for s in shapes)):
        raise EigenvectorsFileError(
            f"{path} is damaged: its vectors have shape {tuple(rows.shape)}, which does not match its "
            f"{record['values'].shape[0]} values and parameter shapes: save them again"
        )
    return Eigenvectors(
        values=record["values"],
        rows=rows,
        names=tuple(record["names"]),
        shapes=shapes,
        which=record["which"],
        residuals=record["residuals"],
        error_bounds=record["error_bounds"],
        operator=record["operator"],
        parameter_norms=record["parameter_norms"],
    )


def parameter_norms(model: torch.nn.Module, names: tuple[str, ...]) -> Tensor:
    """Each named parameter's Euclidean norm, float64 on the CPU: which point of parameter space vectors are of."""
    params = dict(model.named_parameters())
    return torch.stack([norm(params[name].detach().double()) for name in names]).cpu()


def _problem(op) -> Problem:
    """The parameter layout of a hessops curvature operator, or of the one a ``Regularized`` operator wraps."""
    linear_operator("op", op)
    inner = op
    while not isinstance(getattr(inner, "problem", None), Problem) and hasattr(inner, "op"):
        inner = inner.op
    problem = getattr(inner, "problem", None)
    if not isinstance(problem, Problem):
        raise InvalidArgumentError(
            f"{type(op).__name__} has no parameter layout to save the vectors with: pass the hessops curvature "
            "operator (Hessian, GGN, ...) that eigs ran on"
        )
    return problem
