"""The gradient-only product, ``hvp_mode="finite-difference"`` (hessops/operators/finite_difference.py): within its
measured error of plain double backward on the case grid (tests/operators/test_grid.py's architectures; the truth
from tests/reference.py in float64), its error carried into eigs' bounds, which then cover dense eigenvalues, and
working where torch has no double backward at all.

Tolerances: the products must be within the operator's own ``product_error`` (that is the promise); in float64 that
error must also be small (< 1e-6: measured 1e-9 to 1e-8, the step being 6e-6 of the parameters), in float32 under
5 % (measured 0.2-1.2 %, ten times the Richardson estimate)."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_hessian, relative_error
from torch import nn

import hessops
from hessops.errors import HvpFormulationError, InexactProductWarning, WitnessError
from tests.operators.test_grid import ARCHITECTURES, batches, build, dense_of, grid_reference_hessian

FD = "finite-difference"
GRID = [arch for arch in ARCHITECTURES if arch != "batchnorm-train"]  # batch statistics: test_grid's own path


@pytest.mark.parametrize("arch", GRID)
def test_products_are_within_their_measured_error_on_the_grid(arch):
    model, x, y, _ = build(arch)
    data = batches(x, y, [3, 2, 2])
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode=FD)
    product = dense_of(op)
    truth = grid_reference_hessian(model, nn.CrossEntropyLoss(), data, per_batch=False)
    assert op.product_error is not None and op.product_error < 1e-6
    assert relative_error(product, truth) <= op.product_error
    report = op.finite_difference_report
    assert report.exact and max(report.exact) <= op.product_error  # double backward runs on these: it was compared


@pytest.mark.parametrize("arch", ["mlp", "cnn", "attention", "tied"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_eigenvalue_bounds_carry_the_error_and_cover_the_truth(arch, seed):
    """A float32 operator's finite differences are 2e-4 to 1e-3 off (LayerNorm's: 2-7e-3, whose third derivative is
    larger): eigs' bounds must hold all the same (the truth: the float64 model's dense eigenvalues; the float32 copy
    differs from it by rounding, far inside the bounds). At ``value_tol=0.01``: at 0.05 eigs breaks its promise on
    exact float32 operators too (tests/analysis/test_eigs_loose.py, a known bug)."""
    model, _, _, _ = build(arch, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    x = ARCHITECTURES[arch][1](40, g)  # 40 examples: a Hessian of fuller rank than the grid's 7 give
    y = torch.randint(0, 3, (40,), generator=g)
    data = batches(x, y, [24, 16])
    truth = torch.linalg.eigvalsh(grid_reference_hessian(model, nn.CrossEntropyLoss(), data, per_batch=False))
    model = model.float()
    data = [(xb.float() if xb.is_floating_point() else xb, yb) for xb, yb in data]
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode=FD)
    spectrum = hessops.eigs(op, 2, "LM", value_tol=0.01, max_iters=op.shape[0])
    assert 1e-5 < op.product_error < 0.005
    values, bounds = spectrum.values.double(), spectrum.error_bounds.double()
    assert spectrum.converged, spectrum
    expected = truth[truth.abs().argsort(descending=True)][:2]  # the promise of converged: these, in this order
    order = values.abs().argsort(descending=True)
    assert ((values[order] - expected).abs() <= bounds[order]).all(), (values, expected, bounds)
    assert bounds.min() >= op.product_error * values.abs().max() * 0.99  # the products' error is carried in


def test_a_quadratic_loss_has_no_truncation_and_an_analytic_spectrum_with_repeats():
    """Least squares, L = ||Xw − y||²/n: H = 2/n XᵀX exactly, and central differences of a linear gradient have no
    truncation error, only rounding. X with orthogonal columns of chosen norms gives repeated eigenvalues."""
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    X = q * torch.tensor([3.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # eigenvalues 2/n·(9, 9, 4, 1)
    y = torch.randn(n, 1, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    op = hessops.Hessian(model, nn.MSELoss(), [(X[:6], y[:6]), (X[6:], y[6:])], hvp_mode=FD)
    spectrum = hessops.eigs(op, 2, "LA", tol=1e-10)
    assert torch.allclose(spectrum.values, torch.tensor([18.0 / n, 18.0 / n], dtype=torch.float64), atol=1e-8)
    assert op.product_error < 1e-7


class SquareNoDoubleBackward(torch.autograd.Function):
    """z ↦ z², whose backward torch cannot differentiate again (as flash attention's or a fused kernel's): torch's
    double backward through it is silently wrong (the witness refuses it), and finite differences are right."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return 2 * z * grad


class Squared(nn.Module):
    def __init__(self, plain: bool) -> None:
        super().__init__()
        self.first, self.second, self.plain = nn.Linear(3, 4), nn.Linear(4, 2), plain

    def forward(self, x):
        z = self.first(x)
        return self.second(z * z if self.plain else SquareNoDoubleBackward.apply(z))


def test_it_runs_where_torch_has_no_double_backward():
    torch.manual_seed(0)
    model, twin = Squared(plain=False).double(), Squared(plain=True).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.raises(WitnessError, match="second derivatives are wrong"):  # once_differentiable: silently wrong
        hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode="autograd") @ torch.ones(26).double()
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode=FD)
    product = dense_of(op)
    assert relative_error(product, autograd_hessian(twin, nn.CrossEntropyLoss(), x, y)) <= op.product_error < 1e-6
    report = op.finite_difference_report
    assert "second derivatives are likely wrong" in report.exact_failure  # the Richardson pairs decided, not it


def test_half_precision_is_refused_and_the_witness_stands_aside():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    x, y = torch.randn(4, 3).to(torch.bfloat16), torch.randint(0, 2, (4,))
    with pytest.raises(HvpFormulationError, match="bfloat16.*no derivative.*float32"):
        hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode=FD)
    model = nn.Linear(3, 2).double()
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x.double(), y)], hvp_mode=FD)
    op @ torch.ones(8, dtype=torch.float64)
    assert op.witness_report.source == "disabled" and op.hvp_tuning["single"].mode == FD


@pytest.mark.parametrize("arch", ["mlp", "layernorm", "cnn"])
def test_the_exact_trace_of_finite_differences_is_within_its_bias_bound(arch):
    """probes ≥ n: the trace of the n products, no sampling; what is left is the products' own error, which
    ``bias_bound`` must cover (measured: 4 to 300 times inside it in float32); an exact operator's is 0."""
    model, _, _, _ = build(arch)
    g = torch.Generator().manual_seed(10)
    x, y = ARCHITECTURES[arch][1](40, g), torch.randint(0, 3, (40,), generator=g)
    data = batches(x, y, [24, 16])
    truth = float(torch.trace(grid_reference_hessian(model, nn.CrossEntropyLoss(), data, per_batch=False)))
    model = model.float()
    data = [(xb.float(), yb) for xb, yb in data]
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode=FD)
    result = hessops.trace(op, probes=op.shape[0])
    assert result.method == "exact" and 0 < abs(result.estimate - truth) <= result.bias_bound
    assert result.to_dict()["bias_bound"] == result.bias_bound
    assert hessops.trace(hessops.Hessian(model, nn.CrossEntropyLoss(), data), probes=12).bias_bound == 0.0


def test_estimates_that_do_not_carry_the_error_say_so():
    model, x, y, _ = build("mlp")
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), batches(x, y, [4, 3]), hvp_mode=FD)
    with pytest.warns(InexactProductWarning, match="logdet of an operator whose products are finite differences"):
        hessops.logdet(hessops.Regularized(op, 1.0), method="dense")
    with pytest.warns(InexactProductWarning, match="a spectral density"):
        hessops.spectral_density(op, num_probes=1, lanczos_steps=5)


LOSSES = {
    "cross-entropy": lambda: nn.CrossEntropyLoss(),
    "label-smoothing": lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
    "class-weights": lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)),
    "mse": lambda: nn.MSELoss(),
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("batching", ["one", "micro-batches"])
@pytest.mark.parametrize("arch", ["mlp", "attention", "embedding"])
def test_losses_and_batchings_stay_within_the_measured_error(arch, batching, loss):
    """The grid's other axes: losses (the weights and smoothing enter the mean's divisor), micro-batches (the
    operator's own split of batches of 4 and 3 into 2, 2 and 2, 1: one of a single example), and integer inputs
    (an embedding)."""
    model, x, y, _ = build(arch)
    loss_fn = LOSSES[loss]()
    if loss == "mse":
        y = torch.randn(len(y), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sizes = {"one": [7], "micro-batches": [4, 3]}[batching]
    data = batches(x, y, sizes)
    micro = 2 if batching == "micro-batches" else None
    op = hessops.Hessian(model, loss_fn, data, hvp_mode=FD, micro_batch_size=micro)
    truth = grid_reference_hessian(model, loss_fn, data, per_batch=False)
    assert relative_error(dense_of(op), truth) <= op.product_error < 1e-6


def test_a_gpt_with_padding_and_tied_embeddings_is_within_its_error():
    """The next-token loss with padded labels (-100, ignored) in batches of uneven counted tokens, attention, LayerNorm
    and a head tied to the embedding; the truth: double backward on the module (tests/reference.py)."""
    from reference import hessian_product, next_token_loss

    from hessops.operators.losses import next_token_cross_entropy
    from hessops.zoo.lm import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=4)).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (5, 6), generator=g)
    labels = torch.where(torch.arange(6) < torch.tensor([6, 2, 4, 6, 3])[:, None], ids, -100)
    data = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    op = hessops.Hessian(model, next_token_cross_entropy, data, hvp_mode=FD)
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=g)
    truth = torch.stack([hessian_product(model, next_token_loss, data, v) for v in V.T], dim=1)
    assert relative_error(op @ V, truth) <= op.product_error < 1e-5  # measured 1.8e-6: larger third derivatives


def test_a_residual_tolerance_finite_differences_cannot_reach_is_named_in_the_warning():
    """float32 finite differences are 1e-4 to 1e-3 off: eigs' default residual tolerance (1e-4) is out of reach,
    and the warning says why and what to do, rather than blaming float32 rounding."""
    model, _, _, _ = build("mlp")
    g = torch.Generator().manual_seed(10)
    x, y = ARCHITECTURES["mlp"][1](40, g), torch.randint(0, 3, (40,), generator=g)
    op = hessops.Hessian(model.float(), nn.CrossEntropyLoss(), batches(x.float(), y, [24, 16]), hvp_mode=FD)
    with pytest.warns(RuntimeWarning, match="products are finite differences, each within .* exact hvp_mode"):
        spectrum = hessops.eigs(op, 2, "LM", tol=1e-6)
    assert not spectrum.converged
