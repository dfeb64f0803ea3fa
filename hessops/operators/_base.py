"""The base class of every curvature operator: it owns the data loop, the dataset weights, the checks and
the device; a subclass only says how one mini-batch's curvature multiplies blocks of vectors
(:meth:`CurvatureOperator._matmat_batch`: a batch and blocks in, blocks out)."""

# Over 500 lines for a reason: one class, CurvatureOperator, owns the data loop, the dataset weights, the checks and
# the device (docs/architecture.md), and its methods share its state; cut into mixins across modules, it would be
# harder to read, not easier. Its helpers that need no operator live in functional.py, _determinism.py, witness.py.

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessops._cola import cola
from hessops.errors import (
    DeviceMismatchError,
    DistributedError,
    DtypeMismatchError,
    EmptyDataError,
    InvalidArgumentError,
    NondeterministicOperatorError,
    NonFiniteLossError,
)
from hessops.numerics import digest, norm
from hessops.operators import _written_out
from hessops.operators import witness as first_order
from hessops.operators._determinism import batch_fingerprint, check_model, data_changed_error, fingerprint_change
from hessops.operators.distributed import fingerprint, synchronize
from hessops.operators.distributed import resolve as resolve_distributed
from hessops.operators.functional import (
    ParamTree,
    Problem,
    add_tree_,
    all_finite,
    announce_attention_kernels,
    batch_size,
    call_model,
    cast_floating,
    check_batch,
    check_train_mode,
    first_batch,
    flat_to_tree,
    model_state,
    normalize_device,
    select_parameters,
    split_batch,
    split_examples,
    write_tree_,
)
from hessops.operators.losses import check_counted, loss_spec, probe_mean

DEFAULT_CHUNK_SIZE = 16


@dataclass(frozen=True)
class Batch:
    r"""One mini-batch (or micro-batch) of the data, as the data loop hands it to
    :meth:`CurvatureOperator._matmat_batch`.

    ``inputs`` and ``targets`` are on the operator's device, floating tensors in its dtype; ``size`` is the
    number of examples, ``index`` the batch's position in the data and ``part`` the micro-batch within it (0
    for a whole batch). The point :math:`\theta` is ``params``, the differentiated parameters as a tuple of
    tensors in the flat vector's order, with ``constants``, the rest of the model's state (frozen parameters,
    buffers)."""

    inputs: Any
    targets: Any
    size: int
    index: int
    part: int
    params: ParamTree
    constants: dict[str, Tensor] = field(repr=False)
    problem: Problem = field(repr=False)

    def outputs(self, params: ParamTree, model: nn.Module | None = None) -> Any:
        """The model's outputs on this batch with its differentiated parameters set to ``params`` (a tuple
        like ``self.params``), through ``torch.func.functional_call``, so differentiable in ``params`` by
        ``torch.func``; ``model`` defaults to the operator's (a sub-network sharing its parameter names)."""
        return call_model(
            self.problem.model if model is None else model, self.problem.names, params, self.constants, self.inputs
        )

    def loss(self, outputs: Any) -> Tensor:
        """The batch loss of ``outputs`` against ``targets``, reduced as ``loss_fn`` reduces it (mean or sum)."""
        return self.problem.loss_fn(outputs, self.targets)


class CurvatureOperator(cola.ops.LinearOperator):
    r"""Curvature of the dataset loss :math:`L(\theta) = \frac1W \sum_b W_b L_b(\theta)` (``reduction="mean"``;
    :math:`W = \sum_b W_b`) or :math:`\sum_b L_b(\theta)` (``reduction="sum"``), :math:`L_b` the loss of batch
    :math:`b` (:mod:`hessops.operators.losses`).

    One matmat is one pass over ``data``. Batch :math:`b` contributes :math:`W_b \cdot C_b V` (mean) or
    :math:`C_b V` (sum), where :math:`C_b` is the curvature of the batch loss and :math:`W_b` what the batch
    mean divides by (its examples, elements, counted targets, or their class weights); a mean is divided by
    :math:`W` at the end, so unequal batches give exactly the full-batch operator, and a batch whose targets
    are all ignored (:math:`W_b = 0`) is skipped.

    A subclass implements :meth:`_matmat_batch` (one batch's curvature times blocks of vectors) and, if it
    derives anything from the model or the loss or refuses some, :meth:`_setup`; a subclass with options of
    its own lists them, with these, in its ``__init__`` (docs/extending.md).

    Construction checks what it can at once (below); the products raise on a bad batch or vector
    (:class:`~hessops.errors.DeviceMismatchError`, :class:`~hessops.errors.NonFiniteLossError`,
    :class:`~hessops.errors.WitnessError`, ...: docs/operators.md lists them).

    Args:
        model: the network; its current parameters are the point :math:`\theta`. Buffers are used as they are.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean or sum: a loss hessops knows (module,
            functional form or ``functools.partial`` of it), or a callable verified to be a mean over
            examples on the first batch (:func:`hessops.operators.losses.probe_mean`).
        data: a re-iterable of ``(inputs, targets)`` batches (a DataLoader, a list of tuples; a one-shot
            iterator is refused). ``inputs`` is a tensor, a tuple of positional tensors or a mapping of keyword
            tensors; the examples in a batch are counted from the first dimension its input tensors share
            (0-d tensors are constants). A dict holding ``"labels"`` (a HuggingFace batch) is ``(the rest, labels)``;
            for labels under another key, use ``hessops.zoo.data.labels_from``.
        params: parameters to differentiate, in the flat vector's order; default the trainable ones.
        dtype: the operator's dtype; default the parameters'. A wider dtype than the model's evaluates the
            model in that dtype (parameters, buffers and floating inputs are cast on the fly).
        chunk_size: columns vectorized together with ``vmap`` (bounds memory); default 16.
        micro_batch_size: split each batch into pieces of at most this many examples, each weighted by its
            size (bounds the memory of one batch's derivatives, at some speed; exact for a loss that is a
            mean over examples and a model that treats examples independently, i.e. in eval mode); default
            ``None``, whole batches.
        progress: show a tqdm bar over batches during each matmat.
        allow_train_mode: accept Dropout/BatchNorm in training mode, and BatchNorm without running statistics
            (the operator then depends on the batching, or is random).
        batch_size_fn: ``batch_size_fn(inputs) -> int``, the number of examples in a batch, where its input
            tensors do not share a first dimension (micro-batches then cut the tensors whose first dimension
            is that number).
        unpack_inputs: call ``model(*inputs)`` for a tuple and ``model(**inputs)`` for a mapping (default);
            with ``False``, ``model(inputs)``: the whole inputs object as one argument (``forward(batch)``; a
            mapping arrives as a ``dict``).
        check_determinism: check, cheaply, that the operator is one fixed matrix, and raise
            ``NondeterministicOperatorError`` naming the cause if not: at construction, the first batch's
            forward run twice must agree and leave the buffers alone (catches dropout with training=True,
            sampling, buffers updated in forward); at every product, an order-independent fingerprint of the
            examples seen must match the first product's (catches random augmentation and shuffle with
            drop_last; plain shuffling passes).
        distributed: data-parallel over a torch.distributed process group (default: exactly when
            ``torch.distributed`` is initialized or a ``group`` is given). Each rank passes its own shard as
            ``data``; every product is the exact mean over all ranks' examples, on every rank
            (docs/distributed.md).
        group: the process group of ``distributed`` (default: the world).
        witness: check the first product, on a slice of the first batch, against a first-order witness (central
            finite differences of the gradient or of the outputs: hessops/operators/witness.py), which catches
            torch's wrong second derivatives; refuse the operator (``WitnessError``) if it disagrees, and measure
            the products' noise (:attr:`product_noise`). ``HESSOPS_WITNESS=0`` turns it off for every operator.

    Raises:
        TrainModeError: Dropout or BatchNorm in training mode (without ``allow_train_mode``).
        NoParametersError: nothing to differentiate, or ``params`` names a tensor the model does not own.
        UnsupportedLossError: a loss that is not a scalar mean or sum over examples.
        InvalidArgumentError: an argument of the wrong type or out of range.
        DataFormatError: ``data`` is a one-shot iterator, or a batch is not an ``(inputs, targets)`` pair.
        DtypeMismatchError: ``dtype`` is not a floating dtype.
        NondeterministicOperatorError: the first batch's two forwards differ (``check_determinism``).
        DistributedError: ``distributed=True`` without an initialized process group.
    """

    name: str | None = None  # a registered operator's key in hessops.constants.OPERATOR_CLASSES

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Iterable,
        *,
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
        names, tensors = select_parameters(model, params)
        setup = resolve_distributed(distributed, group)
        model_dtype = tensors[0].dtype
        device = normalize_device(tensors[0].device)
        dtype = model_dtype if dtype is None else dtype
        if not dtype.is_floating_point:
            raise DtypeMismatchError(f"dtype={dtype} is not a floating dtype: use torch.float32 or torch.float64")
        if chunk_size is not None and chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be a positive number of columns, got {chunk_size}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise InvalidArgumentError(
                f"micro_batch_size must be a positive number of examples, got {micro_batch_size}"
            )
        if micro_batch_size is not None and allow_train_mode:
            raise InvalidArgumentError(
                "micro_batch_size splits batches, which changes what train-mode BatchNorm computes (batch "
                "statistics): call model.eval(), or drop micro_batch_size"
            )
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise InvalidArgumentError(
                f"batch_size_fn must be a function of a batch's inputs, got {type(batch_size_fn).__name__}"
            )
        check_train_mode(model, allow_train_mode)
        announce_attention_kernels(model)
        spec = loss_spec(loss_fn)
        first = None
        try:
            first = first_batch(data)
            inputs, targets = split_batch(first, 0)
            check_batch(inputs, targets, 0, device, model_dtype)
        except EmptyDataError:
            if setup is None:  # a rank's shard may be empty; the data loop checks the total
                raise
        problem = Problem(
            model=model,
            loss_fn=spec,
            data=data,
            names=names,
            shapes=tuple(p.shape for p in tensors),
            model_dtype=model_dtype,
            chunk_size=chunk_size,
            micro_batch_size=micro_batch_size,
            progress=progress,
            allow_train_mode=allow_train_mode,
            batch_size_fn=batch_size_fn,
            unpack_inputs=unpack_inputs,
            check_determinism=check_determinism,
            witness=witness,
            distributed=setup,
        )
        n = problem.numel
        super().__init__(dtype=dtype, shape=(n, n))
        self.problem = problem
        self.device = device
        if first is not None:
            self._check_first_batch(first)
        self._setup()

    def _check_first_batch(self, batch: Any) -> None:
        """Count batch 0's examples (an uncountable batch fails here, not in the first product), probe a loss
        hessops does not know (:func:`hessops.operators.losses.probe_mean`) and, with ``check_determinism``, check the
        model on its first micro-batch (:func:`hessops.operators._determinism.check_model`)."""
        problem = self.problem
        inputs, targets = self._prepare(batch, 0)
        n_b = batch_size(inputs, 0, problem.batch_size_fn)
        if n_b > 0 and problem.loss_fn.kind is None:
            with torch.no_grad():
                outputs = call_model(problem.model, problem.names, *model_state(problem, self.dtype), inputs)
            probe_mean(problem.loss_fn, outputs, targets, n_b)
        if problem.check_determinism and n_b > 0:
            inputs, targets, _ = split_examples(inputs, targets, n_b, problem.micro_batch_size)[0]
            check_model(problem, *model_state(problem, self.dtype), inputs, targets)

    # -- what a subclass says ------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Called at the end of construction, after the checks of the model, the data and the loss (with
        ``self.problem`` set): derive what the products need from the model or the loss, and refuse, with an
        error that names the fix, what this operator cannot handle. Nothing by default."""

    def _matmat_batch(self, batch: Batch, blocks: list[ParamTree]) -> tuple[list[ParamTree], Tensor]:
        """The curvature :math:`C_b` of this batch's loss (reduced as ``loss_fn`` reduces it) times each block of
        columns, and the batch loss.

        Each block is a tuple of ``(c, *shape)`` tensors, ``c`` columns laid out like ``batch.params``;
        return ``([C_b V for each V in blocks], loss)``, each product laid out the same way and ``loss`` a
        scalar tensor (the data loop checks it is finite). All blocks of a batch come in one call, so one
        forward pass can serve them all. Everything else is the data loop's: the weights :math:`W_b` and the
        dataset divisor, micro-batches, chunking columns into blocks (``chunk_size``), devices, dtypes, and the
        determinism and finiteness checks."""
        raise NotImplementedError(f"{type(self).__name__} must implement _matmat_batch(batch, blocks)")

    # -- the first-order witness --------------------------------------------------------------------------
    def _first_order(self, probe: first_order.Probe, batch: Batch, direction: ParamTree, step: float) -> Tensor | None:
        r"""The first-order witness of this batch's curvature times ``direction`` (a unit vector laid out like
        ``batch.params``), flat, from central differences whose step is ``step`` relative to the scale of what is
        shifted (hessops/operators/witness.py), using only ``probe``'s first-order evaluations; ``None`` (the
        default) where an operator has none: it then gets the symmetry probe only."""
        return None

    @property
    def product_noise(self) -> float | None:
        r"""The relative noise of one product, measured by the first-order witness on the first product (``None``
        before it, or when the witness is off): the largest symmetry defect
        :math:`|w^\top Av - v^\top Aw| / (\lVert w\rVert \lVert Av\rVert + \lVert v\rVert \lVert Aw\rVert)` over
        pairs of random unit vectors on a slice of the first batch. About eps of the dtype for a model computed in
        it; far more for a model that computes in lower precision inside."""
        report = self.problem.memo.get("witness")
        return None if report is None else report.noise

    @property
    def witness_report(self) -> first_order.WitnessReport | None:
        """What the first-order witness did (:class:`~hessops.operators.witness.WitnessReport`), ``None`` before
        the first product."""
        return self.problem.memo.get("witness")

    def _witness_key(self) -> tuple:
        """What a verdict depends on besides the model: kept per model in a process (a later operator reuses it)."""
        spec = self.problem.loss_fn
        return (type(self).__qualname__, str(self.device), self.dtype, self.problem.names, spec.name, spec.reduction)

    def _written_out_layers(self) -> list[str]:
        return _written_out.weight_norm_layers(self.problem.model)

    def _batch_products(self, batch: Batch, blocks: list[ParamTree]) -> tuple[list[ParamTree], Tensor]:
        """:meth:`_matmat_batch` with the model's wrongly differentiated layers written out; the first-order witness
        runs on the first batch of the first product, after that batch's own products (so that the model's and the
        loss's own errors come from the whole batch), and an operator it refuses raises from then on."""
        memo = self.problem.memo
        if "witness" in memo and memo["witness"].passed is False:
            raise first_order.refusal(self, memo["witness"])
        products = self._guarded_products(batch, blocks)
        if "witness" not in memo:
            report = first_order.check(self, batch)
            if report is not None:  # None: this batch's first examples count no target; the next batch is tried
                memo["witness"] = report
                if report.passed is False:
                    raise first_order.refusal(self, report)
                first_order.warn_noise(self, report)
        return products

    def _guarded_products(self, batch: Batch, blocks: list[ParamTree], witness: bool = False):
        """:meth:`_matmat_batch` (or, for the witness, :meth:`_witness_products`) with weight norm written out."""
        with _written_out.written_out(self.problem.model):
            return (self._witness_products if witness else self._matmat_batch)(batch, blocks)

    def _witness_products(self, batch: Batch, blocks: list[ParamTree]) -> tuple[list[ParamTree], Tensor]:
        """The products the witness checks on its slice: :meth:`_matmat_batch`'s, unless a subclass has a reference
        formulation that vouches for its others."""
        return self._matmat_batch(batch, blocks)

    # -- the data loop ------------------------------------------------------------------------------------
    def _matmat(self, X: Tensor) -> Tensor:
        self._check_vectors(X)
        problem = self.problem
        n, k = X.shape
        chunk = problem.chunk_size or DEFAULT_CHUNK_SIZE
        rows = X.T
        blocks = [flat_to_tree(rows[i : i + chunk], problem.shapes) for i in range(0, k, chunk)]
        running = RunningSum(k, n, self.dtype, self.device)
        losses: list[Tensor] = []
        loss_batches: list[int] = []  # the batch index of each loss (empty batches have none)
        total, examples = 0.0, 0  # the dataset loss's divisor W = Σ_b W_b, and the examples seen
        spec = problem.loss_fn
        params, constants = model_state(problem, self.dtype)
        bar = tqdm(
            problem.data,
            total=_length(problem.data),
            desc=f"{type(self).__name__} @ {k} vector{'s' if k > 1 else ''}",
            disable=not problem.progress,
            leave=False,
            unit="batch",
        )
        status: dict[str, Any] = {"error": None, "nonfinite": None, "examples": 0}
        if problem.distributed is not None:
            status.update(fingerprint(params, X))
        data_fingerprint = torch.zeros(5, dtype=torch.float64, device=self.device)
        try:
            with torch.no_grad():
                for index, raw in enumerate(bar):
                    inputs, targets = self._prepare(raw, index)
                    n_b = batch_size(inputs, index, problem.batch_size_fn)
                    if n_b == 0:
                        continue
                    if problem.check_determinism:
                        data_fingerprint += batch_fingerprint(inputs, targets, n_b).to(self.device)
                    pieces = split_examples(inputs, targets, n_b, problem.micro_batch_size)
                    for part, (piece_inputs, piece_targets, n_m) in enumerate(pieces):
                        weight = spec.batch_weight(piece_targets, n_m)  # W_b; 0: every target ignored
                        if weight == 0:
                            continue
                        batch = Batch(piece_inputs, piece_targets, n_m, index, part, params, constants, problem)
                        products, loss = self._batch_products(batch, blocks)
                        running.add(products, chunk, weight if spec.mean else 1.0)
                        losses.append(loss.detach().reshape(()))
                        loss_batches.append(index)
                        total += weight
                    examples += n_b
            status["examples"] = examples
            if problem.check_determinism:
                self._check_same_data(data_fingerprint)
            status["nonfinite"] = _first_nonfinite(losses, loss_batches)
        except Exception as error:
            if problem.distributed is None:
                raise
            status["error"] = f"{type(error).__name__}: {error}"
            try:
                synchronize(running.total(), total, status, problem.distributed)  # tell the other ranks to stop too
            except DistributedError:
                pass
            raise
        finally:  # also on Ctrl-C or SIGTERM: a bar left to the garbage collector cleared its line after the CLI's
            bar.close()  # one-line message ("\x1b[A" last on stderr: test_sigterm_ends_cleanly..., one run in four)
        acc = running.total()
        where = ""
        if problem.distributed is not None:
            acc, total, examples, where = _gathered(acc, total, status, problem.distributed)
        if examples == 0:
            raise EmptyDataError(EmptyDataError.NO_EXAMPLES)
        check_counted(total, examples)
        self._check_finite(status["nonfinite"], acc, where)
        return (acc.div_(total) if spec.mean else acc).T

    def _prepare(self, batch: Any, index: int) -> tuple[Any, Any]:
        inputs, targets = split_batch(batch, index)
        check_batch(inputs, targets, index, self.device, self.problem.model_dtype)
        if self.dtype != self.problem.model_dtype:
            inputs, targets = cast_floating(inputs, self.dtype), cast_floating(targets, self.dtype)
        if not self.problem.unpack_inputs:
            inputs = (inputs,)  # call_model unpacks the 1-tuple: model(inputs)
        return inputs, targets

    def __matmul__(self, X):
        if isinstance(X, Tensor) and (X.dim() not in (1, 2) or X.shape[0] != self.shape[1]):
            n = self.shape[1]
            raise InvalidArgumentError(
                f"{type(self).__name__} of size {n} multiplies a vector ({n},) or a block ({n}, k), got shape "
                f"{tuple(X.shape)}: reshape it (X.reshape({n}, -1))"
            )
        return super().__matmul__(X)

    def _check_same_data(self, fingerprint: Tensor) -> None:
        """The first product keeps its data's fingerprint; every later one must match it, and the first must
        match what a resumed run expects (:meth:`expect_data`)."""
        expected = self.problem.memo.pop("expected_data", None)
        if expected is not None:
            saved, mismatch = expected
            change = fingerprint_change(saved, fingerprint)
            if change is not None:
                raise mismatch(change)
        first = self.problem.memo.setdefault("data_fingerprint", fingerprint)
        change = fingerprint_change(first, fingerprint)
        if change is not None:
            raise data_changed_error(change)

    # -- what identifies the matrix (hessops.linalg.checkpoint) -------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What makes this operator's matrix, besides the data, as strings a resumed run must match
        (:mod:`hessops.linalg.checkpoint`).

        Returns:
            ``operator``: the class and its own options (``MCFisher(samples=4, seed=0)``); ``model``: the
            model's class, qualified; ``parameters``: a SHA-256 of the differentiated parameters (names, dtypes,
            shapes, values, in the flat vector's order); ``buffers``: a SHA-256 of everything else the model
            computes with, by name: the floating buffers (BatchNorm's running statistics) and the frozen
            parameters (integer buffers such as ``num_batches_tracked`` do not enter an eval-mode forward and
            are left out); ``loss``: :attr:`hessops.operators.losses.LossSpec.identity`.
        """
        problem = self.problem
        named = dict(problem.model.named_parameters())
        selected = set(problem.names)
        constants = [(n, p) for n, p in named.items() if n not in selected]
        constants += [(n, b) for n, b in problem.model.named_buffers() if b is not None and b.is_floating_point()]
        options = ", ".join(f"{key}={value!r}" for key, value in self._options().items())
        model = type(problem.model)
        return {
            "operator": f"{type(self).__name__}({options})" if options else type(self).__name__,
            "model": f"{model.__module__}.{model.__qualname__}",
            "parameters": digest(*(part for name in problem.names for part in (name, named[name]))),
            "buffers": digest(*(part for name, t in sorted(constants, key=lambda c: c[0]) for part in (name, t))),
            "loss": problem.loss_fn.identity,
        }

    def _options(self) -> dict[str, Any]:
        """This operator's own options that change its matrix (MCFisher's ``samples`` and ``seed``), for
        :meth:`identity`: none by default; a subclass with such options returns them by name."""
        return {}

    def data_fingerprint(self, take: bool = False) -> Tensor | None:
        """The data's order-independent fingerprint that the first product took.

        Args:
            take: when no product has run, take it now, by one pass over the data without the model (batches
                prepared and counted as a product prepares them).

        Returns:
            The fingerprint (:func:`hessops.operators._determinism.batch_fingerprint`, float64 ``(5,)`` on the
            CPU), or ``None`` before the first product (without ``take``) and with ``check_determinism=False``."""
        problem = self.problem
        if take and problem.check_determinism and "data_fingerprint" not in problem.memo:
            total = torch.zeros(5, dtype=torch.float64, device=self.device)
            for index, raw in enumerate(problem.data):
                inputs, targets = self._prepare(raw, index)
                n_b = batch_size(inputs, index, problem.batch_size_fn)
                if n_b > 0:
                    total += batch_fingerprint(inputs, targets, n_b).to(self.device)
            problem.memo["data_fingerprint"] = total
        fingerprint = problem.memo.get("data_fingerprint")
        return None if fingerprint is None else fingerprint.cpu()

    def expect_data(self, fingerprint: Tensor, mismatch: Callable[[str], Exception]) -> None:
        """Have the data compared with ``fingerprint``: now when a product has run, else by the first product,
        before it returns. Nothing is compared with ``check_determinism=False`` (no fingerprint is taken).

        Args:
            fingerprint: another run's :meth:`data_fingerprint`.
            mismatch: makes the exception to raise from a description of what differs.

        Raises:
            Exception: ``mismatch(what differs)``, when the data differ."""
        problem = self.problem
        if not problem.check_determinism:
            return
        if "data_fingerprint" in problem.memo:
            change = fingerprint_change(fingerprint, problem.memo["data_fingerprint"].cpu())
            if change is not None:
                raise mismatch(change)
            return
        problem.memo["expected_data"] = (fingerprint, mismatch)

    def _check_vectors(self, X: Tensor) -> None:
        if not isinstance(X, Tensor):
            raise InvalidArgumentError(f"{type(self).__name__} multiplies torch tensors, got {type(X).__name__}")
        if X.dtype != self.dtype:
            raise DtypeMismatchError(
                f"vector dtype {X.dtype} differs from the operator's {self.dtype}: cast it (v.to({self.dtype})) "
                f"or build the operator with dtype={X.dtype}"
            )
        if normalize_device(X.device) != self.device:
            raise DeviceMismatchError(
                f"vector is on {X.device} but the operator is on {self.device}: v.to('{self.device}')"
            )
        if not all_finite(X):
            raise InvalidArgumentError(
                f"the vector multiplied by {type(self).__name__} holds NaN or inf: the product would be NaN; check "
                "where the vector came from (an earlier product of a diverged model, a division by a zero norm)"
            )

    def _check_finite(self, nonfinite: tuple[int, float] | None, acc: Tensor, where: str = "") -> None:
        if nonfinite is not None:
            index, value = nonfinite
            raise NonFiniteLossError(
                f"the loss of batch {index}{where} is {value}: check that batch's inputs and targets for "
                "NaN/inf, and the model for overflow (a smaller learning rate, float64, or a checkpoint from "
                "before divergence)"
            )
        if not all_finite(acc):
            raise NonFiniteLossError(
                "every batch loss is finite but the curvature product is not: the data hold an inf or NaN that "
                f"the loss does not show (check the inputs), or the product overflows in {self.dtype} "
                "(build the operator with dtype=torch.float64)"
            )

    # -- conveniences -------------------------------------------------------------------------------------
    def check_deterministic(self, *, seed: int = 0, rtol: float | None = None) -> float:
        """Apply the operator twice to the same random vector; raise if the results differ.

        Random augmentation in the loader, shuffling with ``drop_last``, or sampling in the model make the
        operator random, and Lanczos on a random operator returns nonsense.

        Args:
            seed: the seed of the random vector.
            rtol: the largest relative difference accepted; default ``1000·eps`` of the dtype (room for
                nondeterministic GPU reductions).

        Returns:
            The relative difference ``‖Av − A'v‖ / ‖Av‖``.

        Raises:
            NondeterministicOperatorError: the difference exceeds ``rtol``."""
        rtol = 1e3 * torch.finfo(self.dtype).eps if rtol is None else rtol
        generator = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(self.shape[1], generator=generator, dtype=self.dtype).to(self.device)
        first, second = self @ v, self @ v
        scale = norm(first).clamp_min(torch.finfo(self.dtype).tiny)
        rel = float(norm(first - second) / scale)
        if rel > rtol:
            raise NondeterministicOperatorError(
                f"applying {type(self).__name__} twice to the same vector gave results {rel:.3g} apart (relative; "
                f"tolerance {rtol:.1g}): the data or the model is random. Remove random augmentation from the "
                "loader (curvature needs a fixed function), use shuffle=False or drop_last=False, and call "
                "model.eval()"
            )
        return rel

    def to(self, device, dtype=None):
        """Operators follow their model: move the model and build a new operator instead.

        Args:
            device: the device asked for; only the operator's own is accepted.
            dtype: the dtype asked for; only the operator's own (or ``None``) is accepted.

        Returns:
            The operator itself.

        Raises:
            DtypeMismatchError: another dtype.
            DeviceMismatchError: another device."""
        if dtype is not None and dtype != self.dtype:
            raise DtypeMismatchError(
                f"{type(self).__name__}.to cannot change the dtype: build the operator with dtype={dtype}"
            )
        if normalize_device(device) != self.device:
            raise DeviceMismatchError(
                f"{type(self).__name__} lives where its model's parameters are ({self.device}): "
                f"call model.to('{device}'), move the data, and build a new operator"
            )
        return self

    def __repr__(self) -> str:
        n = self.shape[0]
        return f"<{type(self).__name__} {n}x{n}, dtype={self.dtype}, device={self.device}>"


class RunningSum:
    """The ``(k, n)`` sum of the batches' weighted products, block by block of ``chunk`` columns: the first batch's
    products are written in, not added to a zero-filled buffer (a parameter-sized fill and pass less per product:
    0.11 s of a GPT-2-small product, benchmarks/RESULTS.md)."""

    def __init__(self, k: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.acc = torch.empty(k, n, dtype=dtype, device=device)
        self.filled = False

    def add(self, products: list[ParamTree], chunk: int, alpha: float) -> None:
        """Add ``alpha`` times one batch's products (a list of blocks of ``chunk`` columns) to the sum."""
        accumulate = add_tree_ if self.filled else write_tree_
        for i, product in zip(range(0, self.acc.shape[0], chunk), products):
            accumulate(self.acc[i : i + chunk], product, alpha=alpha)
        self.filled = True

    def total(self) -> Tensor:
        """The sum so far (zero when no batch has been added)."""
        if not self.filled:
            self.acc.zero_()
            self.filled = True
        return self.acc


def _first_nonfinite(losses: list[Tensor], loss_batches: list[int]) -> tuple[int, float] | None:
    """The batch index and the loss of the first batch whose loss is not finite, or ``None``."""
    if losses:
        finite = torch.isfinite(torch.stack(losses))
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            return loss_batches[bad], float(losses[bad])
    return None


def _gathered(acc: Tensor, total: Any, status: dict[str, Any], distributed: Any) -> tuple[Tensor, Any, int, str]:
    """With data parallelism, after the data loop: every rank's sums (:func:`synchronize`), their examples, and
    where (``" on rank r"``) the first rank that saw a non-finite loss saw it, which ``status`` then reports."""
    where = ""
    acc, total, statuses = synchronize(acc, total, status, distributed)
    examples = sum(s["examples"] for s in statuses)
    bad = [(r, s["nonfinite"]) for r, s in enumerate(statuses) if s["nonfinite"]]
    if bad:
        rank, status["nonfinite"] = bad[0]
        where = f" on rank {rank}"
    return acc, total, examples, where


def _length(data: Iterable) -> int | None:
    """``len(data)``, or ``None`` where it has none (a DataLoader over an IterableDataset raises TypeError)."""
    try:
        return len(data)
    except TypeError:
        return None
