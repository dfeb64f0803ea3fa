"""A tiny HuggingFace GPT-2 (float64, built offline), and its saved checkpoint's broken copies as failed downloads
and mixed-up files leave them (tests/zoo/test_lm.py and tests/cli/test_cli.py check each is refused, naming the
file and the fix)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from hessops.zoo.lm import load_hf_model

VOCAB, POSITIONS = 8, 6  # the tiny models' vocabulary and context (tests/zoo/test_lm.py's V and T)


def tiny_hf() -> nn.Module:
    pytest.importorskip("transformers")
    overrides = {"n_layer": 1, "n_embd": 4, "n_head": 2, "vocab_size": VOCAB, "n_positions": POSITIONS}
    return load_hf_model("gpt2", overrides=overrides, seed=0, dtype=torch.float64)


def broken_checkpoints(folder) -> dict:
    """A saved tiny GPT-2 and its broken copies, as failed downloads and mixed-up files leave them: the weights
    cut at half, a config of other sizes, a config.json cut short (beside weights, and alone)."""
    tiny_hf().save_pretrained(folder / "saved")
    broken = {name: folder / name for name in ("half", "other-sizes", "config-cut", "config-cut-alone")}
    for name in ("half", "other-sizes", "config-cut"):
        shutil.copytree(folder / "saved", broken[name])
    weights = broken["half"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((folder / "saved" / "config.json").read_text())
    (broken["other-sizes"] / "config.json").write_text(json.dumps({**config, "n_embd": 8}))
    cut = (folder / "saved" / "config.json").read_text()[:50]
    (broken["config-cut"] / "config.json").write_text(cut)
    broken["config-cut-alone"].mkdir()
    (broken["config-cut-alone"] / "config.json").write_text(cut)
    return broken


BROKEN = {  # what each refusal names: the file or folder, and the fix
    "half": ("model.safetensors", "download the checkpoint again"),
    "other-sizes": ("do not have the sizes that its config.json gives", "use the config.json saved with these"),
    "config-cut": ("config-cut/config.json is not valid JSON", "download or save the config again"),
    "config-cut-alone": ("config-cut-alone/config.json is not valid JSON", "download or save the config again"),
}
