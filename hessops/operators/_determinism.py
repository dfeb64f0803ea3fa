"""Cheap self-checks that an operator is one fixed matrix: not public API.

Lanczos on an operator that changes between products (or with the batching) returns eigenvalues that look
converged and are not. Two sources are checked, unless an operator is built with ``check_determinism=False``:

- the model (:func:`check_model`, once, at construction): the first batch's forward, run twice without
  gradients, must give the same outputs and loss and leave every buffer as it was;
- the data (:func:`batch_fingerprint`, every product): the examples a pass sees are summarized by
  :math:`\\big(N, \\sum_n p_n, \\sum_n |p_n|, \\sum_n p_n^2, \\sum_n \\lVert x_n\\rVert^2\\big)` in float64, with
  :math:`p_n = \\langle w, x_n\\rangle` for a fixed position-dependent :math:`w` over all of example
  :math:`n`'s tensors (inputs and targets; a tensor without the batch dimension counts for every example).
  It does not depend on the order of the examples or on how they are batched, so ``shuffle=True`` passes,
  while random augmentation or ``shuffle=True, drop_last=True`` (other examples each pass) change it;
  :func:`fingerprint_change` compares two passes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hessops.errors import NondeterministicOperatorError
from hessops.operators.functional import ParamTree, Problem, _leaves, call_model

_GOLDEN = 0.6180339887498949  # w_j = cos(φ j + 1/2): no two positions of a tensor, or two tensors, share w
# Sums over a pass in another order differ by at most ~N·eps·Σ|terms| (2e-10 relative for a million examples);
# random augmentation or a dropped batch changes them by far more.
FINGERPRINT_RTOL = 1e-8
OPT_OUT = "or pass check_determinism=False to accept a random operator (Lanczos on it is unreliable)"


def batch_fingerprint(inputs: Any, targets: Any, n_b: int) -> Tensor:
    """``(n_b, Σp, Σ|p|, Σp², Σ‖x‖²)`` of one batch, float64, on the device of its tensors."""
    leaves = _leaves((inputs, targets))
    device = leaves[0].device if leaves else torch.device("cpu")
    p = torch.zeros(n_b, dtype=torch.float64, device=device)
    q = torch.zeros(n_b, dtype=torch.float64, device=device)
    offset = 0
    for leaf in leaves:
        per_example = leaf.dim() > 0 and leaf.shape[0] == n_b
        x = leaf.detach().to(torch.float64)
        x = x.reshape(n_b, x[0].numel()) if per_example else x.reshape(1, x.numel())
        w = torch.arange(offset, offset + x.shape[1], dtype=torch.float64, device=device).mul_(_GOLDEN).add_(0.5).cos_()
        offset += x.shape[1]
        p += x @ w
        q += (x * x).sum(dim=1)
    return torch.stack(
        [torch.tensor(float(n_b), dtype=torch.float64, device=device), p.sum(), p.abs().sum(), (p * p).sum(), q.sum()]
    )


def fingerprint_change(before: Tensor, after: Tensor) -> str | None:
    """What differs between two passes' fingerprints beyond rounding (``None`` if nothing)."""
    before, after = before.cpu().tolist(), after.cpu().tolist()
    if before[0] != after[0]:
        return f"the number of examples went from {before[0]:.0f} to {after[0]:.0f}"
    scales = (max(before[2], after[2]), max(before[2], after[2]), max(before[3], after[3]), max(before[4], after[4]))
    for b, a, scale in zip(before[1:], after[1:], scales):
        if abs(a - b) > FINGERPRINT_RTOL * scale:
            moved = abs(a - b) / max(scale, 1e-300)
            return (
                f"the same number of examples ({before[0]:.0f}) hold other values "
                f"(a summary moved by {moved:.2g}, relative)"
            )
    return None


def data_changed_error(change: str) -> NondeterministicOperatorError:
    return NondeterministicOperatorError(
        f"the data changed between two products: {change}. Curvature is that of one fixed dataset, so every pass "
        "must yield the same examples (in any order): remove random augmentation from the loader, and use "
        f"drop_last=False (or shuffle=False) with shuffle=True; {OPT_OUT}"
    )


def check_model(problem: Problem, params: ParamTree, constants: dict[str, Tensor], inputs: Any, targets: Any) -> None:
    """Run the model and loss twice on one batch without gradients; raise if a buffer changed or the two
    outputs differ beyond ``1000·eps`` of the dtype (room for nondeterministic GPU reductions). The model's
    buffers are restored either way."""
    model = problem.model
    owners = {**dict(model.named_buffers()), **{k: v for k, v in constants.items() if isinstance(v, Tensor)}}
    snapshot = {name: b.detach().clone() for name, b in owners.items()}
    try:
        with torch.no_grad():
            runs = []
            for _ in range(2):
                outputs = call_model(model, problem.names, params, constants, inputs)
                runs.append(_leaves((outputs, problem.loss_fn(outputs, targets))))
                for name, b in owners.items():
                    if not torch.equal(b, snapshot[name]):
                        raise NondeterministicOperatorError(
                            f"the model's forward changed its buffer '{name}' (a running statistic or counter "
                            "updated in forward), so every product sees another function: update it outside "
                            f"forward, or only in training mode (then call model.eval()); {OPT_OUT}"
                        )
    finally:
        with torch.no_grad():
            for name, b in owners.items():
                b.copy_(snapshot[name])
    first, second = runs
    rtol = 1e3 * torch.finfo(params[0].dtype).eps
    for a, b in zip(first, second):
        if a.shape != b.shape or a.dtype != b.dtype:
            differ = True
        elif not a.is_floating_point() or not a.numel():
            differ = not torch.equal(a, b)
        else:
            differ = float((a - b).abs().max()) > rtol * float(a.abs().max())
        if differ:
            raise NondeterministicOperatorError(
                "the model is random: two forward passes of batch 0 with the same parameters gave different "
                "outputs (dropout with training=True, e.g. F.dropout(x, training=True) or Dropout in train mode "
                "with allow_train_mode=True, or sampling in forward). Make forward a fixed function (model.eval(), "
                f"F.dropout(x, training=self.training)); {OPT_OUT}"
            )
