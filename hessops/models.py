"""The model zoo: the networks of the curvature studies, built deterministically, and their checkpoints.

``build_model(name, seed=s)`` draws the initial parameters from torch's CPU generator seeded with ``s``
inside ``torch.random.fork_rng``: the same parameters on every run and machine for a given torch (and timm)
version, whatever the caller's RNG state, which is left untouched.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from hessops.data import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION
from hessops.errors import CheckpointError, MissingDependencyError, UnknownModelError

__all__ = ["MODEL_NAMES", "ModelSpec", "model_spec", "build_model", "make_loss", "load_checkpoint"]

TIMM_PREFIX = "timm:"

# The published resnet18_cifar10 weights (the `detectors` package's, trained from timm's resnet18) were
# trained on CIFAR-10 normalized with this std, not the dataset's (0.2471, 0.2435, 0.2616).
_RESNET18_CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class ModelSpec:
    """What a zoo model takes and how it is trained.

    ``input_shape`` is one example's ``(C, H, W)``; inputs are normalized per channel as
    ``(x - mean) / std`` with ``x`` in [0, 1]; ``loss`` is ``"cross_entropy"`` (the model outputs logits) or
    ``"nll"`` (it outputs log-probabilities); ``n_params`` is the number of parameters, ``None`` when not
    known without building the model.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_data: str | None
    loss: str
    n_params: int | None = None


def _mlp(widths: tuple[int, ...], bias: bool = True) -> nn.Sequential:
    """Flatten, then Linear layers of the given widths with ReLU between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(d_in, d_out, bias=bias))
    return nn.Sequential(*layers)


def _mlp_digits() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _cnn_cifar_5k() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 5, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 5, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(125, 30), nn.ReLU(), nn.Linear(30, 10),
    )


def _cnn_mnist_1710() -> nn.Module:
    """Its study's initialization: weights ~ N(0, 0.5²), biases 0."""
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(169, 10), nn.LogSoftmax(dim=1)
    )
    for layer in (model[0], model[4]):
        nn.init.normal_(layer.weight, 0.0, 0.5)
        nn.init.zeros_(layer.bias)
    return model


def _resnet(depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(weights=None)

    return build


def _resnet18_cifar10() -> nn.Module:
    """torchvision's ResNet-18 with a 3×3 stride-1 stem and no max-pool, for 32×32 inputs; its state_dict
    has the keys and shapes of ``timm.create_model('resnet18', num_classes=10)`` with the same stem."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    model.maxpool = nn.Identity()
    return model


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp-digits": _mlp_digits,
    "cnn-cifar-5k": _cnn_cifar_5k,
    "cnn-mnist-1710": _cnn_mnist_1710,
    "mlp-cifar2": lambda: _mlp((3072, 512, 128, 32, 2)),
    "mlp-mnist": lambda: _mlp((784, 128, 128, 128, 10), bias=False),
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
    "resnet18_cifar10": _resnet18_cifar10,
}

_CE = "cross_entropy"
_CIFAR, _MNIST, _IMAGENET = NORMALIZATION["cifar10"], NORMALIZATION["mnist"], (IMAGENET_MEAN, IMAGENET_STD)
_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mlp-digits", (1, 8, 8), 10, *NORMALIZATION["digits"], "digits", _CE, 2_410),
        ModelSpec("cnn-cifar-5k", (3, 32, 32), 10, *_CIFAR, "cifar10", _CE, 5_100),
        ModelSpec("cnn-mnist-1710", (1, 28, 28), 10, *_MNIST, "mnist", "nll", 1_710),
        ModelSpec("mlp-cifar2", (3, 32, 32), 2, *NORMALIZATION["cifar2"], "cifar2", _CE, 1_643_234),
        ModelSpec("mlp-mnist", (1, 28, 28), 10, *_MNIST, "mnist", _CE, 134_400),
        ModelSpec("resnet18", (3, 224, 224), 1000, *_IMAGENET, "imagenet", _CE, 11_689_512),
        ModelSpec("resnet50", (3, 224, 224), 1000, *_IMAGENET, "imagenet", _CE, 25_557_032),
        ModelSpec("resnet18_cifar10", (3, 32, 32), 10, _CIFAR[0], _RESNET18_CIFAR10_STD, "cifar10", _CE, 11_173_962),
    )
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _import_timm() -> ModuleType:
    try:
        return importlib.import_module("timm")
    except ImportError as error:
        raise MissingDependencyError(
            "timm models need the optional package timm, which is not installed: "
            "pip install 'hessops[zoo]' (or pip install timm)"
        ) from error


def _timm_name(name: str) -> tuple[ModuleType, str]:
    """timm and the model name after ``timm:``, checked to be one timm knows."""
    timm = _import_timm()
    arch = name[len(TIMM_PREFIX):]
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


def model_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of zoo model ``name``; for ``timm:NAME``, input size, mean, std and number of
    classes come from timm's pretrained config of NAME (without building it), ``n_params`` is ``None``."""
    if name in _SPECS:
        return _SPECS[name]
    if not name.startswith(TIMM_PREFIX):
        raise _unknown(name)
    timm, arch = _timm_name(name)
    cfg = timm.models.get_pretrained_cfg(arch)
    data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else None)
    return ModelSpec(
        name=name,
        input_shape=tuple(data["input_size"]),
        num_classes=(cfg.num_classes if cfg and cfg.num_classes else 1000),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        default_data=None,
        loss="cross_entropy",
    )


def build_model(name: str, *, seed: int = 0) -> nn.Module:
    """Zoo model ``name`` (one of ``MODEL_NAMES``, or ``timm:NAME``), on the CPU, in eval mode, with
    parameters initialized from ``seed`` (never downloaded: load weights with ``load_checkpoint``)."""
    if name in _BUILDERS:
        builder = _BUILDERS[name]
    elif name.startswith(TIMM_PREFIX):
        timm, arch = _timm_name(name)

        def builder() -> nn.Module:
            return timm.create_model(arch, pretrained=False)
    else:
        raise _unknown(name)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed)
        model = builder()
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
        state = {k[len("module."):]: v for k, v in state.items()}
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
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise MissingDependencyError(
                f"{path} is a safetensors file, which needs the safetensors package: pip install safetensors"
            ) from error
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
