r"""Per-block spectra: the extreme eigenvalues of each parameter group's curvature block.

The block of a group ``g`` is the square sub-matrix :math:`H_{gg} = \nabla^2_{\theta_g} L(\theta)` of the
full curvature matrix (Hessian, GGN or Fisher of the dataset loss), the other parameters held at their values:
the operator built with ``params=`` the group's tensors. Block-wise studies of transformers compare these
spectra across layers (e.g. Zhang et al., *Why Transformers Need Adam: A Hessian Perspective*, 2024).
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hessops._arguments import boolean, choice, integer, real
from hessops.analysis.spectrum import Spectrum, eigs
from hessops.constants import OPERATOR_NAMES, WHICH
from hessops.errors import InvalidArgumentError, NoParametersError

_INDEX = re.compile(r"^\d+$")


@dataclass
class BlockSpectra:
    """The spectra of :func:`block_spectra`, one per group, in the groups' order.

    ``result[name]`` is a group's spectrum; iterating gives the group names.

    Attributes:
        spectra: each group's name with its :class:`~hessops.analysis.spectrum.Spectrum` (values, residuals and
            error bounds of that block alone).
        parameters: each group's parameter names (the block's flat order).
        sizes: each group's number of parameters.
        operator: the curvature matrix computed.
        which: the eigenvalues computed (as in :func:`hessops.eigs`).
        n_matvecs: the block products used by all groups together (columns).
        seconds: the wall time, operator set-up included."""

    spectra: dict[str, Spectrum]
    parameters: dict[str, tuple[str, ...]]
    sizes: dict[str, int]
    operator: str
    which: str
    n_matvecs: int
    seconds: float

    def __getitem__(self, name: str) -> Spectrum:
        return self.spectra[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.spectra)

    def __len__(self) -> int:
        return len(self.spectra)

    def to_dict(self) -> dict:
        """The result as JSON-ready values.

        Returns:
            ``blocks``, a list (in order) of ``{"name", "parameters", "n_params", **Spectrum.to_dict()}``, and
            ``operator``, ``which``, ``n_matvecs``, ``seconds``."""
        return {
            "blocks": [
                {"name": name, "parameters": list(self.parameters[name]), "n_params": self.sizes[name]}
                | spectrum.to_dict()
                for name, spectrum in self.spectra.items()
            ],
            "operator": self.operator,
            "which": self.which,
            "n_matvecs": self.n_matvecs,
            "seconds": self.seconds,
        }


def block_name(parameter: str) -> str:
    """The automatic group of a parameter name: its module path up to and including the first integer index
    (``layers.3.linear1.weight`` → ``layers.3``, ``transformer.h.3.attn.c_attn.weight`` → ``transformer.h.3``,
    ``layer2.1.conv1.weight`` → ``layer2.1``, ``0.weight`` → ``0``); without an index, its module
    (``head.weight`` → ``head``), or the name itself for a parameter of the root module (``cls_token``)."""
    parts = parameter.split(".")
    for i, part in enumerate(parts[:-1]):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or parameter


def find_blocks(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The automatic groups of ``model``'s trainable parameters (:func:`block_name`), in the order of their
    first parameter in ``model.named_parameters()``: the repeated blocks of a transformer or a ResNet each a
    group, every other module (embeddings, norms, the head) a group of its own."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(block_name(name), []).append(name)
    if not groups:
        raise NoParametersError(
            "the model has no trainable parameters (every parameter has requires_grad=False): unfreeze some, or "
            "pass groups={name: [parameters]} explicitly"
        )
    return {name: tuple(members) for name, members in groups.items()}


def resolve_groups(
    model: nn.Module, groups: Mapping[str, Sequence[Tensor | str] | str] | None
) -> dict[str, tuple[str, ...]]:
    """Each group's parameter names, in ``model.named_parameters()`` order: the automatic groups
    (:func:`find_blocks`) when ``groups`` is ``None``, else each entry's members, a parameter tensor of the
    model, a parameter name, or a module name (a prefix of parameter names): ``"encoder.layers.0"`` takes the
    module's trainable parameters (``requires_grad``; frozen ones, as a LoRA model's base weights, are held
    fixed as in the automatic blocks), a tensor or a full parameter name that parameter. A parameter tied or
    shared between modules is found under each of its paths (``"lm_head"`` of GPT-2 takes ``wte.weight``) and
    named by its first (as ``named_parameters()`` names it). Groups may overlap; each is one block.

    Args:
        model: the model whose parameters are grouped.
        groups: ``{name: [members]}`` (a single member may stand for its list), or ``None``.

    Returns:
        Each group's name with its parameters' names.

    Raises:
        NoParametersError: ``groups`` is ``None`` and the model has no trainable parameters.
        InvalidArgumentError: ``model`` is not a module; a group is empty, unnamed, or holds a member that names
            nothing trainable of the model."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if groups is None:
        return find_blocks(model)
    if not isinstance(groups, Mapping) or not groups:
        raise InvalidArgumentError(
            f"groups={groups!r}: pass a non-empty dict {{name: [parameters or module-name prefixes]}}, or None for "
            "the automatic blocks"
        )
    named = list(model.named_parameters())
    resolved = {}
    for group, members in groups.items():
        if not isinstance(group, str):
            raise InvalidArgumentError(f"groups: the group name {group!r} is not a string: name each group")
        members = [members] if isinstance(members, (str, Tensor)) else list(members)
        chosen = {id(p) for member in members for p in _member_parameters(model, group, member)}
        if not chosen:
            raise InvalidArgumentError(f"groups[{group!r}] is empty: give it at least one parameter or module name")
        resolved[group] = tuple(n for n, p in named if id(p) in chosen)
    return resolved


def _member_parameters(model: nn.Module, group: str, member: Tensor | str) -> list[Tensor]:
    """The parameters that one member of ``groups[group]`` takes (:func:`resolve_groups`): a tensor of the
    model, the parameter of that full name, or the trainable parameters under that module name, each tied
    parameter under any of its paths."""
    every = list(model.named_parameters(remove_duplicate=False))
    if isinstance(member, Tensor):
        if any(p is member for _, p in every):
            return [member]
        raise InvalidArgumentError(
            f"groups[{group!r}]: a {type(member).__name__} of shape {tuple(member.shape)} is not a parameter of the "
            "model: pass tensors from model.parameters() (not copies) or module-name prefixes"
        )
    if not isinstance(member, str):
        raise InvalidArgumentError(
            f"groups[{group!r}]: a {type(member).__name__} is neither a parameter of the model nor a name: pass "
            "tensors from model.parameters() or module-name prefixes"
        )
    exact = [p for n, p in every if n == member]
    if exact:
        return exact[:1]
    under = [p for n, p in every if n.startswith(member + ".")]
    if not under:
        raise InvalidArgumentError(
            f"groups[{group!r}]: {member!r} names no parameter or module of the model: pass a module name such as "
            f"{every[0][0].rsplit('.', 1)[0]!r} or a parameter name (model.named_parameters())"
        )
    trainable = [p for p in under if p.requires_grad]
    if not trainable:
        raise InvalidArgumentError(
            f"groups[{group!r}]: every parameter under {member!r} is frozen (requires_grad=False), and a module's "
            "frozen parameters are held fixed: unfreeze them with requires_grad_(True), or name a frozen parameter "
            "in full to take it"
        )
    return trainable


def block_spectra(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Iterable,
    *,
    groups: Mapping[str, Sequence[Tensor | str] | str] | None = None,
    k: int = 1,
    operator: str = "hessian",
    which: str = "LA",
    tol: float = 1e-5,
    value_tol: float | None = None,
    max_iters: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    operator_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> BlockSpectra:
    """The ``k`` extreme eigenvalues of each parameter group's block :math:`H_{gg}` of the curvature matrix
    ``operator`` of the dataset loss, each with verified residuals and error bounds.

    A group smaller than ``k`` gets all its eigenvalues. Each group is one operator built with ``params=`` its
    tensors, ``dtype`` and ``operator_options``, and one :func:`~hessops.eigs` run with ``tol``, ``value_tol``,
    ``max_iters`` and ``seed``: a block's product costs about as much as the full operator's (one pass over
    ``data``), so ``G`` groups cost about ``G`` times one ``eigs`` of the same ``k``.

    Args:
        model: the model (in eval mode).
        loss_fn: the loss, as for the operators.
        data: a re-iterable of ``(inputs, targets)`` batches.
        groups: ``None`` finds the repeated blocks (:func:`find_blocks`: ``blocks.3`` of a timm ViT,
            ``transformer.h.3`` of GPT-2, ``layers.3`` of ``nn.TransformerEncoder``, ``layer2.1`` of a ResNet,
            each other module its own group); or pass ``{name: [parameters or module-name prefixes]}``
            (:func:`resolve_groups`).
        k: how many eigenvalues of each block.
        operator: ``"hessian"``, ``"ggn"``, ``"ef"`` or ``"mcfisher"``.
        which: as in :func:`hessops.eigs`; default the largest.
        tol: as in :func:`hessops.eigs`.
        value_tol: as in :func:`hessops.eigs`.
        max_iters: as in :func:`hessops.eigs`.
        seed: as in :func:`hessops.eigs`.
        dtype: the operators' dtype (default the model's).
        operator_options: the operator's other keyword arguments: ``hvp_mode``, ``micro_batch_size``,
            ``chunk_size``, ``seed`` of ``"mcfisher"``, ... (not ``params`` nor ``dtype``).
        progress: show each group's progress.

    Returns:
        The :class:`BlockSpectra`, one spectrum per group.

    Raises:
        InvalidArgumentError: an argument of the wrong type or out of range, a group that names nothing of the
            model, or ``operator_options`` holding ``params`` or ``dtype``.
        NoParametersError: the model has no trainable parameters."""
    from hessops.operators import OPERATORS

    began = time.perf_counter()
    operator = choice("operator", operator, OPERATOR_NAMES)
    which = choice("which", which, WHICH)
    k = integer("k", k, minimum=1)
    tol = real("tol", tol, positive=True)
    value_tol = None if value_tol is None else real("value_tol", value_tol, positive=True)
    max_iters = None if max_iters is None else integer("max_iters", max_iters, minimum=k)
    seed = integer("seed", seed)
    progress = boolean("progress", progress)
    options = dict(operator_options or {})
    clashing = sorted({"params", "dtype"} & set(options))
    if clashing:
        raise InvalidArgumentError(
            f"operator_options holds {', '.join(clashing)}: block_spectra sets params per group (use groups=) "
            "and takes dtype= itself"
        )
    accepted = set(inspect.signature(OPERATORS[operator]).parameters) - {"self", "model", "loss_fn", "data"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InvalidArgumentError(
            f"operator_options: {OPERATORS[operator].__name__} takes no {', '.join(map(repr, unknown))}: pass some of "
            f"{', '.join(sorted(accepted - {'params', 'dtype'}))}"
        )
    resolved = resolve_groups(model, groups)
    tensors = dict(model.named_parameters())
    spectra, sizes = {}, {}
    for name, members in resolved.items():
        params = [tensors[m] for m in members]
        op = OPERATORS[operator](model, loss_fn, data, params=params, dtype=dtype, **options)
        sizes[name] = op.shape[0]
        spectra[name] = eigs(
            op,
            min(k, sizes[name]),
            which,
            tol=tol,
            value_tol=value_tol,
            max_iters=max_iters,
            seed=seed,
            progress=progress,
        )
    return BlockSpectra(
        spectra=spectra,
        parameters=resolved,
        sizes=sizes,
        operator=operator,
        which=which,
        n_matvecs=sum(s.n_matvecs for s in spectra.values()),
        seconds=time.perf_counter() - began,
    )
