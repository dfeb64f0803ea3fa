"""The option groups that several commands share, each written once, and the checks of what depends on
several of them. Torch-free: every check reads the registries, nothing is loaded.

A command's own options, those it adds outside these titled groups, are its settings: :func:`own_options`
names them, and :func:`hessops.cli.output.settings` records their values in the JSON result.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hessops.cli.values import (
    DATASETS,
    FIGURE_FORMATS,
    SEED_LIMIT,
    config_override,
    count,
    data_name,
    existing_file,
    existing_folder,
    model_name,
    number,
    output_path,
)
from hessops.constants import (
    BASIS_MODES,
    DEFAULT_TIMEOUT_S,
    DTYPES,
    GPT_SIZES,
    HF_PREFIX,
    HVP_MODES,
    LOGDET_METHODS,
    OPERATOR_NAMES,
    TEXT_DATA,
    TIMEOUT_ENV,
    is_language_model,
    is_text,
)
from hessops.zoo.registry import DATASET_SPECS, MODELS, TIMM_PREFIX


# -- the groups --------------------------------------------------------------------------------------------------
def common(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The options of the commands that build an operator from a model and a dataset: the model and data, the
    output and data-parallel runs. Returns the output group (a command may add its own outputs to it)."""
    model_and_data(parser)
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out", type=output_path(), help="write the result here as JSON (default: print a summary only)"
    )
    group.add_argument(
        "--plot",
        type=output_path(*FIGURE_FORMATS),
        help="draw the figure into this file, PNG (or .pdf, .svg) (default: no figure)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    distributed(parser)
    return group


def model_and_data(parser: argparse.ArgumentParser) -> None:
    """``--model`` and its sizes, ``--data`` and its subset and batches, text, the operator and the seed."""
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model",
        type=model_name,
        default="mlp-digits",
        help="a zoo model (`hessops models` lists them), timm:NAME, or a language model: gpt:SIZE, SIZE one of "
        + ", ".join(GPT_SIZES)
        + ", or hf:SOURCE, a HuggingFace checkpoint folder, config JSON or model type (hf:gpt2)",
    )
    sizes = "(timm:NAME only; default: timm's)"
    group.add_argument("--img-size", type=count(1, 8193), help=f"the model's input height and width {sizes}")
    group.add_argument("--patch-size", type=count(1, 8193), help=f"a vision transformer's patch size {sizes}")
    group.add_argument("--num-classes", type=count(1, 1_000_001), help=f"the model's number of outputs {sizes}")
    group.add_argument(
        "--checkpoint",
        type=existing_file,
        help="a state_dict file to load into the model (default: parameters drawn from --seed)",
    )
    group.add_argument(
        "--data",
        type=data_name,
        metavar="{" + ",".join((*DATASETS, TEXT_DATA, TEXT_DATA + ":PATH")) + "}",
        help="the dataset (default: the model's; digits are embedded, the others need `hessops download`; text: a "
        "corpus bundled with scikit-learn, text:PATH a UTF-8 .txt file or a folder of them, for language models)",
    )
    group.add_argument("--data-dir", type=Path, default=Path("data"), help="where the downloaded datasets are")
    group.add_argument("--test-split", action="store_true", help="use the test split instead of the training split")
    group.add_argument(
        "--seq-len", type=count(2), default=64, help="text: tokens per block (sequence), each block one example"
    )
    group.add_argument(
        "--tokenizer",
        type=existing_folder,
        help="text: a HuggingFace tokenizer in a local folder (default: UTF-8 bytes, vocabulary 256)",
    )
    group.add_argument(
        "--hf-override",
        type=config_override,
        action="append",
        metavar="KEY=VALUE",
        help="hf: models: change a config field before building, e.g. n_layer=2 (repeat for more; default: none)",
    )
    group.add_argument(
        "--num-examples",
        type=count(),
        help="a deterministic subset of this many examples, drawn by --seed (default: the whole split)",
    )
    group.add_argument(
        "--batch-size",
        type=count(),
        default=128,
        help="examples per batch; the operator is the exact mean over all of them whatever this is",
    )
    operator(group)
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", choices=DTYPES, default=DTYPES[0], help="the operator's dtype")
    group.add_argument(
        "--seed",
        type=count(0, SEED_LIMIT),
        default=0,
        help="the model's initial parameters, the data subset and the random probe vectors",
    )


def operator(group: argparse._ArgumentGroup) -> None:
    """``--operator`` and the Hessian's ``--hvp-mode``."""
    group.add_argument(
        "--operator",
        choices=OPERATOR_NAMES,
        default=OPERATOR_NAMES[0],
        help="the curvature matrix: Hessian, generalized Gauss-Newton, empirical Fisher, Monte Carlo Fisher",
    )
    group.add_argument(
        "--hvp-mode",
        choices=HVP_MODES,
        default=HVP_MODES[0],
        help="the Hessian-vector product's formulation (--operator hessian); auto picks the fastest that agrees "
        "with double backward",
    )


def distributed(parser: argparse.ArgumentParser) -> None:
    """``--distributed`` and ``--timeout``, for runs under torchrun."""
    group = parser.add_argument_group("data-parallel (torch.distributed, under torchrun)")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="shard the data over the processes torchrun started (automatic when WORLD_SIZE > 1)",
    )
    group.add_argument(
        "--timeout",
        type=number(above=0),
        default=None,
        help=(
            f"seconds a rank waits for the others before the run fails (default: ${TIMEOUT_ENV}, "
            f"else {DEFAULT_TIMEOUT_S:g})"
        ),
    )


def stopping(parser: argparse.ArgumentParser, per: str) -> None:
    """When Lanczos stops: ``--tol``, ``--value-tol``, ``--max-iters`` (``per``: " per block", or "")."""
    parser.add_argument(
        "--tol",
        type=number(above=0),
        default=1e-5,
        help="stop when each residual ‖Hv − λv‖ is below this times max |λ|",
    )
    parser.add_argument(
        "--value-tol",
        type=number(above=0),
        help="stop on the eigenvalues' error bounds instead, relative to max |λ| (default: off)",
    )
    size = "the block's size" if per else "the size"
    parser.add_argument(
        "--max-iters",
        type=count(),
        help=f"at most this many Lanczos steps{per} (default: max(300, 20·k), at most {size})",
    )


def log_determinant(parser: argparse.ArgumentParser, c: float) -> None:
    """The options of log det(op + c·I) (``logdet``, ``basin``): ``--c`` (default ``c``), the method, SLQ's
    probes and steps, deflation, the confidence level and eigs' steps."""
    parser.add_argument("--c", type=number(), default=c, help="the multiple of the identity added")
    parser.add_argument(
        "--method",
        choices=LOGDET_METHODS,
        default=LOGDET_METHODS[0],
        help="dense (exact) or slq; auto: dense for small operators",
    )
    parser.add_argument("--probes", type=count(), default=30, help="SLQ probe vectors")
    parser.add_argument("--lanczos-steps", type=count(), default=50, help="Lanczos steps per SLQ probe")
    parser.add_argument(
        "--deflate",
        type=count(0),
        help="count the K largest eigenvalues exactly, the rest by SLQ on their complement (--method deflated, "
        "which --deflate implies when --method is auto; default 10)",
    )
    parser.add_argument(
        "--confidence",
        type=number(above=0, below=1),
        default=0.95,
        help="the level of the Student-t confidence interval over the SLQ probes",
    )
    parser.add_argument(
        "--eigs-max-iters",
        type=count(),
        help="at most this many Lanczos steps in each eigs run (λ_min, and the top K of --deflate); default: "
        "eigs' own (with --basis auto, restarted in what fits in half of the free memory, or capped there with "
        "--resume)",
    )


def long_runs(parser: argparse.ArgumentParser, basis: bool = True) -> None:
    """Where a Lanczos basis lives (``--basis``, ``--basis-path``; when ``basis``) and resuming (``--resume``,
    ``--checkpoint-every``)."""
    group = parser.add_argument_group("long and large runs")
    if basis:
        group.add_argument(
            "--basis",
            choices=BASIS_MODES,
            default=BASIS_MODES[0],
            help="where the Lanczos basis lives: device, host memory, a memory-mapped file (disk), or none (no "
            "re-orthogonalization); auto: the device, else the host, where it fits in half the free memory, else none",
        )
        group.add_argument(
            "--basis-path",
            type=output_path(),
            help="--basis disk: the file (default: a temporary file, deleted afterwards; with --resume, PATH.basis)",
        )
    group.add_argument(
        "--resume",
        type=output_path(),
        metavar="PATH",
        help="checkpoint the run to PATH, and resume from it if it exists (default: no checkpoint)",
    )
    group.add_argument(
        "--checkpoint-every",
        type=number(minimum=0),
        default=60.0,
        help="with --resume: save at most every this many seconds (and at the end, and on Ctrl-C)",
    )


def own_options(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The destinations of the options a command adds outside the titled groups above (its settings)."""
    return tuple(action.dest for action in parser._optionals._group_actions if action.dest != "help")


# -- what depends on several options -----------------------------------------------------------------------------
def check_model_and_data(args: argparse.Namespace) -> str | None:
    """What is wrong with the model and data options together (one line), or ``None``."""
    problem = _check_timm_sizes(args) or _check_text(args)
    if problem is not None:
        return problem
    spec = MODELS.get(args.model)
    data = args.data or (spec.default_data if spec else TEXT_DATA if is_language_model(args.model) else None)
    if data not in DATASET_SPECS and not is_text(data):
        made_for = (
            f"was made for {spec.default_data}, which hessops cannot load"
            if spec and spec.default_data
            else "has no default dataset"
        )
        return f"--model {args.model} {made_for}: pass --data ({', '.join(DATASETS)})"
    if data not in DATASET_SPECS:  # text: its blocks are counted when it is loaded
        return None
    split = "test" if args.test_split else "train"
    size = DATASET_SPECS[data].split_sizes[int(args.test_split)]
    if args.num_examples is not None and args.num_examples > size:
        return (
            f"--num-examples {args.num_examples}: the {data} {split} split has {size:,} examples; pass at most {size}"
        )
    return None


def check_eigenvalue_count(args: argparse.Namespace) -> str | None:
    """``--k`` within the model's size and ``--max-iters`` at least ``--k`` (``eigs``, ``blocks``)."""
    spec = MODELS.get(args.model)
    if spec is not None and spec.n_params is not None and args.k > spec.n_params:
        n = spec.n_params
        return f"--k {args.k}: {args.model} has {n:,} parameters, so at most {n} eigenvalues"
    if args.max_iters is not None and args.max_iters < args.k:
        return f"--max-iters {args.max_iters} is less than --k {args.k}: Lanczos needs at least k steps"
    return None


def check_long_runs(args: argparse.Namespace) -> str | None:
    """``--basis-path`` only with ``--basis disk``."""
    if getattr(args, "basis_path", None) is not None and args.basis != "disk":
        return f"--basis-path is the file of --basis disk; --basis is {args.basis}: add --basis disk or leave it out"
    return None


def check_outputs(args: argparse.Namespace) -> str | None:
    """``--out`` and ``--plot`` two files."""
    out, plot = getattr(args, "out", None), getattr(args, "plot", None)
    if out is not None and plot is not None and Path(os.path.abspath(out)) == Path(os.path.abspath(plot)):
        return f"--out and --plot are the same file {out}: give each its own"
    return None


def timm_options(args: argparse.Namespace) -> dict[str, int]:
    """The sizes given for a ``timm:NAME`` model (``--img-size``, ``--patch-size``, ``--num-classes``), as
    ``timm.create_model`` keywords."""
    given = {"img_size": args.img_size, "patch_size": args.patch_size, "num_classes": args.num_classes}
    return {key: value for key, value in given.items() if value is not None}


def _check_timm_sizes(args: argparse.Namespace) -> str | None:
    options = timm_options(args)
    if options and not args.model.startswith(TIMM_PREFIX):
        flags = " ".join(f"--{key.replace('_', '-')}" for key in options)
        return f"{flags}: {args.model} is built at its own sizes; these options are for --model timm:NAME"
    if args.patch_size is not None and args.img_size is not None and args.img_size % args.patch_size:
        return (
            f"--patch-size {args.patch_size} does not divide --img-size {args.img_size}: pass a patch size that "
            f"tiles the image (e.g. {max(d for d in range(1, args.patch_size + 1) if args.img_size % d == 0)})"
        )
    return None


def _check_text(args: argparse.Namespace) -> str | None:
    """Language models on text, image models on images, and the options that only text or hf: models take."""
    lm, data = is_language_model(args.model), args.data
    if lm and data is not None and not is_text(data):
        return f"--model {args.model} is a language model: it reads text, not {data}; pass --data text or text:PATH"
    if not lm and is_text(data):
        return (
            f"--data {data} is text, for language models: pass --model gpt:SIZE ({', '.join(GPT_SIZES)}) or hf:SOURCE"
        )
    if lm and args.test_split:
        return "--test-split: text has no test split; pass the held-out text as --data text:PATH instead"
    if not lm and args.tokenizer is not None:
        return f"--tokenizer tokenizes text, for language models; --model {args.model} reads images: leave it out"
    if args.hf_override and not args.model.startswith(HF_PREFIX):
        return f"--hf-override changes a HuggingFace config: it needs --model hf:SOURCE, not {args.model}"
    return None
