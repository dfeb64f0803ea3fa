"""MCFisher against its exact expectation, computed by enumerating every label (tests/reference.py's
``enumerated_fisher``: plain backward, no hessops code), with a bound from the samples' own spread.

What MCFisher estimates (hessops/operators/fisher.py): F̂ = (1/(W·S)) Σ_n Σ_s ŝ_ns ŝ_nsᵀ, with ŝ_ns the parameter
gradient of example n's summed per-target losses at the s-th labels drawn from the model, S the samples and W the
dataset's counted targets (elements for MSE/BCE; 1 for a sum). An example's targets are drawn independently and
each one's output gradient has mean zero under the model, so the cross terms vanish and
E[F̂] = (1/W) Σ_t Σ_y p_t(y) g_ty g_tyᵀ, whatever the batching: that is the reference.

The check (:func:`consistent`): K operators with seeds 0..K-1 are K independent draws of F̂; for ten forms
u_iᵀ F̂ u_j of fixed probes, the seeds' mean must lie within Z = 5 standard errors (their standard deviation / √K)
of the exact value. Z = 5 keeps a fixed-seed test far from a chance failure (two-sided t-tail with K-1 = 23
degrees of freedom at 5: ~5e-5 per form, ~1e-3 for the ten), and the problems are sized (counted targets ×
samples × seeds: 1-6 million drawn labels) so that 5 standard errors are under 1 % of every diagonal form:
:func:`resolution` asserts it, and a 2 % bias is shown to be rejected. The loose comparisons with the GGN
elsewhere (test_operators, test_losses, test_vit, test_lm) test other things: see their docstrings.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from reference import enumerated_fisher
from torch import Tensor, nn

import hessops
from hessops.operators.losses import next_token_cross_entropy

Z = 5.0  # standard errors allowed between the seeds' mean and the exact expectation
SEEDS = 24  # independent draws of the estimator
PROBES = 4  # probes u_i: the forms u_iᵀ F u_j, i <= j, are checked (10 of them)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these products are thousands of tiny kernels, which a second thread only slows
    (10-20× on two busy cores, measured), and the sample counts bound the work, not the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the check ---------------------------------------------------------------------------------------------
UPPER = torch.triu_indices(PROBES, PROBES)  # the forms u_iᵀ F u_j, i <= j
DIAGONAL = UPPER[0] == UPPER[1]


def forms(products: Tensor, probes: Tensor) -> Tensor:
    """The forms u_iᵀ F u_j, i <= j, from ``products`` = F U (P × m) and ``probes`` = U (P × m)."""
    return (probes.T @ products)[UPPER[0], UPPER[1]]


def standard_errors(estimates: Tensor) -> Tensor:
    """The standard error of the mean of K independent estimates (K × m): sample std / √K."""
    return estimates.std(dim=0) / math.sqrt(estimates.shape[0])


def consistent(estimates: Tensor, exact: Tensor, z: float = Z) -> bool:
    """Whether the mean of K independent estimates (K × m) is within ``z`` standard errors of ``exact`` (m), for
    every one of the m statistics."""
    return bool(((estimates.mean(dim=0) - exact).abs() <= z * standard_errors(estimates)).all())


def resolution(estimates: Tensor, exact: Tensor) -> float:
    """The largest relative half-width ``Z · SE / |exact|`` over the diagonal forms u_iᵀ F u_i: a relative bias
    twice this is rejected whatever the draw (one of the size of the half-width, in about half the draws)."""
    return float((Z * standard_errors(estimates)[DIAGONAL] / exact[DIAGONAL].abs()).max())


def mc_estimates(model, loss_fn, data, probes: Tensor, samples: int) -> Tensor:
    """``forms`` of MCFisher with seeds 0..SEEDS-1, one row per seed. The first operator runs hessops' own
    checks (determinism, witness); the rest skip them, as they repeat the same model and data."""
    rows = []
    for seed in range(SEEDS):
        checks = seed == 0
        op = hessops.MCFisher(
            model, loss_fn, data, samples=samples, seed=seed, check_determinism=checks, witness=checks
        )
        rows.append(forms(op @ probes, probes))
    return torch.stack(rows)


# -- the problems ----------------------------------------------------------------------------------------------
N, D_IN, CLASSES = 1024, 4, 3
VOCAB, T, SEQUENCES = 5, 5, 256


def mlp(d_out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, d_out)).double()


class CausalBag(nn.Module):
    """A tiny causal LM: position t's logits from the mean of the embeddings of tokens 0..t."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 3), nn.Linear(3, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        prefix_means = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1).unsqueeze(-1)
        return self.head(torch.tanh(prefix_means))


def categorical_terms(logits: Tensor):
    """Each example's class c with p(c|x) = softmax, and its cross-entropy."""
    log_p = logits.log_softmax(dim=1)
    for n in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            yield log_p[n, c].detach().exp(), -log_p[n, c]


def gaussian_terms(outputs: Tensor):
    """Each element's label y ~ N(f, 1/2) (squared error is its NLL), by the two-point rule y = f ± √(1/2)
    with weights 1/2: exact for E[(∂ℓ/∂f)²], quadratic in y."""
    for n in range(outputs.shape[0]):
        for k in range(outputs.shape[1]):
            f = outputs[n, k]
            for sign in (1.0, -1.0):
                yield torch.tensor(0.5), (f - (f.detach() + sign * math.sqrt(0.5))) ** 2


def bernoulli_terms(logits: Tensor):
    """Each element's label in {0, 1} with P(1) = sigmoid, and its binary cross-entropy."""
    for n in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            z, p = logits[n, k], logits[n, k].detach().sigmoid()
            for label, probability in ((1.0, p), (0.0, 1 - p)):
                yield probability, F.binary_cross_entropy_with_logits(z, torch.tensor(label, dtype=z.dtype))


def next_token_terms(labels: Tensor):
    """Each counted label t+1 (not -100) with every token v, p = softmax of position t's logits."""

    def terms(logits: Tensor):
        log_p = logits.log_softmax(dim=-1)
        for n, t in (labels[:, 1:] != -100).nonzero().tolist():
            for v in range(logits.shape[-1]):
                yield log_p[n, t, v].detach().exp(), -log_p[n, t, v]

    return terms


@functools.cache
def problem(name: str):
    """``(model, loss_fn, data in two uneven batches, exact E[F̂], samples per seed)``."""
    g = torch.Generator().manual_seed(1)
    if name == "lm":
        model = CausalBag().double()
        ids = torch.randint(0, VOCAB, (SEQUENCES, T), generator=g)
        lengths = torch.randint(2, T + 1, (SEQUENCES,), generator=g)
        labels = torch.where(torch.arange(T) < lengths.unsqueeze(1), ids, -100)  # right padding: ignored
        counted = int((labels[:, 1:] != -100).sum())
        exact = enumerated_fisher(model, ids, next_token_terms(labels), counted)
        cut = SEQUENCES // 3
        return model, next_token_cross_entropy, [(ids[:cut], labels[:cut]), (ids[cut:], labels[cut:])], exact, 192
    x = torch.randn(N, D_IN, dtype=torch.float64, generator=g)
    if name in ("ce", "ce-sum"):
        model = mlp(CLASSES)
        y = torch.randint(0, CLASSES, (N,), generator=g)  # the data's labels play no part in E[F̂]
        loss_fn = nn.CrossEntropyLoss(reduction="sum" if name == "ce-sum" else "mean")
        exact = enumerated_fisher(model, x, categorical_terms, 1.0 if name == "ce-sum" else N)
        samples = 48
    elif name == "mse":
        model, loss_fn = mlp(2), nn.MSELoss()
        y = torch.randn(N, 2, dtype=torch.float64, generator=g)
        exact, samples = enumerated_fisher(model, x, gaussian_terms, N * 2), 128
    else:
        model, loss_fn = mlp(2), nn.BCEWithLogitsLoss()
        y = torch.randint(0, 2, (N, 2), generator=g).double()
        exact, samples = enumerated_fisher(model, x, bernoulli_terms, N * 2), 48
    cut = N // 3
    return model, loss_fn, [(x[:cut], y[:cut]), (x[cut:], y[cut:])], exact, samples


def probes_for(n: int) -> Tensor:
    return torch.randn(n, PROBES, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


# -- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ce", "ce-sum", "mse", "bce", "lm"])
def test_mc_fisher_is_unbiased_for_its_exact_expectation(name):
    """The seeds' mean of u_iᵀ F̂ u_j is within 5 standard errors of the enumerated expectation, and the check
    resolves a 1 % bias (its half-width is under 1 % of every diagonal form)."""
    model, loss_fn, data, exact, samples = problem(name)
    probes = probes_for(exact.shape[0])
    estimates = mc_estimates(model, loss_fn, data, probes, samples)
    truth = forms(exact @ probes, probes)
    assert resolution(estimates, truth) < 0.01
    assert consistent(estimates, truth)


def test_the_check_rejects_a_two_percent_bias(monkeypatch):
    """The same check on MCFisher with its products scaled by 1.02 fails: a 2 % bias cannot pass (every case's
    resolution is asserted under 1 % above; cross-entropy shows the rejection)."""
    original = hessops.MCFisher._output_operator

    def biased(self, outputs, batch):
        matmat = original(self, outputs, batch)
        return lambda u: 1.02 * matmat(u)

    monkeypatch.setattr(hessops.MCFisher, "_output_operator", biased)
    model, loss_fn, data, exact, samples = problem("ce")
    probes = probes_for(exact.shape[0])
    assert not consistent(mc_estimates(model, loss_fn, data, probes, samples), forms(exact @ probes, probes))


def test_the_check_rejects_labels_drawn_from_the_wrong_distribution(monkeypatch):
    """MCFisher sampling uniform labels instead of the model's (same scale, another matrix) fails the check."""
    from hessops.operators import fisher

    draw = fisher._sample_categorical
    monkeypatch.setattr(fisher, "_sample_categorical", lambda probs, s, gen: draw(torch.ones_like(probs), s, gen))
    model, loss_fn, data, exact, samples = problem("ce")
    probes = probes_for(exact.shape[0])
    assert not consistent(mc_estimates(model, loss_fn, data, probes, samples), forms(exact @ probes, probes))


def test_the_enumerated_expectation_is_the_ggn_for_these_likelihoods():
    """A check of the reference itself: for cross-entropy, E[F̂] is the GGN (tests/reference.py's dense_ggn,
    another computation), to float64 rounding."""
    from reference import dense_ggn, relative_error

    model, loss_fn, data, exact, _ = problem("ce")
    assert relative_error(exact, dense_ggn(model, loss_fn, data)) < 1e-10
