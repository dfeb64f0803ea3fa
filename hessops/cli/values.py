"""The command line's values: each a ``type=`` for argparse that reads one option's text, raising
``ArgumentTypeError`` with what to pass instead. Torch-free: every value is checked before anything loads."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hessops.constants import GPT_PREFIX, GPT_SIZES, HF_PREFIX, TEXT_DATA
from hessops.zoo.registry import DATASET_SPECS, MODELS, TIMM_PREFIX

FIGURE_FORMATS = (".png", ".pdf", ".svg")
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes seeds below this (and negative ones, not offered here)
DATASETS: tuple[str, ...] = tuple(DATASET_SPECS)


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
    """A dataset of the zoo's registry, ``text`` (the bundled corpus) or ``text:PATH`` (a .txt file or a folder
    of them)."""
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
