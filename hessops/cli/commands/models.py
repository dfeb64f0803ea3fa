"""``hessops models``: the model zoo, from its registry (no model is built)."""

from __future__ import annotations

import argparse

from hessops.constants import GPT_SIZES
from hessops.zoo.registry import MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> None:
    """The zoo, one model a line, then the other models ``--model`` takes."""
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
