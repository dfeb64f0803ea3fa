"""Exceptions raised by hessops: each names the cause and the fix."""

from __future__ import annotations

__all__ = [
    "HessopsError",
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


class HessopsError(ValueError):
    """Base class of every error hessops raises on bad input."""


class TrainModeError(HessopsError):
    """The model holds Dropout or BatchNorm (or similar) modules in training mode."""


class EmptyDataError(HessopsError):
    """The data yielded no batch, or only empty batches."""

    NO_EXAMPLES = "data yielded no examples: pass a non-empty DataLoader or list of (inputs, targets)"


class NonFiniteLossError(HessopsError):
    """The loss (or the curvature product) of some batch is NaN or infinite."""


class DeviceMismatchError(HessopsError):
    """A batch or a vector lives on another device than the parameters."""


class DtypeMismatchError(HessopsError):
    """A batch or a vector has another floating dtype than expected."""


class NoParametersError(HessopsError):
    """There is nothing to differentiate, or `params` names a tensor the model does not own."""


class UnsupportedLossError(HessopsError):
    """The loss cannot define this operator (wrong reduction, no likelihood to sample from, ...)."""


class NondeterministicOperatorError(HessopsError):
    """Applying the operator twice to the same vector gave different results."""


class UnknownModelError(HessopsError):
    """The name is neither in ``hessops.zoo.models.MODEL_NAMES`` nor a model timm knows (``timm:NAME``)."""


class CheckpointError(HessopsError):
    """The checkpoint file is missing, unreadable, or its tensors do not fit the model's."""


class MissingDependencyError(HessopsError, ImportError):
    """An optional package that this feature needs is not installed."""


class UnknownDatasetError(HessopsError):
    """The name is not in ``hessops.zoo.data.DATA_NAMES``."""


class DatasetNotFoundError(HessopsError):
    """The dataset's files are not in the data directory (and ``download=False``)."""


class CorruptDatasetError(HessopsError):
    """The dataset's files differ from the published ones, or are not in the expected format."""


class EigenvectorsFileError(HessopsError):
    """The file is not eigenvectors written by ``hessops.save_eigenvectors`` (another kind of file, another
    format version, or unreadable)."""


class NotPositiveDefiniteError(HessopsError):
    """The operator has a non-positive eigenvalue, so its log-determinant is not defined."""


class DistributedError(HessopsError):
    """Another rank failed, or stopped answering, during a distributed product."""


class InvalidArgumentError(HessopsError, TypeError):
    """An argument of a public function or constructor has the wrong type (``k=2.5``, ``True`` for a
    count), a value outside its range, or a NaN/inf; the message names the argument. Both a ``ValueError``
    and a ``TypeError``, so either ``except`` catches it."""


class BatchSizeError(HessopsError):
    """The examples in a batch cannot be counted from its inputs (pass ``batch_size_fn``)."""


class TargetShapeError(HessopsError):
    """An element-wise loss got targets of another shape than the outputs, which torch would broadcast."""


class HvpFormulationError(HessopsError):
    """The requested Hessian-vector product formulation is known or found wrong on this model, or torch
    cannot differentiate the model twice."""


class HvpFormulationWarning(UserWarning):
    """A fast Hessian-vector product formulation disagreed with double backward and was set aside."""


class WitnessError(HessopsError):
    """An operator's products disagree with the first-order witness (central finite differences of the gradient,
    or of the model's outputs) on a slice of the first batch: torch's second derivatives are wrong through some
    layer of the model (hessops/operators/witness.py)."""


class ProductNoiseWarning(UserWarning):
    """An operator's products carry far more rounding noise than its dtype's: the model computes in a lower
    precision inside (a float64 operator over layers that cast to float32)."""


class AttentionKernelWarning(UserWarning):
    """The model runs attention in fused kernels without second derivatives, so products run it in torch's
    math kernel instead (said once per process)."""


class CheckpointMismatchError(HessopsError):
    """A resumed run's checkpoint file belongs to another run (other arguments, operator, model, parameters,
    buffers, loss or data: :mod:`hessops.linalg.checkpoint`), is of another format version, or is not a hessops
    checkpoint."""


class CommandError(HessopsError):
    """A command line that cannot run here (no CUDA, a model that does not take the data's inputs)."""


class OutputError(HessopsError):
    """A result, a figure, a checkpoint or eigenvectors could not be written (:func:`hessops._io.atomic_write`)."""
