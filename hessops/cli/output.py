"""What a command writes: ``--out``, the result's own ``to_dict()`` beside the settings and a record of the
run, as JSON; ``--plot``, one figure; each written whole or not at all (:func:`hessops._io.atomic_write`).

Torch-free at import, as the commands are.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hessops import __version__
from hessops._io import atomic_write

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


def settings(args: argparse.Namespace, shared: dict, **computed: Any) -> dict:
    """The settings a result records: ``shared`` (the model's, data's and operator's, from
    :func:`hessops.cli.setup.load`), then each of the command's own options (``args.own_options``, from its
    parser) by its name, then ``computed``, values that the command worked out from its options.

    A flag ``--no-X`` is recorded as ``X``, negated; a path as a string."""
    own = {}
    for dest in args.own_options:
        key, value = dest, getattr(args, dest)
        if key.startswith("no_") and isinstance(value, bool):
            key, value = key[3:], not value
        own[key] = str(value) if isinstance(value, Path) else value
    return shared | own | computed


def interval_text(result: dict) -> str:
    """``"; 95% interval [lo, hi]"`` for a result with a ``confidence_interval``, else nothing."""
    if "confidence_interval" not in result:
        return ""
    low, high = result["confidence_interval"]
    return f"; {100 * result['confidence']:g}% interval [{low:.8g}, {high:.8g}]"


def write_json(path: Path, record: dict) -> None:
    """``record`` as indented JSON, NaN and infinities written as ``null`` (JSON has neither)."""
    text = json.dumps(_finite(record), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def save_figure(fig: Figure, path: Path) -> None:
    """The figure in the format its extension names."""
    atomic_write(path, lambda file: fig.savefig(file, format=path.suffix[1:].lower(), dpi=120))
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
