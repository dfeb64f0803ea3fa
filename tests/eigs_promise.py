"""eigs' promise, checked against dense truth: every reported value within its error bound of an eigenvalue and,
when the run says ``converged``, the i-th within its bound of the true i-th extreme eigenvalue, counted with
multiplicity (tests/analysis/test_multiplicity.py; tests/operators/test_witness.py on float32 models)."""

from __future__ import annotations

import torch

import hessops


def expected(truth: torch.Tensor, k: int, which: str) -> torch.Tensor:
    ascending = truth.sort().values
    if which == "LA":
        return ascending.flip(0)[:k]
    if which == "SA":
        return ascending[:k]
    if which == "LM":
        return truth[torch.argsort(truth.abs(), descending=True, stable=True)[:k]]
    return torch.cat([ascending.flip(0)[: k - k // 2], ascending[: k // 2].flip(0)])


def check_promise(spectrum: hessops.Spectrum, truth: torch.Tensor, k: int, which: str, dtype) -> None:
    """Every value within its bound of an eigenvalue; converged: the i-th within its bound of the true i-th."""
    slack = (1e-12 if dtype == torch.float64 else 1e-5) * float(truth.abs().max())
    values, bounds = spectrum.values.double().cpu(), spectrum.error_bounds.double().cpu()
    nearest = (values[:, None] - truth[None, :]).abs().min(dim=1).values
    assert bool((nearest <= bounds + slack).all()), (values, bounds, nearest)
    if spectrum.converged:
        assert values.shape[0] == k
        if which == "LM":  # ±λ of equal magnitude may come in either order: compare magnitudes, then signs
            truth_k = expected(truth, k, which)
            gap = (values.abs() - truth_k.abs()).abs()
            assert bool((gap <= bounds + slack).all()), (values, truth_k, bounds)
        else:
            gap = (values - expected(truth, k, which)).abs()
            assert bool((gap <= bounds + slack).all()), (values, expected(truth, k, which), bounds)
