"""Block Lanczos with thick restarts (hessops.linalg.block_lanczos), against dense truth
(``torch.linalg.eigh``/``eigvalsh`` of the same matrix) and its own defining relation: the residual estimates
``‖B s_last‖`` must equal the true residuals ``‖A Qs − θ Qs‖`` (float64: to 1e-12 × ‖A‖, a few hundred eps of
the sums), the basis must stay orthonormal through restarts (1e-13), and every eigs result must keep its
promise (tests/eigs_promise.py). The promise over the repeated/clustered grid is in
tests/analysis/test_multiplicity.py; the auto restart where memory is short in tests/linalg/test_basis.py."""

from __future__ import annotations

import cola
import pytest
import torch
from eigs_promise import check_promise
from torch import nn

import hessops
from hessops.analysis._eigs_runs import _select
from hessops.linalg.block_lanczos import block_lanczos, kept_count


def dense_operator(values: list[float] | torch.Tensor, seed: int = 0):
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.shape[0]
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    dense = (q * values) @ q.T
    dense = (dense + dense.T) / 2
    return cola.SelfAdjoint(cola.ops.Dense(dense)), dense


@pytest.mark.parametrize("block, capacity", [(1, 500), (1, 10), (3, 500), (3, 15), (5, 30)])
def test_estimates_are_the_true_residuals_and_the_basis_stays_orthonormal(block, capacity):
    values = torch.cat([torch.tensor([9.0, 9.0, 8.5, 8.4, -7.0]), torch.linspace(-3.0, 3.0, 195, dtype=torch.float64)])
    op, dense = dense_operator(values)
    start = torch.randn(200, block, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for steps in (12, 40, 90):
        state = block_lanczos(
            op, start, steps, capacity=capacity, keep=lambda t, c: _select(t, c, "LM"), wanted=4, seed=3
        )
        theta, S, estimates = state.ritz()
        vectors = state.ritz_vectors(S)
        true = torch.linalg.vector_norm(dense @ vectors - vectors * theta, dim=0)
        torch.testing.assert_close(estimates, true, rtol=0, atol=1e-12 * 9)
        Q = state.rows[: state.size]
        torch.testing.assert_close(Q @ Q.T, torch.eye(state.size, dtype=Q.dtype), rtol=0, atol=1e-13)
        assert state.steps >= steps and state.n_matvecs == state.steps
        assert (state.restarts > 0) == (steps > capacity)
        assert state.size <= capacity


def test_an_invariant_subspace_is_left_for_random_directions():
    """Three distinct eigenvalues: a block of 4 spans the whole Krylov space in one step (its product's remainder is
    rounding), so columns are replaced by random ones orthogonal to the basis, and the run goes on to the rest."""
    values = torch.tensor([5.0] * 10 + [2.0] * 10 + [-1.0] * 10, dtype=torch.float64)
    op, _ = dense_operator(values)
    start = torch.randn(30, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = block_lanczos(op, start.repeat(1, 4), 30, capacity=30, keep=lambda t, c: _select(t, c, "LA"), wanted=3)
    theta, _, estimates = state.ritz()
    assert state.size == 30  # the whole space
    # the remainders dropped for random columns are below 100 eps × the products' scale (~2e-13 × 5 here)
    torch.testing.assert_close(theta, values.sort().values, rtol=0, atol=1e-11)
    assert bool((estimates == 0).all())  # no next block: the basis spans everything


@pytest.mark.parametrize("which", ["LM", "LA", "SA", "both"])
# a basis of 10 restarts ~10 times on the clustered bottom (SA); blocks of 2 in a basis of 12 keep 8 and add 2 blocks a
# cycle, too little for SA in 300 products (converged=False, honestly): the combination runs with 20
@pytest.mark.parametrize("options", [{"block_size": 4}, {"basis_size": 10}, {"block_size": 2, "basis_size": 20}])
def test_an_mlp_hessian_against_its_dense_eigendecomposition(which, options):
    """A real Hessian (an MLP on regression, n = 131, indefinite), with blocks and restarts: every value within
    its bound of the true k extreme eigenvalues, counted with multiplicity (float64 products: tol 1e-9)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    H = hessops.Hessian(model, nn.MSELoss(), [(x[:25], y[:25]), (x[25:], y[25:])])
    from reference import reference_hessian

    truth = torch.linalg.eigvalsh(reference_hessian(model, nn.MSELoss(), [(x, y)]))
    result = hessops.eigs(H, 4, which, tol=1e-9, **options)
    assert result.converged and result.verified
    check_promise(result, truth, 4, which, torch.float64)


class _TokenTagger(nn.Module):
    """LayerNorm, self-attention and a per-token head: a sequence model with a per-token cross-entropy."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)
        self.attention, self.head = nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(self.embed(x))
        return self.head(h + self.attention(h, h, h, need_weights=False)[0]).transpose(1, 2)


@pytest.mark.parametrize("options", [{"block_size": 2, "basis_size": 10}, {"basis_size": 8}])
def test_a_layernorm_attention_model_with_ignored_tokens(options):
    """Beyond the MLP: LayerNorm and attention, a per-token cross-entropy with ignore_index (padding), uneven
    batches, float64; blocks and restarts against the reference's dense Hessian (plain double backward on the whole
    dataset): the top-3 in magnitude within their bounds, with multiplicity."""
    torch.manual_seed(0)
    model = _TokenTagger().double().eval()
    x, y = torch.randn(7, 5, 4, dtype=torch.float64), torch.randint(0, 3, (7, 5))
    y[0, 3:], y[4, 1:] = -100, -100  # padded tokens
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    data = [(x[:2], y[:2]), (x[2:6], y[2:6]), (x[6:], y[6:])]
    from reference import reference_hessian

    H = hessops.Hessian(model, loss_fn, data)
    truth = torch.linalg.eigvalsh(reference_hessian(model, loss_fn, data))
    result = hessops.eigs(H, 3, "LM", tol=1e-9, **options)
    assert result.converged and result.restarts > 0
    check_promise(result, truth, 3, "LM", torch.float64)


def test_a_block_warm_start_from_the_previous_eigenvectors():
    """``start`` as ``(n, c)`` columns with ``block_size ≥ c`` (a tracker's previous top-c eigenvectors, say): from
    the exact top-3 eigenvectors, slightly perturbed, the first run converges in its first block steps, in fewer
    products than a cold block run, to the same values within their bounds; the other columns of a wider block are
    seeded Gaussian."""
    values = torch.cat([torch.tensor([9.0, 8.0, 7.5]), torch.linspace(-3.0, 3.0, 197, dtype=torch.float64)])
    op, dense = dense_operator(values)
    exact, vectors = torch.linalg.eigh(dense)
    top = vectors[:, -3:].flip(1) + 1e-4 * torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator())
    cold = hessops.eigs(op, 3, "LA", tol=1e-9, block_size=3)
    warm = hessops.eigs(op, 3, "LA", tol=1e-9, block_size=3, start=top)
    wider = hessops.eigs(op, 3, "LA", tol=1e-9, block_size=4, start=top[:, :2])
    for result in (cold, warm, wider):
        assert result.converged
        check_promise(result, values, 3, "LA", torch.float64)
    assert warm.n_matvecs < cold.n_matvecs
    with pytest.raises(hessops.InvalidArgumentError, match=r"c ≤ block_size=3 columns"):
        hessops.eigs(op, 3, "LA", block_size=3, start=torch.randn(200, 4, dtype=torch.float64))
    with pytest.raises(hessops.InvalidArgumentError, match=r"one vector of the operator's size, \(200,\)"):
        hessops.eigs(op, 3, "LA", start=top)


def test_kept_count_leaves_room_for_two_blocks():
    assert kept_count(16, 1, 2) == 9
    assert kept_count(40, 1, 10) == 25
    assert kept_count(24, 4, 4) == 14
    assert kept_count(12, 4, 4) == 4  # as few as the wanted ones: the minimum basis_size eigs accepts
    for capacity in range(6, 60):
        for block in (1, 2, 3):
            for wanted in range(1, capacity - 2 * block + 1):
                kept = kept_count(capacity, block, wanted)
                assert wanted <= kept <= capacity - 2 * block


def test_bad_block_and_basis_arguments_are_refused(tmp_path):
    op, _ = dense_operator(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
    with pytest.raises(hessops.InvalidArgumentError, match="basis_size"):
        hessops.eigs(op, 4, basis_size=5)  # fewer than k + 2 blocks
    with pytest.raises(hessops.InvalidArgumentError, match="block_size"):
        hessops.eigs(op, 2, block_size=0)
    with pytest.raises(hessops.InvalidArgumentError, match="at most the operator's size"):
        hessops.eigs(op, 2, block_size=51)
    with pytest.raises(hessops.InvalidArgumentError, match="keeps its basis on the operator's device"):
        hessops.eigs(op, 2, block_size=2, basis="none")
    with pytest.raises(hessops.InvalidArgumentError, match="only single-vector Lanczos without restarts saves"):
        hessops.eigs(op, 2, basis_size=10, checkpoint=tmp_path / "run.pt")
