"""Every operator against its dense float64 reference (tests/reference.py) over the fixture grid.

Tolerance: relative Frobenius error 1e-10 in float64. Operator and reference sum the same terms in different
orders (batches, chunks, vmap), which costs ~1e-15 relative; 1e-10 leaves room for that, while any wrong
batch weight (n_b/N), missing example or wrong reduction shows up as an error of order 1e-2 or more.
"""

from __future__ import annotations

import gc

import pytest
import torch
from reference import dense_ggn, hessian_product, reference_hessian, relative_error
from torch import nn
from toy_networks import cifar_cnn_5k, mlp

import hessops

# "compiled" and "finite-difference" have their own tests (test_compiled.py: it compiles once per batch shape, 5-15 s
# each; test_finite_difference.py: not exact, within its measured error).
EAGER_MODES = tuple(m for m in hessops.operators.hessian.HVP_MODES if m not in ("compiled", "finite-difference"))

RTOL64 = 1e-10
OPERATORS = {"hessian": hessops.Hessian, "ggn": hessops.GGN, "ef": hessops.EmpiricalFisher}


@pytest.mark.parametrize("kind", OPERATORS)
def test_matmat_matches_dense(case, kind):
    op = OPERATORS[kind](case.model, case.loss_fn, case.data)
    dense = case.dense(kind)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert op.shape == dense.shape
    assert relative_error(op @ V, dense @ V) < RTOL64
    assert relative_error(op @ V[:, 0], dense @ V[:, 0]) < RTOL64  # a (n,) vector


@pytest.mark.parametrize("kind", OPERATORS)
def test_to_dense_is_the_dense_operator_and_symmetric(case, kind):
    dense = OPERATORS[kind](case.model, case.loss_fn, case.data).to_dense()
    assert relative_error(dense, case.dense(kind)) < RTOL64
    assert relative_error(dense.T, dense) < RTOL64


def test_batches_of_any_size_give_the_full_batch_operator():
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(13, 4, dtype=torch.float64), torch.randint(0, 3, (13,))
    full = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)]).to_dense()
    for sizes in ([1] * 13, [12, 1], [5, 5, 3], [2, 0, 11]):  # an empty batch contributes nothing
        data = list(zip(x.split(sizes), y.split(sizes)))
        assert relative_error(hessops.Hessian(model, nn.CrossEntropyLoss(), data).to_dense(), full) < RTOL64


class MeanOfEmbeddings(nn.Module):
    """Token embeddings, averaged, then a linear head: ``sparse`` only chooses the gradient's layout."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.embed = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.embed(x).tanh().mean(dim=1))


def test_sparse_embeddings_give_the_dense_embeddings_curvature():
    """nn.Embedding(sparse=True) failed in torch ('reshape is not implemented for sparse tensors'); it is the
    same function as sparse=False, so every operator and the dense Hessian are the same matrix, exactly (the
    same arithmetic), and the modules keep sparse=True afterwards (a SparseAdam still gets sparse gradients)."""
    x, y = torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    models = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        models[sparse] = MeanOfEmbeddings(sparse).double()
    V = torch.randn(sum(p.numel() for p in models[True].parameters()), 2, dtype=torch.float64)
    for cls in (*OPERATORS.values(), hessops.MCFisher):
        products = [
            cls(models[sparse], nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])]) @ V for sparse in (True, False)
        ]
        assert torch.equal(*products), cls.__name__
    dense = [hessops.dense_hessian(models[sparse], nn.CrossEntropyLoss(), [(x, y)]) for sparse in (True, False)]
    assert torch.equal(*dense)
    assert models[True].embed.sparse


def test_parameter_subset_in_the_given_order():
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    subset = [model[2].weight, model[0].bias]  # not the model's order
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, params=subset)
    assert op.shape == (18 + 6, 18 + 6)
    assert relative_error(op.to_dense(), reference_hessian(model, nn.CrossEntropyLoss(), data, params=subset)) < RTOL64
    ggn = hessops.GGN(model, nn.CrossEntropyLoss(), data, params=subset)
    assert relative_error(ggn.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), data, params=subset)) < RTOL64


def test_frozen_parameters_are_left_out_by_default():
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    model[0].weight.requires_grad_(False)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    assert op.shape[0] == sum(p.numel() for p in model.parameters()) - model[0].weight.numel()
    expected = reference_hessian(
        model, nn.CrossEntropyLoss(), [(x, y)], params=[model[0].bias, model[2].weight, model[2].bias]
    )
    assert relative_error(op.to_dense(), expected) < RTOL64


@pytest.mark.parametrize("kind", OPERATORS)
def test_float32_operator_matches_float64_reference(kind):
    """float32 products agree with the float64 truth to float32 accuracy: relative error < 1e-5 (eps 1.2e-7,
    times the few hundred roundings of a forward and two derivative passes)."""
    torch.manual_seed(0)
    model32, x, y = mlp(), torch.randn(20, 4), torch.randint(0, 3, (20,))
    data32 = [(x[:8], y[:8]), (x[8:], y[8:])]
    model64 = mlp().double()
    model64.load_state_dict(model32.state_dict())
    data64 = [(a.double(), b) for a, b in data32]
    op32 = OPERATORS[kind](model32, nn.CrossEntropyLoss(), data32)
    op64 = OPERATORS[kind](model64, nn.CrossEntropyLoss(), data64)
    assert op32.dtype == torch.float32 and op64.dtype == torch.float64
    V = torch.randn(op32.shape[0], 4, dtype=torch.float64)
    assert relative_error((op32 @ V.float()).double(), op64 @ V) < 1e-5


def test_float64_operator_of_a_float32_model_evaluates_in_float64():
    """dtype=torch.float64 on a float32 model casts parameters, buffers and inputs on the fly: the result is
    the float64 curvature at the same point (float32 values are exact in float64), so it meets RTOL64."""
    torch.manual_seed(0)
    from toy_networks import bn_mlp

    model32, x, y = bn_mlp().float(), torch.randn(12, 4), torch.randn(12, 3)
    data32 = [(x[:7], y[:7]), (x[7:], y[7:])]
    model64 = bn_mlp().double()
    model64.load_state_dict(model32.state_dict())
    op = hessops.Hessian(model32, nn.MSELoss(), data32, dtype=torch.float64)
    assert op.dtype == torch.float64
    expected = reference_hessian(model64, nn.MSELoss(), [(a.double(), b.double()) for a, b in data32])
    assert relative_error(op.to_dense(), expected) < RTOL64
    assert next(model32.parameters()).dtype == torch.float32  # the model is left alone


def test_linear_regression_hessian_is_analytic():
    """For f(x) = Wx and L = (1/(N·d)) Σ ||Wx − y||², H = (2/(N·d)) XᵀX per output: I_d ⊗ (2/(N·d)) XᵀX."""
    torch.manual_seed(0)
    N, d_in, d = 17, 5, 3
    model = nn.Linear(d_in, d, bias=False).double()
    X, Y = torch.randn(N, d_in, dtype=torch.float64), torch.randn(N, d, dtype=torch.float64)
    data = [(X[:10], Y[:10]), (X[10:], Y[10:])]
    expected = torch.kron(torch.eye(d, dtype=torch.float64), 2.0 / (N * d) * X.T @ X)
    for cls in (hessops.Hessian, hessops.GGN):
        assert relative_error(cls(model, nn.MSELoss(), data).to_dense(), expected) < RTOL64


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss()], ids=["ce", "mse"])
def test_ggn_equals_hessian_for_a_linear_model(loss):
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3).double(), torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,)) if isinstance(loss, nn.CrossEntropyLoss) else torch.randn(10, 3, dtype=torch.float64)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    H = hessops.Hessian(model, loss, data).to_dense()
    assert relative_error(hessops.GGN(model, loss, data).to_dense(), H) < RTOL64


class PixelLogits(nn.Module):
    """Per-'pixel' logits (N, 3 classes, 2 pixels): cross-entropy then averages over 2 elements per example."""

    def __init__(self):
        super().__init__()
        self.net = mlp(4, 6, 6)

    def forward(self, x):
        return self.net(x).reshape(-1, 3, 2)


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce", "ce-pixels", "nll"])
def test_mc_fisher_converges_to_the_ggn(loss_name):
    """A smoke test of the sampling for five likelihoods (NLL and per-pixel cross-entropy among them): the error
    against the GGN (the true Fisher of these likelihoods) falls as samples grow, and with 4,096 samples is within
    5 % (relative Frobenius). Loose by design, it would pass a 10 % bias: MCFisher's exactness is tested in
    tests/operators/test_mcfisher.py, against its enumerated expectation with a bound from the samples' spread."""
    torch.manual_seed(0)
    model, x = mlp().double(), torch.randn(12, 4, dtype=torch.float64)
    if loss_name == "ce":
        loss, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (12,))
    elif loss_name == "ce-pixels":
        model, loss, y = PixelLogits().double(), nn.CrossEntropyLoss(), torch.randint(0, 3, (12, 2))
    elif loss_name == "nll":
        model, loss, y = nn.Sequential(*mlp(), nn.LogSoftmax(dim=1)).double(), nn.NLLLoss(), torch.randint(0, 3, (12,))
    elif loss_name == "bce":
        loss, y = nn.BCEWithLogitsLoss(), torch.rand(12, 3, dtype=torch.float64).round()
    else:
        loss, y = nn.MSELoss(), torch.randn(12, 3, dtype=torch.float64)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    ggn = hessops.GGN(model, loss, data).to_dense()
    errors = [relative_error(hessops.MCFisher(model, loss, data, samples=s).to_dense(), ggn) for s in (4, 64, 4096)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_mc_fisher_is_a_fixed_matrix_per_seed():
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    a = hessops.MCFisher(model, nn.CrossEntropyLoss(), data, seed=3)
    assert a.check_deterministic() == 0.0
    b = hessops.MCFisher(model, nn.CrossEntropyLoss(), data, seed=4)
    dense = a.to_dense()
    assert relative_error(dense, dense.T) < RTOL64
    assert relative_error(b.to_dense(), dense) > 1e-3  # another seed, other labels


def test_psd_operators_have_no_negative_eigenvalues(case):
    for kind in ("ggn", "ef"):
        eigenvalues = torch.linalg.eigvalsh(OPERATORS[kind](case.model, case.loss_fn, case.data).to_dense())
        assert eigenvalues.min() > -1e-12 * eigenvalues.abs().max()


@pytest.mark.parametrize("mode", EAGER_MODES)
@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_hvp_modes_and_chunk_sizes_agree(mode, chunk_size):
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    op = hessops.Hessian(model, nn.MSELoss(), data, hvp_mode=mode, chunk_size=chunk_size)
    V = torch.randn(op.shape[0], 5, dtype=torch.float64)
    assert relative_error(op @ V, reference_hessian(model, nn.MSELoss(), data) @ V) < RTOL64


def test_cifar_cnn_5k_operators_match_dense(cifar_case):
    """The 5,100-parameter CNN of the CIFAR spectrum study, exactly as the study defines it. The Hessian's
    reference is H V by plain double backward, column by column (tests/reference.py's hessian_product: the
    dense Hessian's rows are the same double backward, one per unit vector, and took 15 s of 5,100 passes)."""
    model = cifar_case.model
    assert sum(p.numel() for p in model.parameters()) == 5100
    V = torch.randn(5100, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind, cls in OPERATORS.items():
        op = cls(model, cifar_case.loss_fn, cifar_case.data)
        if kind == "hessian":
            reference = torch.stack([hessian_product(model, cifar_case.loss_fn, cifar_case.data, v) for v in V.T], 1)
        else:
            reference = cifar_case.dense(kind) @ V
        assert relative_error(op @ V, reference) < RTOL64, kind
    H = hessops.Hessian(model, cifar_case.loss_fn, cifar_case.data)
    v, w = V[:, 0], V[:, 1]
    assert abs(float(v @ (H @ w) - w @ (H @ v))) < RTOL64 * float(v.norm() * (H @ w).norm())


def test_mnist_cnn_1710_operators_match_dense(mnist_case):
    """The 1,710-parameter MNIST net of the basin-volume study (LogSoftmax + NLLLoss). Its GGN is taken at
    the logits (the NLL of log-probabilities is linear, so the GGN there would be zero)."""
    model = mnist_case.model
    assert sum(p.numel() for p in model.parameters()) == 1710
    V = torch.randn(1710, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind, cls in OPERATORS.items():
        op = cls(model, mnist_case.loss_fn, mnist_case.data)
        assert relative_error(op @ V, mnist_case.dense(kind) @ V) < RTOL64, kind
    assert float(mnist_case.dense("ggn").norm()) > 1e-3


def test_progress_bar_shows_batches(capsys):
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])], progress=True)
    op @ torch.randn(op.shape[0], dtype=torch.float64)
    err = capsys.readouterr().err
    assert "Hessian @ 1 vector" in err and "/2 [" in err


def test_operators_take_a_dataloader_and_cifar_sized_inputs():
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.randint(0, 10, (10,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    model = cifar_cnn_5k()
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), loader)
    assert op.check_deterministic() == 0.0
    listed = hessops.Hessian(model, nn.CrossEntropyLoss(), list(loader))
    v = torch.randn(5100)
    torch.testing.assert_close(op @ v, listed @ v)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) + self.b(z)


def test_inputs_as_a_tuple_or_a_dict():
    torch.manual_seed(0)
    model = TwoInputs().double()
    x, z, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,))
    positional = [((x[:5], z[:5]), y[:5]), ((x[5:], z[5:]), y[5:])]
    # the reference: one concatenated tensor, split back inside the model
    keywords = [({"x": x[:5], "z": z[:5]}, y[:5]), ({"x": x[5:], "z": z[5:]}, y[5:])]

    class Concat(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, xz):
            return self.inner(xz[:, :4], xz[:, 4:])

    expected = reference_hessian(Concat(model), nn.CrossEntropyLoss(), [(torch.cat([x, z], 1), y)])
    for data in (positional, keywords):
        assert relative_error(hessops.Hessian(model, nn.CrossEntropyLoss(), data).to_dense(), expected) < RTOL64


def test_auto_mode_picks_a_measured_formulation_once_per_kind(monkeypatch):
    from hessops.operators import hessian as hessian_module
    from hessops.operators import hvp_tuning

    monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_PRODUCTS", 0)  # tune at the first product, however cheap
    monkeypatch.setattr(hvp_tuning, "MIN_PRODUCT_SECONDS", 0.0)
    monkeypatch.setattr(hvp_tuning, "budget", lambda spent: float("inf"))  # and try every candidate

    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    hessian_module._TUNED.clear()
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    assert op.hvp_mode == "auto"
    dense = reference_hessian(model, nn.CrossEntropyLoss(), data)
    v, V = torch.randn(op.shape[0], dtype=torch.float64), torch.randn(op.shape[0], 3, dtype=torch.float64)
    assert relative_error(op @ v, dense @ v) < RTOL64  # the timed first batch's result is used as is
    assert relative_error(op @ V, dense @ V) < RTOL64
    tuned = {key[-1]: mode for key, mode in hessian_module._TUNED[model].items()}
    assert (
        tuned["single"] in hessian_module.CANDIDATES["single"] and tuned["block"] in hessian_module.CANDIDATES["block"]
    )
    assert relative_error(op @ V, dense @ V) < RTOL64  # later products reuse the choice
    assert len(hessian_module._TUNED[model]) == 2
    del op, model  # the choice dies with its model: a later model at the same address tunes afresh
    gc.collect()
    assert len(hessian_module._TUNED) == 0


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("micro", [2])
def test_micro_batches_give_the_same_operator(case, kind, micro):
    """Splitting every batch into micro-batches weighted by their sizes is exact for per-example mean losses
    and eval-mode models (BatchNorm in eval mode included): same 1e-10 tolerance as the whole batches."""
    op = OPERATORS[kind](case.model, case.loss_fn, case.data, micro_batch_size=micro)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert relative_error(op @ V, case.dense(kind) @ V) < RTOL64


def test_micro_batches_of_tuple_and_dict_inputs():
    torch.manual_seed(0)
    model = TwoInputs().double()
    x, z, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,))
    whole = hessops.Hessian(model, nn.CrossEntropyLoss(), [((x, z), y)]).to_dense()
    for inputs in ((x, z), {"x": x, "z": z}):
        op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(inputs, y)], micro_batch_size=3)
        assert relative_error(op.to_dense(), whole) < RTOL64


def test_mc_fisher_with_micro_batches_is_fixed_and_unbiased():
    """Each micro-batch draws its own labels (seeded by batch and piece): a fixed matrix, and as unbiased
    for the GGN as whole batches (4,096 samples: within 5%, as in the convergence test above)."""
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    op = hessops.MCFisher(model, nn.CrossEntropyLoss(), data, micro_batch_size=2)
    assert op.check_deterministic() == 0.0
    ggn = hessops.GGN(model, nn.CrossEntropyLoss(), data).to_dense()
    many = hessops.MCFisher(model, nn.CrossEntropyLoss(), data, micro_batch_size=2, samples=4096)
    assert relative_error(many.to_dense(), ggn) < 0.05


def test_ctrl_c_while_tuning_is_not_taken_for_a_failed_candidate(monkeypatch):
    """torch can hand a KeyboardInterrupt back wrapped in a RuntimeError; the tuner skips formulations that
    raise RuntimeError, but must not swallow an interrupt."""
    from hessops.operators import _hvp

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("KeyboardInterrupt: raised in a vmapped function")  # noqa: B904 - as torch does

    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    monkeypatch.setattr(_hvp, "run", interrupted)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    with pytest.raises(KeyboardInterrupt):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
