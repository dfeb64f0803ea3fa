"""Coverage of hessops' standard errors and intervals over many seeds, against the dense truth.

    python -m benchmarks.coverage --seeds 1000

For each estimator and test problem, ``--seeds`` runs (seeds 0, 1, …) and the count of those whose interval
misses the truth: ``trace``'s ``estimate ± t·std_error`` (Student t with the samples' degrees of freedom, see
:func:`trace_samples`) and the ``confidence_interval`` of ``logdet`` (SLQ, deflated) and ``basin_volume``, at
their nominal 95 %. The truth is dense: the trace and ``Σ log λ`` of ``torch.linalg.eigvalsh`` in float64.
A row is *consistent* with its nominal rate when its misses lie within the central 99.8 % of
Binomial(seeds, 1 − nominal) (:meth:`Coverage.consistent`). tests/analysis/test_coverage.py runs the same experiments
with fewer seeds. Prints a Markdown table; ``--out`` also writes it as JSON.

The problems are ``n × n`` float64 matrices ``Q diag(λ) Qᵀ`` in a Haar-random basis ``Q`` (:func:`spectra`:
flat, one outlier, decaying, clustered, ill-conditioned) and a tiny tanh MLP's Hessian (:func:`mlp_hessian`), as
``cola.ops.Dense`` operators: the estimators' arithmetic on these matrices, at a fraction of a network's cost.
The SLQ and deflated rows whose ``lanczos_steps`` reach the (complement's) dimension have exact quadrature, so
their intervals are tested against exactly what they promise: the probes' noise. Rows marked ``resolved: no``
take fewer steps on an ill-conditioned spectrum, where the quadrature's bias, which the intervals leave out
(docs/analysis.md), shows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cola
import torch
from scipy.stats import binom
from scipy.stats import t as student_t
from torch import Tensor, nn

import hessops

CONFIDENCE = 0.95
LEVEL = 0.998  # the central mass of Binomial(seeds, 1 − nominal) within which a row's misses count as consistent


def spectra(n: int = 60) -> dict[str, Tensor]:
    """Five positive spectra of size ``n`` (float64) that stress the estimators: ``flat`` (uniform on [1, 2]),
    ``outlier`` (one eigenvalue 100 over a bulk on [0.5, 1.5]: it dominates the probes' variance), ``decaying``
    (``10 i^{-1.5} + 10^{-2}``), ``clustered`` (half near 1, half near 10) and ``ill-conditioned`` (``10^{-4}``
    to ``10^2``, log-spaced: κ = 10⁶)."""
    g = torch.Generator().manual_seed(0)

    def uniform(k: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(k, generator=g, dtype=torch.float64)

    i = torch.arange(1, n + 1, dtype=torch.float64)
    return {
        "flat": uniform(n, 1.0, 2.0),
        "outlier": torch.cat([torch.tensor([100.0], dtype=torch.float64), uniform(n - 1, 0.5, 1.5)]),
        "decaying": 10 * i**-1.5 + 1e-2,
        "clustered": torch.cat([uniform(n // 2, 0.99, 1.01), uniform(n - n // 2, 9.9, 10.1)]),
        "ill-conditioned": torch.logspace(-4, 2, n, dtype=torch.float64),
    }


@dataclass
class Problem:
    """A dense symmetric float64 ``matrix`` with its ``eigenvalues`` (ascending) and a ``name``."""

    name: str
    matrix: Tensor
    eigenvalues: Tensor

    @property
    def op(self) -> cola.ops.LinearOperator:
        return cola.SelfAdjoint(cola.ops.Dense(self.matrix))

    @property
    def n(self) -> int:
        return self.matrix.shape[0]

    @property
    def label(self) -> str:
        return f"{self.name}, n = {self.n}"


def in_random_basis(name: str, spectrum: Tensor, seed: int = 1) -> Problem:
    """``Q diag(spectrum) Qᵀ`` for a Haar-random orthogonal ``Q`` (QR of a Gaussian matrix, signs fixed): in the
    eigenbasis a Rademacher probe's ``zᵀAz`` would be exact."""
    n = len(spectrum)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    Q = q * torch.sign(torch.diagonal(r))
    matrix = (Q * spectrum) @ Q.T
    matrix = (matrix + matrix.T) / 2
    return Problem(name, matrix, torch.linalg.eigvalsh(matrix))


def mlp_hessian(hessian: Callable | None = None) -> Problem:
    """The Hessian of a tanh MLP 3 → 8 → 2 (n = 50) under MSE on 30 seeded random examples, in float64:
    indefinite, a few outliers over a bulk near 0. ``hessian(model, loss_fn, data)`` computes it
    (default :func:`hessops.dense_hessian`; the tests pass their double-backward reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    matrix = (hessian or hessops.dense_hessian)(model, nn.MSELoss(), [(x, y)]).double()
    matrix = (matrix + matrix.T) / 2
    return Problem("MLP Hessian", matrix, torch.linalg.eigvalsh(matrix))


def regularized(problem: Problem, c: float) -> Problem:
    """``problem`` plus ``c·I``, named with ``c``."""
    eye = torch.eye(problem.n, dtype=torch.float64)
    return Problem(f"{problem.name} + {c:g}·I", problem.matrix + c * eye, problem.eigenvalues + c)


@dataclass
class Coverage:
    """Of ``seeds`` runs of ``estimator`` on ``problem``, ``misses`` intervals at level ``nominal`` missed the
    truth; ``matvecs`` products (columns) per run (the largest over the runs), ``settings`` the estimator's
    arguments, ``resolved``: whether the Lanczos steps make the quadrature exact (``None``: no quadrature).
    ``at_least``: the interval is widened by bounds on its biases, so only under-coverage breaks its promise.
    ``refused``: runs that raised :class:`hessops.NotPositiveDefiniteError` instead of returning an interval (not
    counted in ``seeds``)."""

    estimator: str
    problem: str
    nominal: float
    seeds: int
    misses: int
    matvecs: int
    settings: dict = field(default_factory=dict)
    resolved: bool | None = None
    at_least: bool = False
    refused: int = 0

    @property
    def coverage(self) -> float:
        return 1 - self.misses / self.seeds

    def bounds(self, level: float = LEVEL) -> tuple[int, int]:
        """The central ``level`` of Binomial(seeds, 1 − nominal): the range of misses consistent with the rate."""
        tail = (1 - level) / 2
        p = 1 - self.nominal
        return int(binom.ppf(tail, self.seeds, p)), int(binom.ppf(1 - tail, self.seeds, p))

    def consistent(self, level: float = LEVEL) -> bool:
        low, high = self.bounds(level)
        return (self.at_least or low <= self.misses) and self.misses <= high

    def row(self) -> str:
        low, high = self.bounds()
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        resolved = {None: "–", True: "yes", False: "no"}[self.resolved]
        verdict = "yes" if self.consistent() else ("**under**" if self.misses > high else "**over**")
        return (
            f"| {self.estimator} | {self.problem} | {settings} | {resolved} | {'≥ ' * self.at_least}{self.nominal:.0%} | "
            f"{self.coverage:.3f} | {self.misses} ({low}–{high}) | {verdict} | {self.seeds} | {self.refused} | "
            f"{self.matvecs} |"
        )


HEADER = (
    "| estimator | problem | settings | quadrature resolved | nominal | observed coverage | misses (consistent range) "
    "| consistent | seeds | refused | matvecs per run |\n| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: "
    "| ---: |"
)


def trace_samples(method: str, probes: int) -> int:
    """The number of samples behind :func:`hessops.trace`'s ``std_error``: ``probes`` for Hutchinson, the
    ``probes − 2⌊probes/3⌋`` deflated samples for Hutch++."""
    return probes if method == "hutchinson" else probes - 2 * (probes // 3)


def trace_coverage(problem: Problem, method: str, probes: int, seeds: int, quantile: float | None = None) -> Coverage:
    """``estimate ± q·std_error`` against ``tr A`` over ``seeds`` runs, ``q`` the Student-t quantile at
    :data:`CONFIDENCE` with ``samples − 1`` degrees of freedom (:func:`trace_samples`), or ``quantile`` (then
    the nominal rate is the t distribution's mass within ``±quantile``)."""
    dof = trace_samples(method, probes) - 1
    if quantile is None:
        q, nominal = float(student_t.ppf(0.5 + CONFIDENCE / 2, dof)), CONFIDENCE
    else:
        q, nominal = quantile, float(2 * student_t.cdf(quantile, dof) - 1)
    truth = float(problem.eigenvalues.sum())
    op, misses, matvecs = problem.op, 0, 0
    for seed in range(seeds):
        result = hessops.trace(op, probes=probes, method=method, seed=seed)
        misses += not abs(result.estimate - truth) <= q * result.std_error
        matvecs = max(matvecs, result.n_matvecs)
    name = method if quantile is None else f"{method}, ±{quantile:g} s.e."
    return Coverage(f"trace ({name})", problem.label, nominal, seeds, misses, matvecs, {"probes": probes})


def logdet_coverage(
    problem: Problem, method: str, probes: int, lanczos_steps: int, seeds: int, deflate: int = 0, biases: bool = False
) -> Coverage:
    """``logdet(method=method)``'s ``confidence_interval`` ``[low, high]`` at :data:`CONFIDENCE` against
    ``Σ log λ`` over ``seeds`` runs; the deflated runs get the true smallest eigenvalue as their ``lower_bound``.
    For the deflated method without ``biases``, its ``noise_interval`` ``[low, high]`` (the probes' noise only);
    with ``biases``, its ``confidence_interval`` ``[low − quadrature_bias − deflation_bias, high]``, which should
    cover at least at the level."""
    truth = float(problem.eigenvalues.log().sum())
    extra = {"deflate": deflate, "lower_bound": float(problem.eigenvalues[0])} if method == "deflated" else {}
    op, misses, matvecs = problem.op, 0, 0
    for seed in range(seeds):
        result = hessops.logdet(op, method=method, probes=probes, lanczos_steps=lanczos_steps, seed=seed, **extra)
        low, high = result.noise_interval if method == "deflated" and not biases else result.confidence_interval
        misses += not low <= truth <= high
        matvecs = max(matvecs, result.n_matvecs)
    settings = {"probes": probes, "lanczos_steps": lanczos_steps} | ({"deflate": deflate} if extra else {})
    resolved = lanczos_steps >= problem.n - deflate
    name = f"logdet ({method}{', low − biases' * biases})"
    return Coverage(name, problem.label, CONFIDENCE, seeds, misses, matvecs, settings, resolved, at_least=biases)


def basin_coverage(
    problem: Problem, c: float, probes: int, lanczos_steps: int, seeds: int, deflate: int, threshold: float = 1.0
) -> Coverage:
    """``basin_volume(H, c=c, method="deflated")``'s ``confidence_interval`` of the log-volume against the dense
    one over ``seeds`` runs, each with its own check of ``c`` (``eigs`` for the smallest eigenvalue of ``H``); a
    run whose check refuses (:class:`hessops.NotPositiveDefiniteError`) counts as ``refused``, and the next seed
    is run in its place, so that ``seeds`` intervals are counted."""
    n = problem.n
    truth = (
        hessops.log_unit_ball_volume(n)
        + 0.5 * n * math.log(2 * threshold)
        - 0.5 * float((problem.eigenvalues + c).log().sum())
    )
    op, misses, matvecs, refused, seed = problem.op, 0, 0, 0, -1
    while (seed := seed + 1) < seeds + refused:
        try:
            volume = hessops.basin_volume(
                op,
                threshold=threshold,
                c=c,
                method="deflated",
                deflate=deflate,
                probes=probes,
                lanczos_steps=lanczos_steps,
                seed=seed,
            )
        except hessops.NotPositiveDefiniteError:
            refused += 1
            continue
        low, high = volume.confidence_interval
        misses += not low <= truth <= high
        matvecs = max(matvecs, volume.n_matvecs)
    settings = {"c": c, "probes": probes, "lanczos_steps": lanczos_steps, "deflate": deflate}
    resolved = lanczos_steps >= n - deflate
    return Coverage(
        "basin_volume (deflated)",
        problem.label,
        CONFIDENCE,
        seeds,
        misses,
        matvecs,
        settings,
        resolved,
        refused=refused,
    )


MLP_C = 1.0  # the damping of the MLP Hessian (λ_min = −0.82): H + I has eigenvalues in [0.18, 3.26]


def experiments(hessian: Callable | None = None) -> dict[str, Callable[[int], Coverage]]:
    """The experiments by key, each a function of the number of seeds; ``hessian`` computes the MLP's Hessian
    (:func:`mlp_hessian`). Trace problems are 200 × 200 (so that 100 probes stay below ``n``), the others 60 × 60."""
    large = {name: in_random_basis(name, s) for name, s in spectra(200).items()}
    small = {name: in_random_basis(name, s) for name, s in spectra(60).items()}
    mlp = mlp_hessian(hessian)
    damped = regularized(mlp, MLP_C)
    runs: dict[str, Callable[[int], Coverage]] = {}
    for method in ("hutchinson", "hutch++"):
        for probes in (30, 100):
            for name, problem in large.items():
                runs[f"trace-{method}-{probes}-{name}"] = lambda s, p=problem, m=method, k=probes: trace_coverage(
                    p, m, k, s
                )
            runs[f"trace-{method}-{probes}-1.96"] = lambda s, m=method, k=probes: trace_coverage(
                large["flat"], m, k, s, quantile=1.96
            )
        runs[f"trace-{method}-30-mlp"] = lambda s, m=method: trace_coverage(mlp, m, 30, s)
    for name in ("outlier", "decaying"):  # few probes of a spiked spectrum: skewed samples
        runs[f"trace-hutchinson-10-{name}"] = lambda s, p=large[name]: trace_coverage(p, "hutchinson", 10, s)
    for name, problem in [*small.items(), ("mlp", damped)]:
        runs[f"slq-{name}"] = lambda s, p=problem: logdet_coverage(p, "slq", 10, p.n, s)
        runs[f"deflated-{name}"] = lambda s, p=problem: logdet_coverage(p, "deflated", 10, p.n - 3, s, deflate=3)
    for steps in (30, 60):  # n = 200, κ = 10⁶: the quadrature unresolved
        for biases in (False, True):
            runs[f"deflated-ill-conditioned-{steps}-steps{'-biases' * biases}"] = lambda s, k=steps, b=biases: (
                logdet_coverage(large["ill-conditioned"], "deflated", 10, k, s, deflate=3, biases=b)
            )
    runs["basin-mlp"] = lambda s: basin_coverage(mlp, MLP_C, 10, mlp.n - 3, s, deflate=3)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--only", nargs="+", help="experiment keys (default: all)")
    parser.add_argument("--out", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    runs = experiments()
    keys = args.only or list(runs)
    print(HEADER, flush=True)
    rows = []
    for key in keys:
        coverage = runs[key](args.seeds)
        rows.append({"key": key, **asdict(coverage), "coverage": coverage.coverage, "bounds": coverage.bounds()})
        print(coverage.row(), flush=True)
        if args.out:  # after each row, so that a long run keeps what it finished
            command = "python -m benchmarks.coverage " + " ".join(argv)
            args.out.write_text(json.dumps({"command": command, "level": LEVEL, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
