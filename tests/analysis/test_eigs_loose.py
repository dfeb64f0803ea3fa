"""A known bug, kept visible: with a loose ``value_tol`` eigs can report ``converged=True`` with a value whose bound
the truth violates, on an exact float32 operator (found 2026-12-08 while testing the finite-difference product; not
yet understood: the second Ritz value's residual, 0.039, exceeds its distance to both neighbouring eigenvalues, 0.024
and 0.030, yet its gap-based bound says 0.021). The truth: the dense eigenvalues of the same operator
(``to_dense``), which agree with the float64 model's to 1e-7."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessops
from tests.operators.test_grid import ARCHITECTURES, batches, build


@pytest.mark.xfail(strict=True, reason="eigs' gap-based bound at value_tol=0.05 on a float32 MLP: a known bug, open")
def test_a_loose_value_tol_keeps_its_promise_on_a_float32_mlp():
    model, _, _, _ = build("mlp", seed=0)
    g = torch.Generator().manual_seed(10)
    x, y = ARCHITECTURES["mlp"][1](40, g), torch.randint(0, 3, (40,), generator=g)
    model = model.float()
    op = hessops.Hessian(model, nn.CrossEntropyLoss(), batches(x.float(), y, [24, 16]))
    truth = torch.linalg.eigvalsh(op.to_dense().double())
    expected = truth[truth.abs().argsort(descending=True)][:2]
    spectrum = hessops.eigs(op, 2, "LM", value_tol=0.05)
    order = spectrum.values.abs().argsort(descending=True)
    assert spectrum.converged
    assert ((spectrum.values.double()[order] - expected).abs() <= spectrum.error_bounds.double()[order]).all()
