"""The registries of the zoo: each dataset's spec (:data:`DATASET_SPECS`: its split sizes, input shape,
classes, normalization, whether it is downloaded) and each model's (:data:`MODELS`: its builder, input size,
normalization, default data, loss and size). Torch-free at import (each builder imports torch when it runs),
so that ``hessops models`` and the CLI's choices and checks cost nothing; :mod:`hessops.zoo.models` builds,
seeds and loads the models, :mod:`hessops.zoo.data` loads the datasets.

Adding a model is one entry of :data:`MODELS` (docs/extending.md); a dataset, one entry of
:data:`DATASET_SPECS`, its loader in :mod:`hessops.zoo.data` and its name in ``hessops.constants.DATASETS``
(the core's torch-free tuple of names, which may not import the zoo; tests/cli/test_cli_contract.py checks
that the two agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DatasetSpec",
    "DATASET_SPECS",
    "DOWNLOADABLE",
    "ModelSpec",
    "MODELS",
    "TIMM_PREFIX",
    "NORMALIZATION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

TIMM_PREFIX = "timm:"

# Per-channel (mean, std) of each dataset's [0, 1] inputs, which hessops.zoo.data normalizes with and the zoo's
# models are trained on; digits are left in [0, 1].
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset of :func:`hessops.zoo.data.load_dataset` is.

    ``split_sizes`` is the number of examples of its ``(train, test)`` splits (the CLI checks
    ``--num-examples`` against them without loading); ``input_shape`` one example's ``(C, H, W)``; each input
    is ``x = (u / scale - mean) / std`` per channel from the stored integer pixels ``u``; ``downloadable``
    whether ``hessops download`` fetches it (``False``: it ships with a dependency); ``description`` one line.
    """

    name: str
    split_sizes: tuple[int, int]
    input_shape: tuple[int, int, int]
    num_classes: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    downloadable: bool
    description: str


DATASET_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits", (1_437, 360), (1, 8, 8), 10, 16, (0.0,), (1.0,), False, "scikit-learn's bundled 8×8 digits"
        ),
        DatasetSpec("mnist", (60_000, 10_000), (1, 28, 28), 10, 255, MNIST_MEAN, MNIST_STD, True, "MNIST"),
        DatasetSpec("cifar10", (50_000, 10_000), (3, 32, 32), 10, 255, CIFAR10_MEAN, CIFAR10_STD, True, "CIFAR-10"),
        DatasetSpec(
            "cifar2",
            (10_000, 2_000),
            (3, 32, 32),
            2,
            255,
            CIFAR10_MEAN,
            CIFAR10_STD,
            True,
            "CIFAR-10's airplanes and birds, labelled 0 and 1",
        ),
    )
}
# The datasets `hessops download` fetches, and each dataset's (mean, std), read from DATASET_SPECS.
DOWNLOADABLE: tuple[str, ...] = tuple(name for name, spec in DATASET_SPECS.items() if spec.downloadable)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: (spec.mean, spec.std) for name, spec in DATASET_SPECS.items()
}

# The published resnet18_cifar10 weights (the `detectors` package's, trained from timm's resnet18) were
# trained on CIFAR-10 normalized with this std, not the dataset's (0.2471, 0.2435, 0.2616).
RESNET18_CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class ModelSpec:
    """What a zoo model is, takes and is trained with.

    ``build()`` returns a new model with parameters from torch's current RNG (``hessops.zoo.models.build_model``
    seeds it); ``input_shape`` is one example's ``(C, H, W)``; inputs are normalized per channel as
    ``(x - mean) / std`` with ``x`` in [0, 1]; ``default_data`` is a ``hessops.constants.DATASETS`` name, or
    ``"imagenet"``/``None`` when hessops cannot load the model's data; ``loss`` is ``"cross_entropy"`` (the
    model outputs logits) or ``"nll"`` (log-probabilities); ``n_params`` the number of parameters (``None``
    for timm models, which are not built to list them); ``description`` one line for ``hessops models``.
    """

    name: str
    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_data: str | None
    loss: str
    n_params: int | None
    description: str


def _mlp(widths: tuple[int, ...], bias: bool = True) -> torch.nn.Module:
    """Flatten, then Linear layers of the given widths with ReLU between them."""
    from torch import nn

    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(d_in, d_out, bias=bias))
    return nn.Sequential(*layers)


def _mlp_digits() -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _cnn_cifar_5k() -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 5, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 5, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(125, 30),
        nn.ReLU(),
        nn.Linear(30, 10),
    )


def _cnn_mnist_1710() -> torch.nn.Module:
    """Its study's initialization: weights ~ N(0, 0.5²), biases 0."""
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(169, 10), nn.LogSoftmax(dim=1)
    )
    for layer in (model[0], model[4]):
        nn.init.normal_(layer.weight, 0.0, 0.5)
        nn.init.zeros_(layer.bias)
    return model


def _resnet(depth: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(weights=None)

    return build


def _resnet18_cifar10() -> torch.nn.Module:
    """torchvision's ResNet-18 with a 3×3 stride-1 stem and no max-pool, for 32×32 inputs; its state_dict
    has the keys and shapes of ``timm.create_model('resnet18', num_classes=10)`` with the same stem."""
    import torchvision
    from torch import nn

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    model.maxpool = nn.Identity()
    return model


def _timm_vit(**options: int) -> Callable[[], torch.nn.Module]:
    """timm's ``vit_tiny_patch16_224`` architecture rebuilt for CIFAR's 32×32 inputs and 10 classes, with
    ``options`` (patch size, width, depth, heads) passed to ``timm.create_model``."""

    def build() -> torch.nn.Module:
        from hessops.zoo.optional import import_timm

        return import_timm().create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10, **options
        )

    return build


_CE = "cross_entropy"
_CIFAR, _MNIST, _IMAGENET = NORMALIZATION["cifar10"], NORMALIZATION["mnist"], (IMAGENET_MEAN, IMAGENET_STD)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mlp-digits",
            _mlp_digits,
            (1, 8, 8),
            10,
            *NORMALIZATION["digits"],
            "digits",
            _CE,
            2_410,
            "MLP 64-32-10 with tanh, for scikit-learn's 8×8 digits",
        ),
        ModelSpec(
            "cnn-cifar-5k",
            _cnn_cifar_5k,
            (3, 32, 32),
            10,
            *_CIFAR,
            "cifar10",
            _CE,
            5_100,
            "two 5×5 conv layers and an MLP head",
        ),
        ModelSpec(
            "cnn-mnist-1710",
            _cnn_mnist_1710,
            (1, 28, 28),
            10,
            *_MNIST,
            "mnist",
            "nll",
            1_710,
            "one 3×3 conv filter and a linear layer, log-softmax output (basin-volume study)",
        ),
        ModelSpec(
            "mlp-cifar2",
            lambda: _mlp((3072, 512, 128, 32, 2)),
            (3, 32, 32),
            2,
            *NORMALIZATION["cifar2"],
            "cifar2",
            _CE,
            1_643_234,
            "MLP 3072-512-128-32-2 with ReLU, airplane vs bird",
        ),
        ModelSpec(
            "mlp-mnist",
            lambda: _mlp((784, 128, 128, 128, 10), bias=False),
            (1, 28, 28),
            10,
            *_MNIST,
            "mnist",
            _CE,
            134_400,
            "MLP 784-128-128-128-10 with ReLU, no biases",
        ),
        ModelSpec(
            "resnet18",
            _resnet(18),
            (3, 224, 224),
            1000,
            *_IMAGENET,
            "imagenet",
            _CE,
            11_689_512,
            "torchvision's ResNet-18 for ImageNet",
        ),
        ModelSpec(
            "resnet50",
            _resnet(50),
            (3, 224, 224),
            1000,
            *_IMAGENET,
            "imagenet",
            _CE,
            25_557_032,
            "torchvision's ResNet-50 for ImageNet",
        ),
        ModelSpec(
            "resnet18_cifar10",
            _resnet18_cifar10,
            (3, 32, 32),
            10,
            _CIFAR[0],
            RESNET18_CIFAR10_STD,
            "cifar10",
            _CE,
            11_173_962,
            "ResNet-18 with a 3×3 stem for 32×32 inputs (fits the published weights)",
        ),
        ModelSpec(
            "vit-tiny-cifar",
            _timm_vit(patch_size=4),
            (3, 32, 32),
            10,
            *_CIFAR,
            "cifar10",
            _CE,
            5_362_762,
            "timm's ViT-Tiny (12 blocks, width 192, 3 heads) for 32×32 inputs, 4×4 patches (64 tokens); needs timm",
        ),
        ModelSpec(
            "vit-micro-cifar",
            _timm_vit(patch_size=8, embed_dim=32, depth=2, num_heads=2),
            (3, 32, 32),
            10,
            *_CIFAR,
            "cifar10",
            _CE,
            32_554,
            "timm's ViT, 2 blocks of width 32 and 2 heads, for 32×32 inputs, 8×8 patches (16 tokens); needs timm",
        ),
    )
}
