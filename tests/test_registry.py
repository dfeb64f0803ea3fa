"""One place for each thing: the shared names (hessops.constants), the model registry (hessops.zoo) and the
table of operators by name are the objects the library itself checks against, not copies."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import hessops
from hessops import constants, zoo
from hessops.analysis import spectrum, volume
from hessops.analysis import trace as trace_estimation
from hessops.operators import OPERATORS, CurvatureOperator, _hvp, hessian
from hessops.zoo import data, models


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
    assert tuple(OPERATORS) == constants.OPERATOR_NAMES == tuple(constants.OPERATOR_CLASSES)
    assert all(cls.name == name for name, cls in OPERATORS.items())  # each class carries its registry key
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


TOY_OPERATOR = '''
"""A toy operator: 2 x the Gauss-Newton matrix of the squared error, J^T (2I) J, per batch."""
from torch.func import jvp, vjp

from hessops import CurvatureOperator


class DoubledGram(CurvatureOperator):
    """2 J^T J averaged over the examples (the squared error's GGN times 2)."""

    name = "doubled-gram"

    def _setup(self):
        import cola

        self.annotations = self.annotations | {cola.SelfAdjoint, cola.PSD}

    def _matmat_batch(self, batch, blocks):
        outputs, pullback = vjp(batch.outputs, batch.params)
        products = []
        for block in blocks:
            columns = []
            for c in range(block[0].shape[0]):
                _, jv = jvp(batch.outputs, (batch.params,), (tuple(t[c] for t in block),))
                columns.append(pullback(2 * jv / batch.size)[0])
            products.append(tuple(__import__("torch").stack([col[i] for col in columns]) for i in range(len(block))))
        return products, batch.loss(outputs)
'''

TOY_RUN = """
import json, sys
import hessops.constants
hessops.constants.OPERATOR_CLASSES["doubled-gram"] = "toy_operator:DoubledGram"  # the one registry line
hessops.constants.OPERATOR_NAMES = tuple(hessops.constants.OPERATOR_CLASSES)
from hessops.cli import main
status = main(["eigs", "--operator", "doubled-gram", "--model", "mlp-digits", "--num-examples", "40",
               "--dtype", "float64", "--k", "2", "--which", "LA", "--no-check", "--no-progress", "--out", sys.argv[1]])
print(json.dumps({"status": status}))
"""


def test_an_operator_is_one_module_and_one_registry_line(tmp_path):
    """docs/architecture.md's promise: a new operator (a module of its own) plus its line in
    hessops.constants.OPERATOR_CLASSES is offered by hessops.operators.OPERATORS and the command line's
    --operator, with nothing else touched. Checked in a fresh process: the top-2 of 2 x the squared error's
    Gauss-Newton matrix, against tests/reference.py's GGN (its own, not this operator's code) times 2."""
    import json
    import subprocess
    import sys

    (tmp_path / "toy_operator.py").write_text(TOY_OPERATOR)
    out = tmp_path / "eigs.json"
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(
        [sys.executable, "-c", TOY_RUN, str(out)], capture_output=True, text=True, env=env, timeout=3600
    )
    assert run.returncode == 0 and json.loads(run.stdout.strip().splitlines()[-1])["status"] == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["settings"]["operator"] == "doubled-gram"
    model = models.build_model("mlp-digits", seed=0).double()
    inputs = torch.stack([x for x, _ in data.load_dataset("digits", num_examples=40, seed=0)]).double()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def outputs(theta):
        pieces, start = [], 0
        for shape in shapes:
            pieces.append(theta[start : start + shape.numel()].reshape(shape))
            start += shape.numel()
        return torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), pieces)), (inputs,))

    jacobian = torch.autograd.functional.jacobian(outputs, flat).reshape(-1, flat.numel())  # (N·classes, n)
    exact = torch.linalg.eigvalsh(2 * jacobian.T @ jacobian / inputs.shape[0]).flip(0)[:2]
    found = torch.tensor(record["eigenvalues"], dtype=torch.float64)
    torch.testing.assert_close(found, exact, rtol=1e-8, atol=0)  # float64 products, Lanczos to its tolerance
