"""The registry of ``hessops`` commands: each command's name, the module that is the command and its one-line
help. Torch-free, and it imports no command: ``hessops --help`` lists the commands from this table alone, and
``hessops NAME ...`` imports only NAME's module (pip's ``commands_dict``, huggingface_hub's ``commands/``).

A command's module defines ``add_arguments(parser)`` (its options, the shared groups of
:mod:`hessops.cli.options` among them), ``run(args)``, and, where options depend on each other, ``check(args)``,
the one-line message of a usage error or ``None``, found without loading anything. It is torch-free at
import (what it computes with is imported in ``run``). Adding a command is its module and one line here
(docs/cli.md).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class Command(NamedTuple):
    """Where a command is (a module's dotted path) and what it does (one line, lower case, no full stop)."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "eigs": Command("hessops.cli.commands.eigs", "extreme eigenvalues by Lanczos, with residuals and error bounds"),
    "blocks": Command(
        "hessops.cli.commands.blocks", "top eigenvalues of each parameter group's block (each transformer block, ...)"
    ),
    "density": Command("hessops.cli.commands.density", "spectral density by stochastic Lanczos quadrature"),
    "trace": Command("hessops.cli.commands.trace", "trace by Hutch++ or Hutchinson"),
    "logdet": Command("hessops.cli.commands.logdet", "log det(op + c·I), exact or by stochastic Lanczos quadrature"),
    "basin": Command("hessops.cli.commands.basin", "log volume of the basin {δ: ½δᵀ(H + cI)δ ≤ threshold}"),
    "landscape": Command(
        "hessops.cli.commands.landscape",
        "the loss (and accuracy) on a line or a plane through the parameters, along eigenvectors or random "
        "filter-normalized directions",
    ),
    "track": Command(
        "hessops.cli.commands.track", "train with SGD, tracking the sharpness and the per-layer gradient norms"
    ),
    "demo": Command(
        "hessops.cli.commands.demo",
        "train a small net on the embedded digits, then spectrum, density, trace and basin volume",
    ),
    "download": Command(
        "hessops.cli.commands.download", "fetch a dataset through torchvision (needs the network, once)"
    ),
    "models": Command("hessops.cli.commands.models", "list the model zoo: sizes, inputs, classes, data"),
}


def load(name: str) -> ModuleType:
    """The module of command ``name`` (imported on first use)."""
    return importlib.import_module(COMMANDS[name].module)
