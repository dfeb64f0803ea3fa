"""The set-up shared by the commands that build an operator: the model (checkpoint loaded, on the device), its
loss, the dataset and its loader, the operator ``--operator`` names and the settings they record; joining and
leaving a data-parallel run; the library's keyword arguments read from the shared options.

Torch-free at import: torch is imported when a command runs.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hessops.cli.options import timm_options
from hessops.constants import GPT_PREFIX, HF_PREFIX, TEXT_DATA, is_language_model, is_text
from hessops.errors import CommandError, InvalidArgumentError
from hessops.zoo.registry import MODELS

if TYPE_CHECKING:
    import torch


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


def load(args: argparse.Namespace) -> Setup:
    """The data first (a missing dataset is reported before a large model is built), then the model, checked
    to take the data's inputs, then the operator ``--operator`` names."""
    from hessops.zoo.data import load_dataset
    from hessops.zoo.models import build_model, load_checkpoint, make_loss, model_spec

    device = _device(args.device)
    if args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = start_distributed(args)
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


def start_distributed(args: argparse.Namespace) -> torch.device:
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


def deflation(args: argparse.Namespace) -> tuple[str, int]:
    """The log-determinant method and the number of deflated eigenvalues: ``--deflate`` implies ``deflated``
    when ``--method`` is ``auto``, and only ``deflated`` takes it."""
    if args.deflate is None:
        return args.method, 10
    if args.method not in ("auto", "deflated"):
        raise InvalidArgumentError(f"--deflate applies to --method deflated, not {args.method}: drop one of them")
    return "deflated", args.deflate
