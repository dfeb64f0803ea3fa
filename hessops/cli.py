"""The ``hessops`` command line: ``hessops COMMAND``, one of eigs, blocks, density, trace, logdet, basin, landscape,
track, demo, download, models.

This module is the command line's grammar and its contract, and imports nothing heavy: ``hessops --help``
and ``--version`` answer without torch. Every value is checked here, before any model or data is loaded;
what the commands do is in :mod:`hessops._commands`, which imports torch when a command runs.

Exit statuses (docs/cli.md): 0 done; 1 the run failed (a rank of a distributed run, or writing a result);
2 a bad command line or bad input, in one line on standard error; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from hessops import __version__, _commands
from hessops.constants import (
    BASIS_MODES,
    DATASETS,
    DEFAULT_TIMEOUT_S,
    DOWNLOADABLE,
    DTYPES,
    GPT_PREFIX,
    GPT_SIZES,
    HF_PREFIX,
    HVP_MODES,
    LANDSCAPE_DIRECTIONS,
    LOGDET_METHODS,
    OPERATOR_NAMES,
    TEXT_DATA,
    TIMEOUT_ENV,
    TRACE_METHODS,
    WHICH,
    is_language_model,
    is_text,
)
from hessops.demo import DEMO_MODEL
from hessops.errors import DistributedError, HessopsError
from hessops.zoo import MODELS, TIMM_PREFIX

# The examples in each dataset's (train, test) split, to check --num-examples without loading the data.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "digits": (1_437, 360),
    "mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar2": (10_000, 2_000),
}
FIGURE_FORMATS = (".png", ".pdf", ".svg")
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes seeds below this (and negative ones, not offered here)

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


# -- values: each a type= for argparse, raising ArgumentTypeError with what to pass instead --------------------
def count(minimum: int = 1, below: int | None = None) -> Callable[[str], int]:
    """A whole number ≥ ``minimum`` and < ``below`` where given (``2.5``, ``1e3`` and ``-1`` are refused)."""
    wanted = f"a whole number ≥ {minimum}" + (f" and < {below:,}" if below is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: pass {wanted}") from None
        if value < minimum or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"{value} is out of range: pass {wanted}")
        return value

    parse.__name__ = "count"  # argparse names the type in some messages
    return parse


def number(
    *, minimum: float = -math.inf, above: float | None = None, below: float | None = None
) -> Callable[[str], float]:
    """A finite real number, ≥ ``minimum``, > ``above`` and < ``below`` where given."""
    rule = " and ".join(
        part
        for part in (
            f"≥ {minimum:g}" if minimum > -math.inf else "",
            f"> {above:g}" if above is not None else "",
            f"< {below:g}" if below is not None else "",
        )
        if part
    )
    wanted = f"a finite number {rule}".strip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: pass {wanted}") from None
        if not (
            math.isfinite(value)
            and value >= minimum
            and (above is None or value > above)
            and (below is None or value < below)
        ):
            raise argparse.ArgumentTypeError(f"{text} is out of range: pass {wanted}")
        return value

    parse.__name__ = "number"
    return parse


def model_name(text: str) -> str:
    """A zoo model (``zoo.MODELS``), ``timm:NAME``, or a language model: ``gpt:SIZE`` or ``hf:SOURCE``."""
    if text in MODELS or (text.startswith(TIMM_PREFIX) and len(text) > len(TIMM_PREFIX)):
        return text
    if text.startswith(GPT_PREFIX):
        size = text[len(GPT_PREFIX) :]
        if size in GPT_SIZES:
            return text
        close = difflib.get_close_matches(size, GPT_SIZES, n=1)
        hint = f" (did you mean {GPT_PREFIX}{close[0]}?)" if close else ""
        raise argparse.ArgumentTypeError(
            f"unknown GPT size {size!r}{hint}: pass gpt:SIZE, SIZE one of {', '.join(GPT_SIZES)}"
        )
    if text.startswith(HF_PREFIX):
        if text[len(HF_PREFIX) :].strip():
            return text
        raise argparse.ArgumentTypeError(
            "hf: needs a source: hf:FOLDER (a checkpoint), hf:CONFIG.json, or hf:TYPE (e.g. hf:gpt2, random weights)"
        )
    close = difflib.get_close_matches(text, MODELS, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}{hint}: pass one of {', '.join(MODELS)} (`hessops models` lists them), timm:NAME, "
        "gpt:SIZE or hf:SOURCE"
    )


def data_name(text: str) -> str:
    """A dataset of ``DATASETS``, ``text`` (the bundled corpus) or ``text:PATH`` (a .txt file or a folder of them)."""
    if text in DATASETS or text == TEXT_DATA:
        return text
    if text.startswith(TEXT_DATA + ":"):
        if not text[len(TEXT_DATA) + 1 :].strip():
            raise argparse.ArgumentTypeError(
                f"{text!r} has an empty path (an unset variable in text:$FILE?): pass text:PATH, a UTF-8 .txt file "
                f"or a folder of them, or {TEXT_DATA} for the bundled corpus"
            )
        path = Path(text[len(TEXT_DATA) + 1 :])
        if path.is_file() or path.is_dir():
            return text
        raise argparse.ArgumentTypeError(
            f"{text}: no such file or folder: pass text:PATH, a UTF-8 .txt file or a folder of them"
        )
    close = difflib.get_close_matches(text, (*DATASETS, TEXT_DATA), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise argparse.ArgumentTypeError(
        f"unknown data {text!r}{hint}: pass one of {', '.join(DATASETS)}, {TEXT_DATA} or {TEXT_DATA}:PATH"
    )


def config_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for a HuggingFace config: VALUE read as JSON (``2``, ``0.1``, ``true``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: pass KEY=VALUE, a field of the model's config, e.g. n_layer=2")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value.strip()


def existing_folder(text: str) -> Path:
    """A path to a folder that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {'is a file, not a folder' if path.is_file() else 'no such folder'}")
    return path


def group_spec(text: str) -> tuple[str, list[str]]:
    """``NAME=PREFIX[,PREFIX...]``: a parameter group of ``hessops blocks``, its module-name prefixes."""
    name, sep, prefixes = text.partition("=")
    members = [p.strip() for p in prefixes.split(",")]
    if not sep or not name.strip() or not all(members):
        raise argparse.ArgumentTypeError(
            f"{text!r}: pass NAME=PREFIX[,PREFIX...], e.g. attention=encoder.layers.0.self_attn (module names as in "
            "model.named_parameters())"
        )
    return name.strip(), members


def existing_file(text: str) -> Path:
    """A path to a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {'is a directory' if path.is_dir() else 'no such file'}")
    return path


def output_path(*formats: str) -> Callable[[str], Path]:
    """A file this run may write (or replace): not a directory, in a folder that exists or can be made and
    that this user can write in, and with one of ``formats`` as its extension where given."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_dir() or text.endswith(os.sep):
            raise argparse.ArgumentTypeError(f"{text} is a directory: give the path of a file (in it, or elsewhere)")
        if formats and path.suffix.lower() not in formats:
            raise argparse.ArgumentTypeError(
                f"{text}: the figure's format comes from the extension: {', '.join(formats)}"
            )
        folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {folder} is not a directory")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text}: no permission to write in {folder}")
        return path

    parse.__name__ = "path"
    return parse


# -- the grammar -----------------------------------------------------------------------------------------------
class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (``None``, or a flag's ``False``): the help
    says what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on standard error (``hessops: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line and exit with status 2."""
        usage_error(message, self.prog)


def usage_error(message: str, prog: str = "hessops") -> NoReturn:
    """``hessops: error: <message> (see `<prog> --help`)`` on standard error, exit status 2."""
    print(f"hessops: error: {message} (see `{prog} --help`)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _subparser(sub: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], None]) -> Parser:
    parser = sub.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", formatter_class=Formatter
    )
    parser.set_defaults(func=func)
    return parser


def _stopping(parser: argparse.ArgumentParser, per: str) -> None:
    """When eigs' Lanczos stops: ``--tol``, ``--value-tol``, ``--max-iters`` (``per``: " per block", or "")."""
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


def _common(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that build an operator from a model and a dataset."""
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
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", choices=DTYPES, default=DTYPES[0], help="the operator's dtype")
    group.add_argument(
        "--seed",
        type=count(0, SEED_LIMIT),
        default=0,
        help="the model's initial parameters, the data subset and the random probe vectors",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=output_path(), help="write the result here as JSON (default: print a summary only)")
    out.add_argument(
        "--plot",
        type=output_path(*FIGURE_FORMATS),
        help="draw the figure into this file, PNG (or .pdf, .svg) (default: no figure)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    par = parser.add_argument_group("data-parallel (torch.distributed, under torchrun)")
    par.add_argument(
        "--distributed",
        action="store_true",
        help="shard the data over the processes torchrun started (automatic when WORLD_SIZE > 1)",
    )
    par.add_argument(
        "--timeout",
        type=number(above=0),
        default=None,
        help=(
            f"seconds a rank waits for the others before the run fails (default: ${TIMEOUT_ENV}, "
            f"else {DEFAULT_TIMEOUT_S:g})"
        ),
    )


def _long_runs(parser: argparse.ArgumentParser, basis: bool = True) -> None:
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


def build_parser() -> Parser:
    """The ``hessops`` argument parser (torch-free)."""
    parser = Parser(
        prog="hessops",
        description="Curvature of neural networks: spectra, densities, traces, volumes.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"hessops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(sub, "eigs", "extreme eigenvalues by Lanczos, with residuals and error bounds", _commands.eigs)
    _common(p)
    p.add_argument("--k", type=count(), default=10, help="how many eigenvalues (at each end for --which both)")
    p.add_argument(
        "--which", choices=WHICH, default=WHICH[0], help="largest magnitude, largest, smallest, or both ends"
    )
    p.add_argument(
        "--save-vectors",
        type=output_path(),
        metavar="PATH",
        help="also write the eigenvectors to PATH, reloadable as parameter-shaped dicts "
        "(hessops.load_eigenvectors; `hessops landscape --vectors PATH`) (default: not written)",
    )
    _stopping(p, "")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check runs that find further copies of repeated eigenvalues: one Lanczos run, fewer "
        "products, and 'converged' no longer certifies the k extreme values with multiplicity (default: checked)",
    )
    _long_runs(p)

    p = _subparser(
        sub, "blocks", "top eigenvalues of each parameter group's block (each transformer block, ...)", _commands.blocks
    )
    _common(p)
    p.add_argument("--k", type=count(), default=1, help="how many eigenvalues of each block")
    p.add_argument("--which", choices=WHICH, default="LA", help="largest magnitude, largest, smallest, or both ends")
    p.add_argument(
        "--group",
        type=group_spec,
        action="append",
        metavar="NAME=PREFIX[,PREFIX...]",
        help="a parameter group by module names (repeat for more; default: the repeated blocks found automatically, "
        "each other module its own group)",
    )
    _stopping(p, " per block")

    p = _subparser(sub, "density", "spectral density by stochastic Lanczos quadrature", _commands.density)
    _common(p)
    p.add_argument("--num-probes", type=count(), default=10, help="random start vectors (one Lanczos run each)")
    p.add_argument("--lanczos-steps", type=count(), default=80, help="Lanczos steps per probe")
    p.add_argument("--sigma", type=number(above=0), help="Gaussian broadening (default: 1%% of the spectrum's span)")
    p.add_argument("--grid", type=count(2), default=1000, help="number of points the density is evaluated at")
    _long_runs(p)

    p = _subparser(sub, "trace", "trace by Hutch++ or Hutchinson", _commands.trace)
    _common(p)
    p.add_argument(
        "--probes",
        type=count(2),
        default=100,
        help="products with random vectors (at least 4 for hutch++, 2 for hutchinson)",
    )
    p.add_argument("--method", choices=TRACE_METHODS, default=TRACE_METHODS[0], help="the estimator")
    _long_runs(p, basis=False)

    for name, help_text, func in (
        ("logdet", "log det(op + c·I), exact or by stochastic Lanczos quadrature", _commands.logdet),
        ("basin", "log volume of the basin {δ: ½δᵀ(H + cI)δ ≤ threshold}", _commands.basin),
    ):
        p = _subparser(sub, name, help_text, func)
        _common(p)
        p.add_argument(
            "--c", type=number(), default=0.0 if name == "basin" else 1e-3, help="the multiple of the identity added"
        )
        p.add_argument(
            "--method",
            choices=LOGDET_METHODS,
            default=LOGDET_METHODS[0],
            help="dense (exact) or slq; auto: dense for small operators",
        )
        p.add_argument("--probes", type=count(), default=30, help="SLQ probe vectors")
        p.add_argument("--lanczos-steps", type=count(), default=50, help="Lanczos steps per SLQ probe")
        p.add_argument(
            "--deflate",
            type=count(0),
            help="count the K largest eigenvalues exactly, the rest by SLQ on their complement (--method deflated, "
            "which --deflate implies when --method is auto; default 10)",
        )
        p.add_argument(
            "--confidence",
            type=number(above=0, below=1),
            default=0.95,
            help="the level of the Student-t confidence interval over the SLQ probes",
        )
        p.add_argument(
            "--eigs-max-iters",
            type=count(),
            help="at most this many Lanczos steps in each eigs run (λ_min, and the top K of --deflate); default: "
            "eigs' own, which --basis auto caps at what fits in half of the free memory",
        )
        if name == "basin":
            p.add_argument(
                "--threshold", type=number(above=0), default=2.0, help="the loss increase that bounds the basin"
            )
            p.add_argument(
                "--no-check-c",
                action="store_true",
                help="skip the check that c exceeds |λ_min| of H by more than its error bound (one eigs run)",
            )
            p.add_argument(
                "--smallest-eigenvalue",
                type=number(),
                help="a known lower bound on the operator's smallest eigenvalue (0 for ggn, ef, mcfisher), checked "
                "against --c instead of the eigs run (default: none, run eigs)",
            )
        _long_runs(p)

    p = _subparser(
        sub,
        "landscape",
        "the loss (and accuracy) on a line or a plane through the parameters, along eigenvectors or random "
        "filter-normalized directions",
        _commands.landscape,
    )
    _common(p)
    p.add_argument(
        "--directions",
        choices=LANDSCAPE_DIRECTIONS,
        default=LANDSCAPE_DIRECTIONS[0],
        help="random filter-normalized directions (Li et al. 2018), or eigenvectors of --operator",
    )
    p.add_argument(
        "--vectors",
        type=existing_file,
        metavar="PATH",
        help="--directions eigen: the eigenvectors `hessops eigs --save-vectors PATH` wrote, the first --dims of them "
        "(default: the --dims largest eigenvalues' vectors, computed here by eigs)",
    )
    p.add_argument("--dims", type=count(1, 3), default=2, help="1: a line, 2: a plane")
    p.add_argument(
        "--span",
        type=number(above=0),
        default=1.0,
        help="each axis runs from -span to span (eigenvectors: a distance in parameter space; random: relative to "
        "each filter's norm)",
    )
    p.add_argument("--points", type=count(2), default=21, help="points per axis (odd: the parameters are one)")

    p = _subparser(
        sub, "track", "train with SGD, tracking the sharpness and the per-layer gradient norms", _commands.track
    )
    _common(p)
    p.add_argument("--epochs", type=count(), default=5, help="epochs of SGD")
    p.add_argument("--lr", type=number(above=0), default=0.05, help="the learning rate")
    p.add_argument("--momentum", type=number(minimum=0, below=1), default=0.0, help="heavy-ball momentum")
    p.add_argument("--weight-decay", type=number(minimum=0), default=0.0, help="L2 penalty")
    p.add_argument(
        "--every", type=count(), default=1, help="measure the sharpness every this many epochs (and before training)"
    )
    p.add_argument(
        "--sharpness-examples",
        type=count(),
        default=256,
        help="the sharpness is measured on the first this many examples",
    )

    p = _subparser(
        sub,
        "demo",
        "train a small net on the embedded digits, then spectrum, density, trace and basin volume",
        _commands.demo,
    )
    p.add_argument("--out", type=output_path(), default=Path("demo/result.json"), help="write the result here as JSON")
    p.add_argument(
        "--plot",
        type=output_path(*FIGURE_FORMATS),
        default=Path("demo/demo.png"),
        help="draw the four panels into this file",
    )
    p.add_argument("--k", type=count(), default=10, help="how many top eigenvalues")
    p.add_argument(
        "--seed", type=count(0, SEED_LIMIT), default=0, help="the model's initial parameters and the probe vectors"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = _subparser(sub, "download", "fetch a dataset through torchvision (needs the network, once)", _commands.download)
    p.add_argument("name", choices=DOWNLOADABLE, help="the dataset")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where to put it")

    _subparser(sub, "models", "list the model zoo: sizes, inputs, classes, data", _commands.models)
    return parser


# -- what depends on several options -----------------------------------------------------------------------------
def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the options together (one line), or ``None``; nothing is loaded to find out."""
    if args.command == "demo" and args.k > MODELS[DEMO_MODEL].n_params:
        n = MODELS[DEMO_MODEL].n_params
        return f"--k {args.k}: the demo's {DEMO_MODEL} has {n:,} parameters, so at most {n} eigenvalues"
    if not hasattr(args, "model"):
        return _check_outputs(args)
    problem = _check_timm_sizes(args) or _check_text(args)
    if problem is not None:
        return problem
    spec = MODELS.get(args.model)
    data = args.data or (spec.default_data if spec else TEXT_DATA if is_language_model(args.model) else None)
    if data not in DATASETS and not is_text(data):
        made_for = (
            f"was made for {spec.default_data}, which hessops cannot load"
            if spec and spec.default_data
            else "has no default dataset"
        )
        return f"--model {args.model} {made_for}: pass --data ({', '.join(DATASETS)})"
    split = "test" if args.test_split else "train"
    size = SPLIT_SIZES[data][int(args.test_split)] if data in SPLIT_SIZES else None  # text: counted when loaded
    if args.num_examples is not None and size is not None and args.num_examples > size:
        return (
            f"--num-examples {args.num_examples}: the {data} {split} split has {size:,} examples; pass at most {size}"
        )
    n = spec.n_params if spec else None
    if args.command == "eigs":
        if n is not None and args.k > n:
            return f"--k {args.k}: {args.model} has {n:,} parameters, so at most {n} eigenvalues"
        if args.max_iters is not None and args.max_iters < args.k:
            return f"--max-iters {args.max_iters} is less than --k {args.k}: Lanczos needs at least k steps"
    if args.command == "blocks":
        if n is not None and args.k > n:
            return f"--k {args.k}: {args.model} has {n:,} parameters, so at most {n} eigenvalues"
        if args.max_iters is not None and args.max_iters < args.k:
            return f"--max-iters {args.max_iters} is less than --k {args.k}: Lanczos needs at least k steps"
        names = [name for name, _ in args.group or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            return f"--group {twice[0]} is given twice: give each group its own name"
    if args.command == "eigs" and args.save_vectors is not None:
        where = os.path.abspath(args.save_vectors)
        same = [
            o for o in ("out", "plot") if getattr(args, o) is not None and os.path.abspath(getattr(args, o)) == where
        ]
        if same:
            return f"--save-vectors and --{same[0]} are the same file {args.save_vectors}: give each its own"
    if args.command == "landscape":
        if args.vectors is not None and args.directions != "eigen":
            return "--vectors gives eigenvector directions: pass --directions eigen too (or leave out --vectors)"
        if args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return "`hessops landscape` runs in one process: run it without torchrun and --distributed"
    if getattr(args, "basis_path", None) is not None and args.basis != "disk":
        return f"--basis-path is the file of --basis disk; --basis is {args.basis}: add --basis disk or leave it out"
    if args.command == "trace" and args.method == "hutch++" and args.probes < 4:
        return (
            f"--probes {args.probes}: hutch++ needs at least 4 (a third sketch the range, the rest probe the remainder)"
        )
    return _check_outputs(args)


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
    if lm and args.command == "track":
        return f"`hessops track` trains image classifiers; --model {args.model} is a language model"
    if lm and args.test_split:
        return "--test-split: text has no test split; pass the held-out text as --data text:PATH instead"
    if not lm and args.tokenizer is not None:
        return f"--tokenizer tokenizes text, for language models; --model {args.model} reads images: leave it out"
    if args.hf_override and not args.model.startswith(HF_PREFIX):
        return f"--hf-override changes a HuggingFace config: it needs --model hf:SOURCE, not {args.model}"
    return None


def _check_outputs(args: argparse.Namespace) -> str | None:
    out, plot = getattr(args, "out", None), getattr(args, "plot", None)
    if out is not None and plot is not None and Path(os.path.abspath(out)) == Path(os.path.abspath(plot)):
        return f"--out and --plot are the same file {out}: give each its own"
    return None


# -- running ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``sys.argv[1:]`` when ``argv`` is None); returns the exit status."""
    began, started = time.perf_counter(), datetime.now(timezone.utc)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, terminated = None, []
    try:
        with _sigterm_as_interrupt(terminated):
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            if extra:
                usage_error(_unknown(args.command, extra), f"hessops {args.command}")
            problem = check(args)
            if problem is not None:
                usage_error(problem, f"hessops {args.command}")
            args.began = began
            args.run = {
                "argv": ["hessops", *argv],
                "started": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
            }
            args.func(args)
        return 0
    except SystemExit as done:  # argparse: --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    except KeyboardInterrupt as stop:  # a checkpointed run says where it saved and how to resume
        said, status = ("terminated", EXIT_TERMINATED) if terminated else ("interrupted", EXIT_INTERRUPTED)
        return _fail(f"{said}: {stop}" if str(stop) else said, status)
    except DistributedError as error:  # another rank failed: not a bad command line
        return _fail(f"error: {error}", EXIT_FAILED)
    except _commands.OutputError as error:
        return _fail(f"error: {error}", EXIT_FAILED)
    except (HessopsError, ValueError, FileNotFoundError) as error:  # bad input found while loading or computing
        return _fail(f"error: {_one_line(error)}", EXIT_USAGE)
    finally:
        if args is not None and getattr(args, "rank", None) is not None:
            _commands.end_distributed()


@contextlib.contextmanager
def _sigterm_as_interrupt(received: list[int]) -> Iterator[None]:
    """SIGTERM (``kill PID``, a scheduler's time limit) raises ``KeyboardInterrupt``, as Ctrl-C does, noted in
    ``received``: the run then ends cleanly (checkpoints save, ``finally`` blocks run) with its own status.
    The previous handler comes back afterwards; outside the main thread, where no handler can be set,
    nothing changes.

    Args:
        received: a list that each SIGTERM received appends its signal number to.

    Returns:
        A context manager for the run."""

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unknown(command: str, extra: list[str]) -> str:
    """Options the command does not take; ``--plot`` and ``--out`` on one with nothing to draw or write."""
    refused = [option for option in ("--plot", "--out") if any(e.split("=")[0] == option for e in extra)]
    if refused:
        nothing = "no figure to draw" if refused[0] == "--plot" else "no result to write"
        return f"`hessops {command}` has {nothing}: leave out {refused[0]}"
    return f"unrecognized arguments: {' '.join(extra)}"


def _fail(message: str, status: int) -> int:
    print(f"hessops: {message}", file=sys.stderr)
    return status


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
