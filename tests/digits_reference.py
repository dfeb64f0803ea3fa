"""Dense float64 references of the zoo's digits problem as the command line builds it (the model mlp-digits, the
dataset digits): tests/reference.py's double backward and Jᵀ H_ℓ J on the whole dataset at once, no hessops operator
code. tests/cli/test_cli.py and tests/analysis/test_deflation.py check the command's numbers against them."""

from __future__ import annotations

import torch
from reference import as_float64, dense_ggn, reference_hessian

from hessops.zoo.data import load_dataset, make_loader
from hessops.zoo.models import build_model, make_loss, model_spec


def digits_dense_hessian(num_examples: int, seed: int = 0, model_seed: int | None = None) -> torch.Tensor:
    """The float64 reference the CLI's numbers are checked against: tests/reference.py's double backward on the
    whole dataset at once (no hessops code; the model and data are the zoo's, as the command builds them)."""
    model = build_model("mlp-digits", seed=seed if model_seed is None else model_seed).double()
    data = make_loader(load_dataset("digits", num_examples=num_examples, seed=seed), batch_size=128)
    return reference_hessian(model, make_loss(model_spec("mlp-digits")), as_float64(data))


def digits_dense_ggn(num_examples: int, seed: int = 0) -> torch.Tensor:
    """The float64 GGN (tests/reference.py's Jᵀ H_ℓ J on the whole dataset) of the same problem."""
    model = build_model("mlp-digits", seed=seed).double()
    data = make_loader(load_dataset("digits", num_examples=num_examples, seed=seed), batch_size=128)
    return dense_ggn(model, make_loss(model_spec("mlp-digits")), as_float64(data))
