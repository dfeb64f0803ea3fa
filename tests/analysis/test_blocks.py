"""Per-block spectra (hessops.analysis.blocks): the automatic groups of transformers and ResNets, and each block's top
eigenvalues against the eigenvalues of the dense float64 Hessian's (or GGN's) diagonal block."""

from __future__ import annotations

import json

import pytest
import torch
from reference import as_float64, dense_ggn, reference_hessian
from torch import nn

import hessops
from hessops.analysis.blocks import block_name, find_blocks, resolve_groups
from hessops.errors import InvalidArgumentError, NoParametersError
from hessops.zoo.lm import GPT, GPTConfig


class TinyEncoder(nn.Module):
    """A transformer classifier: a linear embedding, two ``nn.TransformerEncoder`` layers (post-norm, ReLU),
    mean pooling and a linear head; 2 classes, 398 parameters."""

    def __init__(self, d_in: int = 3, d_model: int = 4, classes: int = 2):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class Basic(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """A ResNet's layout at 2 channels: stem conv and BN, ``layer1`` of two basic blocks, ``layer2`` of one,
    global pooling and a linear head (``fc``); 221 parameters."""

    def __init__(self, channels: int = 2, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(Basic(channels), Basic(channels))
        self.layer2 = nn.Sequential(Basic(channels))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layer2(self.layer1(x)).mean(dim=(2, 3)))


def encoder_problem():
    torch.manual_seed(0)
    model = TinyEncoder().double().eval()
    x, y = torch.randn(10, 5, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    return model, nn.CrossEntropyLoss(), [(x[:6], y[:6]), (x[6:], y[6:])]


def resnet_problem():
    torch.manual_seed(1)
    model = TinyResNet().double()
    for module in model.modules():  # running statistics away from (0, 1), so eval-mode BN matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    x, y = torch.randn(8, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    return model, nn.CrossEntropyLoss(), [(x, y)]


def block_slices(model: nn.Module, parameters: tuple[str, ...]) -> torch.Tensor:
    """The indices of a group's entries in the full flat parameter vector (model.parameters() order)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    return torch.cat([offsets[name] for name in parameters])


@pytest.mark.parametrize(
    "name, group",
    [
        ("blocks.3.attn.qkv.weight", "blocks.3"),  # timm ViT
        ("transformer.h.11.mlp.c_fc.bias", "transformer.h.11"),  # HuggingFace GPT-2
        ("encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0"),  # nn.TransformerEncoder
        ("layer2.1.conv1.weight", "layer2.1"),  # torchvision ResNet
        ("0.weight", "0"),  # nn.Sequential
        ("transformer.wte.weight", "transformer.wte"),  # an embedding: its module
        ("head.bias", "head"),
        ("cls_token", "cls_token"),  # a parameter of the root module
    ],
)
def test_block_name_cuts_at_the_first_integer_index(name, group):
    assert block_name(name) == group


def test_automatic_groups_of_a_transformer_and_a_resnet():
    encoder = find_blocks(encoder_problem()[0])
    assert list(encoder) == ["embed", "encoder.layers.0", "encoder.layers.1", "head"]
    assert len(encoder["encoder.layers.1"]) == 12  # in_proj, out_proj, linear1, linear2, norm1, norm2: weight, bias
    resnet = find_blocks(resnet_problem()[0])
    assert list(resnet) == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "fc"]
    assert resnet["layer1.0"] == tuple(f"layer1.0.{m}" for m in ("conv1.weight", "bn1.weight", "bn1.bias")) + tuple(
        f"layer1.0.{m}" for m in ("conv2.weight", "bn2.weight", "bn2.bias")
    )


@pytest.mark.parametrize("problem", [encoder_problem, resnet_problem], ids=["transformer", "resnet"])
def test_each_block_matches_the_dense_hessians_diagonal_block(problem):
    """Tolerance 1e-8 relative to the block's largest |λ|: float64 products, and eigs stops at residuals below
    1e-10·max|λ| (tol), so each value is within residual²/gap of an eigenvalue, far below this."""
    model, loss_fn, data = problem()
    full = reference_hessian(model, loss_fn, data)  # tests/reference.py: attention in torch's math kernel
    result = hessops.block_spectra(model, loss_fn, data, k=2, which="LA", tol=1e-10)
    assert list(result) == list(find_blocks(model))
    for name in result:
        index = block_slices(model, result.parameters[name])
        exact = torch.linalg.eigvalsh(full[index][:, index]).flip(0)
        found = result[name].values
        assert result.sizes[name] == index.numel() and found.shape == (2,)
        scale = exact.abs().max()
        assert torch.allclose(found, exact[: found.numel()], rtol=0, atol=1e-8 * float(scale)), (name, found, exact)
        assert result[name].converged and result[name].verified
    assert result.n_matvecs == sum(result[name].n_matvecs for name in result)


def test_a_timm_vits_blocks_match_the_dense_hessian_of_each_group():
    """A one-block timm ViT at 8×8 pixels (fused attention, LayerNorm, class token) in float64: its automatic
    groups, and each group's top eigenvalues against the dense Hessian of that group's parameters (tolerance
    1e-8 relative, as above)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=4,
        embed_dim=8,
        depth=1,
        num_heads=2,
        mlp_ratio=1.0,
        num_classes=3,
    )
    model = model.double().eval()
    data = [(torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    loss_fn = nn.CrossEntropyLoss()
    assert list(find_blocks(model)) == ["cls_token", "pos_embed", "patch_embed.proj", "blocks.0", "norm", "head"]
    groups = {name: [name] for name in ("pos_embed", "blocks.0", "head")}
    result = hessops.block_spectra(model, loss_fn, data, groups=groups, k=2, tol=1e-10)
    tensors = dict(model.named_parameters())
    for name in groups:
        block = reference_hessian(model, loss_fn, data, params=[tensors[p] for p in result.parameters[name]])
        exact = torch.linalg.eigvalsh(block).flip(0)[:2]
        assert torch.allclose(result[name].values, exact, rtol=0, atol=1e-8 * float(exact.abs().max())), name


def test_explicit_groups_of_tensors_and_prefixes_and_the_ggn():
    """The GGN's blocks against the dense GGN's (tests/reference.py); a group mixing a module prefix and a
    tensor, overlapping another group. Tolerance as above."""
    model, loss_fn, data = encoder_problem()
    groups = {
        "attention": ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"],
        "mlp of layer 1 and head bias": ["encoder.layers.1.linear1", model.head.bias],
        "head": model.head.weight,
    }
    resolved = resolve_groups(model, groups)
    assert resolved["mlp of layer 1 and head bias"] == (
        "encoder.layers.1.linear1.weight",
        "encoder.layers.1.linear1.bias",
        "head.bias",
    )
    result = hessops.block_spectra(model, loss_fn, data, groups=groups, k=2, operator="ggn", tol=1e-10)
    tensors = dict(model.named_parameters())
    for name in groups:
        block = dense_ggn(model, loss_fn, data, params=[tensors[p] for p in resolved[name]])
        exact = torch.linalg.eigvalsh(block).flip(0)
        assert torch.allclose(result[name].values, exact[:2], rtol=0, atol=1e-8 * float(exact.abs().max()))
    record = json.loads(json.dumps(result.to_dict()))
    assert [b["name"] for b in record["blocks"]] == list(groups) and record["operator"] == "ggn"
    assert record["blocks"][2]["n_params"] == 8 and len(record["blocks"][0]["eigenvalues"]) == 2
    assert record["n_matvecs"] == result.n_matvecs > 0 and record["seconds"] > 0


def test_a_module_names_its_trainable_parameters_as_the_automatic_block_does():
    """A LoRA-like model with frozen weights: the module's group is the automatic block (its trainable
    parameters), with the same top eigenvalue; a frozen parameter named in full is taken; a module whose
    parameters are all frozen is refused. (Frozen parameters were taken, another block with another value.)"""
    model, loss_fn, data = encoder_problem()
    layer = model.encoder.layers[0]
    layer.self_attn.in_proj_weight.requires_grad_(False)
    layer.linear1.requires_grad_(False)
    automatic = find_blocks(model)["encoder.layers.0"]
    assert resolve_groups(model, {"layer 0": "encoder.layers.0"}) == {"layer 0": automatic}
    assert "encoder.layers.0.self_attn.in_proj_weight" not in automatic
    named = resolve_groups(model, {"g": ["encoder.layers.0.self_attn.in_proj_weight"]})
    assert named == {"g": ("encoder.layers.0.self_attn.in_proj_weight",)}
    explicit = hessops.block_spectra(model, loss_fn, data, groups={"layer 0": ["encoder.layers.0"]}, tol=1e-10)
    found = hessops.block_spectra(model, loss_fn, data, tol=1e-10)
    assert explicit.sizes["layer 0"] == found.sizes["encoder.layers.0"]
    assert torch.allclose(explicit["layer 0"].values, found["encoder.layers.0"].values, rtol=1e-8, atol=0)
    with pytest.raises(InvalidArgumentError, match="every parameter under 'encoder.layers.0.linear1' is frozen"):
        resolve_groups(model, {"g": ["encoder.layers.0.linear1"]})


def test_a_tied_modules_name_takes_the_shared_parameter():
    """GPT-2's lm_head is a module whose weight is wte.weight: named by either path, the group is that
    parameter, under the name named_parameters() gives it (it was refused as naming nothing)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=4)).double().eval()
    groups = {"head": ["lm_head"], "weight": "lm_head.weight", "both": ["wte", "lm_head"]}
    assert resolve_groups(model, groups) == {
        "head": ("wte.weight",),
        "weight": ("wte.weight",),
        "both": ("wte.weight",),
    }


def test_a_block_smaller_than_k_gets_all_its_eigenvalues():
    model, loss_fn, data = encoder_problem()
    result = hessops.block_spectra(model, loss_fn, data, groups={"head bias": [model.head.bias]}, k=5)
    assert result["head bias"].values.shape == (2,)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"groups": {"g": ["decoder"]}}, InvalidArgumentError, "'decoder' names no parameter or module"),
        ({"groups": {"g": [torch.zeros(3)]}}, InvalidArgumentError, "is not a parameter of the model"),
        ({"groups": {"g": []}}, InvalidArgumentError, "groups['g'] is empty"),
        ({"groups": {}}, InvalidArgumentError, "pass a non-empty dict"),
        ({"groups": {1: ["head"]}}, InvalidArgumentError, "is not a string"),
        ({"k": 0}, InvalidArgumentError, "k=0 must be at least 1"),
        ({"which": "largest"}, InvalidArgumentError, "which='largest': choose one of"),
        ({"operator": "fisher"}, InvalidArgumentError, "operator='fisher': choose one of"),
        ({"max_iters": 1, "k": 2}, InvalidArgumentError, "max_iters=1 must be at least 2"),
        ({"operator_options": {"params": []}}, InvalidArgumentError, "use groups="),
        ({"operator_options": {"hvp": "autograd"}}, InvalidArgumentError, "Hessian takes no 'hvp': pass some of"),
    ],
)
def test_bad_arguments_are_refused_before_any_product(kwargs, error, message):
    model, loss_fn, data = encoder_problem()
    with pytest.raises(error) as caught:
        hessops.block_spectra(model, loss_fn, data, **kwargs)
    assert message in str(caught.value)


def test_a_frozen_model_is_refused():
    model, loss_fn, data = encoder_problem()
    model.requires_grad_(False)
    with pytest.raises(NoParametersError, match="no trainable parameters"):
        hessops.block_spectra(model, loss_fn, data)


def test_the_command_writes_each_blocks_exact_values_and_a_figure(tmp_path, capsys):
    """`hessops blocks` in float64 on mlp-digits (Linear layers "1" and "3") with two explicit groups, the
    output layer and the hidden biases: each block's values against the dense Hessian of that group's
    parameters, read back from --out (tolerance 1e-8 relative: as above); --plot draws a figure. In-process
    (tests/cli/test_cli.py says why)."""
    from hessops.cli import main
    from hessops.zoo.data import load_dataset, make_loader
    from hessops.zoo.models import build_model, make_loss, model_spec

    out, plot = tmp_path / "blocks.json", tmp_path / "blocks.png"
    args = ["blocks", "--num-examples", "64", "--k", "2", "--dtype", "float64", "--tol", "1e-10", "--no-progress"]
    assert main([*args, "--group", "output=3", "--group", "biases=1.bias", "--out", str(out), "--plot", str(plot)]) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "blocks" and record["settings"]["groups"] == {"output": ["3"], "biases": ["1.bias"]}
    assert plot.stat().st_size > 10_000  # a drawn figure; an empty canvas is about 3 kB
    model = build_model("mlp-digits", seed=0).double()
    data = make_loader(load_dataset("digits", num_examples=64, seed=0), batch_size=128)
    tensors = dict(model.named_parameters())
    assert [b["name"] for b in record["blocks"]] == ["output", "biases"]
    for block in record["blocks"]:
        params = [tensors[name] for name in block["parameters"]]
        full = reference_hessian(model, make_loss(model_spec("mlp-digits")), as_float64(data), params=params)
        exact = torch.linalg.eigvalsh(full).flip(0)[:2]
        found = torch.tensor(block["eigenvalues"], dtype=torch.float64)
        assert block["n_params"] == full.shape[0] and block["converged"]
        assert torch.allclose(found, exact, rtol=0, atol=1e-8 * float(exact.abs().max())), (block["name"], exact)
    assert "biases" in capsys.readouterr().out


def test_the_command_refuses_a_group_the_model_lacks_in_one_line(capsys):
    from hessops.cli import main
    from hessops.cli.app import EXIT_USAGE

    status = main(["blocks", "--num-examples", "8", "--group", "attention=encoder", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USAGE and len(err) == 1 and "'encoder' names no parameter or module" in err[0], err


def test_plot_block_spectra_puts_the_blocks_on_the_x_axis(tmp_path):
    """One line per eigenvalue index across the blocks, the blocks named in order on the x-axis, a gap where a
    block has fewer values, a log scale when all are positive over more than a decade; a result draws as its
    values do."""
    from matplotlib.figure import Figure

    from hessops.plot import plot_block_spectra

    values = {"embed": [5.0, 1.0], "layers.0": [40.0, 3.0], "layers.1": [30.0, 2.0], "head": [0.5]}
    ax = Figure().subplots()
    plot_block_spectra(values, tmp_path / "blocks.png", ax=ax)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(values)
    first, second = (line.get_ydata() for line in ax.get_lines())
    assert list(first) == [5.0, 40.0, 30.0, 0.5] and list(second[:3]) == [1.0, 3.0, 2.0] and second[3] != second[3]
    assert ax.get_yscale() == "log" and (tmp_path / "blocks.png").stat().st_size > 10_000
    signed = Figure().subplots()
    plot_block_spectra({"a": [2.0, -1.0], "b": [3.0, 1.0]}, ax=signed)
    assert signed.get_yscale() == "linear"
    model, loss_fn, data = encoder_problem()
    result = hessops.block_spectra(model, loss_fn, data, groups={"head": ["head"], "embed": ["embed"]}, k=2)
    drawn = Figure().subplots()
    plot_block_spectra(result, ax=drawn)
    assert list(drawn.get_lines()[0].get_ydata()) == [float(result[name].values[0]) for name in ("head", "embed")]
    with pytest.raises(ValueError, match="no blocks to draw"):
        plot_block_spectra({})
