"""The model zoo: the networks of the curvature studies, built deterministically, and their checkpoints.

``build_model(name, seed=s)`` draws the initial parameters from torch's CPU generator seeded with ``s``
inside ``torch.random.fork_rng``: the same parameters on every run and machine for a given torch (and timm)
version, whatever the caller's RNG state, which is left untouched.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from hessops.errors import CheckpointError, InvalidArgumentError, UnknownModelError
from hessops.zoo import MODELS, TIMM_PREFIX, ModelSpec
from hessops.zoo.optional import import_timm, optional_import

__all__ = ["MODEL_NAMES", "TIMM_OPTIONS", "ModelSpec", "model_spec", "build_model", "make_loss", "load_checkpoint"]

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def _timm_name(name: str) -> tuple[ModuleType, str]:
    """timm and the model name after ``timm:``, checked to be one timm knows."""
    timm = import_timm()
    arch = name[len(TIMM_PREFIX) :]
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UnknownModelError(
            f"timm has no model {arch!r}{hint}: list the names with timm.list_models('*{arch.split('.')[0]}*')"
        )
    return timm, arch


def _unknown(name: str) -> UnknownModelError:
    return UnknownModelError(
        f"unknown model {name!r}: the models are {', '.join(MODEL_NAMES)}, or 'timm:NAME' for a timm model "
        "(e.g. 'timm:resnet18', with pip install 'hessops[zoo]')"
    )


TIMM_OPTIONS = ("img_size", "patch_size", "num_classes")  # the sizes a timm:NAME model may be built with


def model_spec(name: str, *, options: Mapping[str, int] | None = None) -> ModelSpec:
    """The ``ModelSpec`` of zoo model ``name`` (its entry in :data:`hessops.zoo.MODELS`); for ``timm:NAME``,
    input size, mean, std and number of classes come from timm's pretrained config of NAME (without building
    it), ``n_params`` is ``None``. ``options`` (``timm:NAME`` only): sizes among :data:`TIMM_OPTIONS` passed to
    ``timm.create_model``, e.g. ``{"img_size": 32, "patch_size": 4, "num_classes": 10}`` for a ViT on CIFAR."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(TIMM_OPTIONS))
    if unknown:
        raise InvalidArgumentError(f"options {unknown} are not sizes hessops passes to timm: use {TIMM_OPTIONS}")
    bad = {k: v for k, v in options.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise InvalidArgumentError(f"options {bad}: each size must be a positive int")
    if name in MODELS and not options:
        return MODELS[name]
    if not name.startswith(TIMM_PREFIX):
        if name in MODELS:
            raise InvalidArgumentError(
                f"options {options} are for timm:NAME models; {name} is built at its own sizes: leave them out"
            )
        raise _unknown(name)
    timm, arch = _timm_name(name)
    cfg = timm.models.get_pretrained_cfg(arch)
    data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else None)
    input_shape = tuple(data["input_size"])
    if "img_size" in options:
        input_shape = (input_shape[0], options["img_size"], options["img_size"])
    return ModelSpec(
        name=name,
        build=lambda: _create_timm(timm, arch, options),
        input_shape=input_shape,
        num_classes=options.get("num_classes") or (cfg.num_classes if cfg and cfg.num_classes else 1000),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        default_data=None,
        loss="cross_entropy",
        n_params=None,
        description=f"timm's {arch}",
    )


def _create_timm(timm: ModuleType, arch: str, options: dict[str, int]) -> nn.Module:
    """``timm.create_model(arch, **options)`` with random weights; sizes the architecture does not take, or
    cannot be built with, are reported as such."""
    try:
        return timm.create_model(arch, pretrained=False, **options)
    except (TypeError, AssertionError, ValueError, RuntimeError) as error:
        if not options:
            raise
        raise InvalidArgumentError(
            f"timm cannot build {arch} with {options} ({type(error).__name__}: {error}): pass sizes the "
            "architecture takes (a ViT takes img_size, patch_size with img_size divisible by it, num_classes)"
        ) from error


def build_model(name: str, *, seed: int = 0, options: Mapping[str, int] | None = None) -> nn.Module:
    """Zoo model ``name`` (one of ``MODEL_NAMES``, or ``timm:NAME`` with size ``options``, see
    :func:`model_spec`), on the CPU, in eval mode, with parameters initialized from ``seed`` (never
    downloaded: load weights with ``load_checkpoint``)."""
    spec = model_spec(name, options=options)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed)
        model = spec.build()
    return model.eval()


def make_loss(spec: ModelSpec | str) -> nn.Module:
    """The batch-mean training loss of a zoo model: ``nn.NLLLoss()`` for ``loss="nll"``, else
    ``nn.CrossEntropyLoss()``."""
    spec = model_spec(spec) if isinstance(spec, str) else spec
    return nn.NLLLoss() if spec.loss == "nll" else nn.CrossEntropyLoss()


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (strict: every key and shape must match) and return it.

    ``path`` is a ``torch.save`` file, read with ``weights_only=True`` (tensors and plain containers only,
    never arbitrary objects), or a ``.safetensors`` file (needs the ``safetensors`` package). It holds a
    state_dict, or a dict with the state_dict under ``'state_dict'``, ``'model'`` or ``'model_state_dict'``;
    a ``'module.'`` prefix on every key (``nn.DataParallel``) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found (looked at {path.resolve()}): check the path")
    state = _unwrap(_read(path), path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    report = _mismatch_report(model, state)
    if report:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model ({report}): build the architecture the checkpoint was "
            "saved from (e.g. build_model('resnet18_cifar10') for CIFAR-10 ResNet-18 weights)"
        )
    model.load_state_dict(state, strict=True)
    return model


def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        load_file = optional_import(
            "safetensors.torch",
            f"{path} is a safetensors file, which needs the safetensors package: pip install safetensors",
        ).load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not a refused class: the bytes are no pickle at all
            raise CheckpointError(
                f"{path} is not a torch checkpoint that torch.load can read (its pickle is malformed)"
            ) from error
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers (a whole pickled model?), which "
            "hessops does not unpickle (weights_only=True): save the weights with "
            "torch.save(model.state_dict(), path)"
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a torch checkpoint that torch.load can read ({type(error).__name__}: {error})"
        ) from error


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        found = f"a dict with keys {', '.join(map(repr, list(obj)[:8]))}"
    else:
        found = f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{path} holds {found}, not a state_dict (names → tensors) nor a dict with one under "
        f"{', '.join(map(repr, _WRAPPER_KEYS))}: save it with torch.save(model.state_dict(), path)"
    )


def _first(items: list[str], n: int = 3) -> str:
    more = f", … (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _mismatch_report(model: nn.Module, state: dict[str, Tensor]) -> str:
    """How ``state`` differs from ``model.state_dict()`` in keys and shapes; empty when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return ""
    n_params = sum(p.numel() for p in model.parameters())
    parts = [
        f"{type(model).__name__} with {n_params:,} parameters, {len(expected)} state_dict entries; "
        f"the checkpoint has {len(state)}"
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {label}: {_first(items)}")
    return "; ".join(parts)
