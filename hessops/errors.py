"""Exceptions raised by hessops: each names the cause and the fix.

Every one derives from :class:`HessopsError`. Those of bad input (an argument, the model, the loss, the data, a
file, the environment: the fix is to pass something else) derive from :class:`InputError`, a ``ValueError``;
:class:`InvalidArgumentError` and :class:`DataFormatError` are ``TypeError`` s too, and
:class:`MissingDependencyError` an ``ImportError``. A failed run is not bad input: :class:`DistributedError`
(another rank failed) is a ``RuntimeError``, :class:`OutputError` (a write failed) an ``OSError``.
"""

from __future__ import annotations

__all__ = [
    "HessopsError",
    "InputError",
    "TrainModeError",
    "EmptyDataError",
    "NonFiniteLossError",
    "DeviceMismatchError",
    "DtypeMismatchError",
    "NoParametersError",
    "UnsupportedLossError",
    "NondeterministicOperatorError",
    "UnknownModelError",
    "CheckpointError",
    "CheckpointMismatchError",
    "MissingDependencyError",
    "UnknownDatasetError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "EigenvectorsFileError",
    "NotPositiveDefiniteError",
    "DistributedError",
    "InvalidArgumentError",
    "DataFormatError",
    "BatchSizeError",
    "TargetShapeError",
    "HvpFormulationError",
    "HvpFormulationWarning",
    "WitnessError",
    "ProductNoiseWarning",
    "AttentionKernelWarning",
    "CommandError",
    "OutputError",
]


class HessopsError(Exception):
    """Base class of every error hessops raises: ``except hessops.HessopsError`` catches them all."""


class InputError(HessopsError, ValueError):
    """Base class of the errors of bad input (an argument, the model, the loss, the data, a file or the
    environment): the message names what to pass instead. A ``ValueError``, so ``except ValueError`` catches
    them."""


class TrainModeError(InputError):
    """The model holds Dropout or BatchNorm (or similar) modules in training mode."""


class EmptyDataError(InputError):
    """The data yielded no batch, or only empty batches (or a tracker closed an epoch in which it saw none)."""

    NO_EXAMPLES = "data yielded no examples: pass a non-empty DataLoader or list of (inputs, targets)"


class NonFiniteLossError(InputError):
    """The loss (or the curvature product) of some batch is NaN or infinite."""


class DeviceMismatchError(InputError):
    """A batch or a vector lives on another device than the parameters."""


class DtypeMismatchError(InputError):
    """A batch or a vector has another floating dtype than expected."""


class NoParametersError(InputError):
    """There is nothing to differentiate, or `params` names a tensor the model does not own."""


class UnsupportedLossError(InputError):
    """The loss cannot define this operator (wrong reduction, no likelihood to sample from, ...)."""


class NondeterministicOperatorError(InputError):
    """Applying the operator twice to the same vector gave different results."""


class UnknownModelError(InputError):
    """The name is neither in ``hessops.zoo.models.MODEL_NAMES`` nor a model timm knows (``timm:NAME``)."""


class CheckpointError(InputError):
    """The checkpoint file is missing, unreadable, or its tensors do not fit the model's."""


class MissingDependencyError(InputError, ImportError):
    """An optional package that this feature needs is not installed."""


class UnknownDatasetError(InputError):
    """The name is not in ``hessops.zoo.data.DATA_NAMES``."""


class DatasetNotFoundError(InputError):
    """The dataset's files are not in the data directory (and ``download=False``)."""


class CorruptDatasetError(InputError):
    """The dataset's files differ from the published ones, or are not in the expected format."""


class EigenvectorsFileError(InputError):
    """The file is not eigenvectors written by ``hessops.save_eigenvectors`` (another kind of file, another
    format version, or unreadable)."""


class NotPositiveDefiniteError(InputError):
    """The operator has a non-positive eigenvalue, so its log-determinant is not defined."""


class DistributedError(HessopsError, RuntimeError):
    """Another rank failed, or stopped answering, during a distributed product: the run failed, its input may be
    right (a ``RuntimeError``, not an :class:`InputError`). The message names the rank and its error."""


class InvalidArgumentError(InputError, TypeError):
    """An argument of a public function or constructor has the wrong type (``k=2.5``, ``True`` for a
    count), a value outside its range, or a NaN/inf (or an environment variable that stands for an argument,
    ``$HESSOPS_DIST_TIMEOUT``); the message names the argument. Both a ``ValueError``
    and a ``TypeError``, so either ``except`` catches it."""


class DataFormatError(InputError, TypeError):
    """``data`` is not a re-iterable of ``(inputs, targets)`` batches: not iterable, a generator or another
    one-shot iterator, or a batch that is not an ``(inputs, targets)`` pair nor a mapping holding its labels under
    ``"labels"`` (wrap the loader with ``hessops.zoo.data.labels_from``), or whose inputs hold no tensor. The
    message names the batch and the fix. Both a ``ValueError`` and a ``TypeError``."""


class BatchSizeError(InputError):
    """The examples in a batch cannot be counted from its inputs (pass ``batch_size_fn``)."""


class TargetShapeError(InputError):
    """An element-wise loss got targets of another shape than the outputs, which torch would broadcast."""


class HvpFormulationError(InputError):
    """The requested Hessian-vector product formulation is known or found wrong on this model, or torch
    cannot differentiate the model twice."""


class HvpFormulationWarning(UserWarning):
    """A fast Hessian-vector product formulation disagreed with double backward and was set aside."""


class WitnessError(InputError):
    """An operator's products disagree with the first-order witness (central finite differences of the gradient,
    or of the model's outputs) on a slice of the first batch: torch's second derivatives are wrong through some
    layer of the model (hessops/operators/witness.py)."""


class ProductNoiseWarning(UserWarning):
    """An operator's products carry far more rounding noise than its dtype's: the model computes in a lower
    precision inside (a float64 operator over layers that cast to float32)."""


class InexactProductWarning(UserWarning):
    """An estimate whose interval leaves out the error of products that are not exact (``hvp_mode="finite-difference"``
    into a log-determinant or a spectral density): :func:`hessops.eigs` and :func:`hessops.trace` carry that error,
    these do not yet."""


class AttentionKernelWarning(UserWarning):
    """The model runs attention in fused kernels without second derivatives, so products run it in torch's
    math kernel instead (said once per process)."""


class CheckpointMismatchError(InputError):
    """A resumed run's checkpoint file belongs to another run (other arguments, operator, model, parameters,
    buffers, loss or data: :mod:`hessops.linalg.checkpoint`), is of another format version, or is not a hessops
    checkpoint."""


class CommandError(InputError):
    """A command line that cannot run here (no CUDA, a model that does not take the data's inputs)."""


class OutputError(HessopsError, OSError):
    """A result, a figure, a checkpoint or eigenvectors could not be written (:func:`hessops._io.atomic_write`):
    the message names the path and the cause (no space left, no permission). An ``OSError``, not an
    :class:`InputError`."""
