"""The Hessian-vector product formulations and their tuner (hessops/operators/_hvp.py, hvp_tuning.py),
against plain double backward in float64."""

from __future__ import annotations

import copy
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_networks import Attention

import hessops
from hessops.errors import HvpFormulationError, HvpFormulationWarning
from hessops.operators import _hvp, hvp_tuning

BUDGET = hvp_tuning.budget  # the real rule, which the fixture below lifts for most tests
# Every exact formulation but "compiled", which has its own tests (tests/operators/test_compiled.py): it compiles
# once per batch shape, 5-15 s each on 2 CPU cores, so it runs on a few models, not on every grid; and not
# "finite-difference", which is not exact (tests/operators/test_finite_difference.py checks it within its error).
EAGER_MODES = tuple(m for m in hessops.operators.hessian.HVP_MODES if m not in ("compiled", "finite-difference"))
RTOL64 = 1e-12  # float64: formulations agree with double backward to ~5e-16 on these models (measured)


class ScaledDotProduct(nn.Module):
    """F.scaled_dot_product_attention, whose default CPU kernel has no double backward."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v).mean(1))


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A tiny model (tens of parameters) and 6 inputs for it, float64, seeded."""
    torch.manual_seed(0)
    conv = lambda norm: nn.Sequential(nn.Conv1d(2, 4, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))  # noqa: E731
    dense = lambda *mid: nn.Sequential(nn.Linear(4, 5), *mid, nn.Tanh(), nn.Linear(5, 3))  # noqa: E731
    model, shape = {
        "mlp": (dense(), (6, 4)),
        "layernorm": (dense(nn.LayerNorm(5)), (6, 4)),
        "instancenorm": (conv(nn.InstanceNorm1d(4, affine=True)), (6, 2, 5)),
        "groupnorm": (conv(nn.GroupNorm(2, 4)), (6, 2, 5)),
        "batchnorm-train": (dense(nn.BatchNorm1d(5)), (6, 4)),
        "attention": (Attention().eval(), (6, 3, 4)),
        "sdpa": (ScaledDotProduct().eval(), (6, 3, 4)),
    }[name]
    return model.double(), torch.randn(*shape, dtype=torch.float64)


MODELS = ("mlp", "layernorm", "instancenorm", "groupnorm", "batchnorm-train", "attention", "sdpa")


def plain_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The obviously-correct reference: ∇²θ CE(model(x), y) row by row, torch.autograd.grad of the gradient,
    on a copy of the model (train-mode BatchNorm updates its running statistics)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    with _hvp.differentiable_kernels():  # attention's default kernels have no double backward
        return _rows(model, params, x, y)


def _rows(model: nn.Module, params: list, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)])
    rows = [
        torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True, materialize_grads=True)
        for i in range(g.numel())
    ]
    return torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test tunes afresh, with a disk cache of its own."""
    monkeypatch.setenv("HESSOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("HESSOPS_HVP_TUNING", raising=False)
    monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_PRODUCTS", 0)  # tune at the first product, ...
    monkeypatch.setattr(hvp_tuning, "MIN_PRODUCT_SECONDS", 0.0)  # ... however cheap (tiny models), ...
    monkeypatch.setattr(hvp_tuning, "budget", lambda spent: float("inf"))  # ... trying every candidate
    return tmp_path


def problem(name: str):
    model, x = build(name)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    train = name == "batchnorm-train"
    data = [(x, y)] if train else [(x[:4], y[:4]), (x[4:], y[4:])]  # batch statistics: one batch
    return model, x, y, data, {"allow_train_mode": train}


@pytest.mark.parametrize("mode", EAGER_MODES)
@pytest.mark.parametrize("name", MODELS)
def test_every_formulation_matches_double_backward_or_is_refused(name, mode):
    model, x, y, data, kwargs = problem(name)
    if _hvp.known_wrong_on(mode, model):
        with pytest.raises(HvpFormulationError, match="torch-pitfalls"):
            hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode=mode, **kwargs)
        return
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode=mode, chunk_size=2, **kwargs)
    dense = plain_hessian(model, x, y)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert relative_error(op @ V[:, 0], dense @ V[:, 0]) < RTOL64
    assert relative_error(op @ V, dense @ V) < RTOL64


@pytest.mark.parametrize("name, layer", [("layernorm", "LayerNorm"), ("instancenorm", "InstanceNorm1d")])
def test_auto_sets_aside_a_wrong_formulation_even_when_it_is_fastest(name, layer, monkeypatch):
    model, x, y, data, _ = problem(name)
    monkeypatch.setattr(_hvp, "KNOWN_WRONG", {})  # as if torch's table were unknown: validation must catch it
    timed = hvp_tuning._timed

    def rigged(mode, call, device):  # reverse-over-forward always "wins" the timing
        outcome, seconds = timed(mode, call, device)
        return outcome, 0.0 if mode == "reverse-over-forward" else seconds + 1.0

    monkeypatch.setattr(hvp_tuning, "_timed", rigged)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.warns(HvpFormulationWarning, match=f"reverse-over-forward.*{layer}") as caught:
        product = op @ v
    assert len([w for w in caught if issubclass(w.category, HvpFormulationWarning)]) == 1
    assert relative_error(product, plain_hessian(model, x, y) @ v) < RTOL64
    tuning = op.hvp_tuning["single"]
    assert tuning.mode != "reverse-over-forward" and tuning.errors["reverse-over-forward"] > 0.05


def test_explicit_formulation_known_wrong_is_refused_and_one_found_wrong_too(monkeypatch):
    model, _, _, data, _ = problem("layernorm")
    with pytest.raises(HvpFormulationError, match="reverse-over-forward.*LayerNorm"):
        hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode="reverse-over-forward")
    monkeypatch.setattr(_hvp, "KNOWN_WRONG", {})  # not in the table: its first product checks it
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, hvp_mode="reverse-over-forward")
    with pytest.raises(HvpFormulationError, match="wrong on this model.*LayerNorm"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)


class Failing(Exception):
    pass


@pytest.mark.parametrize("mode", hessops.operators.hessian.HVP_MODES)
def test_the_users_own_errors_arrive_as_themselves(mode):
    """A shape error in the model, or a loss that raises, reaches the user as itself: at construction, from
    the determinism check's forward, or (with that check off) from the first product, whatever the mode."""
    torch.manual_seed(0)
    model, x, y = (
        nn.Sequential(nn.Linear(5, 3)).double(),
        torch.randn(4, 4, dtype=torch.float64),
        torch.randint(0, 3, (4,)),
    )
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode=mode)
    assert not isinstance(caught.value, HvpFormulationError)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode=mode, check_determinism=False)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert not isinstance(caught.value, HvpFormulationError)

    class FailingLoss(nn.CrossEntropyLoss):  # a loss hessops knows, so no probe runs it at construction
        def forward(self, outputs, targets):
            raise Failing("the loss's own error")

    good = [(torch.randn(4, 5, dtype=torch.float64), y)]
    failing = hessops.Hessian(model, FailingLoss(), good, hvp_mode=mode, check_determinism=False)
    with pytest.raises(Failing, match="own error"):
        failing @ torch.randn(op.shape[0], dtype=torch.float64)


class OldStyleTanh(torch.autograd.Function):
    """A custom function without ``setup_context``: torch.func cannot run it, double backward can."""

    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2)


def test_formulations_torch_func_cannot_run_are_set_aside():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return OldStyleTanh.apply(self.linear(x))

    torch.manual_seed(0)
    model, x, y = Model().double(), torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    reference = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode="autograd-loop")
    assert relative_error(op @ V, reference @ V) < RTOL64
    assert "torch cannot run it" in op.hvp_tuning["block"].excluded["reverse-over-reverse"]


def test_forward_over_reverse_falls_back_to_double_backward_for_mse():
    torch.manual_seed(0)
    model, x, y = build("layernorm")[0], torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    op = hessops.Hessian(model, nn.MSELoss(), [(x, y)], hvp_mode="forward-over-reverse")
    reference = hessops.Hessian(model, nn.MSELoss(), [(x, y)], hvp_mode="autograd")
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    assert relative_error(op @ V, reference @ V) < RTOL64
    assert op.problem.memo["forward_fails"]  # torch 2.14: "ZeroTensors are immutable"; right either way


def test_disk_cache_round_trip_and_key(fresh_cache):
    model, x, y, data, _ = problem("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    first = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    first @ v
    assert first.hvp_tuning["single"].source == "timed"
    stored = json.loads((fresh_cache / hvp_tuning.CACHE_FILE).read_text())
    assert list(stored.values()) == [first.hvp_tuning["single"].mode]
    twin = build("mlp")[0]  # another process would build the same structure: a fresh instance stands in
    second = hessops.Hessian(twin, nn.CrossEntropyLoss(), data)
    assert relative_error(second @ v, plain_hessian(twin, x, y) @ v) < RTOL64
    tuning = second.hvp_tuning["single"]
    assert tuning.source == "disk cache" and tuning.mode == first.hvp_tuning["single"].mode
    assert tuning.runs == (1 if tuning.mode == "autograd" else 2)  # the reference, and the cached choice checked
    third = hessops.Hessian(twin, nn.CrossEntropyLoss(), data)
    third @ v
    assert third.hvp_tuning["single"].source == "in-process" and third.hvp_tuning["single"].runs == 0

    def key(model, dtype=torch.float64, kind="single"):
        names = tuple(n for n, _ in model.named_parameters())
        shapes = tuple(p.shape for p in model.parameters())
        return hvp_tuning.cache_key(model, names, shapes, torch.device("cpu"), dtype, kind)

    base = key(model)
    assert key(twin) == base
    assert key(model, dtype=torch.float32) != base and key(model, kind="block") != base
    assert key(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))) != base  # shapes
    assert key(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))) != base  # module types
    assert key(copy.deepcopy(model).train(False)) != base  # train/eval


def test_a_cached_choice_known_wrong_is_ignored(fresh_cache):
    model, x, y, data, _ = problem("layernorm")
    names = tuple(n for n, _ in model.named_parameters())
    key = hvp_tuning.cache_key(
        model, names, tuple(p.shape for p in model.parameters()), torch.device("cpu"), torch.float64, "single"
    )
    (fresh_cache / hvp_tuning.CACHE_FILE).write_text(json.dumps({key: "reverse-over-forward"}))
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert relative_error(op @ v, plain_hessian(model, x, y) @ v) < RTOL64
    assert op.hvp_tuning["single"].source == "timed" and op.hvp_tuning["single"].mode != "reverse-over-forward"


def test_tuning_work_is_a_slice():
    """Count the examples each loss evaluation sees: the tuner's runs are on TUNE_EXAMPLES examples of the
    first batch and at most TUNE_COLUMNS columns, and together hold at most two full products' examples."""
    torch.manual_seed(0)
    model, n = build("mlp")[0], 32
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    seen = []

    def loss(outputs, targets):
        seen.append(outputs.shape[0])
        return F.cross_entropy(outputs, targets)

    # the witness's own work: tests/operators/test_witness.py
    op = hessops.Hessian(model, loss, [(x, y)], witness=False)
    for columns, kind in ((1, "single"), (6, "block")):
        seen.clear()
        op @ torch.randn(op.shape[0], columns, dtype=torch.float64)
        tuning = op.hvp_tuning[kind]
        assert tuning.examples == hvp_tuning.TUNE_EXAMPLES and tuning.columns == min(columns, hvp_tuning.TUNE_COLUMNS)
        assert seen == [hvp_tuning.TUNE_EXAMPLES] * tuning.runs + [n]  # the slice runs, then the product
        assert tuning.runs <= 2 * len(hvp_tuning.CANDIDATES[kind])
        assert tuning.runs * tuning.examples <= 2 * n


def test_auto_tunes_only_once_a_run_has_shown_it_can_pay(monkeypatch):
    """By default the first TUNE_AFTER_PRODUCTS products of a kind are double backward, untuned (a short run
    pays nothing for tuning); then cheap products stay double backward and dear ones are tuned."""
    monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_PRODUCTS", 3)
    model, x, y, data, _ = problem("layernorm")
    truth = plain_hessian(model, x, y)
    v = torch.randn(truth.shape[0], dtype=torch.float64)
    for dearest, source in ((float("inf"), "cheap product"), (0.0, "timed")):
        monkeypatch.setattr(hvp_tuning, "MIN_PRODUCT_SECONDS", dearest)
        hvp_tuning._TUNED.clear()
        op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
        for _ in range(3):
            assert relative_error(op @ v, truth @ v) < RTOL64
            assert "single" not in op.hvp_tuning  # not yet: three products decide
        assert relative_error(op @ v, truth @ v) < RTOL64
        tuning = op.hvp_tuning["single"]
        assert tuning.source == source and (tuning.mode == "autograd" if source == "cheap product" else tuning.runs > 1)
        assert tuning.mode != "reverse-over-forward"  # wrong through LayerNorm, never chosen


def test_cheap_products_are_tuned_once_they_add_up(monkeypatch, fresh_cache):
    """Cheap products are double backward ("cheap product") until the run has spent TUNE_AFTER_SECONDS on them;
    then the kind is tuned like a dear one, validated on the slice against the reference, and every product
    stays exact. With the threshold out of reach they are never tuned."""
    monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_PRODUCTS", 2)
    monkeypatch.setattr(hvp_tuning, "MIN_PRODUCT_SECONDS", float("inf"))  # every product counts as cheap
    model, x, y, data, _ = problem("layernorm")
    truth = plain_hessian(model, x, y)
    V = torch.randn(truth.shape[0], 3, dtype=torch.float64)
    for threshold, source in ((float("inf"), "cheap product"), (0.0, "timed")):
        monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_SECONDS", threshold)
        hvp_tuning._TUNED.clear()
        op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
        for _ in range(4):
            assert relative_error(op @ V, truth @ V) < RTOL64
        tuning = op.hvp_tuning["block"]
        assert tuning.source == source, (threshold, tuning)
        assert tuning.mode != "reverse-over-forward"  # wrong through LayerNorm, never chosen


@pytest.mark.parametrize("product_seconds, tried", [(5.0, 1), (50.0, 2)])
def test_tuning_costs_at_most_its_budget_of_the_time_spent(product_seconds, tried, monkeypatch, fresh_cache):
    """Work counted with the clocks mocked: after two products of ``product_seconds`` each, "auto" may spend
    TUNING_BUDGET of their time on slice runs (each 0.4 s here). With 10 s spent (a 1 s budget) it runs the
    reference and one candidate (a check and a timing: 1.2 s, the one step it may overrun by) and leaves the
    other untried; with 100 s spent it tries both. A partial choice is not written to the disk cache."""
    from hessops.operators import hessian as hessian_module

    monkeypatch.setattr(hvp_tuning, "budget", BUDGET)
    monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_PRODUCTS", 2)
    clock = iter(range(0, 10**6))  # the operator's clock: each product spans two readings, product_seconds apart
    monkeypatch.setattr(hessian_module, "time", SimpleNamespace(perf_counter=lambda: next(clock) * product_seconds))
    timed = []

    def slice_run(mode, call, device):  # every slice run takes 0.4 s
        timed.append(mode)
        return call(), 0.4

    monkeypatch.setattr(hvp_tuning, "_timed", slice_run)
    model, x, y, data, _ = problem("mlp")
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    for _ in range(3):
        assert relative_error(op @ v, plain_hessian(model, x, y) @ v) < RTOL64
    tuning = op.hvp_tuning["single"]
    others = [m for m in hvp_tuning.CANDIDATES["single"] if m != "autograd"]  # none known wrong on an MLP
    assert tuning.source == "timed" and timed == ["autograd"] + [m for m in others[:tried] for _ in range(2)]
    assert tuning.runs == len(timed) and set(tuning.times) == {"autograd", *others[:tried]}
    budget, step = hvp_tuning.TUNING_BUDGET * 2 * product_seconds, 2 * 0.4
    assert 0.4 * (len(timed) - 2) < budget and 0.4 * len(timed) <= budget + step  # the last step began under it
    untried = others[tried:]
    assert all("not tried" in tuning.excluded[m] for m in untried)
    assert (fresh_cache / hvp_tuning.CACHE_FILE).exists() == (not untried)


def test_tuning_switched_off_by_name(monkeypatch):
    monkeypatch.setenv("HESSOPS_HVP_TUNING", "0")
    model, _, _, data, _ = problem("mlp")
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert op.hvp_tuning["single"].mode == "autograd" and op.hvp_tuning["single"].source == "disabled"
    assert op.hvp_tuning["single"].runs == 0


@pytest.mark.parametrize("name", ["mlp", "layernorm", "instancenorm", "attention"])
def test_float32_validation_keeps_the_correct_formulations(name):
    model, x, y, data, _ = problem(name)
    model = model.float()
    data = [(xb.float(), yb) for xb, yb in data]
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HvpFormulationWarning)
        V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(2))
        op @ V[:, 0], op @ V
    for tuning in op.hvp_tuning.values():
        # every candidate not excluded up front was measured and agreed within 10·sqrt(eps) = 3.5e-3
        assert set(tuning.errors) == set(hvp_tuning.CANDIDATES[tuning.kind]) - set(tuning.excluded)
        assert max(tuning.errors.values()) < tuning.tolerance == pytest.approx(3.45e-3, rel=1e-2)
    dense = plain_hessian(model.double(), x, y)
    assert relative_error((op @ V).double(), dense @ V.double()) < 1e-5  # float32 rounding of the sums


@pytest.mark.parametrize("name", ["layernorm", "instancenorm", "groupnorm", "mlp"])
def test_dense_hessian_is_right_through_normalization_layers(name):
    model, x, y, data, _ = problem(name)
    # 1e-12: two double-backward computations, one batched over rows, of a ~50x50 float64 Hessian
    assert (
        relative_error(
            hessops.dense_hessian(model, nn.CrossEntropyLoss(), data, chunk_size=7), plain_hessian(model, x, y)
        )
        < 1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_scalar_form_of_a_single_column_is_grad_outputs_to_rounding(dtype, monkeypatch):
    """hessops/operators/_autograd.py differentiates one column of a small problem as the scalar <∇L, v> (no sympy
    import), a large one with v as grad_outputs (no copy of v): the same products to rounding (the backward adds
    the same terms in another order: measured 9e-8 relative in float32, 1e-16 in float64)."""
    from hessops.operators import _autograd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3)).to(dtype).eval()
    x, y = torch.randn(9, 5, dtype=dtype), torch.randint(0, 3, (9,))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=dtype)
    products = {}
    for form, limit in (("scalar", 10**9), ("grad_outputs", 0)):
        monkeypatch.setattr(_autograd, "_SYMPY_USER", "not a module")  # sympy is loaded in the test process
        monkeypatch.setattr(_autograd, "SCALAR_FORM_MAX_ELEMENTS", limit)
        H = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])], hvp_mode="autograd-loop")
        products[form] = H @ V
    a, b = products["scalar"], products["grad_outputs"]
    assert float((a - b).abs().max() / b.abs().max()) < 16 * torch.finfo(dtype).eps
