"""The first-order witness (hessops/operators/witness.py) and weight norm written out
(hessops/operators/_written_out.py): products against central finite differences (tests/reference.py's
fd_hessian_product, and the GGN's here), independently of hessops, in float64."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from reference import autograd_hessian, fd_hessian_product
from torch import nn
from toy_networks import WEIGHT_NORMS, Attention, weight_normed

import hessops
from hessops.errors import ProductNoiseWarning, WitnessError
from hessops.operators import _hvp, _written_out, witness

# Central differences with h = 1e-5 in float64 are within ~1e-8 of the true product on these models (truncation
# h² ≈ 1e-10 times third derivatives of order one, rounding eps/h ≈ 2e-11 times the gradient); torch's weight
# norm is 5-36 % off. 1e-6 leaves two orders of magnitude on both sides.
FD_STEP, FD_RTOL = 1e-5, 1e-6
OPERATORS = (hessops.Hessian, hessops.GGN, hessops.EmpiricalFisher, hessops.MCFisher)


def labelled(kind: str):
    model, x = weight_normed(kind)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    return model, x, y, [(x[:4], y[:4]), (x[4:], y[4:])]


def fd_ggn_product(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Jᵀ H_ℓ J v for the mean cross-entropy: Jv by central differences of the outputs, H_ℓ = (diag p − ppᵀ)/N
    written out, Jᵀ by one backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    theta = nn.utils.parameters_to_vector(params).detach().clone()

    def outputs_at(point: torch.Tensor) -> torch.Tensor:
        nn.utils.vector_to_parameters(point, params)
        with torch.no_grad():
            return model(x)

    jv = (outputs_at(theta + FD_STEP * v) - outputs_at(theta - FD_STEP * v)) / (2 * FD_STEP)
    nn.utils.vector_to_parameters(theta, params)
    outputs = model(x)
    p = outputs.detach().softmax(dim=1)
    u = (p * jv - p * (p * jv).sum(1, keepdim=True)) / len(x)
    grads = torch.autograd.grad(outputs, params, u)
    return torch.cat([g.reshape(-1) for g in grads])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_vector(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


KINDS = (*WEIGHT_NORMS, "conv")


@pytest.mark.parametrize("kind", KINDS)
def test_weight_normed_hessian_products_match_finite_differences(kind):
    model, x, y, data = labelled(kind)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    V = torch.stack([random_vector(op.shape[0], seed) for seed in (2, 3)], dim=1)
    assert relative_error(op @ V[:, 0], fd_hessian_product(model, x, y, V[:, 0])) < FD_RTOL
    block = op @ V
    for i in range(2):
        assert relative_error(block[:, i], fd_hessian_product(model, x, y, V[:, i])) < FD_RTOL
    report = op.witness_report
    assert report.passed and report.source == "checked" and report.written_out  # the layers written out, named
    assert float(V[:, 1] @ block[:, 0] - V[:, 0] @ block[:, 1]).__abs__() < 1e-12 * float(block.norm())


@pytest.mark.parametrize(
    "mode", ["autograd-loop", "forward-over-reverse", "reverse-over-forward", "reverse-over-reverse"]
)
def test_every_formulation_is_right_through_weight_norm(mode):
    model, x, y, data = labelled("parametrization-dim0")
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode=mode)
    v = random_vector(op.shape[0])
    assert relative_error(op @ v, fd_hessian_product(model, x, y, v)) < FD_RTOL


@pytest.mark.parametrize("kind", ["parametrization-dim1", "legacy-dim0", "conv"])
def test_weight_normed_ggn_matches_its_first_order_form(kind):
    """torch has no forward-mode derivative of its fused weight norm: the GGN failed before it was written out."""
    model, x, y, data = labelled(kind)
    op = hessops.GGN(model, nn.CrossEntropyLoss(), data)
    v = random_vector(op.shape[0])
    assert relative_error(op @ v, fd_ggn_product(model, x, y, v)) < FD_RTOL
    for cls in (hessops.EmpiricalFisher, hessops.MCFisher):
        other = cls(model, nn.CrossEntropyLoss(), data)
        other @ v
        assert other.witness_report.passed


def test_dense_hessian_and_exact_trace_are_right_through_weight_norm():
    model, x, y, data = labelled("legacy-dim0")
    n = sum(p.numel() for p in model.parameters())
    columns = torch.stack([fd_hessian_product(model, x, y, e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    dense = hessops.dense_hessian(model, nn.CrossEntropyLoss(), data)
    assert relative_error(dense, columns) < FD_RTOL
    assert float((dense - dense.T).norm()) < 1e-12 * float(dense.norm())  # torch's own: 35 % asymmetric
    result = hessops.trace(hessops.Hessian(model, nn.CrossEntropyLoss(), data), probes=n)
    assert result.method == "exact"
    assert abs(result.estimate - float(columns.trace())) < FD_RTOL * float(columns.diagonal().abs().sum())


@contextlib.contextmanager
def torch_weight_norm(monkeypatch):
    """Products through torch's own weight norm, as before it was written out."""
    monkeypatch.setattr(_written_out, "written_out", lambda model, enabled=True: contextlib.nullcontext([]))
    yield


@pytest.mark.parametrize("kind", ["parametrization-dim0", "legacy-dim1", "conv"])
def test_torch_weight_norm_is_refused_naming_the_layer(kind, monkeypatch):
    model, x, y, data = labelled(kind)
    with torch_weight_norm(monkeypatch):
        op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
        v = random_vector(op.shape[0])
        assert relative_error(_raw_product(op, v), fd_hessian_product(model, x, y, v)) > 0.01
        with pytest.raises(WitnessError, match=r"off the first-order witness.*'0' \((legacy )?weight norm of 'weight'"):
            op @ v
        with pytest.raises(WitnessError):  # refused for good, not only on the first product
            op @ v
        assert op.witness_report.passed is False


def test_dense_hessian_refuses_torch_weight_norm(monkeypatch):
    model, x, y, data = labelled("parametrization-dim1")
    with torch_weight_norm(monkeypatch):
        with pytest.raises(WitnessError, match=r"dense_hessian's matrix is .* off.*'0' \(weight norm of 'weight'"):
            hessops.dense_hessian(model, nn.CrossEntropyLoss(), data)
        unchecked = hessops.dense_hessian(model, nn.CrossEntropyLoss(), data, witness=False)
    assert float((unchecked - unchecked.T).norm()) > 0.01 * float(unchecked.norm())  # torch's: asymmetric


def _raw_product(op, v: torch.Tensor) -> torch.Tensor:
    """The operator's product with the witness off: what it computes, unchecked."""
    unchecked = hessops.Hessian(op.problem.model, nn.CrossEntropyLoss(), op.problem.data, witness=False)
    return unchecked @ v


def test_a_wrong_hessian_formulation_is_caught(monkeypatch):
    model, x, y, data = labelled("parametrization-dim0")
    run = _hvp.run

    def scaled(*args, **kwargs):  # products 10 % too large: agrees with itself, not with the gradient
        products, loss = run(*args, **kwargs)
        return [tuple(1.1 * t for t in block) for block in products], loss

    monkeypatch.setattr(_hvp, "run", scaled)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(WitnessError, match=r"0\.1 off"):
        op @ random_vector(op.shape[0])
    assert hessops.Hessian(model, nn.CrossEntropyLoss(), data, witness=False) @ random_vector(op.shape[0]) is not None
    monkeypatch.setenv("HESSOPS_WITNESS", "0")
    off = hessops.Hessian(labelled("parametrization-dim0")[0], nn.CrossEntropyLoss(), data)
    off @ random_vector(off.shape[0])
    assert off.witness_report.source == "disabled" and off.product_noise is None


def test_a_ggn_without_a_term_is_caught(monkeypatch):
    """The cross-entropy's output Hessian diag(p) − ppᵀ without its ppᵀ term: still PSD, still symmetric."""
    model, x, y, data = labelled("legacy-dim0")

    def dropped(self, outputs, batch):
        return lambda u: outputs.softmax(dim=1) * u / len(outputs)

    monkeypatch.setattr(hessops.GGN, "_output_operator", dropped)
    op = hessops.GGN(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(WitnessError, match="GGN's products"):
        op @ random_vector(op.shape[0])


class Float32Inside(nn.Module):
    """A float64 model whose middle layer computes in float32, as HuggingFace's Llama computes RMSNorm."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        h32 = h.float()
        normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(torch.tanh(normed.to(x.dtype)))


@pytest.mark.parametrize("cls", OPERATORS)
def test_a_model_computing_in_float32_inside_is_measured_and_said(cls):
    torch.manual_seed(0)
    model = Float32Inside().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    op = cls(model, nn.CrossEntropyLoss(), [(x, y)])
    regularized = hessops.Regularized(op, 0.1)
    assert op.product_noise is None and regularized.product_noise is None
    with pytest.warns(ProductNoiseWarning, match="float64 .* lower precision") as caught:
        regularized @ random_vector(op.shape[0])
    assert len([w for w in caught if w.category is ProductNoiseWarning]) == 1
    assert op.product_noise > 1e3 * torch.finfo(torch.float64).eps  # float32 rounding: ~1e-9 to 1e-7
    assert regularized.product_noise == op.product_noise
    assert op.witness_report.passed  # noisy, not wrong: its finite differences take wider steps


def test_a_float64_hugging_face_llama_is_said_to_compute_in_float32_inside():
    """Issue 21, finding 3: its RMSNorm and rotary embedding run in float32 whatever the model's dtype."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        head_dim=8,
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, 50, (4, 8))
    op = hessops.Hessian(model, hessops.next_token_cross_entropy, [({"input_ids": ids}, ids)])
    with pytest.warns(ProductNoiseWarning, match="float64 Hessian .*float32 RMSNorm"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert op.product_noise > 1e3 * torch.finfo(torch.float64).eps and op.witness_report.passed  # measured: 2e-10


def test_the_noise_is_the_symmetry_defect(monkeypatch):
    """An antisymmetric perturbation of relative size 1e-9 shows up as product_noise of that order."""
    model, x, y, data = labelled("parametrization-dim1")
    n = sum(p.numel() for p in model.parameters())
    skew = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    skew = (skew - skew.T) / torch.linalg.matrix_norm(skew - skew.T, ord=2)
    run = _hvp.run

    def skewed(mode, batch_loss, params, blocks, *args):  # H V + c S V, c fixed within a call
        products, loss = run(mode, batch_loss, params, blocks, *args)
        c = 1e-9 * float(witness.flat(products[0]).norm())
        out = []
        for block, product in zip(blocks, products):
            flat = witness.flat(product) + c * witness.flat(block) @ skew.T
            out.append(
                tuple(t.reshape(p.shape) for t, p in zip(flat.split([p[0].numel() for p in product], 1), product))
            )
        return out, loss

    monkeypatch.setattr(_hvp, "run", skewed)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    with pytest.warns(ProductNoiseWarning):
        op @ random_vector(n)
    assert 1e-12 < op.product_noise < 1e-8 and op.witness_report.passed


def normal_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (8, 4)),
        "cnn": (
            nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)),
            (8, 1, 6, 6),
        ),
        "layernorm": (nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 3)), (8, 4)),
        "attention": (Attention().eval(), (8, 3, 4)),
    }[name]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm", "attention"])
def test_normal_models_pass_the_witness_quietly(name, dtype):
    model, shape = normal_model(name)
    model = model.to(dtype)
    x, y = torch.randn(*shape, dtype=dtype), torch.randint(0, 3, (shape[0],))
    for cls in OPERATORS:
        op = cls(model, nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])])
        with warnings.catch_warnings():
            warnings.simplefilter("error", ProductNoiseWarning)
            op @ torch.ones(op.shape[0], dtype=dtype)
        report = op.witness_report
        assert report.passed and report.precision == "float64", (cls.__name__, report)
        assert max(report.errors) < 1e-2 * min(report.tolerances), report  # a check with power, not a vacuous one
        assert op.product_noise < witness.NOISE_WARNING * torch.finfo(dtype).eps


def test_a_slice_whose_targets_are_all_ignored_leaves_the_witness_to_the_next_batch():
    model, x, y, _ = labelled("legacy-dim0")
    ignored = torch.full((4,), -100)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x[:4], ignored), (x[4:], y[4:])])
    v = random_vector(op.shape[0])
    product = op @ v
    assert op.witness_report.passed and op.witness_report.examples == 2  # the second batch's two examples
    assert relative_error(product, fd_hessian_product(model, x[4:], y[4:], v)) < FD_RTOL


class Float32Only(nn.Module):
    """A float32 model that cannot run in float64: a constant kept as a plain float32 attribute."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 6), nn.Linear(6, 3)
        self.mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) / 3

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) @ self.mix))


def test_a_model_that_cannot_run_in_float64_is_witnessed_in_its_own_dtype():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for cls in OPERATORS:
        op = cls(Float32Only(), nn.CrossEntropyLoss(), [(x, y)])
        op @ torch.ones(op.shape[0])
        assert op.witness_report.passed and op.witness_report.precision == "float32", op.witness_report


class Counted(nn.Module):
    """The MLP, counting its forward passes."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("cls", OPERATORS)
def test_the_witness_costs_a_bounded_number_of_evaluations_once(cls):
    torch.manual_seed(0)
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(3)]
    v = random_vector(sum(p.numel() for p in Counted().parameters()))

    def forwards(model, **kwargs) -> tuple[int, int, hessops.CurvatureOperator]:
        op = cls(model, nn.CrossEntropyLoss(), data, **kwargs)
        before = model.calls
        op @ v
        first = model.calls - before
        op @ v
        return first, model.calls - before - first, op

    plain, plain_second, _ = forwards(Counted(), witness=False)
    model = Counted()
    checked, second, op = forwards(model)
    report = op.witness_report
    hessian = cls is hessops.Hessian  # 4 shifted evaluations per direction (+ one at θ for the Jᵀ of the others)
    assert report.evaluations == 4 * witness.CHECKED + (0 if hessian else 1)
    assert report.backwards == (4 if hessian else 2) * witness.CHECKED
    slice_product = 1 if hessian else 1 + witness.DIRECTIONS  # the sandwich's jvp is a forward per column block
    assert checked - plain == slice_product + report.evaluations
    head = 2 if hessian else 0  # the softmax head's first-use check: one forward each way (once per model)
    assert second == plain_second == plain - head  # later products pay nothing
    assert report.examples == witness.WITNESS_EXAMPLES and report.products == witness.DIRECTIONS
    again, _, later = forwards(model)  # another operator of the kind on the same model: the verdict is kept
    assert again == plain - head and later.witness_report.source == "in-process"


class RMSNormedInside(nn.Module):
    """A residual MLP with RMS norms that compute in ``inside`` (float32 in a float64 model, as Llama's do)."""

    def __init__(self, inside: torch.dtype):
        super().__init__()
        self.inside = inside
        self.inp, self.mid, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def rms(self, h):
        low = h.to(self.inside)
        return (low * torch.rsqrt(low.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)

    def forward(self, x):
        h = self.rms(self.inp(x))
        return self.out(h + torch.tanh(self.rms(self.mid(h))))


@pytest.fixture(scope="module")
def float32_inside():
    """The float64 model with float32 norms, its operator over two batches, and the eigenvalues of the same
    function computed in float64 throughout (double backward, tests/reference.py): the truth its products round."""
    torch.manual_seed(0)
    model = RMSNormedInside(torch.float32).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 4, (40,))
    exact = RMSNormedInside(torch.float64).double()
    exact.load_state_dict(model.state_dict())
    H = autograd_hessian(exact, nn.CrossEntropyLoss(), x, y)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x[:16], y[:16]), (x[16:], y[16:])])
    with pytest.warns(ProductNoiseWarning):
        op @ random_vector(op.shape[0])
    return op, torch.linalg.eigvalsh((H + H.T) / 2)


@pytest.mark.parametrize(
    "which, tol, value_tol", [("LA", 1e-3, None), ("SA", 1e-6, None), ("both", 1e-12, None), ("LM", 1e-8, 1e-12)]
)
def test_eigs_bounds_cover_the_precision_the_model_computes_in(float32_inside, which, tol, value_tol):
    """Issue 21, finding 3: the products' symmetry defect (2e-9 here) is not a bound on how far float32 norms
    move the eigenvalues (up to 1.4e-8 of max|λ| against the float64 function's, 7-10× beyond bounds built on
    the defect): the bounds take 24 eps of float32 instead, every value within its bound of the truth, and a
    tolerance below that precision (1e-12) is reported as not converged."""
    from eigs_promise import check_promise

    op, truth = float32_inside
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spectrum = hessops.eigs(op, 4, which, tol=tol, value_tol=value_tol, seed=1)
    check_promise(spectrum, truth, 4, which, torch.float64)
    assert float(spectrum.error_bounds.min()) >= 0.99 * 8 * torch.finfo(torch.float32).eps * float(truth.abs().max())
    assert spectrum.converged == (tol >= 1e-6)


@pytest.mark.parametrize("kind", ["parametrization-dim0", "legacy-dim1"])
def test_a_large_float32_model_is_witnessed_in_float32_and_still_refuses_torch_weight_norm(kind, monkeypatch):
    """Above FLOAT64_LIMIT parameters a float32 operator's witness runs in float32 (no float64 copy of the model):
    correct products pass (their error within the tolerance, measured 1.5 % here: under 3 %), torch's weight norm
    (5-36 % off the finite-difference truth) is still refused. The limit is lowered to these tiny models."""
    monkeypatch.setattr(witness, "FLOAT64_LIMIT", 0)
    model, x, y, data = labelled(kind)
    model, data = model.float(), [(a.float(), b) for a, b in data]
    good = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    good @ torch.ones(good.shape[0])
    report = good.witness_report
    assert report.passed and report.precision == "float32", report
    assert max(report.tolerances) < 0.03 and max(report.errors) < max(report.tolerances)
    model = labelled(kind)[0].float()  # another model: a verdict is kept per model in the process
    with torch_weight_norm(monkeypatch):
        bad = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
        with pytest.raises(WitnessError, match="off the first-order witness"):
            bad @ torch.ones(bad.shape[0])
        assert bad.witness_report.precision == "float32"


def test_the_slab_reductions_are_the_float64_sums(monkeypatch):
    """gram, row_norms and agreement sum in float64 over slabs of columns: the same as float64 on whole copies,
    across slab edges (SLAB lowered to 7 so that 50 columns make 8 slabs, the last one short)."""
    monkeypatch.setattr(witness, "SLAB", 7)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 50, generator=generator), torch.randn(3, 50, generator=generator)
    # 50 products of order-one numbers summed in another order: a few 1e-15 apart; a dropped or doubled slab is 0.1-10
    assert torch.allclose(witness.gram(a, b), a.double() @ b.double().T, rtol=0, atol=1e-13)
    assert torch.allclose(witness.row_norms(a), a.double().norm(dim=1), rtol=0, atol=1e-13)
    one, two = b[0], b[0] + 1e-3 * b[1]
    w = (4 * one.double() - two.double()) / 3
    error, allowed, fd_error = witness.agreement(a[0], one, two, rho=0.1)
    assert error == pytest.approx(float((a[0].double() - w).norm() / w.norm()), rel=1e-13)
    assert fd_error == pytest.approx(float((one.double() - two.double()).norm() / w.norm()), rel=1e-13)
    assert allowed == pytest.approx(10 * fd_error + 0.1 * max(1.0, float(a[0].double().norm() / w.norm())), rel=1e-13)
