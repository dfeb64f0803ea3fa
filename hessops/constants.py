"""The names the library and the command line share, in one place: the library's modules check their
arguments against these tuples and the CLI offers them as choices. Torch-free, so that parsing a command line
imports nothing heavy."""

from __future__ import annotations

__all__ = [
    "OPERATOR_CLASSES",
    "OPERATOR_NAMES",
    "HVP_MODES",
    "WHICH",
    "LANDSCAPE_DIRECTIONS",
    "TRACE_METHODS",
    "LOGDET_METHODS",
    "BASIS_MODES",
    "DATASETS",
    "DOWNLOADABLE",
    "DTYPES",
    "GPT_SIZES",
    "GPT_PREFIX",
    "HF_PREFIX",
    "TEXT_DATA",
    "is_language_model",
    "is_text",
    "NOISE_WARNING",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "DEFAULT_IGNORE_INDEX",
]

# The label a loss does not count (torch's cross_entropy default; padding in hessops.zoo.text).
DEFAULT_IGNORE_INDEX = -100

# How long a rank waits in a collective for the others before the run fails (hessops.operators.distributed):
# long enough for the slowest rank's shard of a product (or rank 0 writing a checkpoint) on a loaded machine;
# torch's own gloo default.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "HESSOPS_DIST_TIMEOUT"  # seconds, overrides DEFAULT_TIMEOUT_S where no timeout is passed

# A product noise (hessops.operators.witness) above this many eps of the operator's dtype means the model computes
# in a lower precision inside: the operator warns, and eigs bounds the rounding by that precision.
NOISE_WARNING = 100.0

# The registry of curvature operators: each name (the CLI's --operator choices, block_spectra's operator=) and
# where its class lives, torch-free. Registering an operator is one line here; its class carries the same
# ``name`` (tests/test_registry.py), and hessops.operators.OPERATORS maps each name to its class.
OPERATOR_CLASSES: dict[str, str] = {
    "hessian": "hessops.operators.hessian:Hessian",
    "ggn": "hessops.operators.ggn:GGN",
    "ef": "hessops.operators.fisher:EmpiricalFisher",
    "mcfisher": "hessops.operators.fisher:MCFisher",
}
OPERATOR_NAMES: tuple[str, ...] = tuple(OPERATOR_CLASSES)

# Hessian(hvp_mode=...): "auto" or one of the exact formulations of hessops/operators/_hvp.py.
HVP_MODES: tuple[str, ...] = (
    "auto",
    "autograd",
    "autograd-loop",
    "forward-over-reverse",
    "reverse-over-forward",
    "reverse-over-reverse",
    "compiled",
    "finite-difference",
)

# eigs(which=...): largest magnitude, largest algebraic, smallest algebraic, or both ends.
WHICH: tuple[str, ...] = ("LM", "LA", "SA", "both")

# `hessops landscape --directions`: random filter-normalized directions, or eigenvectors of the operator.
LANDSCAPE_DIRECTIONS: tuple[str, ...] = ("random", "eigen")

# trace(method=...).
TRACE_METHODS: tuple[str, ...] = ("hutch++", "hutchinson")

# logdet(method=...) and basin_volume(method=...); "deflated": top eigenvalues exactly, the rest by SLQ.
LOGDET_METHODS: tuple[str, ...] = ("auto", "dense", "slq", "deflated")

# lanczos(basis=...) and the functions built on it: where the Lanczos basis lives (hessops/linalg/basis.py).
BASIS_MODES: tuple[str, ...] = ("auto", "device", "host", "disk", "none")

# The names of the datasets hessops.zoo.data.load_dataset knows, and of those download_dataset fetches (digits ship
# with scikit-learn): each dataset's facts are its entry of hessops.zoo.registry.DATASET_SPECS, which the core may
# not import; tests/cli/test_cli_contract.py checks that these names are that registry's.
DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10", "cifar2")
DOWNLOADABLE: tuple[str, ...] = ("mnist", "cifar10", "cifar2")

# The operator dtypes the CLI offers (torch.float32, torch.float64).
DTYPES: tuple[str, ...] = ("float32", "float64")

# The command line's language models: gpt:SIZE (SIZE a named size, the keys of hessops.zoo.lm.GPT_CONFIGS) and
# hf:SOURCE (hessops.zoo.lm.load_hf_model); their data is text (hessops.zoo.text's corpus) or text:PATH (a user's).
GPT_PREFIX, HF_PREFIX, TEXT_DATA = "gpt:", "hf:", "text"
GPT_SIZES: tuple[str, ...] = ("gpt2-small", "gpt2-medium", "gpt-bytes-mini", "gpt-bytes-tiny")


def is_language_model(model: str) -> bool:
    """Whether the CLI's ``--model`` value ``model`` is a language model (``gpt:SIZE``, ``hf:SOURCE``)."""
    return model.startswith((GPT_PREFIX, HF_PREFIX))


def is_text(data: str | None) -> bool:
    """Whether the CLI's ``--data`` value ``data`` is text (``text``, ``text:PATH``)."""
    return data is not None and (data == TEXT_DATA or data.startswith(TEXT_DATA + ":"))
