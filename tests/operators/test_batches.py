"""Batches as users have them: input forms, counting examples, loaders without a length, one-shot iterables
and HuggingFace-style dict batches, each against the dense float64 reference on the concatenated data.

Tolerance: relative Frobenius error 1e-10 in float64, as in test_operators.py: operator and reference sum the
same terms in other orders (~1e-15), while a miscounted batch (the bug this file guards against weighed each
batch as one example) is off by 1e-2 or more.
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Mapping
from types import SimpleNamespace

import pytest
import torch
from reference import dense_empirical_fisher, dense_ggn, reference_hessian, relative_error
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import hessops
from hessops.zoo.data import LogitsOf, labels_from

RTOL64 = 1e-10
OPERATORS = {"hessian": hessops.Hessian, "ggn": hessops.GGN, "ef": hessops.EmpiricalFisher}
REFERENCES = {"hessian": reference_hessian, "ggn": dense_ggn, "ef": dense_empirical_fisher}
SIZES = [1, 7, 3]  # uneven batches, one of a single example


class Net(nn.Module):
    """tanh(A x)·scale + B z: a 0-d input beside two batched ones."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, scale, x, z):
        return torch.tanh(self.a(x)) * scale + self.b(z)


class Concat(nn.Module):
    """The reference's view of Net: one tensor [x, z] in, the scale fixed."""

    def __init__(self, net, scale):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, xz):
        return self.net(self.scale, xz[:, :4], xz[:, 4:])


class OneArgument(nn.Module):
    """forward(batch), as curvlinops' and HuggingFace's examples are written."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["scale"], batch["x"], batch["z"])


class ReadOnlyMapping(Mapping):
    def __init__(self, **items):
        self._items = items

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = Net().double()
    scale = torch.tensor(1.5, dtype=torch.float64)
    n = sum(SIZES)
    x, z = torch.randn(n, 4, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    reference_data = [(torch.cat([x, z], 1), y)]
    references = {
        kind: REFERENCES[kind](Concat(net, scale), nn.CrossEntropyLoss(), reference_data) for kind in OPERATORS
    }
    return SimpleNamespace(net=net, scale=scale, x=x, z=z, y=y, references=references)


def batches(s, form):
    """The data in SIZES batches, inputs in the given form; the model and options that take them."""
    out = []
    for x, z, y in zip(s.x.split(SIZES), s.z.split(SIZES), s.y.split(SIZES)):
        items = {"scale": s.scale, "x": x, "z": z}  # the 0-d tensor first: it counts no examples
        inputs = {
            "tensor": torch.cat([x, z], 1),
            "tuple": (s.scale, x, z),
            "dict": items,
            "userdict": UserDict(items),
            "mapping": ReadOnlyMapping(**items),
            "one-argument": items,
        }[form]
        out.append((inputs, y))
    model = {"tensor": Concat(s.net, s.scale), "one-argument": OneArgument(s.net)}.get(form, s.net)
    return model, out, {"unpack_inputs": False} if form == "one-argument" else {}


FORMS = ["tensor", "tuple", "dict", "userdict", "mapping", "one-argument"]


@pytest.mark.parametrize("micro", [None, 2])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", OPERATORS)
def test_every_input_form_gives_the_dense_operator(setup, kind, form, micro):
    model, data, options = batches(setup, form)
    op = OPERATORS[kind](model, nn.CrossEntropyLoss(), data, micro_batch_size=micro, **options)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert relative_error(op @ V, setup.references[kind] @ V) < RTOL64


def test_the_dense_hessian_counts_examples_the_same_way(setup):
    _, data, _ = batches(setup, "dict")
    assert (
        relative_error(hessops.dense_hessian(setup.net, nn.CrossEntropyLoss(), data), setup.references["hessian"])
        < RTOL64
    )


class WithOffset(nn.Module):
    """A per-batch constant of 3 entries beside the examples: leading dimensions disagree."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x, offset):
        return torch.tanh(self.a(x)) + offset


@pytest.mark.parametrize("micro", [None, 2])
def test_leaves_that_disagree_need_batch_size_fn(micro):
    torch.manual_seed(0)
    model, x, y = WithOffset().double(), torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    offset = torch.randn(3, dtype=torch.float64)
    data = [({"x": xb, "offset": offset}, yb) for xb, yb in zip(x.split([1, 7, 2]), y.split([1, 7, 2]))]
    with pytest.raises(hessops.BatchSizeError, match=r"first dimensions differ.*\(1, 4\), \(3,\).*batch_size_fn="):
        hessops.Hessian(model, nn.CrossEntropyLoss(), data)

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x, offset)

    op = hessops.Hessian(
        model, nn.CrossEntropyLoss(), data, batch_size_fn=lambda inputs: inputs["x"].shape[0], micro_batch_size=micro
    )
    assert relative_error(op.to_dense(), reference_hessian(Fixed(), nn.CrossEntropyLoss(), [(x, y)])) < RTOL64


def test_batches_of_constants_only_or_a_bad_batch_size_fn_are_refused(setup):
    data = [((setup.scale, setup.scale, setup.scale), setup.y[:1])]
    with pytest.raises(hessops.BatchSizeError, match=r"only 0-d tensors.*batch_size_fn="):
        hessops.Hessian(setup.net, nn.CrossEntropyLoss(), data)
    _, data, _ = batches(setup, "dict")
    for bad in (lambda inputs: 2.5, lambda inputs: -1, lambda inputs: True):
        with pytest.raises(hessops.BatchSizeError, match="an int >= 0"):
            hessops.Hessian(setup.net, nn.CrossEntropyLoss(), data, batch_size_fn=bad)
    with pytest.raises(TypeError, match="batch_size_fn must be a function"):
        hessops.Hessian(setup.net, nn.CrossEntropyLoss(), data, batch_size_fn=3)


class Stream(IterableDataset):
    """An IterableDataset without __len__ (a DataLoader over it has no len either)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_a_loader_over_an_iterable_dataset_without_len(setup):
    model, _, _ = batches(setup, "tensor")
    loader = DataLoader(Stream(torch.cat([setup.x, setup.z], 1), setup.y), batch_size=4)  # batches of 4, 4, 3
    with pytest.raises(TypeError):
        len(loader)
    op = hessops.GGN(model, nn.CrossEntropyLoss(), loader, progress=True)  # progress: tqdm without a total
    assert relative_error(op.to_dense(), setup.references["ggn"]) < RTOL64


def test_a_loader_with_persistent_workers_is_re_iterable(setup):
    """Such a DataLoader hands out the same (reset) iterator on every iter(): it must not be taken for a
    one-shot iterable."""
    model, _, _ = batches(setup, "tensor")
    dataset = TensorDataset(torch.cat([setup.x, setup.z], 1), setup.y)
    loader = DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), loader)
    assert relative_error(op.to_dense(), setup.references["hessian"]) < RTOL64


class StoredIterator:
    """__iter__ returns one stored iterator: a second pass would start where the first stopped."""

    def __init__(self, batches):
        self.iterator = iter(batches)

    def __iter__(self):
        return self.iterator


def test_one_shot_iterables_are_refused_before_anything_is_consumed(setup):
    model, data, _ = batches(setup, "tensor")
    once = StoredIterator(data)
    with pytest.raises(TypeError, match="one-shot iterator.*__iter__ returns one stored iterator.*re-iterable"):
        hessops.Hessian(model, nn.CrossEntropyLoss(), once)
    assert next(once.iterator)[0] is data[0][0]  # batch 0 is still there
    generator = (batch for batch in data)
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessops.GGN(model, nn.CrossEntropyLoss(), generator)
    assert next(generator)[0] is data[0][0]


def test_a_dict_batch_holding_its_labels_works_directly(setup):
    model, data, _ = batches(setup, "dict")
    hf_style = [{**inputs, "labels": y} for inputs, y in data]
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), hf_style)
    assert relative_error(op.to_dense(), setup.references["hessian"]) < RTOL64
    other_key = [{**inputs, "label": y} for inputs, y in data]
    with pytest.raises(TypeError, match=r"no 'labels'.*labels_from\(loader, key='labels'\)"):
        hessops.Hessian(model, nn.CrossEntropyLoss(), other_key)


# -- HuggingFace-style: one dict holding the labels in, an output object with .logits out -----------------
T, VOCAB = 5, 7


class FakeHFModel(nn.Module):
    """What a HuggingFace sequence classifier looks like from outside: keyword tensors in, a ModelOutput-like
    object out, the loss computed by the model itself only when labels are passed."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 3), nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (torch.tanh(self.embed(input_ids)) * mask).sum(1) / mask.sum(1)
        logits = self.head(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


class Tokens(Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, T), generator=g)
        self.mask = (torch.arange(T) < torch.randint(1, T + 1, (n, 1), generator=g)).long()  # padded sequences
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Packed(nn.Module):
    """The reference's view: [ids, mask] as one long tensor."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, packed):
        return self.hf(input_ids=packed[:, :T], attention_mask=packed[:, T:]).logits


@pytest.mark.parametrize("kind", OPERATORS)
def test_huggingface_style_batches_through_the_adapter(kind):
    torch.manual_seed(0)
    hf = FakeHFModel().double().eval()
    dataset = Tokens(11)
    loader = DataLoader(dataset, batch_size=4)  # dict batches of 4, 4, 3
    data = labels_from(loader)
    assert len(data) == len(loader) == 3
    op = OPERATORS[kind](LogitsOf(hf), nn.CrossEntropyLoss(), data)
    expected = REFERENCES[kind](
        Packed(hf), nn.CrossEntropyLoss(), [(torch.cat([dataset.ids, dataset.mask], 1), dataset.labels)]
    )
    assert relative_error(op.to_dense(), expected) < RTOL64  # to_dense: one pass per column, so re-iterable


def test_the_adapter_names_a_missing_key():
    data = labels_from(DataLoader(Tokens(4), batch_size=2), key="label")
    with pytest.raises(TypeError, match=r"keys \['input_ids', 'attention_mask', 'labels'\].*key='label'"):
        next(iter(data))
