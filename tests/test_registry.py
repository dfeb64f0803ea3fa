"""One place for each thing: the shared names (hessops.constants), the model registry (hessops.zoo) and the
table of operators by name are the objects the library itself checks against, not copies."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import hessops
from hessops import constants, data, models, spectrum, trace_estimation, volume, zoo
from hessops.operators import OPERATORS, CurvatureOperator, _hvp, hessian


def test_the_library_checks_against_the_constants_themselves():
    assert spectrum.WHICH is constants.WHICH
    assert trace_estimation.METHODS is constants.TRACE_METHODS
    assert volume.LOGDET_METHODS is constants.LOGDET_METHODS
    assert data.DATA_NAMES is constants.DATASETS
    assert hessian.HVP_MODES is constants.HVP_MODES
    assert constants.HVP_MODES == ("auto", *_hvp.FORMULATIONS)
    assert set(constants.DOWNLOADABLE) < set(constants.DATASETS)
    assert set(data.NORMALIZATION) == set(constants.DATASETS)


@pytest.mark.parametrize(
    "call, argument, name",
    [
        (lambda op, v: hessops.eigs(op, 1, which=v), "which", "WHICH"),
        (lambda op, v: hessops.trace(op, probes=4, method=v), "method", "TRACE_METHODS"),
        (lambda op, v: hessops.logdet(op, method=v), "method", "LOGDET_METHODS"),
    ],
)
def test_a_name_outside_the_constants_is_refused_with_the_choices(call, argument, name):
    op = hessops.Regularized(_ggn(), 1.0)
    with pytest.raises(hessops.InvalidArgumentError, match=f"{argument}='nope'.*{getattr(constants, name)[0]}"):
        call(op, "nope")


def test_the_model_registry_is_the_zoo():
    assert models.MODEL_NAMES == tuple(zoo.MODELS)
    for name, spec in zoo.MODELS.items():
        assert models.model_spec(name) is spec and spec.name == name
        assert spec.default_data in (*constants.DATASETS, "imagenet")
        assert spec.loss in ("cross_entropy", "nll") and spec.description
    digits = zoo.MODELS["mlp-digits"]
    assert (digits.mean, digits.std) == data.NORMALIZATION["digits"]


def test_build_model_runs_the_specs_builder(monkeypatch):
    """build_model seeds and calls spec.build, whatever the entry: a new zoo entry needs nothing else."""
    spec = zoo.ModelSpec("tiny", lambda: nn.Linear(3, 2), (3,), 2, (0.0,), (1.0,), None, "cross_entropy", 8, "a test")
    monkeypatch.setitem(zoo.MODELS, "tiny", spec)
    first, second = models.build_model("tiny", seed=3), models.build_model("tiny", seed=3)
    assert torch.equal(first.weight, second.weight) and not first.training
    assert sum(p.numel() for p in first.parameters()) == spec.n_params


def _ggn() -> hessops.GGN:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return hessops.GGN(model, nn.CrossEntropyLoss(), [(torch.randn(5, 3, dtype=torch.float64), torch.arange(5) % 2)])


def test_operators_by_name():
    assert tuple(OPERATORS) == constants.OPERATOR_NAMES
    assert OPERATORS["hessian"] is hessops.Hessian and OPERATORS["ggn"] is hessops.GGN
    assert OPERATORS["ef"] is hessops.EmpiricalFisher and OPERATORS["mcfisher"] is hessops.MCFisher
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.arange(4) % 2)]
    for name, cls in OPERATORS.items():
        op = cls(model, nn.CrossEntropyLoss(), batches)
        assert isinstance(op, CurvatureOperator) and op.shape == (8, 8), name


def test_constructors_show_every_option():
    """Each operator's signature names every option of CurvatureOperator with the same default (no **kwargs
    hiding them), and its own options besides."""
    base = inspect.signature(CurvatureOperator).parameters
    own = {"hessian": {"hvp_mode"}, "ggn": set(), "ef": set(), "mcfisher": {"samples", "seed"}}
    for name, cls in OPERATORS.items():
        parameters = inspect.signature(cls).parameters
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters.values()), name
        assert set(parameters) == set(base) | own[name], name
        for option, parameter in base.items():
            assert parameters[option].default == parameter.default, (name, option)
            assert parameters[option].kind == parameter.kind, (name, option)
