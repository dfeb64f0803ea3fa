"""What each ``hessops`` command does, once :mod:`hessops.cli` has checked its command line.

Torch-free at import, so that parsing a command line stays cheap: each command imports what it needs when it
runs. Every command prints a short summary; ``--out`` gets the result's own ``to_dict()`` beside the
settings and a record of the run, and ``--plot`` one figure, each written whole or not at all.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from hessops import __version__
from hessops._io import atomic_write
from hessops.constants import GPT_PREFIX, GPT_SIZES, HF_PREFIX, TEXT_DATA, is_language_model, is_text
from hessops.errors import CommandError, HessopsError, OutputError  # noqa: F401 - re-exported
from hessops.zoo import MODELS

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


# -- set-up shared by the commands that build an operator ------------------------------------------------------
@dataclass
class Setup:
    """The model (checkpoint loaded, on the device), its loss, the dataset, its loader and the operator."""

    model: torch.nn.Module
    loss_fn: Any
    dataset: torch.utils.data.Dataset
    loader: Any
    op: Any
    settings: dict


def _device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def setup(args: argparse.Namespace) -> Setup:
    """The data first (a missing dataset is reported before a large model is built), then the model, checked
    to take the data's inputs, then the operator ``--operator`` names."""
    from hessops.cli.app import timm_options
    from hessops.zoo.data import load_dataset
    from hessops.zoo.models import build_model, load_checkpoint, make_loss, model_spec

    device = _device(args.device)
    if args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = _start_distributed(args)
    if is_language_model(args.model):
        return _language_setup(args, device)
    options = timm_options(args)
    spec = model_spec(args.model, options=options)
    data_name = args.data or spec.default_data
    # The model's own normalization where it was trained on this data (resnet18_cifar10's checkpoint differs).
    normalization = {"mean": spec.mean, "std": spec.std} if data_name == spec.default_data else {}
    dataset = load_dataset(
        data_name,
        data_dir=args.data_dir,
        train=not args.test_split,
        num_examples=args.num_examples,
        seed=args.seed,
        **normalization,
    )
    model = build_model(args.model, seed=args.seed, options=options)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model = model.to(device).eval()
    _check_fits(model, dataset, device, args.model, data_name)
    return _operator_setup(args, model, make_loss(spec), dataset, data_name, device)


def operator_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--operator``'s own keyword arguments from the command line (``dtype`` aside)."""
    options: dict[str, Any] = {"progress": not args.no_progress}
    if args.operator == "mcfisher":
        options["seed"] = args.seed
    if args.operator == "hessian":
        options["hvp_mode"] = args.hvp_mode
    return options


def long_run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``--basis``, ``--basis-path``, ``--resume`` and ``--checkpoint-every`` (the first
    two where the command takes them)."""
    options: dict[str, Any] = {"checkpoint": args.resume, "checkpoint_every": args.checkpoint_every}
    if hasattr(args, "basis"):
        options |= {"basis": args.basis, "basis_path": args.basis_path}
    return options


def _operator_setup(
    args: argparse.Namespace,
    model: torch.nn.Module,
    loss_fn: Any,
    dataset: Any,
    data_name: str,
    device: torch.device,
) -> Setup:
    """The loader (this rank's shard), the operator and the settings, for a model and dataset checked to fit."""
    import torch

    from hessops.operators import OPERATORS
    from hessops.zoo.data import make_loader, on_device

    total_examples = len(dataset)
    if getattr(args, "rank", None) is not None:
        from hessops.operators.distributed import shard

        dataset = shard(dataset)  # this rank's contiguous part; the operator sums over all ranks
    loader = on_device(make_loader(dataset, batch_size=args.batch_size), device)
    op = OPERATORS[args.operator](model, loss_fn, loader, dtype=getattr(torch, args.dtype), **operator_options(args))
    settings = {
        "model": args.model,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "data": data_name,
        "split": "test" if args.test_split else "train",
        "num_examples": total_examples,
        "batch_size": args.batch_size,
        "operator": args.operator,
        "hvp_mode": args.hvp_mode if args.operator == "hessian" else None,
        "device": str(op.device),
        "dtype": args.dtype,
        "seed": args.seed,
        "n_params": op.shape[0],
        "world_size": getattr(args, "world_size", 1),
    }
    if is_text(data_name):  # text has no split; its examples are blocks of seq_len tokens
        settings |= {
            "split": None,
            "seq_len": args.seq_len,
            "tokenizer": str(args.tokenizer) if args.tokenizer else None,
            "hf_overrides": dict(args.hf_override or []),
        }
    return Setup(model, loss_fn, dataset, loader, op, settings)


def _language_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    """A language model (``gpt:SIZE`` or ``hf:SOURCE``) on text, cut into blocks of ``--seq-len`` tokens, with
    the next-token cross-entropy; the vocabulary and the context length are checked to fit first."""
    import torch

    from hessops.operators.losses import next_token_cross_entropy
    from hessops.zoo.data import draw_subset
    from hessops.zoo.lm import GPT, gpt_config, load_hf_model
    from hessops.zoo.models import load_checkpoint
    from hessops.zoo.text import load_text

    data_name = args.data or TEXT_DATA
    source = None if data_name == TEXT_DATA else data_name[len(TEXT_DATA) + 1 :]
    dataset = load_text(source, block_size=args.seq_len, tokenizer=args.tokenizer)
    vocab_needed = int(dataset.input_ids.max()) + 1
    if args.num_examples is not None:
        n = len(dataset)
        if args.num_examples > n:
            raise CommandError(
                f"--num-examples {args.num_examples}: {data_name} has {n:,} blocks of {args.seq_len} tokens; pass at "
                f"most {n} (or a smaller --seq-len for more blocks)"
            )
        dataset = draw_subset(dataset, args.num_examples, args.seed, data_name, True)
    if args.model.startswith(GPT_PREFIX):
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(args.seed)
            model = GPT(gpt_config(args.model[len(GPT_PREFIX) :]))
        context = model.config.block_size
    else:
        model = load_hf_model(args.model[len(HF_PREFIX) :], overrides=dict(args.hf_override or []), seed=args.seed)
        context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.seq_len > context:
        raise CommandError(
            f"--seq-len {args.seq_len}: {args.model} reads at most {context} tokens; pass --seq-len {context} or less"
        )
    vocab = model.config.vocab_size
    if vocab_needed > vocab:
        raise CommandError(
            f"--model {args.model} has a vocabulary of {vocab:,} tokens, but {data_name}'s token ids go up to "
            f"{vocab_needed - 1:,}: pass a model with a vocabulary of at least {vocab_needed:,} (or the tokenizer "
            "it was trained with, --tokenizer)"
        )
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    return _operator_setup(args, model.to(device).eval(), next_token_cross_entropy, dataset, data_name, device)


def _check_fits(model: torch.nn.Module, dataset: Any, device: torch.device, name: str, data: str) -> None:
    """One example through the model: a model made for other inputs fails here in one line, not inside the
    first product."""
    import torch

    x = dataset[0][0].unsqueeze(0).to(device)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise CommandError(
            f"--model {name} does not take {data}'s inputs of shape {tuple(x.shape[1:])} ({reason}): pass --data "
            f"with the model's inputs ({MODELS[name].input_shape if name in MODELS else 'see its timm config'})"
        ) from None


def _start_distributed(args: argparse.Namespace) -> torch.device:
    """Join the process group torchrun set up; only rank 0 prints, shows progress and writes files."""
    from hessops.operators.distributed import default_timeout, init_from_environment

    if args.timeout is None:
        try:
            args.timeout = default_timeout()  # $HESSOPS_DIST_TIMEOUT, else 30 minutes
        except ValueError as error:
            raise CommandError(str(error)) from None
    args.rank, args.world_size, device = init_from_environment(args.device, args.timeout)
    if args.rank != 0:
        args.no_progress, args.out, args.plot = True, None, None
        sys.stdout = io.StringIO()  # ranks other than 0 compute in silence
    return device


def end_distributed() -> None:
    """Leave the process group, if one was joined."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# -- output: JSON and figures, each written whole or not at all ------------------------------------------------
def replace_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """:func:`hessops._io.atomic_write`, the one atomic write."""
    atomic_write(path, write)


def write_json(path: Path, record: dict) -> None:
    """``record`` as indented JSON, NaN and infinities written as ``null`` (JSON has neither)."""
    text = json.dumps(_finite(record), indent=2, allow_nan=False) + "\n"
    replace_file(path, lambda file: file.write(text.encode()))


def save_figure(fig: Figure, path: Path) -> None:
    """The figure in the format its extension names."""
    replace_file(path, lambda file: fig.savefig(file, format=path.suffix[1:].lower(), dpi=120))
    if "matplotlib.pyplot" in sys.modules:  # a figure pyplot made is kept open by pyplot until closed
        sys.modules["matplotlib.pyplot"].close(fig)


def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.5, 4.5)) -> tuple[Figure, Any]:
    """A figure of its own (no pyplot, so no backend is chosen or switched) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols)


def title(what: str, settings: dict) -> str:
    """``what`` and the model, data and number of examples it is of."""
    return f"{what}: {settings['model']} on {settings['data']}, N = {settings['num_examples']:,}"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _describe(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.machine() or 'unknown machine'}, {torch.get_num_threads()} threads)"


def run_record(args: argparse.Namespace, device: torch.device) -> dict:
    """The command line, when it started (UTC) and how long it has run, the device and the versions."""
    import torch

    from hessops._cola import cola

    return {
        **args.run,
        "wall_seconds": time.perf_counter() - args.began,
        "device": _describe(device),
        "versions": {"hessops": __version__, "torch": torch.__version__, "cola": cola.__version__},
    }


def emit(
    args: argparse.Namespace,
    settings: dict,
    result: dict,
    device: torch.device,
    draw: Callable[[], Figure],
) -> None:
    """Write ``--out``, ``{"command", "run", "settings", **result}``, and draw ``--plot`` (``draw`` makes the
    figure, only when asked)."""
    if args.out is not None:  # first: a figure that fails to draw costs no result
        write_json(args.out, {"command": args.command, "run": run_record(args, device), "settings": settings, **result})
        print(f"wrote {args.out}")
    if args.plot is not None:
        save_figure(draw(), args.plot)
        print(f"wrote {args.plot}")


# -- the commands ------------------------------------------------------------------------------------------------
def eigs(args: argparse.Namespace) -> None:
    """``hessops eigs``: Lanczos on the operator; prints each eigenvalue with its residual and error bound."""
    import hessops
    from hessops.plot import plot_eigenvalues

    s = setup(args)
    spectrum = hessops.eigs(
        s.op,
        args.k,
        args.which,
        tol=args.tol,
        value_tol=args.value_tol,
        max_iters=args.max_iters,
        seed=args.seed,
        check=not args.no_check,
        progress=not args.no_progress,
        **long_run_options(args),
    )
    result = spectrum.to_dict()
    for i, (value, residual, bound) in enumerate(
        zip(result["eigenvalues"], result["residuals"], result["error_bounds"]), 1
    ):
        print(f"λ{i:<3d} = {value: .8g}   ‖Hv − λv‖ = {residual:.2g}   error ≤ {bound:.2g}")
    print(
        f"{result['n_matvecs']} products in {result['seconds']:.2f} s ({result['lanczos_steps']} Lanczos steps, "
        f"{result['check_runs']} check runs), converged: {result['converged']}"
    )
    name = type(s.op).__name__
    what = (
        f"{name} top-{args.k} eigenvalues" if args.which == "LM" else f"{name} eigenvalues ({args.which}, k = {args.k})"
    )

    def draw() -> Figure:
        fig, ax = new_figure()
        plot_eigenvalues(result["eigenvalues"], ax=ax, title=title(what, s.settings))
        return fig

    settings = s.settings | {
        "k": args.k,
        "which": args.which,
        "tol": args.tol,
        "value_tol": args.value_tol,
        "max_iters": args.max_iters,
        "check": not args.no_check,
    }
    if args.save_vectors is not None and not getattr(args, "rank", None):  # rank 0 alone writes
        spectrum.save_vectors(args.save_vectors, s.op)
        print(f"wrote {args.save_vectors}")
        settings["save_vectors"] = str(args.save_vectors)
    tuning = {kind: t.to_dict() for kind, t in getattr(s.op, "hvp_tuning", {}).items()}
    emit(args, settings, result | {"hvp_tuning": tuning}, s.op.device, draw)


def blocks(args: argparse.Namespace) -> None:
    """``hessops blocks``: :func:`hessops.block_spectra` on each parameter group; prints each block's values."""
    import hessops
    from hessops.plot import plot_block_spectra

    s = setup(args)
    spectra = hessops.block_spectra(
        s.model,
        s.loss_fn,
        s.loader,
        groups=None if args.group is None else dict(args.group),
        k=args.k,
        operator=args.operator,
        which=args.which,
        tol=args.tol,
        value_tol=args.value_tol,
        max_iters=args.max_iters,
        seed=args.seed,
        dtype=s.op.dtype,
        operator_options=operator_options(args),
        progress=not args.no_progress,
    )
    result = spectra.to_dict()
    width = max(len(block["name"]) for block in result["blocks"])
    for block in result["blocks"]:
        values = "  ".join(f"{v: .6g}" for v in block["eigenvalues"])
        print(
            f"{block['name']:<{width}}  {block['n_params']:>10,} params   λ = {values}   "
            f"max ‖Hv − λv‖ = {max(block['residuals']):.2g}"
        )
    print(f"{len(result['blocks'])} blocks: {result['n_matvecs']} products in {result['seconds']:.2f} s")

    def draw() -> Figure:
        fig, ax = new_figure(size=(max(6.5, 0.45 * len(result["blocks"]) + 2), 4.5))
        values = {block["name"]: block["eigenvalues"] for block in result["blocks"]}
        plot_block_spectra(
            values, ax=ax, title=title(f"{type(s.op).__name__} blocks ({args.which}, k = {args.k})", s.settings)
        )
        return fig

    settings = s.settings | {
        "k": args.k,
        "which": args.which,
        "groups": None if args.group is None else dict(args.group),
        "tol": args.tol,
        "value_tol": args.value_tol,
        "max_iters": args.max_iters,
    }
    emit(args, settings, result, s.op.device, draw)


def density(args: argparse.Namespace) -> None:
    """``hessops density``: the SLQ spectral density, broadened on a grid."""
    import hessops
    from hessops.plot import plot_density

    s = setup(args)
    d = hessops.spectral_density(
        s.op,
        num_probes=args.num_probes,
        lanczos_steps=args.lanczos_steps,
        grid=args.grid,
        sigma=args.sigma,
        seed=args.seed,
        progress=not args.no_progress,
        **long_run_options(args),
    )
    result = d.to_dict()
    grid = result["grid"]
    print(
        f"density on [{grid[0]:.4g}, {grid[-1]:.4g}], σ = {result['sigma']:.3g}; mean eigenvalue "
        f"{result['moments']['mean']:.6g}; {result['n_matvecs']} products in {result['seconds']:.2f} s"
    )
    top = sum(max(nodes) for nodes in result["nodes"]) / len(result["nodes"])  # the largest Ritz value, on average

    def draw() -> Figure:
        fig, ax = new_figure()
        plot_density(
            grid,
            result["density"],
            ax=ax,
            top=[top],
            title=title(f"{type(s.op).__name__} spectral density", s.settings),
        )
        return fig

    settings = s.settings | {
        "num_probes": args.num_probes,
        "lanczos_steps": args.lanczos_steps,
        "grid": args.grid,
        "sigma": args.sigma,
    }
    emit(args, settings, result, s.op.device, draw)


def trace(args: argparse.Namespace) -> None:
    """``hessops trace``: Hutch++ or Hutchinson."""
    import hessops
    from hessops.plot import plot_trace

    s = setup(args)
    estimate = hessops.trace(s.op, probes=args.probes, method=args.method, seed=args.seed, **long_run_options(args))
    result = estimate.to_dict()
    print(
        f"trace = {result['trace']:.8g} ± {result['std_error']:.2g} ({result['method']}, {result['n_matvecs']} "
        f"products, {result['seconds']:.2f} s)"
    )

    def draw() -> Figure:
        fig, ax = new_figure()
        plot_trace(estimate, ax=ax, title=title(f"{type(s.op).__name__} trace against probes", s.settings))
        return fig

    emit(args, s.settings | {"probes": args.probes, "method": args.method}, result, s.op.device, draw)


def logdet(args: argparse.Namespace) -> None:
    """``hessops logdet``: log det(op + c·I), exact or by SLQ."""
    import hessops
    from hessops.plot import plot_log_volume

    s = setup(args)
    method, deflate = deflation(args)
    estimate = hessops.logdet(
        hessops.Regularized(s.op, args.c),
        method=method,
        probes=args.probes,
        lanczos_steps=args.lanczos_steps,
        seed=args.seed,
        progress=not args.no_progress,
        **long_run_options(args),
        deflate=deflate,
        confidence=args.confidence,
        eigs_max_iters=args.eigs_max_iters,
    )
    result = estimate.to_dict()
    print(
        f"log det({args.operator} + {args.c:g}·I) = {result['logdet']:.8g} ± {result['std_error']:.2g} "
        f"({result['method']}, {result['n_matvecs']} products, {result['seconds']:.2f} s)" + interval_text(result)
    )

    def draw() -> Figure:
        return plot_log_volume(estimate, title=title(f"log det({type(s.op).__name__} + {args.c:g}·I)", s.settings))

    settings = s.settings | {
        "c": args.c,
        "method": method,
        "probes": args.probes,
        "lanczos_steps": args.lanczos_steps,
        "deflate": deflate,
        "confidence": args.confidence,
        "eigs_max_iters": args.eigs_max_iters,
    }
    emit(args, settings, result, s.op.device, draw)


def deflation(args: argparse.Namespace) -> tuple[str, int]:
    """The log-determinant method and the number of deflated eigenvalues: ``--deflate`` implies ``deflated``
    when ``--method`` is ``auto``, and only ``deflated`` takes it."""
    from hessops.errors import InvalidArgumentError

    if args.deflate is None:
        return args.method, 10
    if args.method not in ("auto", "deflated"):
        raise InvalidArgumentError(f"--deflate applies to --method deflated, not {args.method}: drop one of them")
    return "deflated", args.deflate


def interval_text(result: dict) -> str:
    """``"; 95% interval [lo, hi]"`` for a result with a ``confidence_interval``, else nothing."""
    if "confidence_interval" not in result:
        return ""
    low, high = result["confidence_interval"]
    return f"; {100 * result['confidence']:g}% interval [{low:.8g}, {high:.8g}]"


def basin(args: argparse.Namespace) -> None:
    """``hessops basin``: the log volume of the quadratic basin."""
    import hessops
    from hessops.plot import plot_log_volume

    s = setup(args)
    method, deflate = deflation(args)
    volume = hessops.basin_volume(
        s.op,
        threshold=args.threshold,
        c=args.c,
        method=method,
        probes=args.probes,
        lanczos_steps=args.lanczos_steps,
        seed=args.seed,
        progress=not args.no_progress,
        **long_run_options(args),
        deflate=deflate,
        confidence=args.confidence,
        check_c=not args.no_check_c,
        eigs_max_iters=args.eigs_max_iters,
        smallest_eigenvalue=args.smallest_eigenvalue,
    )
    result = volume.to_dict()
    print(
        f"log V = {result['log_volume']:.6f}  (log unit ball {result['log_unit_ball']:.6f} + threshold term "
        f"{result['log_threshold_term']:.6f} − ½ logdet {result['half_logdet']:.6f} ± "
        f"{0.5 * result['logdet_std_error']:.2g}; n = {result['n']}, {result['method']})" + interval_text(result)
    )
    if args.smallest_eigenvalue is not None:
        print(
            f"smallest eigenvalue of {args.operator}: at least {args.smallest_eigenvalue:g} (given), "
            f"above -c = {-args.c:g}"
        )
    elif "smallest_eigenvalue" in result:
        print(
            f"smallest eigenvalue of {args.operator}: {result['smallest_eigenvalue']:.6g} "
            f"± {result['smallest_eigenvalue_bound']:.2g}, below c = {args.c:g} in magnitude (checked)"
        )

    def draw() -> Figure:
        return plot_log_volume(
            volume, title=title(f"Log basin volume ({type(s.op).__name__}, c = {args.c:g})", s.settings)
        )

    settings = s.settings | {
        "threshold": args.threshold,
        "c": args.c,
        "method": method,
        "probes": args.probes,
        "lanczos_steps": args.lanczos_steps,
        "deflate": deflate,
        "confidence": args.confidence,
        "check_c": not args.no_check_c,
        "eigs_max_iters": args.eigs_max_iters,
        "smallest_eigenvalue": args.smallest_eigenvalue,
    }
    emit(args, settings, result, s.op.device, draw)


def landscape(args: argparse.Namespace) -> None:
    """``hessops landscape``: the loss (and accuracy) on a line or a plane through the parameters."""
    import hessops
    from hessops.plot import plot_landscape

    s = setup(args)
    directions: Any = "random"
    if args.directions == "eigen" and args.vectors is not None:
        directions = hessops.load_eigenvectors(args.vectors)
    elif args.directions == "eigen":
        directions = hessops.eigs(s.op, args.dims, "LA", seed=args.seed, progress=not args.no_progress)
        values = ", ".join(f"{v:.6g}" for v in directions.values.tolist())
        print(f"eigenvectors of the {args.dims} largest eigenvalues ({values}): {directions.n_matvecs} products")
    surface = hessops.loss_landscape(
        s.model,
        s.loss_fn,
        s.loader,
        directions,
        dims=args.dims,
        span=args.span,
        points=args.points,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result = surface.to_dict()
    finite = surface.loss[surface.loss.isfinite()]
    accuracy = "" if surface.accuracy is None else f", accuracy {surface.center_accuracy:.4f}"
    print(
        f"loss at the parameters {surface.center_loss:.6g}{accuracy}; on the {args.dims}-D slice (span ±{args.span:g}) "
        f"from {float(finite.min()):.6g} to {float(finite.max()):.6g}; {surface.n_points} points × "
        f"{surface.n_examples:,} examples ({surface.n_passes} passes over the data) in {surface.seconds:.2f} s"
    )

    def draw() -> Figure:
        fig, ax = new_figure(size=(7.5, 4.5) if args.dims == 1 else (8, 6))
        plot_landscape(surface, ax=ax, title=title(f"Loss landscape ({args.directions} directions)", s.settings))
        return fig

    settings = s.settings | {
        "directions": args.directions,
        "vectors": str(args.vectors) if args.vectors else None,
        "dims": args.dims,
        "span": args.span,
        "points": args.points,
    }
    emit(args, settings, result, s.op.device, draw)


def track(args: argparse.Namespace) -> None:
    """``hessops track``: SGD, measuring the sharpness every ``--every`` epochs and the gradient norms."""
    import torch

    from hessops.analysis.tracking import GradNormTracker, SharpnessTracker, train
    from hessops.zoo.data import make_loader, on_device

    s = setup(args)
    subset = torch.utils.data.Subset(s.dataset, range(min(args.sharpness_examples, len(s.dataset))))
    fixed = on_device(make_loader(subset, batch_size=args.batch_size), s.op.device)
    sharpness = SharpnessTracker(s.model, s.loss_fn, fixed, unit="epoch", dtype=s.op.dtype)
    grad_norms = GradNormTracker(s.model)
    history = train(
        s.model,
        s.loss_fn,
        s.loader,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        sharpness=sharpness,
        grad_norms=grad_norms,
        every=args.every,
        progress=not args.no_progress,
    )
    for record in sharpness.history:
        print(f"epoch {record.step:3d}: sharpness {record.values[0]:.6g}")

    def draw() -> Figure:
        fig, (left, right) = new_figure(1, 2, (13, 4.5))
        sharpness.plot(ax=left, title="Sharpness (top Hessian eigenvalue)")
        grad_norms.plot(ax=right, title="Per-layer gradient norms")
        fig.suptitle(title("Training with SGD", s.settings))
        return fig

    settings = s.settings | {
        "epochs": args.epochs,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "every": args.every,
        "sharpness_examples": len(subset),
    }
    result = {
        "training": history,
        "sharpness": [asdict(r) for r in sharpness.history],
        "grad_norms": grad_norms.history,
    }
    emit(args, settings, result, s.op.device, draw)


def demo(args: argparse.Namespace) -> None:
    """``hessops demo``: :func:`hessops.demo.run_demo`, its result at ``--out`` and its figure at ``--plot``."""
    import torch

    from hessops.demo import run_demo

    result = run_demo(k=args.k, seed=args.seed, progress=not args.no_progress)
    emit(args, result.settings, result.to_dict(), torch.device("cpu"), result.figure)


def download(args: argparse.Namespace) -> None:
    """``hessops download``: torchvision fetches the files (see :func:`hessops.zoo.data.download_dataset`)."""
    from hessops.zoo.data import download_dataset

    print(f"{args.name} is in {download_dataset(args.name, args.data_dir)}")


def models(args: argparse.Namespace) -> None:
    """``hessops models``: the zoo, from its registry (no model is built)."""
    rows = [("model", "parameters", "input", "classes", "data", "description")]
    for spec in MODELS.values():
        size = f"{spec.n_params:,}" if spec.n_params is not None else "?"
        rows.append(
            (
                spec.name,
                size,
                "×".join(map(str, spec.input_shape)),
                str(spec.num_classes),
                str(spec.default_data),
                spec.description,
            )
        )
    rows.append(("timm:NAME", "", "", "", "", "any timm model (pip install 'hessops[zoo]'); pass --data"))
    rows.append(("gpt:SIZE", "", "tokens", "", "text", f"hessops.GPT, a causal LM; SIZE one of {', '.join(GPT_SIZES)}"))
    rows.append(
        (
            "hf:SOURCE",
            "",
            "tokens",
            "",
            "text",
            "a HuggingFace causal LM: checkpoint folder, config JSON or model type (pip install 'hessops[hf]')",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [
            row[0].ljust(widths[0]),
            row[1].rjust(widths[1]),
            row[2].ljust(widths[2]),
            row[3].rjust(widths[3]),
            row[4].ljust(widths[4]),
            row[5],
        ]
        print("  ".join(cells).rstrip())
