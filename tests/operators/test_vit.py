"""Vision transformers and torch.nn attention: every operator exact in float64 against the dense references,
the switch to differentiable attention kernels said once, and the user's kernel settings left as they were.

Tolerance: relative error 1e-10 in float64, as in tests/operators/test_operators.py (operator and reference sum the
same terms in other orders, ~1e-15; a kernel without second derivatives fails outright, and a wrong term is
off by far more). The Monte-Carlo Fisher is a sample mean: 2048 labels per example put it within ~2 % of its
expectation, the GGN, on these models (measured with 1024: 0.1-2.9 % over four seeds); 5 % is the bound.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from reference import dense_empirical_fisher, dense_ggn, reference_hessian, relative_error
from torch import nn

import hessops
from hessops.errors import AttentionKernelWarning
from hessops.operators import functional as _functional

timm = pytest.importorskip("timm")

RTOL64 = 1e-10


def tiny_vit() -> nn.Module:
    """timm's ViT at 4×4 grey inputs, 2×2 patches, width 4, one block: 198 parameters, fused attention on."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=4,
        patch_size=2,
        in_chans=1,
        embed_dim=4,
        depth=1,
        num_heads=2,
        mlp_ratio=1.0,
        num_classes=2,
    )
    return model.double().eval()


def tiny_encoder() -> nn.Module:
    """An nn.TransformerEncoderLayer (nn.MultiheadAttention inside) and a linear head on 3 tokens of width 4:
    162 parameters."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, 4, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    return nn.Sequential(encoder, nn.Flatten(), nn.Linear(3 * 4, 2)).double().eval()


def batches(shape: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 2, (6,), generator=generator)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


CASES = {"timm-vit": (tiny_vit, (1, 4, 4)), "nn-transformer": (tiny_encoder, (3, 4))}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, shape = CASES[request.param]
    model, data = build(), batches(shape)
    return model, nn.CrossEntropyLoss(), data, reference_hessian(model, nn.CrossEntropyLoss(), data)


def probes(n: int) -> torch.Tensor:
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def test_fused_attention_is_on_in_the_models_as_built():
    """The premise: left alone, these models run attention in kernels without a double backward."""
    assert tiny_vit().blocks[0].attn.fused_attn
    assert _functional.fused_attention(tiny_encoder())
    model, data = tiny_vit(), batches((1, 4, 4))
    x, y = data[0]
    params = [p for p in model.parameters()]
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), params[:1])


def test_dense_hessian_is_plain_double_backward(case):
    """hessops.operators.dense (batched, in differentiable kernels) = tests/reference.py's row-by-row double backward
    on the module, on the whole dataset at once (the case's reference)."""
    model, loss, data, hessian = case
    result = hessops.dense_hessian(model, loss, data)
    assert relative_error(result, hessian) < RTOL64
    assert relative_error(result, result.T) < RTOL64


@pytest.mark.parametrize("hvp_mode", ["auto", "autograd", "forward-over-reverse", "reverse-over-reverse"])
def test_hessian_is_exact(case, hvp_mode):
    model, loss, data, hessian = case
    V = probes(hessian.shape[0])
    assert relative_error(hessops.Hessian(model, loss, data, hvp_mode=hvp_mode) @ V, hessian @ V) < RTOL64


def test_ggn_and_fishers_are_exact(case):
    """The GGN and the empirical Fisher on the ViT are exact (1e-10, float64); MCFisher only near the GGN."""
    model, loss, data, hessian = case
    V = probes(hessian.shape[0])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # its jacrev's vmap: no fast rule
        ggn = dense_ggn(model, loss, data)  # for the fused kernel's backward, and slow on it
    assert relative_error(hessops.GGN(model, loss, data) @ V, ggn @ V) < RTOL64
    ef = dense_empirical_fisher(model, loss, data)
    assert relative_error(hessops.EmpiricalFisher(model, loss, data) @ V, ef @ V) < RTOL64
    # MCFisher only runs on the ViT near the GGN (its Monte-Carlo error ~2 %; a 10 % bias would pass): its
    # exactness is tests/operators/test_mcfisher.py's
    assert relative_error(hessops.MCFisher(model, loss, data, samples=2048) @ V, ggn @ V) < 0.05


def test_the_switch_is_said_once_per_process(monkeypatch):
    monkeypatch.setattr(_functional, "_ATTENTION_SAID", [])
    data = batches((1, 4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hessops.Hessian(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double(), nn.CrossEntropyLoss(), data)
        assert not caught  # no attention, nothing to say
        for _ in range(2):
            hessops.GGN(tiny_vit(), nn.CrossEntropyLoss(), data)
        hessops.Hessian(tiny_encoder(), nn.CrossEntropyLoss(), batches((3, 4)))
    said = [w for w in caught if issubclass(w.category, AttentionKernelWarning)]
    assert len(said) == 1
    assert "'blocks.0.attn' (Attention)" in str(said[0].message)
    assert "math attention kernel" in str(said[0].message)


def kernel_settings() -> dict[str, bool]:
    """The attention settings a user can change: the MHA fast path and which SDPA kernels are enabled."""
    return {
        "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
    }


SETTERS = {
    "mha_fastpath": torch.backends.mha.set_fastpath_enabled,
    "flash": torch.backends.cuda.enable_flash_sdp,
    "mem_efficient": torch.backends.cuda.enable_mem_efficient_sdp,
    "math": torch.backends.cuda.enable_math_sdp,
    "cudnn": torch.backends.cuda.enable_cudnn_sdp,
}


USERS = {
    "torch-defaults": dict.fromkeys(SETTERS, True),
    "math-off": {"mha_fastpath": False, "flash": True, "mem_efficient": True, "math": False, "cudnn": False},
}


@pytest.mark.parametrize("user", list(USERS))
def test_the_users_kernel_settings_are_restored(user):
    """After each product, and after a product that raises, the settings are the user's, whatever they were
    (even the math kernel disabled, which the products need)."""
    saved = kernel_settings()
    model, data = tiny_encoder(), batches((3, 4))
    try:
        for name, setter in SETTERS.items():
            setter(USERS[user][name])
        wanted = kernel_settings()
        assert wanted == USERS[user]
        V = probes(sum(p.numel() for p in model.parameters()))
        for operator in (hessops.Hessian, hessops.GGN, hessops.EmpiricalFisher, hessops.MCFisher):
            operator(model, nn.CrossEntropyLoss(), data) @ V
            assert kernel_settings() == wanted, operator.__name__
        hessops.dense_hessian(model, nn.CrossEntropyLoss(), data[:1])
        assert kernel_settings() == wanted

        def failing(outputs, targets):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            hessops.Hessian(model, failing, data, check_determinism=False) @ V
        assert kernel_settings() == wanted
    finally:
        for name, setter in SETTERS.items():
            setter(saved[name])


@pytest.mark.parametrize("name", ["vit-tiny-cifar", "vit-micro-cifar"])
def test_zoo_vits_have_fused_attention(name):
    """Sizes and inputs are tests/zoo/test_models.py's; here: products on them switch kernels (and say so)."""
    from hessops.zoo.models import build_model

    assert _functional.fused_attention(build_model(name))


def test_timm_sizes_reach_create_model_and_the_spec():
    from hessops.zoo.models import build_model, model_spec

    options = {"img_size": 32, "patch_size": 4, "num_classes": 10}
    spec = model_spec("timm:vit_tiny_patch16_224", options=options)
    assert (spec.input_shape, spec.num_classes) == ((3, 32, 32), 10)
    model = build_model("timm:vit_tiny_patch16_224", options=options)
    reference = build_model("vit-tiny-cifar")  # the zoo entry is these sizes, drawn from the same seed
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("vit-tiny-cifar", {"patch_size": 8}, "are for timm:NAME models"),
        ("timm:vit_tiny_patch16_224", {"depth": 2}, "not sizes hessops passes to timm"),
        ("timm:vit_tiny_patch16_224", {"img_size": 0}, "must be a positive int"),
        ("timm:resnet18", {"patch_size": 4}, "timm cannot build resnet18 with {'patch_size': 4}"),
    ],
)
def test_bad_timm_sizes_are_refused(name, options, message):
    from hessops.errors import InvalidArgumentError
    from hessops.zoo.models import build_model

    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        build_model(name, options=options)


def test_cli_passes_timm_sizes():
    from hessops.cli import app as cli
    from hessops.cli.options import timm_options

    args = cli.build_parser().parse_args(
        ["eigs", "--model", "timm:vit_tiny_patch16_224", "--data", "cifar10", "--img-size", "32", "--patch-size", "4"]
    )
    assert cli.check(args) is None
    assert timm_options(args) == {"img_size": 32, "patch_size": 4}
