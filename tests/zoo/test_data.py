"""The datasets, read from small files the tests write in MNIST's idx and CIFAR-10's python-batch formats.

Exact comparisons (``torch.equal``) are used where hessops and torchvision compute the same float32 ops.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from dataset_files import N_CIFAR_BATCH, N_MNIST, write_cifar, write_mnist
from torch.utils.data import Subset
from torchvision.transforms import functional as TF

from hessops.errors import CorruptDatasetError, DatasetNotFoundError, UnknownDatasetError
from hessops.zoo.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATA_NAMES,
    MNIST_MEAN,
    MNIST_STD,
    ImageDataset,
    download_dataset,
    load_dataset,
    make_loader,
    on_device,
)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    return write_mnist(tmp_path)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    write_cifar(tmp_path)
    return tmp_path


def test_mnist_shapes_labels_and_normalization(mnist_dir):
    for train in (True, False):
        ds = load_dataset("mnist", data_dir=mnist_dir, train=train)
        assert len(ds) == N_MNIST[train]
        x, y = ds[3]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.item() == 3
        assert ds[0][0][0, 0, 0].item() == pytest.approx(-MNIST_MEAN[0] / MNIST_STD[0], rel=1e-6)


def test_mnist_items_equal_torchvision_totensor_normalize(mnist_dir):
    reference = torchvision.datasets.MNIST(mnist_dir, train=True)
    ds = load_dataset("mnist", data_dir=mnist_dir)
    for i in (0, 7, 19):
        image, label = reference[i]
        expected = TF.normalize(TF.to_tensor(image), MNIST_MEAN, MNIST_STD)
        assert torch.equal(ds[i][0], expected) and ds[i][1].item() == label


def test_cifar10_reads_batches_in_documented_layout(cifar_dir):
    ds = load_dataset("cifar10", data_dir=cifar_dir, verify=False)
    assert len(ds) == 5 * N_CIFAR_BATCH
    assert ds.classes[:3] == ("airplane", "automobile", "bird")
    x, y = ds[N_CIFAR_BATCH + 1]  # second batch, second image
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.item() == 2
    x0 = ds[0][0][:, 0, 0]  # R = 255, G = 0, B = 51 = 0.2 · 255
    expected = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.2), CIFAR10_MEAN, CIFAR10_STD)]
    assert x0.tolist() == pytest.approx(expected, rel=1e-6)
    test = load_dataset("cifar10", data_dir=cifar_dir, train=False, verify=False)
    assert len(test) == N_CIFAR_BATCH and test[0][1].item() == 5


def test_cifar10_items_equal_torchvision(tmp_path, monkeypatch):
    # torchvision's reader refuses files without the published MD5 sums; skip that check to compare readers.
    # It indexes the dicts by str keys, as the published (Python 2) pickles give under encoding="latin1".
    cifar_dir = tmp_path
    write_cifar(cifar_dir, str_keys=True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    for train in (True, False):
        reference = torchvision.datasets.CIFAR10(cifar_dir, train=train)
        ds = load_dataset("cifar10", data_dir=cifar_dir, train=train, verify=False)
        assert len(ds) == len(reference)
        for i in (0, 13, len(ds) - 1):
            image, label = reference[i]
            assert torch.equal(ds[i][0], TF.normalize(TF.to_tensor(image), CIFAR10_MEAN, CIFAR10_STD))
            assert ds[i][1].item() == label


def test_cifar_python2_style_str_keys_are_read(tmp_path):
    write_cifar(tmp_path, str_keys=True)
    ds = load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert len(ds) == 5 * N_CIFAR_BATCH and ds.classes[2] == "bird"


def test_cifar_verify_rejects_files_that_are_not_the_published_ones(cifar_dir):
    with pytest.raises(CorruptDatasetError, match=r"MD5 .* verify=False") as info:
        load_dataset("cifar10", data_dir=cifar_dir)
    assert "hessops download cifar10 --data-dir" in str(info.value)


def test_cifar_malformed_batch_is_reported(cifar_dir):
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(CorruptDatasetError, match=r"data_batch_3 is not a CIFAR-10 batch.*\(4, 100\)"):
        load_dataset("cifar10", data_dir=cifar_dir, verify=False)


def test_cifar2_keeps_airplanes_and_birds_relabelled(cifar_dir):
    cifar10 = load_dataset("cifar10", data_dir=cifar_dir, verify=False)
    cifar2 = load_dataset("cifar2", data_dir=cifar_dir, verify=False)
    keep = [i for i in range(len(cifar10)) if cifar10[i][1].item() in (0, 2)]
    assert len(cifar2) == len(keep) > 0 and cifar2.classes == ("airplane", "bird")
    for j, i in enumerate(keep):
        assert torch.equal(cifar2[j][0], cifar10[i][0])
        assert cifar2[j][1].item() == {0: 0, 2: 1}[cifar10[i][1].item()]


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar2"])
def test_missing_files_name_the_folder_and_the_download_command(name, tmp_path):
    data_dir = tmp_path / "my data"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=data_dir)
    message = str(info.value)
    assert f"hessops download {name} --data-dir '{data_dir}'" in message
    assert str(data_dir.resolve()) in message


def test_subsets_are_deterministic_in_the_seed(mnist_dir):
    a = load_dataset("mnist", data_dir=mnist_dir, num_examples=5, seed=3)
    b = load_dataset("mnist", data_dir=mnist_dir, num_examples=5, seed=3)
    c = load_dataset("mnist", data_dir=mnist_dir, num_examples=5, seed=4)
    assert isinstance(a, Subset) and len(a) == 5
    assert a.indices == b.indices != c.indices
    assert a.indices == torch.randperm(N_MNIST[True], generator=torch.Generator().manual_seed(3))[:5].tolist()
    assert torch.equal(a[0][0], a.dataset[a.indices[0]][0])


@pytest.mark.parametrize("k", [0, N_MNIST[True] + 1])
def test_num_examples_out_of_range(mnist_dir, k):
    with pytest.raises(ValueError, match=rf"num_examples={k}, but the mnist train split has {N_MNIST[True]} examples"):
        load_dataset("mnist", data_dir=mnist_dir, num_examples=k)


def test_digits_split_is_fixed_80_20():
    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    assert (len(train), len(test)) == (1437, 360)  # floor(0.8 · 1797) = 1437
    assert torch.equal(load_dataset("digits", seed=5).images, train.images)  # seed does not move the split
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= train.images.min() and (train.images.max() / 16) <= 1.0
    from sklearn.datasets import load_digits

    digits = load_digits()
    all_images = torch.cat([train.images, test.images]).reshape(1797, 64).to(torch.float64)
    pairs = sorted(map(tuple, torch.cat([all_images, torch.cat([train.labels, test.labels])[:, None]], 1).tolist()))
    reference = np.concatenate([digits.data, digits.target[:, None]], 1)
    assert pairs == sorted(map(tuple, reference.tolist()))  # a partition of the 1,797 digits


def test_digits_items_are_pixels_over_16():
    from sklearn.datasets import load_digits

    digits = load_digits()
    test = load_dataset("digits", train=False)
    index = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[1437:].sort().values
    for j in (0, 100, 359):
        expected = torch.from_numpy(digits.images[index[j]]).to(torch.float32)[None] / 16
        assert torch.equal(test[j][0], expected) and test[j][1].item() == digits.target[index[j]]


def test_normalization_can_be_overridden(cifar_dir):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = load_dataset("cifar10", data_dir=cifar_dir, verify=False, mean=mean, std=std)
    assert ds[0][0][:, 0, 0].tolist() == pytest.approx([(1.0 - 0.5) / 0.2, -0.4 / 0.25, (0.2 - 0.3) / 0.3], rel=1e-6)
    with pytest.raises(ValueError, match="both mean and std"):
        load_dataset("digits", mean=mean)


def test_unknown_dataset():
    with pytest.raises(UnknownDatasetError, match="digits, mnist, cifar10, cifar2"):
        load_dataset("imagenet")
    assert DATA_NAMES == ("digits", "mnist", "cifar10", "cifar2")


def test_make_loader_keeps_order_and_last_batch():
    ds = load_dataset("digits", train=False)
    batches = list(make_loader(ds, batch_size=128))
    assert [len(y) for _, y in batches] == [128, 128, 104]
    assert torch.equal(batches[1][0][0], ds[128][0]) and batches[0][1].dtype == torch.int64


def test_download_calls_torchvision_with_download_true(tmp_path, monkeypatch):
    calls = []

    class Recorder:
        base_folder, filename, resources = "cifar-10-batches-py", "cifar-10-python.tar.gz", [("a.gz", "md5")]

        def __init__(self, root, train, download):
            calls.append((type(self).__name__, Path(root), train, download))

    monkeypatch.setattr(torchvision.datasets, "MNIST", type("MNIST", (Recorder,), {}))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", type("CIFAR10", (Recorder,), {}))
    assert download_dataset("mnist", tmp_path) == tmp_path / "MNIST" / "raw"
    assert download_dataset("cifar2", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert download_dataset("digits", tmp_path) == tmp_path
    assert calls == [("MNIST", tmp_path, True, True), ("CIFAR10", tmp_path, True, True)]


def test_image_dataset_checks_shapes():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(
            torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2), scale=16, mean=(0.0,), std=(1.0,), classes=[]
        )


@pytest.mark.parametrize("name", ["digits", "cifar2"])
def test_batched_fetch_is_the_per_item_path_bit_for_bit(name, cifar_dir):
    """A DataLoader fetches a batch through ``__getitems__`` (through ``Subset`` too): the same float32 numbers
    as ``__getitem__`` item by item, in the same order."""
    ds = load_dataset(name, data_dir=cifar_dir, num_examples=13, verify=False)
    assert isinstance(ds, Subset) and callable(ds.dataset.__getitems__)
    for (x, y), start in zip(make_loader(ds, batch_size=5), range(0, 13, 5)):
        items = [ds[i] for i in range(start, min(start + 5, 13))]
        assert torch.equal(x, torch.stack([item[0] for item in items]))
        assert torch.equal(y, torch.stack([item[1] for item in items]))


def test_on_device_moves_batches_and_is_reiterable():
    ds = load_dataset("digits", train=False, num_examples=10)
    moved = on_device(make_loader(ds, batch_size=4), "cpu")
    assert len(moved) == 3
    for _ in range(2):  # operators iterate the data once per product
        batches = list(moved)
        assert [len(y) for _, y in batches] == [4, 4, 2]
        assert all(x.device.type == "cpu" and y.dtype == torch.int64 for x, y in batches)
    assert torch.equal(batches[0][0][1], ds[1][0])
