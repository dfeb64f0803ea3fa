"""Eigenvectors on disk and loss-landscape slices: the slice against the dataset loss computed directly, the
exact parabola along eigenvectors of a quadratic loss, filter normalization filter by filter, the model left bit
for bit as it was (also after an error or Ctrl-C), the save/load round trip, bad input, the figure and the CLI."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from reference import reference_hessian
from torch import nn

import hessops
from hessops._cola import cola
from hessops.cli import main
from hessops.errors import (
    EigenvectorsFileError,
    EmptyDataError,
    InvalidArgumentError,
    NonFiniteLossError,
    TrainModeError,
)
from hessops.plot import plot_landscape
from hessops.zoo.data import load_dataset, make_loader
from hessops.zoo.models import build_model, make_loss, model_spec

SIZES = [7, 13, 20]  # unequal batches: an unweighted mean of batch means would differ from the dataset mean


def batches(x, y, sizes=SIZES):
    return list(zip(x.split(sizes), y.split(sizes)))


def snapshot(model: nn.Module) -> dict:
    return {name: (t, t.detach().clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}


def unchanged(model: nn.Module, before: dict) -> bool:
    """The same tensor objects, holding the same bits."""
    now = dict([*model.named_parameters(), *model.named_buffers()])
    return now.keys() == before.keys() and all(
        now[name] is tensor and torch.equal(tensor, copy) for name, (tensor, copy) in before.items()
    )


@pytest.fixture(scope="module")
def regression():
    """Linear regression under the mean squared error: the loss is exactly quadratic, H = 2/N·X̃ᵀX̃ (X̃ with a
    column of ones for the bias), constant; float64 so that rounding stays near 1e-15."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 2.0, 0.2]).double()
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Linear(5, 1).double()
    return model, x, y


def test_slice_at_zero_is_the_dataset_loss_weighted_by_counted_targets():
    """Cross-entropy with ignored targets over unequal batches: the dataset loss is the mean over counted targets
    (what the operators differentiate), not the mean of batch means; the accuracy is over counted targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    y[::5] = -100  # ignored
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits, y, ignore_index=-100)
    counted = y != -100
    accuracy = float((logits.argmax(1)[counted] == y[counted]).double().mean())
    for points in (5, 4):  # odd: θ is a grid point; even: evaluated beside the grid
        s = hessops.loss_landscape(model, loss_fn, batches(x, y), "random", dims=2, points=points, span=0.5)
        # summation order differs from one full-batch call: rounding, ~1e-16 relative
        assert s.center_loss == pytest.approx(float(expected), rel=1e-13)
        assert s.center_accuracy == pytest.approx(accuracy, abs=1e-15)
        assert s.loss.shape == (points, points) and s.accuracy.shape == (points, points)
        assert s.n_examples == 40 and s.n_points == points * points + (points % 2 == 0)
    assert s.coordinates[0][0] == -0.5 and s.coordinates[0][-1] == 0.5
    odd = hessops.loss_landscape(model, loss_fn, batches(x, y), "random", dims=1, points=5, span=0.5)
    assert odd.coordinates[0][2] == 0.0 and odd.loss[2] == odd.center_loss  # the very same evaluation
    assert odd.loss.max() > odd.center_loss  # the random line does move the loss
    assert odd.n_passes == 2  # θ, then the other 4 points in one pass over the data


def test_points_share_passes_over_the_data_without_changing_a_bit():
    """Each batch is evaluated at every point of a pass: the same numbers as one pass per point."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = batches(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    passes = [
        hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, dims=2, points=4, points_per_pass=per_pass)
        for per_pass in (1, 5, None)
    ]
    assert [s.n_passes for s in passes] == [1 + 16, 1 + 4, 1 + 1] and all(s.n_points == 17 for s in passes)
    for s in passes[1:]:
        assert torch.equal(s.loss, passes[0].loss) and torch.equal(s.accuracy, passes[0].accuracy)


@pytest.mark.parametrize("dims", [1, 2])
def test_along_eigenvectors_of_a_quadratic_loss_the_slice_is_the_exact_parabola(tmp_path, regression, dims):
    """L(θ + a·v₁ + b·v₂) = L₀ + a·gᵀv₁ + b·gᵀv₂ + ½λ₁a² + ½λ₂b² for a quadratic loss and eigenvectors v (the
    cross term vᵀ₁Hv₂ vanishes). The eigenpairs go through eigs, save and load; λ is checked against the dense
    Hessian's eigenvalues and g is the autograd gradient. Tolerance 1e-9 relative: float64 rounding (~1e-14 here)
    and the eigenvectors' error (residuals ≤ 1e-12 · λ_max, entering quadratically) are far below it."""
    model, x, y = regression
    data = batches(x, y)
    H = hessops.Hessian(model, nn.MSELoss(), data)
    spectrum = hessops.eigs(H, 2, "LA", tol=1e-12)
    path = spectrum.save_vectors(tmp_path / "vectors.pt", H)
    loaded = hessops.load_eigenvectors(path)
    exact = torch.linalg.eigvalsh(reference_hessian(model, nn.MSELoss(), data)).flip(0)[:2]
    assert torch.allclose(loaded.values, exact, rtol=1e-10)

    s = hessops.loss_landscape(model, nn.MSELoss(), data, loaded, dims=dims, span=(3.0, 2.0)[:dims], points=7)
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    loss0 = F.mse_loss(torch.func.functional_call(model, dict(zip(["weight", "bias"], theta)), (x,)), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss0, theta)])
    slopes = grad @ loaded.flat()[:, :dims]
    grids = torch.meshgrid(*s.coordinates, indexing="ij")
    parabola = float(loss0.detach()) + sum(
        slopes[i] * grids[i] + 0.5 * loaded.values[i] * grids[i] ** 2 for i in range(dims)
    )
    assert s.directions == "eigen" and s.eigenvalues == loaded.values[:dims].tolist()
    assert s.direction_norms == pytest.approx([1.0] * dims, rel=1e-12)  # unit eigenvectors
    assert torch.allclose(s.loss, parabola, rtol=1e-9, atol=0)
    # the same slice from the Spectrum itself (flat vectors in the operator's layout)
    direct = hessops.loss_landscape(model, nn.MSELoss(), data, spectrum, dims=dims, span=(3.0, 2.0)[:dims], points=7)
    assert torch.equal(direct.loss, s.loss)


def test_filter_normalized_directions_match_each_filters_norm_and_leave_1d_parameters_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).eval()
    direction = hessops.filter_normalized_direction(model, seed=3)
    params = dict(model.named_parameters())
    assert direction.keys() == params.keys()
    for name, d in direction.items():
        p = params[name].detach()
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.dim() <= 1:  # the convolution's and the linear layer's biases, BatchNorm's scale and shift
            assert not d.any(), name
            continue
        filters = (d.reshape(len(d), -1).norm(dim=1), p.reshape(len(p), -1).norm(dim=1))
        assert torch.allclose(*filters, rtol=1e-5), name  # float32 rounding of a norm of ≤ 64 entries
        assert not torch.allclose(d / d.norm(), p / p.norm())  # a random direction, not the weights
    again, other = hessops.filter_normalized_direction(model, seed=3), hessops.filter_normalized_direction(model)
    assert all(torch.equal(again[n], direction[n]) for n in direction)
    assert not torch.equal(other["0.weight"], direction["0.weight"])


class Interrupted(nn.Module):
    """A network whose ``calls``-th forward raises ``error`` (an error or Ctrl-C in the middle of a slice)."""

    def __init__(self, calls: int, error: BaseException) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).eval()
        self.calls, self.error, self.count = calls, error, 0

    def forward(self, x):
        self.count += 1
        if self.count == self.calls:
            raise self.error
        return self.net(x)


@pytest.mark.parametrize(
    "error", [None, KeyboardInterrupt(), RuntimeError("out of memory")], ids=["complete", "ctrl-c", "error"]
)
def test_the_model_is_left_bit_for_bit_as_it_was(error):
    torch.manual_seed(0)
    model = Interrupted(calls=10 if error is not None else 0, error=error).eval()
    model.net[1].running_mean.normal_()  # statistics that a train-mode pass would change
    data = batches(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    before = snapshot(model)
    if error is None:
        s = hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, dims=2, points=3, span=2.0)
        assert bool((s.loss != s.center_loss).any())
    else:
        with pytest.raises(type(error)):
            hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, dims=2, points=3, span=2.0)
        assert model.count == 10
    assert unchanged(model, before)
    assert model.training is False and all(not m.training for m in model.modules())


def test_save_load_round_trip_is_parameter_shaped(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = batches(torch.randn(20, 3), torch.randint(0, 2, (20,)), [8, 12])
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), data, dtype=torch.float64)
    spectrum = hessops.eigs(H, 3)
    path = hessops.save_eigenvectors(tmp_path / "sub" / "v.pt", spectrum, hessops.Regularized(H, 0.5))
    loaded = hessops.load_eigenvectors(path)
    assert torch.equal(loaded.values, spectrum.values) and torch.equal(loaded.flat(), spectrum.vectors)
    assert torch.equal(loaded.residuals, spectrum.residuals) and (loaded.which, loaded.operator) == (
        "LM",
        "Regularized",
    )
    assert loaded.names == ("0.weight", "0.bias", "2.weight", "2.bias") and len(loaded) == 3
    dicts = loaded.as_dicts()
    for j, d in enumerate(dicts):
        assert {n: t.shape for n, t in d.items()} == {n: p.shape for n, p in model.named_parameters()}
        assert torch.equal(torch.cat([t.reshape(-1) for t in d.values()]), spectrum.vectors[:, j])
    raw = torch.load(path, weights_only=True)  # plain tensors and strings: no pickled code
    assert raw["format"] == "hessops.eigenvectors" and raw["version"] == 1
    # the dicts drive a slice like the Spectrum does
    a = hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, dicts[:2], points=3)
    b = hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, spectrum, points=3)
    assert torch.allclose(a.loss, b.loss, rtol=1e-6)  # the float32 model: casts of the same float64 vectors

    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(EigenvectorsFileError, match="state_dict.*not hessops eigenvectors"):
        hessops.load_eigenvectors(tmp_path / "state.pt")
    torch.save({**raw, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(EigenvectorsFileError, match="format version 99.*reads version 1"):
        hessops.load_eigenvectors(tmp_path / "future.pt")
    (tmp_path / "text.pt").write_text("not a tensor file")
    with pytest.raises(EigenvectorsFileError, match="torch.load"):
        hessops.load_eigenvectors(tmp_path / "text.pt")
    with pytest.raises(EigenvectorsFileError, match="no such file"):
        hessops.load_eigenvectors(tmp_path / "missing.pt")
    with pytest.raises(InvalidArgumentError, match="parameter layout"):
        hessops.save_eigenvectors(tmp_path / "x.pt", spectrum, cola.ops.Dense(torch.eye(26)))
    with torch.no_grad():
        model[2].bias.add_(1e-3)  # another point: a forgotten checkpoint
    with pytest.warns(RuntimeWarning, match="other parameter values than the model's.*2.bias"):
        hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, loaded, points=2)
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(InvalidArgumentError, match="0.weight has shape"):
        hessops.loss_landscape(other, nn.CrossEntropyLoss(), data, loaded)


def test_bad_input_is_refused_as_the_operators_refuse_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    data = batches(torch.randn(10, 3), torch.randint(0, 2, (10,)), [4, 6])
    with pytest.raises(TrainModeError, match="model.eval"):
        hessops.loss_landscape(model, nn.CrossEntropyLoss(), data)
    model.eval()
    with pytest.raises(EmptyDataError):
        hessops.loss_landscape(model, nn.CrossEntropyLoss(), [])
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessops.loss_landscape(model, nn.CrossEntropyLoss(), iter(data))
    nan = [(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(NonFiniteLossError, match="loss at the model's parameters is nan"):
        hessops.loss_landscape(model, nn.CrossEntropyLoss(), nan)
    for kwargs, message in [
        ({"dims": 3}, "dims=3 must be at most 2"),
        ({"points": 1}, "points=1 must be at least 2"),
        ({"span": 0.0}, "span=0 must be positive"),
        ({"span": (1.0, 2.0, 3.0)}, "one per axis"),
        ({"points_per_pass": 0}, "points_per_pass=0 must be at least 1"),
        ({"directions": "eigen"}, "pass 'random'"),
        ({"directions": torch.ones(5)}, "the parameters they move have 26 entries"),
        ({"directions": torch.ones(26, 3)}, "3 directions given"),
        ({"directions": {"nope": torch.ones(2)}}, "not parameters of the model"),
        ({"directions": torch.full((26,), float("nan"))}, "NaN or inf"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, **kwargs)
    spectrum = hessops.eigs(hessops.Hessian(model, nn.CrossEntropyLoss(), data), 1)
    with pytest.raises(InvalidArgumentError, match="dims=2 needs 2 eigenvectors; the Spectrum holds 1"):
        hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, spectrum, dims=2)


def test_overflow_far_away_is_kept_and_said():
    model = nn.Linear(2, 1)
    data = [(torch.ones(4, 2), torch.zeros(4, 1))]
    with pytest.warns(RuntimeWarning, match="NaN or infinite at 2 of 3 points"):
        s = hessops.loss_landscape(model, nn.MSELoss(), data, torch.ones(3), points=3, span=1e30)
    assert torch.isinf(s.loss[[0, 2]]).all() and torch.isfinite(s.loss[1]) and s.accuracy is None
    assert s.to_dict()["accuracy"] is None


def test_plot_landscape_draws_a_line_with_accuracy_and_a_plane_with_contours(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = batches(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    line = hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, dims=1, points=9)
    plot_landscape(line.to_dict(), tmp_path / "line.png")  # the JSON form draws too
    assert (tmp_path / "line.png").stat().st_size > 10_000
    fig, ax = plt.subplots()
    plot_landscape(line, ax=ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "the parameters", "accuracy"]
    plt.close(fig)
    plane = hessops.loss_landscape(model, nn.CrossEntropyLoss(), data, dims=2, points=9, span=3.0)
    fig, ax = plt.subplots()
    assert plot_landscape(plane, ax=ax, title="plane") is fig and plt.fignum_exists(fig.number)  # left open
    assert ax.get_title() == "plane" and ax.get_xlabel() == "random filter-normalized direction 1"
    assert len(fig.axes) == 2  # the contours and their colour bar
    plt.close(fig)


def test_cli_eigs_save_vectors_then_landscape_along_them(tmp_path, capsys):
    vectors, out, plot = tmp_path / "v.pt", tmp_path / "landscape.json", tmp_path / "landscape.png"
    common = ["--num-examples", "120", "--no-progress"]
    assert main(["eigs", "--k", "2", "--which", "LA", "--save-vectors", str(vectors), *common]) == 0
    saved = hessops.load_eigenvectors(vectors)
    assert saved.names == tuple(n for n, _ in build_model("mlp-digits").named_parameters())
    args = ["landscape", "--directions", "eigen", "--vectors", str(vectors), "--points", "5", "--span", "0.5"]
    assert main([*args, "--out", str(out), "--plot", str(plot), *common]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "landscape" and result["dims"] == 2 and result["directions"] == "eigen"
    assert result["eigenvalues"] == pytest.approx(saved.values.tolist(), rel=1e-6)
    assert result["settings"]["vectors"] == str(vectors) and result["settings"]["points"] == 5
    assert len(result["loss"]) == 5 and len(result["loss"][0]) == 5 and result["loss"][2][2] == result["center_loss"]
    model = build_model("mlp-digits", seed=0).eval()
    data = make_loader(load_dataset("digits", num_examples=120, seed=0), batch_size=128)
    direct = hessops.evaluate(model, make_loss(model_spec("mlp-digits")), data)
    assert result["center_loss"] == pytest.approx(direct["loss"], rel=1e-6)  # float32, one batch
    assert result["center_accuracy"] == pytest.approx(direct["accuracy"])
    assert plot.stat().st_size > 10_000
    capsys.readouterr()
    assert main(["landscape", "--dims", "1", "--points", "3", *common]) == 0  # random directions, eigs not needed
    printed = capsys.readouterr().out
    assert "loss at the parameters" in printed and "eigenvectors" not in printed
    assert main(["landscape", "--directions", "eigen", "--dims", "1", "--points", "3", "--out", str(out), *common]) == 0
    assert "eigenvectors of the 1 largest eigenvalues" in capsys.readouterr().out  # computed first, without --vectors
    assert json.loads(out.read_text())["eigenvalues"] == pytest.approx(saved.values[:1].tolist(), rel=1e-4)
