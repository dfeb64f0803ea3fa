"""The compiled Hessian-vector product (hessops/operators/compiled.py): exact against plain double backward in
float64 (tests/reference.py), refused when torch cannot compile it, and tried by ``"auto"`` only on long runs, kept
only when it agrees and is faster.

Each new batch shape compiles (5-15 s on 2 CPU cores), so only three tests compile for real, each on one batch
shape; the rest replace the compiled function by a stand-in (the eager forward-over-reverse product, made wrong or
slow where the test needs it). Tolerance: 1e-12 relative in float64 (measured: 2e-16 to 1e-15; a wrong formulation is
percents off)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from reference import autograd_hessian, hessian_product, next_token_loss, relative_error
from torch import nn
from torch.func import grad, jvp

import hessops
from hessops.errors import HvpFormulationError, HvpFormulationWarning
from hessops.operators import compiled, hvp_tuning
from hessops.operators.losses import next_token_cross_entropy
from hessops.zoo.lm import GPT, GPTConfig

RTOL64 = 1e-12


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """A disk cache of each test's own, tuning on."""
    monkeypatch.setenv("HESSOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("HESSOPS_HVP_TUNING", raising=False)
    return tmp_path


def layernorm_mlp() -> nn.Module:
    """LayerNorm: where reverse-over-forward is wrong in torch 2.14 (docs/torch-pitfalls.md)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def inputs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_compiled_is_exact_through_layernorm_with_mse_and_compiles_once_per_shape():
    """Asked for by name: checked on the first batch, whole, then exact on single products and blocks; two batches
    of one shape compile once. LayerNorm is where reverse-over-forward is wrong in torch 2.14, and nn.MSELoss where
    eager jvp(grad) raises "ZeroTensors are immutable" (hessops' eager forward-over-reverse falls back to double
    backward there); compiled, both run and are exact."""
    model, (x, _) = layernorm_mlp(), inputs(8)
    y = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    op = hessops.Hessian(model, nn.MSELoss(), data, hvp_mode="compiled")
    dense = autograd_hessian(model, nn.MSELoss(), x, y)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert relative_error(op @ V[:, 0], dense @ V[:, 0]) < RTOL64
    assert relative_error(op @ V, dense @ V) < RTOL64
    tuning = op.hvp_tuning["single"]
    assert (tuning.mode, tuning.source, tuning.examples) == ("compiled", "explicit", 4)  # the whole batch
    assert tuning.errors["compiled"] < RTOL64
    assert compiled.stats(model)["compiles"] == 1
    alive = weakref.ref(model)  # the compiled code kept for the model does not keep it alive
    del op, model
    gc.collect()
    assert alive() is None


def rig_trial(monkeypatch, *, compile_guess: float = 0.0) -> None:
    """ "auto" tunes at its first product; the compiled trial is due at the second (``compile_guess=0``: any time
    spent covers it), or, with the default guess, once single products have taken 600 s."""
    monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_PRODUCTS", 0)
    monkeypatch.setattr(hvp_tuning, "MIN_PRODUCT_SECONDS", 0.0)
    monkeypatch.setattr(compiled, "COMPILE_SECONDS_GUESS", compile_guess)
    if compile_guess == 0.0:
        monkeypatch.setattr(hvp_tuning, "TUNING_BUDGET", 1e9)  # the tuner's own slice runs fit in it too


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=4)).double().eval()


def test_auto_keeps_the_compiled_product_on_a_gpt_when_it_wins(monkeypatch, fresh_cache):
    """A GPT (attention, LayerNorm, tied embeddings, padding labels -100): the trial's product is double backward's,
    the compiled one is kept (its timing rigged to win), later products stay exact, a second operator on the model
    uses it without a trial, and the disk keeps the measured compile for the next process."""
    rig_trial(monkeypatch)
    timed = hvp_tuning._timed
    monkeypatch.setattr(
        hvp_tuning,
        "_timed",
        lambda mode, call, device: (timed(mode, call, device)[0], 0.0 if mode == "compiled" else 1.0),
    )
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (4, 6), generator=g)
    labels = torch.where(torch.arange(6) < torch.tensor([6, 3, 6, 4])[:, None], ids, -100)
    data = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    op = hessops.Hessian(model, next_token_cross_entropy, data)
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=g)
    truth = torch.stack([hessian_product(model, next_token_loss, data, v) for v in V.T], dim=1)
    assert relative_error(op @ V[:, 0], truth[:, 0]) < RTOL64  # tuned
    assert not op.hvp_tuning["single"].compile_trial
    assert relative_error(op @ V[:, 0], truth[:, 0]) < RTOL64  # the trial's
    trial = op.hvp_tuning["single"].compile_trial
    assert trial["kept"] and trial["error"] < RTOL64 and op.hvp_tuning["single"].mode == "compiled"
    assert relative_error(op @ V[:, 1], truth[:, 1]) < RTOL64
    again = hessops.Hessian(model, next_token_cross_entropy, data)
    assert relative_error(again @ V[:, 1], truth[:, 1]) < RTOL64
    assert again.hvp_tuning["single"].source == "in-process" and not again.hvp_tuning["single"].compile_trial
    record = hvp_tuning.read_entry(op._compile_record())
    assert record == {"kept": True, "compile_seconds": trial["compile_seconds"]}  # rigged: 0 s
    assert compiled.stats(model)["compiles"] == 1 and compiled.stats(model)["compile_seconds"] > 0


def eager_stand_in(scale: float = 1.0):
    """A stand-in for compiled.run: the eager forward-over-reverse product (torch.func, no compile), times
    ``scale``."""

    def run(model, names, loss_fn, params, constants, inputs, targets, blocks):
        from hessops.operators.functional import call_model

        def batch_loss(p):
            loss = loss_fn(call_model(model, names, p, constants, inputs), targets)
            return loss, loss

        products = []
        for block in blocks:
            columns = [
                jvp(grad(batch_loss, has_aux=True), (params,), (tuple(t[c] for t in block),), has_aux=True)[1]
                for c in range(block[0].shape[0])
            ]
            products.append(tuple(scale * torch.stack(parts) for parts in zip(*columns)))
        return products, batch_loss(params)[0].detach()

    return run


def long_run(monkeypatch, stand_in, *, seconds: dict[str, float] | None = None):
    """An MLP operator under "auto" whose compiled trial is due at once, with compiled.run replaced."""
    rig_trial(monkeypatch)
    monkeypatch.setattr(compiled, "run", stand_in)
    if seconds is not None:
        timed = hvp_tuning._timed
        monkeypatch.setattr(
            hvp_tuning, "_timed", lambda mode, call, device: (timed(mode, call, device)[0], seconds.get(mode, 1.0))
        )
    model, (x, y) = layernorm_mlp(), inputs(8)
    return model, x, y, hessops.Hessian(model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])])


def test_a_wrong_compiled_product_is_set_aside_with_a_warning_and_never_tried_again(monkeypatch, fresh_cache):
    model, x, y, op = long_run(monkeypatch, eager_stand_in(1.01))
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    op @ v
    with pytest.warns(HvpFormulationWarning, match="compiled Hessian-vector product was set aside: 0.01 off"):
        product = op @ v
    assert relative_error(product, autograd_hessian(model, nn.CrossEntropyLoss(), x, y) @ v) < RTOL64
    tuning = op.hvp_tuning["single"]
    assert tuning.mode != "compiled" and tuning.compile_trial["kept"] is False
    hvp_tuning._COMPILE_TRIED.clear()  # as in a new process: the disk record says it lost
    hvp_tuning._TUNED.clear()
    again = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    again @ v
    again @ v
    assert not again.hvp_tuning["single"].compile_trial


def test_a_slower_compiled_product_is_not_kept(monkeypatch):
    model, x, y, op = long_run(monkeypatch, eager_stand_in(), seconds={"compiled": 2.0, "autograd": 1.0})
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    assert relative_error(op @ v, autograd_hessian(model, nn.CrossEntropyLoss(), x, y) @ v) < RTOL64
    trial = op.hvp_tuning["single"].compile_trial
    assert trial["kept"] is False and trial["reason"].startswith("slower than")
    assert op.hvp_tuning["single"].mode != "compiled"


def test_the_trial_waits_for_a_run_long_enough_to_repay_the_compile(monkeypatch):
    """With the default guess (60 s of compile), a few products of a tiny model never try it: 10 % of their
    time is far from it."""
    rig_trial(monkeypatch, compile_guess=compiled.COMPILE_SECONDS_GUESS)
    monkeypatch.setattr(compiled, "run", lambda *args: pytest.fail("compiled on a short run"))
    model, (x, y) = layernorm_mlp(), inputs(8)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    for _ in range(3):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert not op.hvp_tuning["single"].compile_trial


def test_due_follows_the_budget_and_the_record():
    assert compiled.due(spent=600.0, tuned=0.0, record=None)  # 10 % of 600 s covers the 60 s guess
    assert not compiled.due(spent=600.0, tuned=1.0, record=None)
    assert compiled.due(spent=100.0, tuned=0.0, record={"kept": True, "compile_seconds": 8.0})
    assert not compiled.due(spent=1e6, tuned=0.0, record={"kept": False, "compile_seconds": 8.0})
    assert compiled.expected_seconds({"kept": False, "compile_seconds": None}) == compiled.COMPILE_SECONDS_GUESS


def test_a_model_torch_cannot_compile_is_refused_by_name_and_skipped_by_auto(monkeypatch):
    """torch.compile failing (here made to) ends ``hvp_mode="compiled"`` with a refusal that names the fix; "auto"
    records the failure and goes on exactly."""

    def broken(function, **options):
        def call(*args):
            raise RuntimeError("backend compiler failed: no C++ compiler")

        return call

    monkeypatch.setattr(compiled.torch, "compile", broken)
    model, (x, y) = layernorm_mlp(), inputs(8)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], hvp_mode="compiled")
    with pytest.raises(HvpFormulationError, match="cannot be used on this model.*no C\\+\\+ compiler.*'auto'"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    compiled._COMPILED.clear()
    rig_trial(monkeypatch)
    auto = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    v = torch.randn(auto.shape[0], dtype=torch.float64)
    auto @ v
    assert relative_error(auto @ v, autograd_hessian(model, nn.CrossEntropyLoss(), x, y) @ v) < RTOL64
    assert "no C++ compiler" in auto.hvp_tuning["single"].compile_trial["reason"]
