"""The estimators' statistical promises, tested as such: over many fixed seeds, trace's standard error and the
confidence intervals of the SLQ and deflated log-determinants and of the basin volume cover the dense truth
(float64 eigvalsh) at about their stated rate. The experiments are benchmarks/coverage.py's, with fewer seeds
(``python -m benchmarks.coverage --seeds 1000`` measures them precisely: benchmarks/RESULTS.md, Run S).

Tolerance: a row passes when its number of misses lies within the central 99.8 % of Binomial(seeds, 1 − nominal)
(:meth:`benchmarks.coverage.Coverage.consistent`): below it the interval is too narrow (under-covers), above it
too wide (for an interval widened by bounds on its biases only the first counts). A correct interval fails a
row with probability 0.2 %; with seeds fixed the outcome is deterministic.
Under-coverage by 3 points (92 % for 95 %) fails at the trace's 400 seeds only about half the time, and the
log-determinants' 100 seeds catch coverage below about 87 %, so these tests catch a broken promise (wrong degrees
of freedom, a missing term, a bias); the benchmark's 1000 seeds measure the rate, for more problems.

Work is bounded by products, not time: the problems are 50-200 dimensional dense matrices, and each
experiment's total of products (columns) is asserted below its budget; the log-determinants' cost is mostly
their Lanczos steps, 60 at most per run."""

from __future__ import annotations

import pytest
import torch
from reference import reference_hessian

from benchmarks.coverage import Coverage, experiments, in_random_basis, mlp_hessian, regularized, spectra
from hessops.linalg.lanczos import rademacher
from hessops.linalg.quadrature import quadrature

TRACE_SEEDS, LOGDET_SEEDS, UNRESOLVED_SEEDS = 400, 100, 40
BUDGET = 60_000  # products (columns) per experiment: 400 trace runs of 100 probes, or 100 SLQ runs of 600


@pytest.fixture(scope="module")
def runs():
    return experiments(hessian=reference_hessian)  # the MLP's Hessian by the tests' double-backward reference


def check(coverage: Coverage) -> None:
    assert coverage.seeds * coverage.matvecs <= BUDGET
    low, high = coverage.bounds()
    assert coverage.consistent(), (
        f"{coverage.estimator} on {coverage.problem}: {coverage.misses} of {coverage.seeds} intervals missed the "
        f"truth (coverage {coverage.coverage:.3f}), outside {low}–{high} for a nominal {coverage.nominal:.0%}"
    )


@pytest.mark.parametrize(
    "key",
    [
        "trace-hutchinson-30-flat",
        "trace-hutchinson-100-clustered",
        "trace-hutchinson-100-ill-conditioned",
        "trace-hutchinson-30-mlp",
        "trace-hutch++-30-outlier",
        "trace-hutch++-100-decaying",
        "trace-hutch++-30-clustered",
        "trace-hutch++-100-ill-conditioned",
        "trace-hutch++-30-mlp",
    ],
)
def test_trace_standard_error_gives_a_t_interval_at_its_rate(runs, key):
    """``estimate ± t·std_error``, t at 95 % with ``samples − 1`` degrees of freedom (Hutchinson: ``probes``
    samples; Hutch++: the ``probes − 2⌊probes/3⌋`` deflated ones), covers ``tr A`` in 95 % of runs."""
    check(runs[key](TRACE_SEEDS))


@pytest.mark.parametrize("key", ["trace-hutchinson-100-1.96", "trace-hutch++-30-1.96", "trace-hutch++-100-1.96"])
def test_trace_z_scores_have_the_t_spread(runs, key):
    """``(estimate − truth)/std_error`` within ±1.96 as often as a t variable with ``samples − 1`` degrees of
    freedom is: 95 % for 100 Hutchinson probes, 94 % for 100 Hutch++ probes (34 samples), but 92 % for 30
    Hutch++ probes (10 samples), so ±1.96 standard errors is no 95 % interval there."""
    check(runs[key](TRACE_SEEDS))


@pytest.mark.parametrize("key", ["trace-hutchinson-10-outlier", "trace-hutchinson-10-decaying"])
@pytest.mark.xfail(
    strict=True,
    reason="Hutchinson's samples zᵀAz ≈ λ₁(q₁ᵀz)² + … are skewed when one eigenvalue dominates the variance, "
    "and a t interval over 10 of them under-covers: 86 % (outlier) and 89 % (decaying) over 1000 seeds (Run S); "
    "Hutch++ takes the outlier into its exact part (the rows above)",
)
def test_trace_t_interval_of_few_probes_on_a_spiked_spectrum(runs, key):
    check(runs[key](TRACE_SEEDS))


@pytest.mark.parametrize("key", ["slq-flat", "slq-mlp", "deflated-outlier", "deflated-mlp"])
def test_logdet_interval_covers_the_probes_noise_at_its_level(runs, key):
    """With ``lanczos_steps`` at the (complement's) dimension the quadrature is exact, so the Student-t interval
    over the probes covers ``log det A`` at its 95 %, as documented. Not tested here: plain SLQ on the
    one-outlier spectrum, whose 10 samples are skewed by log 100 ≫ the bulk's logs and covered 92.2 % over 1000
    seeds (Run S), too close to 95 % for 100 seeds to tell; deflating the outlier restores the rate (the
    ``deflated-outlier`` row)."""
    check(runs[key](LOGDET_SEEDS))


def test_basin_volume_interval_covers_the_dense_volume(runs):
    """The MLP Hessian + I, each run checking ``c`` by its own ``eigs`` and deflating 3: the log-volume's
    interval (the log-determinant's, halved and reflected) covers the dense log-volume at its 95 %."""
    check(runs["basin-mlp"](LOGDET_SEEDS))


@pytest.mark.xfail(
    strict=True,
    reason="the deflated noise_interval covers the probes' noise only, not the quadrature's bias (as "
    "documented): on κ = 10⁶, n = 200, 30 Lanczos steps it covered 0 of 1000 runs (60 steps: 60 %; Run S); the "
    "confidence_interval, widened by the reported quadrature_bias and deflation_bias, covers (the next test)",
)
def test_deflated_noise_interval_alone_with_unresolved_quadrature(runs):
    check(runs["deflated-ill-conditioned-30-steps"](UNRESOLVED_SEEDS))


def test_deflated_interval_widened_by_its_biases_covers_unresolved_quadrature(runs):
    """The deflated ``confidence_interval``, ``[low − quadrature_bias − deflation_bias, high]``, covers ``log det A``
    in at least 95 % of runs when 30 Lanczos steps leave the quadrature of a κ = 10⁶ spectrum unresolved (n = 200)."""
    check(runs["deflated-ill-conditioned-30-steps-biases"](UNRESOLVED_SEEDS))


@pytest.mark.parametrize("steps", [3, 10, 30, 120])
def test_gauss_radau_and_gauss_rules_bracket_each_probe(steps):
    """For log, each probe's Gauss-Radau rule with the node λ_min is below its exact ``zᵀ log(A) z / ‖z‖²`` and
    the Gauss rule above (derivatives of constant sign; Golub & Meurant 2010, §6.2), on the κ = 10⁶ spectrum
    and the MLP Hessian + I, and the bracket closes as the steps reach n (to rounding: 1e-12 of the span of
    log λ). The bound is what ``quadrature_bias`` is built from."""
    for problem in (
        in_random_basis("ill-conditioned", spectra(200)["ill-conditioned"]),
        regularized(mlp_hessian(reference_hessian), 1.0),
    ):
        values, vectors = torch.linalg.eigh(problem.matrix)
        Z = rademacher(problem.n, 6, torch.Generator().manual_seed(steps), problem.op)
        exact = (Z * ((vectors * values.log()) @ vectors.T @ Z)).sum(0) / (Z * Z).sum(0)
        rule = quadrature(problem.op, start=Z, lanczos_steps=steps)
        below, above = rule.radau(torch.log, float(values[0])), rule.per_probe(torch.log)
        slack = 1e-12 * float(values.log().max() - values.log().min())
        assert (below <= exact + slack).all() and (exact <= above + slack).all()
        if steps >= problem.n:
            assert (above - below).abs().max() <= slack
