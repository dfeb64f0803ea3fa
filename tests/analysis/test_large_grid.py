"""The large-run features on transformers: where the Lanczos basis lives, checkpoint/resume, eigenvectors on disk,
loss-landscape slices and the deflated log-determinant, on two models with LayerNorm and attention, each in float32
and float64, with uneven batches (the last one smaller):

- ``gpt``: hessops' tiny GPT (1 block, width 4, 308 parameters, tied output layer) under the next-token loss on
  right-padded sequences (labels -100 at padding: 20 counted targets of 30), dict batches of 4 and 2 sequences;
- ``encoder``: a classifier around ``nn.TransformerEncoderLayer`` (eval mode, no dropout; 399 parameters) under
  cross-entropy, tuple batches of 5, 5 and 3.

References are float64: the dense Hessian by double backward on the whole dataset (tests/reference.py, no hessops
code) of a float64 copy of the model, and its eigenvalues. The other checks compare the features with each other
(bit for bit where the arithmetic is the same) and with the plain loss of the whole dataset at once."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from reference import next_token_loss, reference_hessian
from torch import Tensor, nn
from toy_networks import interrupted_at

import hessops
from hessops.operators.losses import next_token_cross_entropy
from hessops.zoo.lm import GPT, GPTConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}
VOCAB, SEQ = 8, 6
LENGTHS = [6, 3, 5, 2, 6, 4]  # right-padded to SEQ


class Encoder(nn.Module):
    """A sequence classifier: a linear embedding, one ``nn.TransformerEncoderLayer`` (attention, LayerNorm), mean
    pooling over positions, a linear head."""

    def __init__(self, d_in: int = 3, width: int = 6, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


@dataclass
class Case:
    """A model, its loss and data in one dtype, its Hessian operator (double backward: the same arithmetic in
    every run, so that bit-for-bit comparisons test the runs, not the formulation tuner), and the float64
    references."""

    name: str
    model: nn.Module
    loss_fn: Any
    data: list
    whole: Any  # the dataset as one batch
    H: hessops.Hessian
    reference: nn.Module  # a float64 copy of the model
    exact: Tensor  # the float64 dense Hessian's eigenvalues, ascending
    exact_loss: float  # the float64 dataset loss

    @property
    def float64(self) -> bool:
        return self.H.dtype == torch.float64

    @property
    def scale(self) -> float:
        return float(self.exact.abs().max())

    def eigs_settings(self) -> dict[str, Any]:
        """Eigenvalues to 1e-7 of the largest in float64, 1e-4 in float32 (what its products reach)."""
        return {"value_tol": 1e-7 if self.float64 else 1e-4}


def gpt_case(dtype: torch.dtype) -> tuple[nn.Module, Any, list, Any]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=1, n_head=2, n_embd=4)).to(dtype).eval()
    ids = torch.randint(0, VOCAB, (len(LENGTHS), SEQ), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(SEQ) < torch.tensor(LENGTHS)[:, None]).long()
    labels = torch.where(mask.bool(), ids, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    data = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    return model, next_token_cross_entropy, data, batch


def encoder_case(dtype: torch.dtype) -> tuple[nn.Module, Any, list, Any]:
    torch.manual_seed(0)
    model = Encoder().to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(13, 4, 3, generator=generator).to(dtype)
    y = torch.randint(0, 3, (13,), generator=generator)
    data = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    return model, nn.CrossEntropyLoss(), data, (x, y)


def as_float64(batch: Any) -> Any:
    if isinstance(batch, dict):
        return batch
    x, y = batch
    return x.double(), y


def whole_loss(model: nn.Module, loss_fn: Any, whole: Any) -> Tensor:
    with torch.no_grad():
        if isinstance(whole, dict):
            inputs = {k: v for k, v in whole.items() if k != "labels"}
            return loss_fn(model(**inputs), whole["labels"])
        return loss_fn(model(whole[0]), whole[1])


@pytest.fixture(scope="module", params=[(m, d) for m in ("gpt", "encoder") for d in DTYPES], ids=lambda p: "-".join(p))
def case(request) -> Case:
    name, dtype_name = request.param
    model, loss_fn, data, whole = (gpt_case if name == "gpt" else encoder_case)(DTYPES[dtype_name])
    reference = copy.deepcopy(model).double()
    reference_loss = next_token_loss if name == "gpt" else loss_fn  # the reference's own next-token loss
    dense = reference_hessian(reference, reference_loss, [as_float64(b) for b in data])
    exact_loss = float(whole_loss(reference, loss_fn, as_float64(whole)))
    H = hessops.Hessian(model, loss_fn, data, hvp_mode="autograd")
    return Case(name, model, loss_fn, data, whole, H, reference, torch.linalg.eigvalsh(dense), exact_loss)


@pytest.fixture(scope="module")
def top(case) -> hessops.Spectrum:
    """The 3 eigenvalues of largest magnitude with the basis on the device (here: the CPU)."""
    return hessops.eigs(case.H, 3, "LM", basis="device", **case.eigs_settings())


def by_magnitude(exact: Tensor, k: int) -> Tensor:
    return exact[torch.argsort(exact.abs(), descending=True)[:k]]


def test_the_device_basis_finds_the_exact_eigenvalues(case, top):
    """Against the float64 dense spectrum: each value within its error bound, plus float32's rounding of the
    products (2e-5 of the largest: the operator in float32 is not the float64 matrix)."""
    slack = 0.0 if case.float64 else 2e-5 * case.scale
    assert top.converged and top.basis == "device"
    assert bool(((top.values.double() - by_magnitude(case.exact, 3)).abs() <= top.error_bounds + slack).all())


@pytest.mark.parametrize("mode", ["host", "disk", "none"])
def test_every_basis_mode_gives_the_device_eigenvalues(case, top, tmp_path, mode):
    """host and disk re-orthogonalize against the same vectors in the same order (disk in one chunk here): the
    device's values and vectors to rounding, 1e-12 of the largest value and 1e-10 in float64, 1e-6 and 1e-5 in
    float32 (on the CPU they are bit-identical today). none keeps no basis: each of its values (a verified Rayleigh
    quotient) within its bound of the exact eigenvalue, and of the device's."""
    path = tmp_path / "basis.npy" if mode == "disk" else None
    other = hessops.eigs(case.H, 3, "LM", basis=mode, basis_path=path, **case.eigs_settings())
    assert other.basis == mode and other.converged
    if mode != "none":
        rounding = (1e-12 if case.float64 else 1e-6) * case.scale
        torch.testing.assert_close(other.values, top.values, rtol=0, atol=rounding)
        torch.testing.assert_close(other.vectors, top.vectors, rtol=0, atol=1e-10 if case.float64 else 1e-5)
    else:
        slack = 0.0 if case.float64 else 2e-5 * case.scale
        exact = by_magnitude(case.exact, 3)
        assert bool(((other.values.double() - exact).abs() <= other.error_bounds + slack).all())
        assert bool(((other.values - top.values).abs() <= other.error_bounds + top.error_bounds + slack).all())
    assert not path or not path.exists()  # a temporary basis file is removed


@pytest.mark.parametrize("mode", ["device", "disk", "none"])
def test_a_resumed_eigs_run_is_the_uninterrupted_one_bit_for_bit(case, tmp_path, mode):
    """Interrupted (Ctrl-C) at its 10th product with a checkpoint saved at every step, then resumed: the values,
    vectors, steps and products of the uninterrupted run without a checkpoint, bit for bit."""
    settings = dict(k=2, which="LA", basis=mode, **case.eigs_settings())
    reference = hessops.eigs(case.H, **settings)
    path = tmp_path / "eigs.ckpt"
    with interrupted_at(case.H, 10) as interrupting, pytest.raises(KeyboardInterrupt, match="resume"):
        hessops.eigs(interrupting, **settings, checkpoint=path, checkpoint_every=0)
    assert torch.load(path, weights_only=True)["state"]["steps"] == 9
    resumed = hessops.eigs(case.H, **settings, checkpoint=path)
    assert torch.equal(resumed.values, reference.values) and torch.equal(resumed.vectors, reference.vectors)
    assert (resumed.steps, resumed.n_matvecs) == (reference.steps, reference.n_matvecs)


def test_a_resumed_density_is_the_uninterrupted_one_bit_for_bit(case, tmp_path):
    """SLQ (3 probes in one block, 12 steps), interrupted at its 5th product: nodes and weights bit for bit."""
    reference = hessops.spectral_density(case.H, num_probes=3, lanczos_steps=12)
    path = tmp_path / "density.ckpt"
    with interrupted_at(case.H, 5) as interrupting, pytest.raises(KeyboardInterrupt):
        hessops.spectral_density(interrupting, num_probes=3, lanczos_steps=12, checkpoint=path, checkpoint_every=0)
    resumed = hessops.spectral_density(case.H, num_probes=3, lanczos_steps=12, checkpoint=path)
    assert torch.equal(resumed.quadrature.nodes, reference.quadrature.nodes)
    assert torch.equal(resumed.quadrature.weights, reference.quadrature.weights)


def test_saved_eigenvectors_reload_as_parameter_shaped_dicts(case, top, tmp_path):
    """Names and shapes are the model's trainable parameters (the GPT's tied output layer once, as wte.weight);
    each dict, flattened in that order, is the Spectrum's vector bit for bit."""
    loaded = hessops.load_eigenvectors(top.save_vectors(tmp_path / "top.pt", case.H))
    params = dict(case.model.named_parameters())
    assert loaded.names == tuple(params) and len(loaded) == 3
    assert torch.equal(loaded.values, top.values.cpu()) and torch.equal(loaded.flat(), top.vectors.cpu())
    for j, vector in enumerate(loaded.as_dicts()):
        assert all(vector[name].shape == p.shape and vector[name].dtype == p.dtype for name, p in params.items())
        assert torch.equal(torch.cat([vector[name].reshape(-1) for name in loaded.names]), top.vectors[:, j])
    if case.name == "gpt":
        assert "lm_head.weight" not in loaded.names and case.model.lm_head.weight is case.model.wte.weight


def test_loss_landscape_along_loaded_eigenvectors(case, top, tmp_path):
    """At θ the slice's loss is the loss of the whole dataset in one batch (the mean over counted tokens for the
    LM, whatever the batching). Along the top eigenvector v the loss bends with its eigenvalue λ: in float64 the
    second difference (L(a) − 2L(0) + L(−a)) / a² at a = 1e-4 is λ to 1e-3 relative (these tiny transformers are
    far from quadratic: at a = 1e-3 the GPT's is 0.8 % off, at 1e-2 half of λ; rounding adds 1e-8). In float32
    the slice is the float64 model's along the same vectors to float32's rounding (1e-5 relative), at a = 1e-2
    (where a second difference is rounding). The model's parameters are left bit for bit as they were."""
    before = {name: p.detach().clone() for name, p in case.model.named_parameters()}
    loaded = hessops.load_eigenvectors(top.save_vectors(tmp_path / "top.pt", case.H))
    a = 1e-4 if case.float64 else 1e-2
    line = hessops.loss_landscape(case.model, case.loss_fn, case.data, loaded, dims=1, span=a, points=3)
    assert line.directions == "eigen" and line.n_examples == (6 if case.name == "gpt" else 13)
    assert line.center_loss == pytest.approx(case.exact_loss, rel=1e-12 if case.float64 else 1e-5)
    if case.float64:
        low, center, high = line.loss.tolist()
        assert (low - 2 * center + high) / a**2 == pytest.approx(float(top.values[0]), rel=1e-3)
    else:
        data64 = [as_float64(b) for b in case.data]
        line64 = hessops.loss_landscape(case.reference, case.loss_fn, data64, loaded, dims=1, span=a, points=3)
        torch.testing.assert_close(line.loss, line64.loss, rtol=1e-5, atol=0)
    plane = hessops.loss_landscape(case.model, case.loss_fn, case.data, "random", points=3, span=0.1)
    assert plane.loss.shape == (3, 3) and bool(torch.isfinite(plane.loss).all())
    assert plane.loss[1, 1] == line.center_loss
    assert all(torch.equal(p, before[name]) for name, p in case.model.named_parameters())


def test_deflated_logdet_matches_the_dense_float64_one(case):
    """log det(H + cI), c = 1 − λ_min (so the smallest eigenvalue of H + cI is 1), deflating the 4 largest and
    estimating the rest by SLQ (12 probes, 25 steps), against the float64 dense one. Tolerance: 4 standard errors of
    the probes' mean (t with 11 degrees of freedom: exceeded with probability 0.2 %) plus the reported deflation
    bias, plus float32's rounding of the operator (1e-4 of |log det|)."""
    c = 1.0 - float(case.exact[0])
    truth = float((case.exact + c).log().sum())
    est = hessops.logdet(hessops.Regularized(case.H, c), method="deflated", deflate=4, probes=12, lanczos_steps=25)
    assert est.method == "deflated" and len(est.deflated_eigenvalues) == 4
    rounding = 0.0 if case.float64 else 1e-4 * abs(truth)
    error = abs(est.estimate - truth)
    assert error <= 4 * est.std_error + est.deflation_bias + rounding, (est.estimate, truth)
    top4 = (case.exact + c).flip(0)[:4]
    assert torch.allclose(est.deflated_eigenvalues, top4, rtol=1e-3 if case.float64 else 2e-3, atol=0)
    assert math.isfinite(est.quadrature_decay)
