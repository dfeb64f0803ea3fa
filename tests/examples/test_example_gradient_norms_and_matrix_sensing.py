"""examples/gradient_norms_and_matrix_sensing.py: its --quick mode run as a user runs it and checked through
result.json; the gradient norms recomputed by hand; the matrix-sensing Hessian through hessops compared with
``torch.func.hessian`` of F written out from its formula, and its null space at a global minimum."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import ModuleType

import examples_runner
import pytest
import torch
from dataset_files import write_mnist
from torch import nn
from torch.utils.data import DataLoader

import hessops
from hessops.zoo.models import build_model

REPLAYED = 6  # epochs of the quick run that test_gradient_norms_match_a_recomputation replays
WEIGHTS = ["1.weight", "3.weight", "5.weight", "7.weight"]  # mlp-mnist's four bias-free Linear layers


def load_example() -> ModuleType:
    return examples_runner.load_example("gradient_norms_and_matrix_sensing")


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """MNIST's idx files with 20 training and 10 test images."""
    return write_mnist(tmp_path)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    return examples_runner.run_quick(
        "gradient_norms_and_matrix_sensing", tmp_path_factory.mktemp("gradient_norms_quick")
    )


def test_quick_gradient_norms_and_losses(quick):
    result, out = quick
    a = result["grad_norms"]
    assert result["mode"] == "quick" and a["model"] == "mlp-mnist" and a["n_params"] == 134_400 and a["lr"] == 0.01
    steps = math.ceil(a["n_train"] / a["batch_size"])
    assert [h["epoch"] for h in a["grad_norms"]] == list(range(1, a["epochs"] + 1))
    for h in a["grad_norms"]:
        assert h["steps"] == steps and list(h["norms"]) == WEIGHTS
        assert all(0 < v < math.inf for v in h["norms"].values())
    assert [c["epoch"] for c in a["curves"]] == list(range(a["epochs"] + 1))  # before training, then each epoch
    assert a["epochs"] == 20 and a["batch_size"] == 32
    # trained: from chance (ln 10 = 2.30) to far below it (measured 0.17 and 0.18 after 20 epochs), not stopped
    # on the way down from the plateau (6 epochs ended at 1.4)
    for split in ("train", "test"):
        assert a["curves"][0][split]["loss"] == pytest.approx(math.log(10), abs=0.1)
        assert a["curves"][-1][split]["loss"] < 0.5 and a["curves"][-1][split]["accuracy"] > 0.85
    assert (out / "grad_norms_and_loss.png").stat().st_size > 20_000


def test_gradient_norms_match_a_recomputation(quick):
    """The same training by hand, each layer's ‖∂L_B/∂W‖_F taken per step and averaged per epoch, over the first
    REPLAYED epochs (270 steps). Two loops' float32 roundings differ by ~1e-7 per step; while the loss falls
    steeply they grow apart (3.6e-4 at the 9th epoch), so the replay stops before that, where 1e-4 holds."""
    result, _ = quick
    a = result["grad_norms"]
    example = load_example()
    args = argparse.Namespace(quick=True, seed=result["seed"])
    train_set, _ = example.mnist_data(args)
    model, loss_fn = build_model("mlp-mnist", seed=result["seed"]), nn.CrossEntropyLoss()
    loader = DataLoader(
        train_set, batch_size=a["batch_size"], shuffle=True, generator=torch.Generator().manual_seed(result["seed"])
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=a["lr"])
    for record in a["grad_norms"][:REPLAYED]:
        model.train()
        sums = dict.fromkeys(WEIGHTS, 0.0)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            for name, p in model.named_parameters():
                sums[name] += float(torch.linalg.matrix_norm(p.grad))
            optimizer.step()
        # the tracker sums float32 norms on the device, this loop in float64 (they differ by ~1e-7 here); 1e-4
        # also leaves room for float32 sums ordered differently by threads, over the replayed 270 steps
        assert record["norms"] == pytest.approx({k: v / record["steps"] for k, v in sums.items()}, rel=1e-4)
    model.eval()
    with torch.no_grad():
        x, y = next(iter(DataLoader(train_set, batch_size=len(train_set))))
        assert float(loss_fn(model(x), y)) == pytest.approx(a["curves"][REPLAYED]["train"]["loss"], rel=1e-4)


def test_full_mode_path_on_mnist_format_files(mnist_dir):
    """The real MNIST loader and the zoo's mlp-mnist, one epoch on the 20 images of small idx files."""
    example = load_example()
    args = argparse.Namespace(
        quick=False, data_dir=mnist_dir, seed=0, epochs=1, batch_size=8, device=torch.device("cpu")
    )
    a = example.gradient_norms(args)
    assert (a["n_train"], a["n_test"], a["n_params"]) == (20, 10, 134_400)
    assert a["grad_norms"][0]["steps"] == 3 and list(a["grad_norms"][0]["norms"]) == WEIGHTS
    assert all(v > 0 for v in a["grad_norms"][0]["norms"].values()) and len(a["curves"]) == 2


def F(U: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F(U) = (1/m) Σ_i (⟨A_i, UUᵀ⟩ − y_i)², from the formula."""
    return ((torch.einsum("mij,ij->m", A, U @ U.T) - y) ** 2).mean()


def test_sensing_hessian_is_torch_func_hessian_of_F():
    example = load_example()
    problem = example.sensing_problem(6, 2, seed=1)
    A, y = problem.A, problem.y
    generator = torch.Generator().manual_seed(2)
    for k in (6, 2):  # over-parameterized and exact
        U = torch.randn(6, k, generator=generator, dtype=torch.float64)
        reference = torch.func.hessian(F)(U, A, y).reshape(6 * k, 6 * k)  # U's row-major order, as hessops'
        batches = [(A[:50], y[:50]), (A[50:51], y[50:51]), (A[51:], y[51:])]  # unequal batches: the same mean
        for data in ([(A, y)], batches):
            H = hessops.Hessian(example.Factorized(U).eval(), nn.MSELoss(), data).to_dense()
            # float64 throughout: equal to rounding (relative 1e-10 of the largest entry)
            assert torch.allclose(H, reference, rtol=0, atol=1e-10 * float(reference.abs().max()))


def test_sensing_hessian_null_space_at_a_global_minimum():
    """At UUᵀ = X* the residuals vanish and H = (2/m) Σ_i g_i g_iᵀ with g_i = vec((A_i + A_iᵀ)U): rank
    dr − r(r−1)/2 (generic Gaussian A_i, m = 10dr), null space {Δ : ΔUᵀ + UΔᵀ = 0} ∋ UΩ for skew Ω."""
    example = load_example()
    d, r = 8, 3
    problem = example.sensing_problem(d, r, seed=3)
    values, vectors = torch.linalg.eigh(problem.x_star)
    u_star = vectors[:, -r:] * values[-r:].sqrt()  # a factor of X*
    omega = torch.randn(r, r, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    omega = omega - omega.T
    for U in (u_star, torch.cat([u_star, torch.zeros(d, d - r, dtype=torch.float64)], dim=1)):
        H = hessops.Hessian(example.Factorized(U).eval(), nn.MSELoss(), [(problem.A, problem.y)]).to_dense()
        spectrum = torch.linalg.eigvalsh(H)
        # exact zeros come out at rounding level (~1e-15 of the largest); the smallest nonzero is O(0.1)
        rank = int((spectrum.abs() > 1e-8 * spectrum.abs().max()).sum())
        assert rank == example.predicted_rank(d, r) == d * r - r * (r - 1) // 2
        rotation = torch.cat([u_star @ omega, torch.zeros(d, U.shape[1] - r, dtype=torch.float64)], dim=1)
        assert float(torch.linalg.vector_norm(H @ rotation.flatten())) < 1e-10 * float(spectrum.abs().max())


def test_quick_matrix_sensing(quick):
    result, out = quick
    s = result["matrix_sensing"]
    d, r = s["d"], s["r"]
    assert (d, r, s["m"]) == (20, 3, 600)
    exact, *over = s["runs"]
    assert exact["shape"] == "d x r" and [run["alpha"] for run in over] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert all(run["shape"] == "d x d" and len(run["t"]) == len(run["error"]) for run in over)
    # the d×r factorization reaches the global minimum: X* to 1e-8 of its norm (it is at 6e-11 after 600 steps)
    assert exact["error"][-1] < 1e-8 * s["x_star_norm"]
    # small α recovers X* to 1e-3 of its norm; the final error grows with α (the implicit bias fades)
    assert all(run["error"][-1] < 1e-3 * s["x_star_norm"] < run["error"][0] for run in over[:2])
    finals = [run["error"][-1] for run in over]
    assert finals == sorted(finals) and finals[-1] > 100 * finals[0]
    # α = 1e-4: U_t is numerically of rank r, its top r singular values those of a factor of X*
    sigma = over[0]["singular_values"][-1]
    assert len(sigma) == 10 and sigma[r] < 1e-2 * sigma[r - 1]
    assert sigma[:r] == pytest.approx([v**0.5 for v in s["x_star_eigenvalues"]], rel=1e-4)
    # the Hessian at the end: rank dr − r(r−1)/2 for the d×r minimum and for small α; fuller for α = 1
    rank = d * r - r * (r - 1) // 2
    for run, n in ((exact, d * r), (over[0], d * d)):
        h = run["hessian"]
        assert h["n"] == len(h["eigenvalues"]) == n and h["rank"] == h["predicted_rank"] == rank
        assert h["eigenvalues"] == sorted(h["eigenvalues"])
    assert exact["hessian"]["null_dim"] == r * (r - 1) // 2
    assert over[-1]["hessian"]["rank"] > 2 * rank
    for name in ("sensing_error", "sensing_singular_values", "sensing_hessian"):
        assert (out / f"{name}.png").stat().st_size > 20_000
