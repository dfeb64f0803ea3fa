"""Named models and datasets: the torch-free registries (:mod:`~hessops.zoo.registry`: every zoo model's
builder, data, loss and size), the builders and checkpoint loading (:mod:`~hessops.zoo.models`), the datasets
(:mod:`~hessops.zoo.data`), language models (:mod:`~hessops.zoo.lm`) and text (:mod:`~hessops.zoo.text`).
``import hessops.zoo`` imports no torch."""

from __future__ import annotations

from hessops.zoo.registry import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    MODELS,
    NORMALIZATION,
    TIMM_PREFIX,
    ModelSpec,
)

__all__ = [
    "ModelSpec",
    "MODELS",
    "TIMM_PREFIX",
    "NORMALIZATION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]
