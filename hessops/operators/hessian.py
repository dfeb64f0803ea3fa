"""The exact Hessian of the dataset mean loss."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessops._cola import cola
from hessops.constants import HVP_MODES
from hessops.errors import HvpFormulationError, HvpFormulationWarning, InvalidArgumentError
from hessops.operators import _hvp, compiled, finite_difference, hvp_tuning, softmax_head
from hessops.operators import witness as first_order
from hessops.operators._base import Batch, CurvatureOperator
from hessops.operators.distributed import all_reduce
from hessops.operators.functional import ParamTree, call_model, differentiable_kernels, flat_to_tree, split_examples
from hessops.operators.hvp_tuning import _TUNED, CANDIDATES, Tuning  # noqa: F401 - where tests and users look


class Hessian(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the dataset mean loss
    :math:`L(\theta) = \frac1N \sum_n \ell(f(x_n;\theta), y_n)`, as a ``SelfAdjoint`` CoLA operator.

    It is symmetric but in general indefinite. Products are computed batch by batch, each block of
    ``chunk_size`` columns at once, in one of these exact formulations (``hvp_mode``,
    hessops/operators/_hvp.py):

    - ``"autograd"``: double backward with ``torch.autograd.grad`` — the gradient's graph is built once per
      batch and differentiated again for all columns (``is_grads_batched``); freed before the next batch.
      The reference: right on every model torch can differentiate twice;
    - ``"autograd-loop"``: the same graph, differentiated once per column;
    - ``"forward-over-reverse"``: ``vmap(jvp(grad(L_b)))``; where torch cannot run it (torch 2.14 raises
      "ZeroTensors are immutable" for ``nn.MSELoss``) it falls back to ``"autograd"``;
    - ``"reverse-over-forward"``: ``vmap(grad(v ↦ jvp(L_b)·v))`` — wrong in torch 2.14 through LayerNorm,
      InstanceNorm and BatchNorm with batch statistics (docs/torch-pitfalls.md), so refused on such models;
    - ``"reverse-over-reverse"``: ``vmap`` over the ``vjp`` of ``grad(L_b)``;
    - ``"compiled"``: forward-over-reverse under ``torch.compile``, column by column: about two thirds of double
      backward's time on a GPT, but each new batch shape compiles (about 60 s for a 10M-parameter GPT on 2 CPU
      cores with an empty inductor cache; hessops/operators/compiled.py);
    - ``"finite-difference"``: central differences of the gradient, two first-order gradients a column: not
      exact, but needs no second derivative (any kernel, any wrapper that supports ``backward()``); its error is
      measured on the first product and carried into :func:`hessops.eigs`' bounds (:attr:`product_error`,
      hessops/operators/finite_difference.py);
    - ``"auto"`` (default): double backward, until a run has shown that tuning can pay: after 20 products
      of one kind (one column, or a block) that took at least 2 s each, the candidates are checked against
      double backward and timed on a slice of a batch, and the fastest that agrees is kept; tuning spends
      at most 10 % of the time the products took, plus one step (hessops/operators/hvp_tuning.py;
      ``HESSOPS_HVP_TUNING=0`` turns this off). Single products try the compiled one later, once 10 % of
      their time covers its expected compile, and keep it if it agrees and is faster. What it did is in
      :attr:`hvp_tuning`.

    The reference itself is checked on the first product: double backward against central differences of the
    gradient on a slice of the first batch (``witness``, hessops/operators/witness.py), and the operator is
    refused (:class:`~hessops.errors.WitnessError`) if they disagree. torch's double backward is wrong through
    weight norm, which hessops therefore writes out in plain operations (hessops/operators/_written_out.py).

    An explicit mode other than ``"autograd"`` is checked against double backward on its first product, and
    refused (:class:`~hessops.errors.HvpFormulationError`) if it disagrees. Attention runs in torch's math
    kernel, the one with second derivatives. The other keyword arguments are :class:`CurvatureOperator`'s.

    Args:
        model: as in :class:`CurvatureOperator`.
        loss_fn: as in :class:`CurvatureOperator`.
        data: as in :class:`CurvatureOperator`.
        hvp_mode: the formulation, above: ``"auto"`` (default), ``"autograd"``, ``"autograd-loop"``,
            ``"forward-over-reverse"``, ``"reverse-over-forward"``, ``"reverse-over-reverse"``, ``"compiled"`` or
            ``"finite-difference"``.

    Raises:
        InvalidArgumentError: ``hvp_mode`` is not one of the formulations.
        HvpFormulationError: ``hvp_mode`` is known wrong through a layer of the model, or found wrong on its first
            product; or torch cannot differentiate the model twice.
        TrainModeError: and the other refusals of :class:`CurvatureOperator`.
    """

    name = "hessian"  # its key in hessops.constants.OPERATOR_CLASSES

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Iterable,
        *,
        hvp_mode: str = "auto",
        params: Sequence[Tensor] | None = None,
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        micro_batch_size: int | None = None,
        progress: bool = False,
        allow_train_mode: bool = False,
        batch_size_fn: Callable[[Any], int] | None = None,
        unpack_inputs: bool = True,
        check_determinism: bool = True,
        distributed: bool | None = None,
        group: Any = None,
        witness: bool = True,
    ):
        if hvp_mode not in HVP_MODES:
            raise InvalidArgumentError(f"hvp_mode={hvp_mode!r}: choose one of {HVP_MODES}")
        if hvp_mode == finite_difference.MODE:
            finite_difference.refuse_low_precision(dtype or _model_dtype(model))
            witness = False  # first derivatives only: nothing for the witness to catch; the error is measured instead
        wrong = _hvp.known_wrong_on(hvp_mode, model)
        if wrong:
            raise HvpFormulationError(
                f"hvp_mode={hvp_mode!r} is wrong through {', '.join(wrong)} in torch (its products are 10-100 % "
                "off; docs/torch-pitfalls.md): use hvp_mode='auto' or another formulation"
            )
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            dtype=dtype,
            chunk_size=chunk_size,
            micro_batch_size=micro_batch_size,
            progress=progress,
            allow_train_mode=allow_train_mode,
            batch_size_fn=batch_size_fn,
            unpack_inputs=unpack_inputs,
            check_determinism=check_determinism,
            distributed=distributed,
            group=group,
            witness=witness,
        )
        self.hvp_mode = hvp_mode
        self.annotations = self.annotations | {cola.SelfAdjoint}

    @property
    def hvp_tuning(self) -> dict[str, Tuning]:
        """What choosing the formulation did, per kind of product (``"single"``, ``"block"``): the mode, its
        source, the seconds it cost, and each candidate's error and time on the slice."""
        return self.problem.memo.setdefault("hvp_tuning", {})

    def _matmat_batch(self, batch: Batch, blocks: list[ParamTree]) -> tuple[list[ParamTree], Tensor]:
        problem = self.problem
        randomness = "same" if problem.allow_train_mode else "error"

        if self.hvp_mode == finite_difference.MODE:  # first derivatives only: no closed-form head to check
            return self._finite_differences(batch, blocks)
        if self.softmax_head is None and softmax_head.applies(problem.loss_fn):  # until the check has decided
            self._check_head(batch, blocks)
        kind = _kind(blocks[0][0].shape[0] if len(blocks) == 1 else 2)
        if not self._settled(kind) and not self._tuning_deferred(kind):
            self.hvp_tuning[kind] = self._tune(kind, batch, blocks, randomness)
        if kind not in self.hvp_tuning:  # "auto" before a run has shown tuning can pay: the reference
            whole = _batch_loss(problem, batch, batch.inputs, batch.targets, self._loss_for(_hvp.REFERENCE))
            return hvp_tuning.run_reference(
                lambda: _hvp.run(_hvp.REFERENCE, whole, batch.params, blocks, randomness, problem.memo)
            )
        if kind == "single" and self._compile_due():
            return self._compile_trial(batch, blocks, randomness)
        return self._products(self.hvp_tuning[kind].mode, batch, batch.inputs, batch.targets, blocks, randomness)

    def _finite_differences(self, batch: Batch, blocks: list[ParamTree]):
        """The gradient-only products of this batch; on the operator's first batch, their error measured first
        (:func:`finite_difference.estimate`)."""
        problem = self.problem
        loss_of = finite_difference.batch_loss(
            problem.model, problem.names, problem.loss_fn, batch.constants, batch.inputs, batch.targets
        )
        if "finite_difference" not in problem.memo:
            first = tuple(t[0] for t in blocks[0])
            problem.memo["finite_difference"] = finite_difference.estimate(
                loss_of, finite_difference.exact_product(loss_of, batch.params), batch.params, first
            )
            for kind in ("single", "block"):
                self.hvp_tuning[kind] = Tuning(kind, finite_difference.MODE, "finite differences")
        return finite_difference.run(loss_of, batch.params, blocks)

    def _agree_on_error(self) -> None:
        """Data-parallel ranks measured the finite differences' error on their own first batch (a rank without data
        measured none): after the first product all take the largest, so that every rank's bounds, and with them
        eigs' stopping decisions, agree (one all-reduce of ``world`` numbers, once)."""
        problem = self.problem
        if problem.distributed is None or problem.memo.get("finite_difference_agreed"):
            return
        group, rank, world = problem.distributed
        report = problem.memo.get("finite_difference")
        table = torch.zeros(world, dtype=torch.float64, device=self.device)
        if report is not None and math.isfinite(report.error):
            table[rank] = report.error
        all_reduce(table, group)
        if report is None:  # no data here: the others' measurement
            report = problem.memo["finite_difference"] = finite_difference.FiniteDifferenceError(
                finite_difference.step(self.dtype), exact=None, exact_failure="measured on other ranks (none here)"
            )
        report.error = float(table.max())
        problem.memo["finite_difference_agreed"] = True

    @property
    def product_error(self) -> float | None:
        """For ``hvp_mode="finite-difference"``: the relative error of one product measured on the first product
        (:class:`~hessops.operators.finite_difference.FiniteDifferenceError`'s ``error``), which
        :func:`hessops.eigs` adds, times ``max|θ|``, to its error bounds; ``None`` for the exact modes or before
        the first product."""
        report = self.problem.memo.get("finite_difference")
        return None if report is None else report.error

    @property
    def finite_difference_report(self) -> finite_difference.FiniteDifferenceError | None:
        """What measuring the finite differences' error found (``None`` for the exact modes or before the first
        product)."""
        return self.problem.memo.get("finite_difference")

    def _products(self, mode: str, batch: Batch, inputs: Any, targets: Any, blocks: list[ParamTree], randomness: str):
        """``mode``'s products ``[H_b V]`` on ``inputs``, ``targets`` (a batch, or a slice of one) and their loss."""
        problem = self.problem
        if mode == compiled.MODE:
            return compiled.run(
                problem.model, problem.names, problem.loss_fn, batch.params, batch.constants, inputs, targets, blocks
            )
        loss = _batch_loss(problem, batch, inputs, targets, self._loss_for(mode))
        return _hvp.run(mode, loss, batch.params, blocks, randomness, problem.memo)

    def _compile_due(self) -> bool:
        """Whether ``"auto"`` tries the compiled product on this batch (:func:`compiled.due`): once per model and
        workload in a process, when tuning is on, in float32 or float64, after the single products have taken
        long enough to repay the expected compile."""
        tuning = self.hvp_tuning["single"]
        if self.hvp_mode != "auto" or tuning.source in ("disabled", "low precision") or tuning.compile_trial:
            return False
        if tuning.mode == compiled.MODE or hvp_tuning.compile_tried(self.problem.model, self._key("single")):
            return False
        memo = self.problem.memo
        spent = memo.get("hvp_usage", {}).get("single", (0, 0.0))[1]
        if hvp_tuning.budget(spent) < tuning.seconds:  # not yet (no disk read, no digest: this runs every product)
            return False
        if "compile_record" not in memo:  # read once per operator
            memo["compile_record"] = hvp_tuning.read_entry(self._compile_record())
        return compiled.due(spent, tuning.seconds, memo["compile_record"])

    def _compile_record(self) -> str:
        """The key of the compiled trial's record in the tuner's disk cache for this model and workload."""
        problem = self.problem
        entry = hvp_tuning.cache_key(problem.model, problem.names, problem.shapes, self.device, self.dtype, "single")
        return compiled.record_key(entry)

    def _compile_trial(self, batch: Batch, blocks: list[ParamTree], randomness: str):
        """Try the compiled product on this batch, whole: double backward (whose products are returned), the tuned
        formulation when it is another (the baseline), then the compiled product twice (the first call compiles).
        Kept, for this model in this process, when it agrees with double backward and its second run is faster
        than the baseline; what it found is recorded in :attr:`hvp_tuning` and on disk."""
        problem, tuning = self.problem, self.hvp_tuning["single"]
        hvp_tuning.compile_tried(problem.model, self._key("single"), mark=True)
        began = time.perf_counter()

        def timed(mode: str):
            call = lambda: self._products(mode, batch, batch.inputs, batch.targets, blocks, randomness)  # noqa: E731
            return hvp_tuning._timed(mode, lambda: hvp_tuning.run_reference(call), self.device)

        reference, baseline = timed(_hvp.REFERENCE)
        if tuning.mode != _hvp.REFERENCE:
            _, baseline = timed(tuning.mode)
        trial = tuning.compile_trial
        trial.update(baseline=tuning.mode, baseline_seconds=baseline)
        try:
            (products, _), trial["compile_seconds"] = timed(compiled.MODE)
        except HvpFormulationError as failure:
            trial.update(kept=False, reason=str(failure).splitlines()[0])
        else:
            trial["error"] = error = hvp_tuning.relative_error(products, reference[0])
            if error > tuning.tolerance:
                trial.update(kept=False, reason=f"{error:.2g} off double backward (tolerance {tuning.tolerance:.1g})")
                warnings.warn(
                    f"the compiled Hessian-vector product was set aside: {trial['reason']}. hessops goes on with "
                    f"{tuning.mode} (docs/torch-pitfalls.md)",
                    HvpFormulationWarning,
                    stacklevel=8,
                )
            else:
                _, trial["seconds"] = timed(compiled.MODE)
                trial["kept"] = trial["seconds"] < baseline
                if not trial["kept"]:
                    trial["reason"] = f"slower than {tuning.mode} ({trial['seconds']:.3g} s against {baseline:.3g} s)"
        if trial["kept"]:
            tuning.mode, tuning.source = compiled.MODE, "compile trial"
            hvp_tuning.remember(problem.model, self._key("single"), compiled.MODE)
        tuning.seconds += time.perf_counter() - began
        hvp_tuning.write_entry(
            self._compile_record(), {"kept": trial["kept"], "compile_seconds": trial.get("compile_seconds")}
        )
        return reference

    @property
    def softmax_head(self) -> softmax_head.HeadCheck | None:
        """The first-use check of the closed-form softmax cross-entropy head
        (hessops/operators/softmax_head.py): ``None`` before the first product or for a loss it does not write
        out; a head that failed it is not used."""
        return self.problem.memo.get("softmax_head")

    def _loss_for(self, mode: str) -> Callable:
        """The loss ``mode`` differentiates: the closed-form head for the double-backward formulations once it
        has passed its check, else the user's."""
        check = self.softmax_head
        if mode in softmax_head.FORMULATIONS and check is not None and check.passed and softmax_head.enabled():
            return softmax_head.head_loss(self.problem.loss_fn)
        return self.problem.loss_fn

    def _check_head(self, batch: Batch, blocks: list[ParamTree]) -> None:
        """Validate the closed-form head on a slice of this batch (its first examples as the witness takes them,
        :func:`~hessops.operators.witness.slice_examples`; two random unit directions) against
        plain double backward, or reuse this process's verdict for the model; a head that disagrees is dropped
        with an :class:`~hessops.errors.HvpFormulationWarning`. After :data:`~hessops.operators.softmax_head.TRIES`
        slices that decide nothing (no counted target), the plain loss is kept without a check."""
        problem = self.problem
        key = (str(self.device), self.dtype, problem.names, problem.loss_fn.identity)
        found = softmax_head.earlier(problem.model, key)
        if found is None:
            inputs, targets, examples = split_examples(
                batch.inputs, batch.targets, batch.size, first_order.slice_examples(self)
            )[0]
            # Two random unit directions (a fixed seed), not the user's columns: a column in the Hessian's null space
            # (all ones through a softmax, say) has a product at rounding level, where a relative error judges nothing.
            rows = torch.randn(2, self.shape[0], generator=torch.Generator().manual_seed(0), dtype=self.dtype)
            block = flat_to_tree((rows / rows.norm(dim=1, keepdim=True)).to(self.device), problem.shapes)

            def products(loss_fn: Callable) -> list[ParamTree]:
                loss = _batch_loss(problem, batch, inputs, targets, loss_fn)
                with differentiable_kernels():
                    return _hvp.autograd(loss, batch.params, [block], batched=False)[0]  # no vmap: no sympy

            found = softmax_head.check(
                lambda: hvp_tuning.run_reference(lambda: products(problem.loss_fn)),
                lambda: products(softmax_head.head_loss(problem.loss_fn)),
                self.dtype,
                examples=examples,
                columns=block[0].shape[0],
            )
            if found is None:  # the slice decides nothing: the next batch is tried, up to TRIES of them
                tries = problem.memo["softmax_head_tries"] = problem.memo.get("softmax_head_tries", 0) + 1
                if tries < softmax_head.TRIES:
                    return
                found = softmax_head.HeadCheck(False, math.nan, tolerance=0.0)  # undecided: the plain loss
            softmax_head.remember(problem.model, key, found)
            softmax_head.remember(problem.model, key, found)
        problem.memo["softmax_head"] = found

    def _settled(self, kind: str) -> bool:
        """Whether the formulation of this kind of product is chosen for good: tuned, given, or refused tuning
        for a reason that lasts (a cheap product may still become worth tuning as a long run adds up)."""
        tuning = self.hvp_tuning.get(kind)
        return tuning is not None and tuning.source != "cheap product"

    def _matmat(self, X: Tensor) -> Tensor:
        if self.hvp_mode == finite_difference.MODE:
            result = super()._matmat(X)
            self._agree_on_error()
            return result
        kind = _kind(X.shape[1])
        if self._settled(kind) and (kind != "single" or self.hvp_mode != "auto"):
            return super()._matmat(X)
        began = time.perf_counter()
        result = super()._matmat(X)
        usage = self.problem.memo.setdefault("hvp_usage", {}).setdefault(kind, [0, 0.0])
        usage[0] += 1
        usage[1] += time.perf_counter() - began
        return result

    def _tuning_deferred(self, kind: str) -> bool:
        """``"auto"`` with tuning on runs double backward until :func:`hvp_tuning.worth_tuning` says (from
        this operator's products so far) whether to tune; a cheap product is then recorded as such."""
        if (
            self.hvp_mode != "auto"
            or not hvp_tuning.enabled()
            or hvp_tuning.in_process(self.problem.model, self._key(kind))
        ):
            return False
        products, seconds = self.problem.memo.get("hvp_usage", {}).get(kind, (0, 0.0))
        worth = hvp_tuning.worth_tuning(products, seconds)
        if worth is False:
            self.hvp_tuning[kind] = hvp_tuning.Tuning(kind, _hvp.REFERENCE, "cheap product")
        return not worth

    def _first_order(self, probe, batch: Batch, direction: ParamTree, step: float) -> Tensor:
        r"""Central differences of the gradient, :math:`(\nabla L_b(\theta + hd) - \nabla L_b(\theta - hd)) / 2h`
        with :math:`h = \mathrm{step} \cdot \max(\lVert\theta\rVert, 1)`: two first-order gradients."""
        h = step * max(first_order.tree_norm(batch.params), 1.0)
        return first_order.central(lambda s: probe.gradient(batch, first_order.shifted(batch.params, direction, s)), h)

    def _witness_products(self, batch: Batch, blocks: list[ParamTree]) -> tuple[list[ParamTree], Tensor]:
        """Double backward, whatever ``hvp_mode``: the reference that every other formulation is checked against
        on its first use (hvp_tuning), so the witness vouches for those too; the tuner's state is left alone."""
        loss = _batch_loss(self.problem, batch, batch.inputs, batch.targets)
        run = _hvp.run
        return hvp_tuning.run_reference(
            lambda: run(_hvp.REFERENCE, loss, batch.params, blocks, "error", self.problem.memo)
        )

    def _key(self, kind: str) -> tuple:
        return (str(self.device), self.dtype, self.problem.names, kind)

    def _tune(self, kind: str, batch: Batch, blocks: list[ParamTree], randomness: str) -> Tuning:
        """Validate (and for ``"auto"`` time) the formulations on a slice of this batch: the first
        ``TUNE_EXAMPLES`` examples and the first ``TUNE_COLUMNS`` columns of the first block (for ``"compiled"``:
        the whole batch and one column)."""
        problem = self.problem
        sliced_inputs, sliced_targets, examples = split_examples(
            batch.inputs, batch.targets, batch.size, hvp_tuning.TUNE_EXAMPLES
        )[0]
        columns = 1 if kind == "single" else min(hvp_tuning.TUNE_COLUMNS, blocks[0][0].shape[0])
        block = tuple(t[:columns] for t in blocks[0])
        if self.hvp_mode == compiled.MODE:  # the whole batch, one column: a slice would be one more shape to compile
            sliced_inputs, sliced_targets, examples = batch.inputs, batch.targets, batch.size
            columns, block = 1, tuple(t[:1] for t in blocks[0])
        probe = hvp_tuning.Slice(
            run=lambda mode: self._products(mode, batch, sliced_inputs, sliced_targets, [block], randomness),
            examples=examples,
            columns=columns,
            device=self.device,
        )
        return hvp_tuning.select(
            self.hvp_mode,
            kind,
            problem.model,
            self._key(kind),
            lambda: hvp_tuning.cache_key(problem.model, problem.names, problem.shapes, self.device, self.dtype, kind),
            probe,
            self.dtype,
            spent=problem.memo.get("hvp_usage", {}).get(kind, (0, 0.0))[1],
        )


def _batch_loss(problem, batch: Batch, inputs: Any, targets: Any, loss_fn: Callable | None = None) -> Callable:
    """``p ↦ (L_b(p), L_b(p))`` on ``inputs``, ``targets`` with ``batch``'s constants, as the formulations take it;
    ``loss_fn`` in place of the problem's loss (the same loss, differentiated another way)."""
    loss_fn = loss_fn or problem.loss_fn

    def batch_loss(p: ParamTree) -> tuple[Tensor, Tensor]:
        loss = loss_fn(call_model(problem.model, problem.names, p, batch.constants, inputs), targets)
        if loss.dim() != 0:
            raise _not_scalar(loss)
        return loss, loss

    return batch_loss


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _kind(columns: int) -> str:
    """``"single"`` for products with one column, ``"block"`` for several: the tuner chooses for each."""
    return "single" if columns == 1 else "block"


def _not_scalar(loss: Tensor) -> Exception:
    from hessops.errors import UnsupportedLossError

    return UnsupportedLossError(
        f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar: it must return the batch mean "
        "(reduction='mean')"
    )
