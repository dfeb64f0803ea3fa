"""The model zoo: architectures, exact sizes, deterministic initialization, and checkpoint loading."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from hessops.errors import CheckpointError, MissingDependencyError, UnknownModelError
from hessops.zoo.models import MODEL_NAMES, ModelSpec, build_model, load_checkpoint, make_loss, model_spec

N_PARAMS = {
    "mlp-digits": 2_410,
    "cnn-cifar-5k": 5_100,
    "cnn-mnist-1710": 1_710,
    "mlp-cifar2": 1_643_234,
    "mlp-mnist": 134_400,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet18_cifar10": 11_173_962,
    "vit-tiny-cifar": 5_362_762,
    "vit-micro-cifar": 32_554,
}
TIMM_TEST_MODEL = "timm:test_resnet"  # a 470k-parameter timm ResNet that builds in milliseconds


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def cifar_timm_resnet18(timm) -> nn.Module:
    """The architecture of the published resnet18_cifar10 weights: timm's resnet18, 10 classes, CIFAR stem."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_with_its_spec(name):
    model, spec = build_model(name), model_spec(name)
    assert isinstance(spec, ModelSpec) and spec.name == name
    assert not model.training
    assert n_params(model) == spec.n_params == N_PARAMS[name]
    assert len(spec.mean) == len(spec.std) == spec.input_shape[0]
    with torch.no_grad():
        assert model(torch.randn(2, *spec.input_shape)).shape == (2, spec.num_classes)


def test_small_architectures_are_exact():
    expected = [
        nn.Conv2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.Conv2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.Flatten,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]
    assert [type(m) for m in build_model("cnn-cifar-5k")] == expected
    mnist = build_model("mlp-mnist")
    assert [m.weight.shape for m in mnist if isinstance(m, nn.Linear)] == [
        (128, 784),
        (128, 128),
        (128, 128),
        (10, 128),
    ]
    assert all(m.bias is None for m in mnist if isinstance(m, nn.Linear))
    cifar2 = build_model("mlp-cifar2")
    assert [m.out_features for m in cifar2 if isinstance(m, nn.Linear)] == [512, 128, 32, 2]
    assert sum(isinstance(m, nn.ReLU) for m in cifar2) == 3


def test_cnn_mnist_1710_initialization_and_loss():
    model = build_model("cnn-mnist-1710")
    conv, linear = model[0], model[4]
    assert torch.count_nonzero(conv.bias) == torch.count_nonzero(linear.bias) == 0
    # 1,690 draws of N(0, 0.5²): the sample std has standard error 0.5/sqrt(2·1690) ≈ 0.009; allow 5 of them.
    assert linear.weight.std().item() == pytest.approx(0.5, abs=0.045)
    log_probs = model(torch.randn(2, 1, 28, 28))
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(2))  # LogSoftmax output
    assert isinstance(make_loss(model_spec("cnn-mnist-1710")), nn.NLLLoss)
    assert isinstance(make_loss("cnn-cifar-5k"), nn.CrossEntropyLoss)


@pytest.mark.parametrize("name", ["mlp-digits", "cnn-mnist-1710", "resnet18_cifar10"])
def test_initialization_is_a_function_of_the_seed_alone(name):
    with torch.random.fork_rng(devices=[]):  # leave the other tests' RNG as it was
        torch.manual_seed(123)
        state = torch.get_rng_state()
        a = build_model(name, seed=7)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
        torch.manual_seed(456)
        b = build_model(name, seed=7)
    assert same_parameters(a, b)
    assert not same_parameters(a, build_model(name, seed=8))


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"'resnet19'.*mlp-digits.*resnet18_cifar10.*timm:NAME"):
        build_model("resnet19")
    with pytest.raises(UnknownModelError):
        model_spec("resnet19")


def test_missing_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    for call in (build_model, model_spec):
        with pytest.raises(MissingDependencyError, match=r"pip install 'hessops\[zoo\]'") as info:
            call(TIMM_TEST_MODEL)
        assert isinstance(info.value, ImportError)
    assert n_params(build_model("mlp-digits")) == 2_410  # the rest of the zoo needs no timm


def test_timm_models_build_without_weights_and_spec_from_pretrained_cfg():
    timm = pytest.importorskip("timm")
    model, spec = build_model(TIMM_TEST_MODEL), model_spec(TIMM_TEST_MODEL)
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    assert (spec.input_shape, spec.mean, spec.std, spec.num_classes) == (
        cfg.input_size,
        cfg.mean,
        cfg.std,
        cfg.num_classes,
    )
    assert not model.training and spec.n_params is None
    assert same_parameters(model, build_model(TIMM_TEST_MODEL))
    with torch.no_grad():
        assert model(torch.randn(2, *spec.input_shape)).shape == (2, spec.num_classes)
    with pytest.raises(UnknownModelError, match="timm has no model 'resnet19x'"):
        build_model("timm:resnet19x")


def test_resnet18_cifar10_matches_timm_and_loads_its_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    reference = cifar_timm_resnet18(timm)
    ours = build_model("resnet18_cifar10")
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    assert load_checkpoint(ours, path) is ours
    assert same_parameters(ours, reference)
    # Same weights, same function: the two ResNet implementations agree to float32 rounding.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_state_dict", "module_prefix"])
def test_checkpoint_wrappers_and_data_parallel_prefix(tmp_path, wrap):
    source, target = build_model("cnn-cifar-5k", seed=1), build_model("cnn-cifar-5k", seed=2)
    state = source.state_dict()
    if wrap == "module_prefix":
        payload = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "plain":
        payload = state
    else:
        payload = {"epoch": 3, wrap: state, "optimizer": {"lr": 0.1}}
    torch.save(payload, tmp_path / "ckpt.pt")
    assert same_parameters(load_checkpoint(target, tmp_path / "ckpt.pt"), source)


def test_safetensors_checkpoint(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source, target = build_model("mlp-digits", seed=1), build_model("mlp-digits", seed=2)
    safetensors.save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    assert same_parameters(load_checkpoint(target, tmp_path / "model.safetensors"), source)


def test_checkpoint_of_another_model_is_explained(tmp_path):
    path = tmp_path / "cifar.pt"
    torch.save(build_model("resnet18_cifar10").state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_model("resnet18"), path)
    message = str(info.value)
    assert str(path) in message and "ResNet with 11,689,512 parameters" in message
    assert "3 shape mismatches: conv1.weight: checkpoint (64, 3, 3, 3) vs model (64, 3, 7, 7)" in message
    assert "fc.weight: checkpoint (10, 512) vs model (1000, 512)" in message

    torch.save(build_model("cnn-cifar-5k").state_dict(), path)
    with pytest.raises(
        CheckpointError, match=r"the checkpoint has 8; \d+ missing: conv1.weight, .*8 unexpected: 0.weight"
    ):
        load_checkpoint(build_model("resnet18_cifar10"), path)


def test_checkpoint_file_problems(tmp_path):
    model = build_model("mlp-digits")
    with pytest.raises(CheckpointError, match="nope.pt not found"):
        load_checkpoint(model, tmp_path / "nope.pt")
    torch.save(model, tmp_path / "whole.pt")  # a pickled module, not a state_dict
    with pytest.raises(CheckpointError, match=r"torch.save\(model.state_dict\(\), path\)"):
        load_checkpoint(model, tmp_path / "whole.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt is not a torch checkpoint"):
        load_checkpoint(model, tmp_path / "junk.pt")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"a dict with keys 'epoch', 'weights', not a state_dict"):
        load_checkpoint(model, tmp_path / "other.pt")
