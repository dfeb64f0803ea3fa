"""The datasets of the model zoo, as fixed, normalized, in-memory image datasets (never augmented).

Every item is ``(x, y)``: ``x`` a float32 tensor of shape ``(C, H, W)``, ``x = (u / scale - mean) / std`` per
channel from the stored integer pixels ``u`` (``scale`` 255, or 16 for digits), exactly as torchvision's
``ToTensor()`` followed by ``Normalize(mean, std)``; ``y`` an int64 scalar tensor. Curvature is that of one
fixed function of the data, so no transform is random.

For data of other shapes: ``labels_from`` turns HuggingFace-style batches (one dict holding the labels) into
``(inputs, labels)`` pairs, and ``LogitsOf`` a model that returns an object with ``.logits`` into one that
returns the tensor.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shlex
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from hessops.constants import DATASETS
from hessops.errors import (
    CorruptDatasetError,
    DataFormatError,
    DatasetNotFoundError,
    InvalidArgumentError,
    UnknownDatasetError,
)
from hessops.zoo.optional import optional_import

# Each dataset's facts (split sizes, shape, normalization) are its entry of the zoo's registry; its (mean, std)
# per channel importable from here too
from hessops.zoo.registry import (  # noqa: F401
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASET_SPECS,
    MNIST_MEAN,
    MNIST_STD,
    NORMALIZATION,
)

__all__ = [
    "DATA_NAMES",
    "NORMALIZATION",
    "ImageDataset",
    "load_dataset",
    "download_dataset",
    "draw_subset",
    "make_loader",
    "on_device",
    "DeviceLoader",
    "labels_from",
    "LabelsFrom",
    "LogitsOf",
]

DATA_NAMES: tuple[str, ...] = DATASETS  # the names load_dataset knows (hessops.constants)

CIFAR2_CLASSES = (0, 2)  # CIFAR-10's airplane and bird, relabelled 0 and 1
_DIGITS_TRAIN_FRACTION = (4, 5)  # train = floor(4n/5) = 1,437 of the 1,797 digits, test = 360 (DATASET_SPECS)


class ImageDataset(Dataset):
    """Integer images held in memory, normalized per item.

    ``images``: ``(N, C, H, W)`` uint8; ``labels``: ``(N,)`` int64. Item ``i`` is
    ``((images[i] / scale - mean) / std, labels[i])`` as float32, the mean and std taken per channel.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str],
    ) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0] or not len(mean) == len(std) == images.shape[1]:
            raise InvalidArgumentError(
                f"images {tuple(images.shape)} must be (N, C, H, W) with N = {labels.shape[0]} labels and "
                f"C = {len(mean)} channels of mean and std"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.scale = float(scale)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.classes = tuple(classes)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index].to(torch.float32).div(self.scale)
        return x.sub_(self._mean).div_(self._std), self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """The items at ``indices``, normalized in one operation (what a ``DataLoader`` asks for a batch):
        the same numbers as ``__getitem__``, bit for bit, at a fifth of the cost per pass."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[index].to(torch.float32).div(self.scale).sub_(self._mean).div_(self._std)
        return list(zip(x.unbind(0), self.labels[index].unbind(0)))


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike = "data",
    train: bool = True,
    num_examples: int | None = None,
    seed: int = 0,
    download: bool = False,
    verify: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Dataset:
    """The train (or test) split of dataset ``name`` (one of ``DATA_NAMES``), normalized, never augmented.

    - ``digits``: scikit-learn's 1,797 bundled 8×8 digits (no files, no network), pixels /16 in [0, 1],
      shape ``(1, 8, 8)``. The split is fixed, whatever ``seed``: a permutation drawn from
      ``torch.Generator().manual_seed(0)``, its first floor(0.8·1797) = 1,437 indices (sorted) the train
      split and the other 360 the test split.
    - ``mnist``: 60,000 / 10,000 images ``(1, 28, 28)``, read by ``torchvision.datasets.MNIST`` from
      ``data_dir/MNIST/raw``.
    - ``cifar10``: 50,000 / 10,000 images ``(3, 32, 32)`` from the python batches in
      ``data_dir/cifar-10-batches-py``.
    - ``cifar2``: the airplane (label 0) and bird (label 2) images of ``cifar10``, relabelled 0 and 1.

    Inputs are normalized with ``DATASET_SPECS[name]``'s ``mean`` and ``std`` (``NORMALIZATION[name]``), or
    with ``mean`` and ``std`` when both are given (e.g. a checkpoint's own, ``model_spec(...).mean``).
    ``num_examples=k`` keeps the first ``k`` indices of ``torch.randperm(n,
    generator=torch.Generator().manual_seed(seed))`` (a ``Subset``, the same on every machine for a given
    torch version). ``download=True`` fetches missing files first (``download_dataset``).

    CIFAR-10 is read here, not by ``torchvision.datasets.CIFAR10``, whose loader refuses any file but the
    published ones. With ``verify=True`` (the default) each file is first compared with the published MD5
    sum that torchvision lists (torchvision's own check), and only then unpickled; ``verify=False``
    reads files that are in CIFAR-10's documented format (https://www.cs.toronto.edu/~kriz/cifar.html) but
    are not the published ones (a subset, a file you wrote), which is safe only for files you trust, since
    unpickling runs code. MNIST has no such option: torchvision reads its raw files without checksums.
    """
    _check_name(name)
    if (mean is None) != (std is None):
        raise InvalidArgumentError("pass both mean and std to override the normalization, or neither")
    if download:
        download_dataset(name, data_dir)
    if name == "digits":
        dataset = _digits(train)
    elif name == "mnist":
        dataset = _mnist(Path(data_dir), train)
    else:
        dataset = _cifar10(Path(data_dir), train, verify, name)
        if name == "cifar2":
            dataset = _cifar2(dataset)
    if mean is not None:
        dataset = ImageDataset(
            dataset.images, dataset.labels, scale=dataset.scale, mean=mean, std=std, classes=dataset.classes
        )
    return dataset if num_examples is None else draw_subset(dataset, num_examples, seed, name, train)


def download_dataset(name: str, data_dir: str | os.PathLike = "data") -> Path:
    """Fetch dataset ``name`` into ``data_dir`` with torchvision (which checks the MD5 sums) and return the
    folder its files are in. Already present files are not fetched again. ``digits`` ships inside
    scikit-learn: nothing is fetched and ``Path(data_dir)`` is returned.

    When the download fails (no network, a proxy's page instead of the file), what this call created is
    removed and a ``DatasetNotFoundError`` says which files to fetch elsewhere and the folder to put them in."""
    _check_name(name)
    root = Path(data_dir)
    if not DATASET_SPECS[name].downloadable:
        return root
    import torchvision

    if name == "mnist":
        dataset, folder = torchvision.datasets.MNIST, root / "MNIST" / "raw"
        archives = [folder / filename for filename, _ in dataset.resources]
    else:
        dataset = torchvision.datasets.CIFAR10
        folder, archives = root / dataset.base_folder, [root / dataset.filename]
    new = [path for path in (*reversed((folder, *folder.parents)), *archives) if not path.exists()]
    try:
        dataset(root, train=True, download=True)  # fetches (and unpacks) both splits
    except BaseException as error:
        for path in new:  # the outermost new folder first: with it go the folders and files inside it
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):  # urllib's URLError is an OSError
            raise DatasetNotFoundError(_download_failed(name, root, dataset, archives, error)) from error
        raise
    return folder


def _download_failed(name: str, root: Path, dataset: type, archives: list[Path], error: BaseException) -> str:
    """What went wrong, and how to put the files in place by hand: the exact names torchvision checks."""
    reason = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    urls = [dataset.mirrors[0] + archive.name for archive in archives] if name == "mnist" else [dataset.url]
    return (
        f"could not download {name} ({reason[-1]}). Without the network here: fetch {', '.join(urls)} elsewhere, "
        f"put {'them' if len(urls) > 1 else 'it'} in {archives[0].parent.resolve()}{os.sep}, then run "
        f"`hessops download {name} --data-dir {shlex.quote(str(root))}` again: it checks the MD5 sums and "
        "unpacks, without the network"
    )


def make_loader(dataset: Dataset, batch_size: int = 128) -> DataLoader:
    """A ``DataLoader`` in the dataset's order (``shuffle=False``), keeping the last partial batch."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, pin_memory=torch.cuda.is_available()
    )


class DeviceLoader:
    """Re-iterable view of ``loader`` whose batches have every tensor moved to ``device`` (asynchronously
    from pinned memory); ``len`` is the loader's."""

    def __init__(self, loader: Iterable, device: torch.device | str) -> None:
        self.loader = loader
        self.device = torch.device(device)

    def _move(self, obj: Any) -> Any:
        return obj.to(self.device, non_blocking=True) if isinstance(obj, Tensor) else obj

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield torch.utils._pytree.tree_map(self._move, batch)

    def __len__(self) -> int:
        return len(self.loader)


def on_device(loader: Iterable, device: torch.device | str) -> DeviceLoader:
    """``loader``'s batches, re-iterably, with their tensors on ``device``.

    Args:
        loader: a re-iterable of batches (e.g. ``make_loader(ds)``).
        device: where the batches' tensors go (e.g. ``"cuda"``).

    Returns:
        A re-iterable of the moved batches."""
    return DeviceLoader(loader, device)


class LabelsFrom:
    """Re-iterable view of ``loader`` whose batches are single mappings holding the labels under ``key``
    (HuggingFace style): each is yielded as ``(inputs, labels)``, ``inputs`` the other entries as a ``dict``
    (in their order) and ``labels = batch[key]``. ``len`` is the loader's (where it has one)."""

    def __init__(self, loader: Iterable, key: str = "labels") -> None:
        self.loader = loader
        self.key = key

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Any]]:
        for index, batch in enumerate(self.loader):
            if not isinstance(batch, Mapping) or self.key not in batch:
                what = (
                    f"a mapping with keys {list(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
                )
                raise DataFormatError(
                    f"labels_from(..., key={self.key!r}): batch {index} is {what}, not a mapping holding the labels "
                    f"under {self.key!r}: pass the key the labels are under (key='label'?), or, for (inputs, targets) "
                    "pairs, the loader itself"
                )
            yield {k: v for k, v in batch.items() if k != self.key}, batch[self.key]

    def __len__(self) -> int:
        return len(self.loader)


def labels_from(loader: Iterable, key: str = "labels") -> LabelsFrom:
    """``loader``'s batches ``{..., key: labels}`` as ``(inputs, labels)`` pairs, re-iterably, for the
    operators: ``Hessian(LogitsOf(model), nn.CrossEntropyLoss(), labels_from(loader))``. The labels are left
    out of the inputs, so a HuggingFace model returns logits instead of computing its own loss."""
    return LabelsFrom(loader, key)


class LogitsOf(nn.Module):
    """``model(*args, **kwargs).logits``: a model that returns an output object (HuggingFace's
    ``ModelOutput``) as one that returns the logits tensor, which the losses and the GGN need. Its parameters
    are ``model``'s (named ``model.<name>``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The wrapped model's ``.logits`` for the same arguments."""
        return self.model(*args, **kwargs).logits


def _check_name(name: str) -> None:
    if name not in DATA_NAMES:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}: the datasets are {', '.join(DATA_NAMES)}; for other data, pass your own "
            "DataLoader of (inputs, targets) batches to the operators"
        )


def draw_subset(dataset: Dataset, num_examples: int, seed: int, name: str, train: bool) -> Subset:
    """The examples at the first ``num_examples`` indices of ``torch.randperm(len(dataset))`` drawn from
    ``torch.Generator().manual_seed(seed)``; ``name`` and ``train`` name the split in the error.

    Raises:
        InvalidArgumentError: ``num_examples`` is not from 1 to ``len(dataset)``."""
    n = len(dataset)
    if not 0 < num_examples <= n:
        raise InvalidArgumentError(
            f"num_examples={num_examples}, but the {name} {'train' if train else 'test'} split has {n:,} "
            f"examples: pass a number from 1 to {n}, or num_examples=None for all"
        )
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, permutation[:num_examples].tolist())


def _not_found(name: str, folder: Path, missing: list[str], data_dir: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: looked in {folder.resolve()} for {', '.join(missing)}. Fetch it with "
        f"`hessops download {name} --data-dir {shlex.quote(str(data_dir))}`, or pass download=True"
    )


def _digits(train: bool) -> ImageDataset:
    datasets = optional_import(
        "sklearn.datasets", "the digits dataset ships with scikit-learn: pip install scikit-learn"
    )
    digits = datasets.load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    n = labels.shape[0]
    n_train = n * _DIGITS_TRAIN_FRACTION[0] // _DIGITS_TRAIN_FRACTION[1]
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    index = (permutation[:n_train] if train else permutation[n_train:]).sort().values
    spec = DATASET_SPECS["digits"]
    return ImageDataset(
        images[index],
        labels[index],
        scale=spec.scale,
        mean=spec.mean,
        std=spec.std,
        classes=[str(d) for d in range(spec.num_classes)],
    )


def _mnist(data_dir: Path, train: bool) -> ImageDataset:
    import torchvision

    MNIST = torchvision.datasets.MNIST
    raw = data_dir / "MNIST" / "raw"
    files = [os.path.splitext(os.path.basename(resource[0]))[0] for resource in MNIST.resources]
    missing = [f for f in files if not (raw / f).is_file()]
    if missing:
        raise _not_found("mnist", raw, missing, data_dir)
    try:
        mnist = MNIST(data_dir, train=train, download=False)
    except (AssertionError, RuntimeError, ValueError) as error:
        raise CorruptDatasetError(
            f"the MNIST files in {raw.resolve()} are not valid idx files ({error!r}): delete them and run "
            f"`hessops download mnist --data-dir {shlex.quote(str(data_dir))}`"
        ) from error
    images, labels, spec = mnist.data.unsqueeze(1), mnist.targets, DATASET_SPECS["mnist"]
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != spec.input_shape:
        raise CorruptDatasetError(
            f"the MNIST files in {raw.resolve()} hold images {tuple(images.shape)} and {labels.shape[0]} labels, "
            "not N×28×28 images with N labels: delete them and download again"
        )
    return ImageDataset(images, labels, scale=spec.scale, mean=spec.mean, std=spec.std, classes=mnist.classes)


def _cifar10(data_dir: Path, train: bool, verify: bool, name: str) -> ImageDataset:
    """CIFAR-10's python batches; ``name`` (cifar10 or cifar2) is the one the messages tell to download."""
    import torchvision

    CIFAR10 = torchvision.datasets.CIFAR10
    folder = data_dir / CIFAR10.base_folder
    batches = CIFAR10.train_list if train else CIFAR10.test_list
    files = [*batches, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    missing = [f for f, _ in files if not (folder / f).is_file()]
    if missing:
        raise _not_found(name, folder, missing, data_dir)
    if verify:
        for filename, md5 in files:
            actual = hashlib.md5((folder / filename).read_bytes(), usedforsecurity=False).hexdigest()
            if actual != md5:
                raise CorruptDatasetError(
                    f"{folder.resolve() / filename} has MD5 {actual}, not the published CIFAR-10 file's {md5}: "
                    f"it is damaged or not the original. Delete {folder.resolve()} and run `hessops download "
                    f"{name} --data-dir {shlex.quote(str(data_dir))}`; pass verify=False only to read files you "
                    "made yourself in CIFAR-10's format"
                )
    data, labels = zip(*(_read_cifar_batch(folder / f) for f, _ in batches))
    meta = _unpickle(folder / CIFAR10.meta["filename"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", range(10))]
    spec = DATASET_SPECS["cifar10"]
    images = torch.from_numpy(np.concatenate(data)).reshape(-1, *spec.input_shape)  # rows: R, G, B planes, row-major
    labels = torch.from_numpy(np.concatenate(labels))
    return ImageDataset(images, labels, scale=spec.scale, mean=spec.mean, std=spec.std, classes=classes)


def _cifar2(cifar10: ImageDataset) -> ImageDataset:
    keep = torch.isin(cifar10.labels, torch.tensor(CIFAR2_CLASSES))
    labels = (cifar10.labels[keep] == CIFAR2_CLASSES[1]).to(torch.int64)
    spec = DATASET_SPECS["cifar2"]
    classes = [cifar10.classes[c] for c in CIFAR2_CLASSES]
    return ImageDataset(cifar10.images[keep], labels, scale=spec.scale, mean=spec.mean, std=spec.std, classes=classes)


def _unpickle(path: Path) -> dict:
    """A CIFAR python file: a pickled dict, its keys made ``str`` (Python 2 and 3 pickles alike)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    except Exception as error:
        raise CorruptDatasetError(
            f"{path.resolve()} is not a pickled dict ({error!r}): delete {path.parent.resolve()} and download again"
        ) from error


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``data``: uint8 ``(n, 3072)``, ``labels``: ``n`` ints in 0..9, as the CIFAR-10 page documents."""
    entry = _unpickle(path)
    data = np.asarray(entry.get("data"))
    labels = np.asarray(entry.get("labels", []), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise CorruptDatasetError(
            f"{path.resolve()} is not a CIFAR-10 batch: it must hold 'data', uint8 of shape (n, 3072), and n "
            f"'labels'; it holds data {data.dtype} {data.shape} and {labels.size} labels"
        )
    if labels.size and not (0 <= labels.min() and labels.max() <= 9):
        raise CorruptDatasetError(f"{path.resolve()} has labels outside 0..9 ({labels.min()}..{labels.max()})")
    return data, labels
