"""The case grid: architectures × losses × input forms × batchings × formulations × operators × dtypes, each
against a plain-autograd dense reference in float64 (tests/reference.py), and against curvlinops where it
agrees with that reference.

Each axis is crossed with a fixed base of the others (MLP, cross-entropy, tensor inputs, uneven batches), and
the axes that interact (architecture × formulation, architecture × operator, loss × operator, input form ×
batching × operator) are crossed fully; the README's testing section gives the count and the run time.

Tolerances: float64, relative Frobenius error 1e-10. Operator and reference sum the same terms in other
orders (~1e-15 relative, ×10³ for the conditioning of a few small nets); any wrong weight, missing example
or wrong formulation is an error of 1e-3 or more (the wrong formulations the grid catches are 10–600 % off).
float32: 2e-4 against the float64 truth of the same weights: eps₃₂ = 1.2e-7 times the few hundred roundings of
a forward and two derivative passes, times the conditioning of these nets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from reference import autograd_hessian, relative_error
from torch import Tensor, nn

import hessops

# "compiled" and "finite-difference" have their own tests (test_compiled.py: it compiles once per batch shape, 5-15 s
# each; test_finite_difference.py: not exact, within its measured error).
EAGER_MODES = tuple(m for m in hessops.operators.hessian.HVP_MODES if m not in ("compiled", "finite-difference"))

RTOL64 = 1e-10
RTOL32 = 2e-4
N_EXAMPLES = 7
BATCHINGS = {"one": [7], "uneven": [1, 4, 2], "size1": [1] * 7}
CLASSES = 3


# -- architectures -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Self-attention over 3 tokens of width 4 (nn.MultiheadAttention), mean-pooled, then a linear head."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        mixed, _ = self.attention(x, x, x, need_weights=False)
        return self.head(torch.tanh(mixed).mean(1))


class Embedding(nn.Module):
    """Token embeddings (integer inputs), mean-pooled, then a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


class Tied(nn.Module):
    """Weight sharing: one Linear applied twice."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Unused(nn.Module):
    """A parameter the forward never touches: its Hessian rows are zero."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES))
        self.spare = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _bn(train: bool) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, CLASSES))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.train(train)


def _affine_norm(model: nn.Module) -> nn.Module:
    """Norm layers' affine parameters moved off (1, 0), so that their second derivatives are not trivial."""
    with torch.no_grad():
        for module in model.modules():
            if (
                isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))
                and module.weight is not None
            ):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def _vector(n: int, g: torch.Generator) -> Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=g)


# name -> (builder, inputs(n, generator), train mode)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], Tensor], bool]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES)), _vector, False),
    "cnn": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, CLASSES)),
        lambda n, g: torch.randn(n, 1, 6, 6, dtype=torch.float64, generator=g),
        False,
    ),
    "batchnorm-eval": (lambda: _bn(False), _vector, False),
    "batchnorm-train": (lambda: _bn(True), _vector, True),
    "layernorm": (
        lambda: _affine_norm(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, CLASSES))),
        _vector,
        False,
    ),
    "instancenorm": (
        lambda: _affine_norm(
            nn.Sequential(
                nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3, affine=True), nn.Tanh(), nn.Flatten(), nn.Linear(12, CLASSES)
            )
        ),
        lambda n, g: torch.randn(n, 2, 5, dtype=torch.float64, generator=g),
        False,
    ),
    "groupnorm": (
        lambda: _affine_norm(
            nn.Sequential(nn.Conv1d(2, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(16, CLASSES))
        ),
        lambda n, g: torch.randn(n, 2, 5, dtype=torch.float64, generator=g),
        False,
    ),
    "attention": (Attention, lambda n, g: torch.randn(n, 3, 4, dtype=torch.float64, generator=g), False),
    "embedding": (Embedding, lambda n, g: torch.randint(0, 6, (n, 3), generator=g), False),
    "tied": (Tied, _vector, False),
    "unused": (Unused, _vector, False),
}


def build(arch: str, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, bool]:
    builder, inputs, train = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = builder().double()
    model.train(train)
    g = torch.Generator().manual_seed(seed + 1)
    return model, inputs(N_EXAMPLES, g), torch.randint(0, CLASSES, (N_EXAMPLES,), generator=g), train


def batches(x, y, sizes: list[int], train: bool = False) -> list[tuple]:
    """``(x, y)`` cut into batches of ``sizes``; train-mode BatchNorm needs two examples a batch, so there the
    cut is [3, 4]."""
    sizes = [3, 4] if train else sizes
    return list(zip(x.split(sizes), y.split(sizes)))


# -- the plain-autograd references (tests/reference.py) -----------------------------------------------------
def grid_reference_hessian(model, loss_fn, data, per_batch: bool) -> Tensor:
    """The dataset-mean Hessian: on the concatenated data, or (train-mode BatchNorm, whose operator is defined
    batch by batch) the example-weighted mean of the batches' Hessians."""
    if not per_batch:
        x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
        return autograd_hessian(model, loss_fn, x, y)
    total = sum(len(b[1]) for b in data)
    return sum(len(b[1]) / total * autograd_hessian(model, loss_fn, b[0], b[1]) for b in data)


def reference(kind: str, model, loss_fn, data, per_batch: bool) -> Tensor:
    from reference import dense_empirical_fisher, dense_ggn

    if kind == "hessian":
        return grid_reference_hessian(model, loss_fn, data, per_batch)
    dense = {"ggn": dense_ggn, "ef": dense_empirical_fisher}[kind]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        if not per_batch:
            return dense(model, loss_fn, data)
        model = without_running_statistics(model)
        total = sum(len(b[1]) for b in data)
        return sum(len(b[1]) / total * dense(model, loss_fn, [b]) for b in data)


def without_running_statistics(model: nn.Module) -> nn.Module:
    """A copy whose train-mode BatchNorms keep no running statistics (torch.func forbids their in-place
    update); the output, normalized by batch statistics, is the same."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return model


OPERATORS = {"hessian": hessops.Hessian, "ggn": hessops.GGN, "ef": hessops.EmpiricalFisher}


def dense_of(op) -> Tensor:
    return op @ torch.eye(op.shape[1], dtype=op.dtype, device=op.device)


# -- architecture × formulation -----------------------------------------------------------------------------
# The refusals the grid expects, each with the words it must carry: every one is hessops refusing, at construction,
# a formulation listed in _hvp.KNOWN_WRONG for a module of the model (reverse-over-forward, measured 10-100 % off
# through these layers in torch 2.14; docs/torch-pitfalls.md). Found by running the grid: no other (architecture,
# formulation) is refused. Any other refusal fails the grid, as does an expected refusal that does not happen or
# comes for another reason (the validation's "off double backward"), so a broken formulation cannot pass as
# "refused".
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    ("batchnorm-train", "reverse-over-forward"): "is wrong through '1' (BatchNorm with batch statistics)",
    ("layernorm", "reverse-over-forward"): "is wrong through '1' (LayerNorm)",
    ("instancenorm", "reverse-over-forward"): "is wrong through '1' (InstanceNorm)",
}


@pytest.fixture
def tune_at_once(monkeypatch):
    """ "auto" validates and times at its first product, and tries every candidate."""
    from hessops.operators import hvp_tuning

    monkeypatch.setattr(hvp_tuning, "TUNE_AFTER_PRODUCTS", 0)
    monkeypatch.setattr(hvp_tuning, "MIN_PRODUCT_SECONDS", 0.0)
    monkeypatch.setattr(hvp_tuning, "budget", lambda spent: float("inf"))


def formulation_failure(arch: str, mode: str) -> str | None:
    """``None`` when ``mode`` on ``arch`` does what the grid expects (exact to RTOL64 against double backward on
    the module, or refused with the reason in :data:`EXPECTED_REFUSALS`); else what went wrong."""
    model, x, y, train = build(arch)
    data = batches(x, y, BATCHINGS["uneven"], train)
    loss_fn = nn.CrossEntropyLoss()
    expected = EXPECTED_REFUSALS.get((arch, mode))
    try:
        result = dense_of(hessops.Hessian(model, loss_fn, data, hvp_mode=mode, allow_train_mode=train))
    except hessops.HessopsError as refusal:
        if expected is None:
            return f"{mode} refused on {arch}, unexpectedly: {refusal}"
        if not isinstance(refusal, hessops.errors.HvpFormulationError) or expected not in str(refusal):
            return f"{mode} refused on {arch}, but not as expected ({expected}): {refusal!r}"
        return None
    if expected is not None:
        return f"{mode} on {arch} was expected to be refused ({expected}), and was not"
    error = relative_error(result, grid_reference_hessian(model, loss_fn, data, per_batch=train))
    return None if error < RTOL64 else f"{mode} on {arch} is {error:.2g} off double backward"


@pytest.mark.parametrize("mode", EAGER_MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_formulation_is_right_or_refused_as_expected(arch, mode, tune_at_once):
    """Exact to 1e-10 (float64) against double backward on the module, or refused exactly where
    :data:`EXPECTED_REFUSALS` says."""
    assert formulation_failure(arch, mode) is None


def _one_percent_off(monkeypatch, name: str) -> None:
    """``_hvp``'s formulation ``name`` (its function) returns products 1 % too large."""
    from hessops.operators import _hvp

    exact = getattr(_hvp, name)

    def off(*args, **kwargs):
        products, loss = exact(*args, **kwargs)
        return [tuple(1.01 * t for t in block) for block in products], loss

    monkeypatch.setattr(_hvp, name, off)


@pytest.mark.parametrize("arch", ["mlp", "embedding"])
def test_a_formulation_one_percent_off_fails_the_grid(arch, tune_at_once, monkeypatch, tmp_path):
    """reverse-over-reverse made 1 % off: asked for by name, hessops' validation refuses it (tolerance 1.5e-7,
    hvp_tuning.tolerance), which the grid counts as a failure since no refusal is expected there; with that
    validation switched off too, the grid's own comparison (1e-10) sees the 1 % error; and "auto" sets it aside
    with a warning and stays exact, so the grid passes it."""
    from hessops.operators import hvp_tuning

    monkeypatch.setenv("HESSOPS_CACHE_DIR", str(tmp_path))  # "auto" tries every candidate, none read from disk
    _one_percent_off(monkeypatch, "reverse_over_reverse")
    assert "refused" in formulation_failure(arch, "reverse-over-reverse")
    with pytest.warns(hessops.errors.HvpFormulationWarning, match="reverse-over-reverse"):
        assert formulation_failure(arch, "auto") is None
    monkeypatch.setattr(hvp_tuning, "tolerance", lambda dtype: float("inf"))
    assert "0.01 off double backward" in formulation_failure(arch, "reverse-over-reverse")


def test_an_expected_refusal_must_come_for_its_reason(tune_at_once, monkeypatch):
    """With reverse-over-forward no longer known wrong through LayerNorm, hessops' validation still refuses it
    there (it is 10-100 % off), but for another reason than the table's: the grid reports that."""
    from hessops.operators import _hvp

    monkeypatch.setattr(_hvp, "KNOWN_WRONG", {})
    assert "not as expected" in formulation_failure("layernorm", "reverse-over-forward")


# -- architecture × operator, in float64 and float32 ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gauss_newton_and_fisher_on_every_architecture(arch, kind):
    model, x, y, train = build(arch)
    if train and kind == "ef":
        pytest.skip("train-mode BatchNorm couples a batch's examples: there is no per-example gradient to compare")
    data = batches(x, y, BATCHINGS["uneven"], train)
    loss_fn = nn.CrossEntropyLoss()
    op = OPERATORS[kind](model, loss_fn, data, allow_train_mode=train)
    assert relative_error(dense_of(op), reference(kind, model, loss_fn, data, per_batch=train)) < RTOL64


FLOAT32_ARCHITECTURES = ["mlp", "cnn", "layernorm", "instancenorm", "groupnorm", "attention", "embedding"]


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("arch", FLOAT32_ARCHITECTURES)
def test_float32_operators_match_the_float64_truth(arch, kind):
    model64, x, y, _ = build(arch)
    model32 = copy.deepcopy(model64).float()
    model64 = copy.deepcopy(model32).double()  # the float32 weights, exactly, in float64
    x32 = x.float() if x.is_floating_point() else x
    data32, data64 = (
        batches(x32, y, BATCHINGS["uneven"]),
        batches(x32.double() if x.is_floating_point() else x, y, BATCHINGS["uneven"]),
    )
    op = OPERATORS[kind](model32, nn.CrossEntropyLoss(), data32)
    truth = reference(kind, model64, nn.CrossEntropyLoss(), data64, per_batch=False)
    assert relative_error(dense_of(op).double(), truth) < RTOL32


# -- architecture × batching × micro-batches ----------------------------------------------------------------------
@pytest.mark.parametrize("micro", [None, 2])
@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("arch", ["mlp", "cnn", "layernorm", "attention", "embedding"])
def test_batchings_and_micro_batches(arch, batching, micro):
    model, x, y, _ = build(arch)
    data = batches(x, y, BATCHINGS[batching])
    truth = grid_reference_hessian(model, nn.CrossEntropyLoss(), data, per_batch=False)
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), data, micro_batch_size=micro)
    assert relative_error(dense_of(op), truth) < RTOL64


# -- an independent peer ----------------------------------------------------------------------------------------------
# curvlinops 3.0.1's HessianLinearOperator (vmap over jvp of jacrev) is 5-20 % off through LayerNorm and
# InstanceNorm and cannot run GroupNorm (no forward AD of native_group_norm_backward), nor fused attention:
# docs/torch-pitfalls.md. It is compared where it agrees with the reference.
CURVLINOPS_ARCHITECTURES = ["mlp", "cnn", "batchnorm-eval", "embedding", "tied"]


@pytest.mark.parametrize("arch", CURVLINOPS_ARCHITECTURES)
def test_curvlinops_agrees(arch):
    curvlinops = pytest.importorskip("curvlinops")
    model, x, y, _ = build(arch)
    data = batches(x, y, BATCHINGS["uneven"])
    params = [p for p in model.parameters() if p.requires_grad]
    peer = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    n = sum(p.numel() for p in params)
    theirs = peer @ torch.eye(n, dtype=torch.float64)
    truth = grid_reference_hessian(model, nn.CrossEntropyLoss(), data, per_batch=False)
    assert relative_error(theirs, truth) < RTOL64
    ours = dense_of(hessops.Hessian(model, nn.CrossEntropyLoss(), data))
    assert relative_error(ours, theirs) < RTOL64


PYHESSIAN_ARCHITECTURES = [
    "mlp",
    "cnn",
    "batchnorm-eval",
    "layernorm",
    "instancenorm",
    "groupnorm",
    "attention",
    "embedding",
    "tied",
]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")  # PyHessian's own call
@pytest.mark.parametrize("arch", PYHESSIAN_ARCHITECTURES)
def test_pyhessian_agrees(arch):
    """PyHessian (double backward through .backward(create_graph=True)) against the reference and hessops."""
    pyhessian = pytest.importorskip("pyhessian")
    model, x, y, _ = build(arch)
    data = batches(x, y, BATCHINGS["uneven"])
    peer = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=data, cuda=False)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v_list = [t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in params]), params)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, theirs = peer.dataloader_hv_product(v_list)
    theirs = torch.cat([t.reshape(-1) for t in theirs]).double()
    truth = grid_reference_hessian(model, nn.CrossEntropyLoss(), data, per_batch=False) @ v
    assert relative_error(theirs, truth) < RTOL64
    assert relative_error(hessops.Hessian(model, nn.CrossEntropyLoss(), data) @ v, theirs) < RTOL64
