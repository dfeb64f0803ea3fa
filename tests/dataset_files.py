"""Small dataset files in MNIST's idx and CIFAR-10's python-batch formats, written where a test asks:
tests/zoo/test_data.py reads them through hessops.zoo.data, and the examples' tests run their full-mode data paths
on them."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

N_MNIST = {True: 20, False: 10}
N_CIFAR_BATCH = 20
CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file: magic (0, 0, 0x08 = uint8, ndim), each dimension as a big-endian int32, then the bytes."""
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4")
    path.write_bytes(header.tobytes() + array.astype(np.uint8).tobytes())


def write_mnist(root: Path) -> Path:
    """MNIST/raw/ under ``root`` with 20 training and 10 test images (label of image j: j mod 10); returns ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, train in (("train", True), ("t10k", False)):
        images = rng.integers(0, 256, size=(N_MNIST[train], 28, 28), dtype=np.uint8)
        images[0, 0, 0] = 0
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(N_MNIST[train]) % 10)
    return root


def write_cifar(root: Path, str_keys: bool = False) -> None:
    """Five train batches and a test batch of 20 images each (label of image j in file i: (i + j) mod 10),
    and batches.meta; keys are bytes as Python 3 pickles them, or str as the published files load."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    key = (lambda k: k.decode()) if str_keys else (lambda k: k)
    for i, name in enumerate([*(f"data_batch_{b}" for b in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, size=(N_CIFAR_BATCH, 3072), dtype=np.uint8)
        data[0, 0], data[0, 1024], data[0, 2048] = 255, 0, 51  # pixel (0, 0) of image 0: R, G, B
        labels = [(i + j) % 10 for j in range(N_CIFAR_BATCH)]
        with open(folder / name, "wb") as f:
            pickle.dump({key(b"batch_label"): b"fake", key(b"data"): data, key(b"labels"): labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({key(b"label_names"): CIFAR_NAMES, key(b"num_vis"): 3072}, f)
