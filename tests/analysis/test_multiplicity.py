"""eigs' promise with repeated and clustered eigenvalues, against dense truth (``torch.linalg.eigvalsh``).

For every case of the grid: each reported value lies within its error bound of an eigenvalue, and when the run
says ``converged`` the i-th reported value lies within its bound of the true i-th extreme eigenvalue, counted with
multiplicity. The matrices are ``Q diag(λ) Qᵀ`` with a seeded random orthogonal ``Q``, so the truth is ``λ`` itself;
the bounds are compared with a slack of 1e-12 (float64) or 1e-5 (float32) relative to ``max|λ|``, the rounding of
forming ``Q diag(λ) Qᵀ`` and of ``eigvalsh``, which the operator's products cannot show.
"""

from __future__ import annotations

import warnings

import cola
import pytest
import torch
from eigs_promise import check_promise
from torch import nn

import hessops

N = 120


def operator(spectrum: list[float], dtype=torch.float64, seed: int = 0):
    values = torch.tensor(spectrum, dtype=torch.float64)
    n = values.shape[0]
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    dense = (q * values) @ q.T
    return cola.SelfAdjoint(cola.ops.Dense(((dense + dense.T) / 2).to(dtype))), values, q


def bulk(count: int, low: float = 0.0, high: float = 1.0) -> list[float]:
    return torch.linspace(low, high, count, dtype=torch.float64).tolist()


TOP = [5.0, 5.0, 5.0, 5.0, 3.0, 2.0]
CASES = {
    # exact multiplicities 2..4 at the top, a bulk below
    "top x2": ([5.0, 5.0, 3.0, 2.0] + bulk(N - 4), "LA", 3),
    "top x3": ([5.0, 5.0, 5.0, 3.0, 2.0] + bulk(N - 5), "LA", 3),
    "top x4 k5": (TOP + bulk(N - 6), "LA", 5),
    # at the bottom: a rank-deficient PSD matrix, SA finds the zeros with multiplicity
    "null space": ([0.0] * 6 + bulk(N - 6, 0.5, 3.0), "SA", 4),
    "bottom x3": ([-4.0, -4.0, -4.0, -1.0] + bulk(N - 4), "SA", 4),
    # both ends repeated
    "both ends": ([6.0, 6.0, -6.0, -6.0] + bulk(N - 4, -1.0, 1.0), "both", 4),
    # LM with ± pairs of equal magnitude, repeated
    "LM pairs": ([5.0, 5.0, -5.0, -5.0, 4.0] + bulk(N - 5, -1.0, 1.0), "LM", 5),
    # near-multiplicities
    "near copies": ([5.0, 5.0 - 5e-7, 5.0 - 1e-6, 3.0] + bulk(N - 4), "LA", 3),
    # a cluster of C = 10 class outliers (Papyan) above a bulk
    "10 outliers": ([10.0 + 0.01 * i for i in range(10)] + bulk(N - 10), "LA", 10),
    # the top value once, the next one three times: the copies straddle the k-th
    "k-th repeated": ([7.0, 4.0, 4.0, 4.0, 1.5] + bulk(N - 5), "LA", 3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("test", ["tol", "value_tol"])
def test_extreme_values_with_multiplicity(case, dtype, test):
    spectrum, which, k = CASES[case]
    op, truth, _ = operator(spectrum, dtype)
    # float32: verified residuals of a 6-fold null space reach ~3e-3 × max|λ| (estimates say 1e-7), so the strict
    # value test is 1e-3 there; 1e-4 ends converged=False, as it should, with bounds that still cover the truth.
    # Even 1e-3 is the edge there: its bounds measured below it on an AMD EPYC and 1.3-2e-3 × max|λ| on an Intel Xeon
    # (BLAS rounds differently by CPU and thread count), so that case may end converged=False, with its warning.
    strict = 1e-8 if dtype == torch.float64 else (1e-4 if test == "tol" else 1e-3)
    options = {"tol": strict} if test == "tol" else {"value_tol": strict}
    edge = dtype == torch.float32 and case == "null space" and test == "value_tol"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = hessops.eigs(op, k, which, **options)
    assert result.converged or (edge and any("eigs stopped" in str(w.message) for w in caught)), result
    check_promise(result, truth, k, which, dtype)


@pytest.mark.parametrize("basis", ["device", "host", "disk", "none"])
@pytest.mark.parametrize("case", ["top x3", "null space", "LM pairs", "near copies"])
def test_every_basis_mode(case, basis, tmp_path):
    spectrum, which, k = CASES[case]
    op, truth, _ = operator(spectrum)
    path = tmp_path / "basis.bin" if basis == "disk" else None
    result = hessops.eigs(op, k, which, tol=1e-8, basis=basis, basis_path=path)
    assert result.converged and result.basis == basis
    check_promise(result, truth, k, which, torch.float64)


# block Lanczos and thick restarts (hessops.linalg.block_lanczos): a block of 3 (as many copies as the top has, or
# fewer), a bounded basis that restarts many times, and both
BLOCKED = {
    "block 3": {"block_size": 3},
    "basis 14": {"basis_size": 14},
    "block 4 basis 24": {"block_size": 4, "basis_size": 24},
}


@pytest.mark.parametrize("blocked", list(BLOCKED))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_blocks_and_thick_restarts_keep_the_promise(case, dtype, blocked):
    """The promise on the whole grid for block Lanczos and thick restarts, at the residual test (1e-8 in float64,
    1e-4 in float32), with the restarts counted and the steps in whole blocks."""
    spectrum, which, k = CASES[case]
    op, truth, _ = operator(spectrum, dtype)
    options = BLOCKED[blocked]
    result = hessops.eigs(op, k, which, tol=1e-8 if dtype == torch.float64 else 1e-4, max_iters=N, **options)
    assert result.converged, result
    assert result.block_size == options.get("block_size", 1)
    if "basis_size" not in options:
        assert result.restarts == 0
    elif result.steps > options["basis_size"] * (result.checks + 1):  # some run outgrew its basis
        assert result.restarts > 0
    check_promise(result, truth, k, which, dtype)


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-10])
@pytest.mark.parametrize("seed", range(5))
def test_loose_and_strict_tolerances(tol, seed):
    """Loose tolerances stop early: the promise must still hold for what is reported, and for the order."""
    spectrum, which, k = CASES["top x4 k5"]
    op, truth, _ = operator(spectrum, seed=seed)
    with_check = hessops.eigs(op, k, which, tol=tol, seed=seed)
    check_promise(with_check, truth, k, which, torch.float64)
    assert with_check.converged


def test_a_warm_start_on_one_copy():
    """A start vector exactly on one copy of the repeated top eigenvalue spans a 1-dimensional Krylov space."""
    spectrum, which, k = CASES["top x3"]
    op, truth, q = operator(spectrum)
    result = hessops.eigs(op, k, which, tol=1e-10, start=q[:, 0].clone())
    assert result.converged
    check_promise(result, truth, k, which, torch.float64)
    torch.testing.assert_close(result.values, torch.full((3,), 5.0, dtype=torch.float64), rtol=0, atol=1e-10)


def test_without_the_check_a_copy_is_missed():
    """What the check is for: without it one run finds one copy of 5 and reports 3 as the second value (a long
    run, tol=1e-10, lets rounding bring a second copy in after about 20 steps: the default tolerance stops first)."""
    op, truth, _ = operator(CASES["top x3"][0])
    plain = hessops.eigs(op, 3, "LA", check=False)
    assert plain.checks == 0 and abs(float(plain.values[1]) - 3.0) < 1e-8
    checked = hessops.eigs(op, 3, "LA", tol=1e-10)
    assert checked.checks >= 2  # a run per copy that the first missed (rounding brings one in), one that finds none
    torch.testing.assert_close(checked.values, torch.full((3,), 5.0, dtype=torch.float64), rtol=0, atol=1e-10)
    assert checked.to_dict()["check_runs"] == checked.checks


def test_zero_initialised_logistic_regression_on_digits():
    """Issue 21's case: nn.Linear(64, 10) at zero, the first 500 scikit-learn digits (pixels / 16), cross-entropy.
    The Hessian is (I/C − 11ᵀ/C²) ⊗ E[x̃x̃ᵀ] (x̃ = (x, 1)): every eigenvalue 9 times, the top one
    λ_max(E[x̃x̃ᵀ]) / C = 1.17791. PyHessian and scipy's eigsh on curvlinops' operator return it five times."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X[:500], dtype=torch.float64) / 16
    targets = torch.tensor(y[:500])
    model = nn.Linear(64, 10).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    H = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x[:250], targets[:250]), (x[250:], targets[250:])])
    augmented = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], dim=1)
    top = float(torch.linalg.eigvalsh(augmented.T @ augmented / 500)[-1]) / 10  # analytic, no autograd
    assert top == pytest.approx(1.17791, abs=5e-6)
    result = hessops.eigs(H, 5, "LA")
    assert result.converged
    torch.testing.assert_close(result.values, torch.full((5,), top, dtype=torch.float64), rtol=1e-9, atol=0)
    assert bool((result.error_bounds < 1e-6).all())


@pytest.mark.parametrize("seed", range(20))
def test_random_spectra_with_repeats(seed):
    """Adversarial spectra drawn at random: a few values each repeated 1-4 times at either end, a bulk between,
    every `which`, float64, the default tolerance."""
    generator = torch.Generator().manual_seed(1000 + seed)
    distinct = (torch.rand(4, generator=generator, dtype=torch.float64) * 4 + 2) * torch.where(
        torch.rand(4, generator=generator) < 0.5, -1.0, 1.0
    ).double()
    copies = torch.randint(1, 5, (4,), generator=generator)
    outliers = torch.repeat_interleave(distinct, copies).tolist()
    spectrum = outliers + bulk(N - len(outliers), -1.0, 1.0)
    which = ["LA", "SA", "LM", "both"][seed % 4]
    k = int(torch.randint(1, 7, (1,), generator=generator))
    op, truth, _ = operator(spectrum, seed=seed)
    result = hessops.eigs(op, k, which, seed=seed)
    assert result.converged
    check_promise(result, truth, k, which, torch.float64)


def test_a_run_interrupted_in_a_check_run_resumes_bit_identically(tmp_path):
    """Ctrl-C inside the first check run: the first run resumes from its finished checkpoint, the check run from
    its own (``PATH.check1``), and the result is the uninterrupted one, bit for bit."""
    from toy_networks import interrupted_at

    op, _, _ = operator(CASES["top x3"][0])
    whole = hessops.eigs(op, 3, "LA", tol=1e-8)
    first = hessops.eigs(op, 3, "LA", tol=1e-8, check=False, verify=False).n_matvecs
    path = tmp_path / "eigs.ckpt"
    with interrupted_at(op, first + 4), pytest.raises(KeyboardInterrupt):
        hessops.eigs(op, 3, "LA", tol=1e-8, checkpoint=path, checkpoint_every=0)
    assert path.exists() and (tmp_path / "eigs.ckpt.check1").exists()
    resumed = hessops.eigs(op, 3, "LA", tol=1e-8, checkpoint=path, checkpoint_every=0)
    assert torch.equal(resumed.values, whole.values) and torch.equal(resumed.vectors, whole.vectors)
    assert torch.equal(resumed.error_bounds, whole.error_bounds) and resumed.checks == whole.checks


def least_squares(singular: list[float], n_examples: int = 80, seed: int = 0):
    """``nn.Linear(d, 1, bias=False)`` with MSE on inputs ``X`` (N × d) chosen so that ``H = 2/N XᵀX`` has the given
    eigenvalues: analytic truth, no autograd."""
    d = len(singular)
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(n_examples, d, dtype=torch.float64, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator)).Q
    X = left @ torch.diag((torch.tensor(singular, dtype=torch.float64) * n_examples / 2).sqrt()) @ right.T
    y = torch.randn(n_examples, 1, dtype=torch.float64, generator=generator)
    model = nn.Linear(d, 1, bias=False).double()
    truth = torch.linalg.eigvalsh(2 / n_examples * X.T @ X)
    return model, [(X[:50], y[:50]), (X[50:], y[50:])], truth


@pytest.mark.parametrize("value_tol", [None, 1e-8])
@pytest.mark.parametrize(
    "spectrum", [[5, 5, 5, 3, 2] + [1.0 / i for i in range(1, 26)], [5, 5 - 5e-7, 5 - 1e-6, 3] + [0.5] * 20]
)
def test_least_squares_with_repeated_top(spectrum, value_tol):
    """Issue 21: H = 2/N XᵀX of spectrum (5, 5, 5, 3, 2, …) gave (5, 3, 2) for k = 3, converged, with or without
    value_tol, and (5, 5 − 5e-7, 5 − 1e-6, 3, …) gave (5, 5, 3)."""
    model, data, truth = least_squares([float(s) for s in spectrum])
    H = hessops.Hessian(model, nn.MSELoss(), data)
    result = hessops.eigs(H, 3, "LA", value_tol=value_tol)
    assert result.converged
    check_promise(result, truth, 3, "LA", torch.float64)
    assert float(result.values[-1]) > 4.9


@pytest.mark.parametrize("operator_name", ["ggn", "ef"])
def test_rank_deficient_curvature_smallest_with_multiplicity(operator_name):
    """Issue 21: which="SA" on a rank-deficient GGN or empirical Fisher returned one copy of 0, then nonzero values,
    converged, its bounds off by 0.36 for k = 3. 6 examples × 2 outputs of an MLP with 59 parameters: the GGN has
    rank ≤ 12, the empirical Fisher ≤ 6, so 0 is an eigenvalue 47 (53) times. Truth: the dense GGN / empirical
    Fisher of tests/reference.py (Jacobians of the whole dataset at once)."""
    from reference import dense_empirical_fisher, dense_ggn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    reference = dense_ggn if operator_name == "ggn" else dense_empirical_fisher
    truth = torch.linalg.eigvalsh(reference(model, nn.MSELoss(), data))
    op = (hessops.GGN if operator_name == "ggn" else hessops.EmpiricalFisher)(model, nn.MSELoss(), data)
    result = hessops.eigs(op, 3, "SA", tol=1e-8)
    assert result.converged
    check_promise(result, truth, 3, "SA", torch.float64)
    assert float(result.values.abs().max()) < 1e-7 * float(truth.abs().max())


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_a_tiny_tanh_mlp_with_a_loose_tolerance(tol):
    """Issue 21: with tol=1e-2 a tiny tanh MLP's 4th reported value was the true 5th; the true 4th was never found.
    Truth: plain double backward on the whole dataset (tests/reference.py)."""
    from reference import reference_hessian

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    data = [(x[:17], y[:17]), (x[17:], y[17:])]
    truth = torch.linalg.eigvalsh(reference_hessian(model, nn.MSELoss(), data))
    for which in ("LA", "LM", "SA"):
        result = hessops.eigs(hessops.Hessian(model, nn.MSELoss(), data), 5, which, tol=tol)
        check_promise(result, truth, 5, which, torch.float64)


@pytest.mark.parametrize("seed", [772, 833, 863, 1038])
def test_the_stopping_test_matches_the_reported_bound(seed):
    """A tanh MLP's float64 Hessian (benchmarks/coverage.py's, n = 50), ``"SA"`` with ``value_tol=1e-3``: for these
    seeds the first run stopped where its own test (the Lanczos estimates with the rest's bare residuals) passed but
    the reported bound (the rest's residuals at least the wanted one's, as :func:`hessops.eigs` reports them)
    missed the tolerance by 1–6 %, so the run said "not converged" and blamed float64 products; basin_volume's c
    check then refused 3 of 1003 runs (benchmarks/RESULTS.md, Run S). The run now goes on until the reported bound
    passes, and keeps its promise against the double-backward truth."""
    from reference import reference_hessian

    from benchmarks.coverage import mlp_hessian

    problem = mlp_hessian(reference_hessian)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        spectrum = hessops.eigs(problem.op, 1, "SA", value_tol=1e-3, seed=seed)
    assert spectrum.converged and float(spectrum.error_bounds[0]) <= 1e-3 * 2.26
    check_promise(spectrum, problem.eigenvalues, 1, "SA", torch.float64)
