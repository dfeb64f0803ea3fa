"""Causal language models: a plain ``torch.nn`` GPT for users without HuggingFace, and HuggingFace causal LMs
built offline (:func:`load_hf_model`). Both return logits ``(B, T, V)`` for
:func:`hessops.operators.losses.next_token_cross_entropy`.

:class:`GPT` is GPT-2's architecture (Radford et al. 2019): learned token and position embeddings,
pre-LayerNorm blocks of causal multi-head self-attention (``F.scaled_dot_product_attention``) and a GELU MLP
of width ``4·n_embd``, a final LayerNorm, and an output layer **tied** to the token embedding (its weight is
``wte.weight``, counted once in ``parameters()``), as in GPT-2.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessops.errors import CheckpointError, InvalidArgumentError, UnknownModelError
from hessops.zoo.optional import optional_import

__all__ = ["GPTConfig", "GPT", "gpt_config", "GPT_CONFIGS", "load_hf_model"]


@dataclass(frozen=True)
class GPTConfig:
    """The sizes of a :class:`GPT`.

    Attributes:
        vocab_size: the tokens.
        block_size: the most positions.
        n_layer: the blocks.
        n_head: the heads of a block.
        n_embd: the features (divisible by ``n_head``).
        dropout: on the embeddings, attention and residual branches (0 for curvature).
        bias: in the linear layers and norms.

    Raises:
        InvalidArgumentError: a size that is not a positive int, ``n_embd`` not divisible by ``n_head``, or
            ``dropout`` outside ``[0, 1)``."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise InvalidArgumentError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}: each head gets "
                "n_embd / n_head features; choose sizes that divide"
            )
        if not 0 <= self.dropout < 1:
            raise InvalidArgumentError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


# Named sizes. GPT-2's are its published ones (124M: 124,439,808 parameters with the tied output layer);
# gpt-bytes-* read byte-level tokens (vocab 256, hessops.zoo.text).
GPT_CONFIGS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt-bytes-mini": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "gpt-bytes-tiny": GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=16),
}


def gpt_config(name: str, **changes: Any) -> GPTConfig:
    """A named size, with changes to its fields, e.g. ``gpt_config("gpt2-small", block_size=128)``.

    Args:
        name: a key of :data:`GPT_CONFIGS`.
        **changes: new values of :class:`GPTConfig` fields.

    Returns:
        The :class:`GPTConfig`.

    Raises:
        UnknownModelError: ``name`` is not a named size.
        InvalidArgumentError: a changed size out of range."""
    if name not in GPT_CONFIGS:
        raise UnknownModelError(f"unknown GPT size {name!r}: the named sizes are {', '.join(GPT_CONFIGS)}")
    return replace(GPT_CONFIGS[name], **changes)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused query/key/value projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x`` ``(B, T, C)``; ``mask`` ``(B, 1, T, T)`` boolean (True: may attend), or ``None``: causal."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """One block on ``x`` ``(B, T, C)``."""
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-style causal language model (module docstring): ``model(input_ids, attention_mask=None)`` with
    ``input_ids`` ``(B, T)``, ``T <= block_size``, returns logits ``(B, T, vocab_size)``.

    Args:
        config: the sizes.

    ``attention_mask`` ``(B, T)`` (1: token, 0: padding, HuggingFace's convention) keeps every position from
    attending to padding; a position still attends to itself, so a padded position's logits stay finite
    (label it -100). Weights are initialized as GPT-2's: normal with std 0.02 (residual projections
    ``0.02 / sqrt(2·n_layer)``), biases zero."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:
                std = 0.02 / (2 * config.n_layer) ** 0.5 if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The logits of the next token at every position.

        Args:
            input_ids: ``(B, T)`` token ids, ``T <= block_size``.
            attention_mask: ``(B, T)``, 1: token, 0: padding; ``None``: no padding.

        Returns:
            Logits ``(B, T, vocab_size)``.

        Raises:
            InvalidArgumentError: ``T`` exceeds ``block_size``."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise InvalidArgumentError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        positions = torch.arange(T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        mask = None
        if attention_mask is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            itself = torch.eye(T, dtype=torch.bool, device=input_ids.device)
            mask = (causal & (attention_mask.bool()[:, None, None, :] | itself)).expand(B, 1, T, T)
        for block in self.h:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


def load_hf_model(
    source: str | os.PathLike,
    *,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A HuggingFace causal LM (``AutoModelForCausalLM``), in eval mode, without the network:

    - a local checkpoint folder (``config.json`` and weights): ``from_pretrained(source,
      local_files_only=True)``;
    - a config JSON file, or a folder with only ``config.json``: that config, random weights;
    - a model type that transformers knows (``"gpt2"``, ``"llama"``, ...): the default config of that type as
      the installed transformers defines it (for ``"gpt2"``: GPT-2 small, 124M), random weights.

    ``overrides`` changes config fields first (``{"n_layer": 2, "n_embd": 32}``), given to the config's
    constructor, so that fields it derives follow them as in transformers (Llama's ``head_dim =
    hidden_size // num_attention_heads`` unless ``head_dim`` is overridden too). Random weights are the
    model's own initialization under ``torch.manual_seed(seed)``, drawn without touching the global random
    state. ``use_cache`` is turned off (no key/value cache is needed for the loss).

    Args:
        source: a checkpoint folder, a config JSON file (or a folder with only ``config.json``), or a model type.
        overrides: config fields to change first.
        seed: the seed of random weights.
        dtype: the model's dtype (default: as loaded).

    Returns:
        The model, in eval mode.

    Raises:
        MissingDependencyError: transformers is not installed: it needs the ``hf`` extra
            (``pip install hessops[hf]``).
        CheckpointError: the folder or config file cannot be read.
        UnknownModelError: a model type that transformers does not know."""
    transformers = optional_import("transformers", "load_hf_model needs transformers: pip install 'hessops[hf]'")

    path = Path(source)
    changes = {**(overrides or {}), "use_cache": False}
    if path.is_dir() and any((path / name).is_file() for name in _WEIGHTS):
        return _from_checkpoint(transformers, path, changes, dtype)
    if path.is_dir() or path.suffix == ".json":
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(
                f"{file} does not exist: pass a checkpoint folder (config.json and weights), a config JSON file, "
                "or a model type such as 'gpt2'"
            )
        values = _read_config(file)
        config = transformers.AutoConfig.for_model(**_with_changes(values, _special_ids_within(values, changes)))
    elif str(source) in transformers.CONFIG_MAPPING:
        defaults = transformers.CONFIG_MAPPING[str(source)]().to_dict()
        config = transformers.AutoConfig.for_model(str(source), **_special_ids_within(defaults, changes))
    else:
        raise UnknownModelError(
            f"{source!r} is neither a local folder, a config JSON file, nor a model type transformers knows "
            f"(e.g. gpt2, llama); nothing is downloaded: put a checkpoint in a folder and pass its path"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_config(file: Path) -> dict[str, Any]:
    """The values of the HuggingFace config ``file``.

    Args:
        file: a ``config.json``.

    Returns:
        Its values, ``model_type`` among them.

    Raises:
        CheckpointError: the file is not JSON (cut short by a failed download, say) or names no model type."""
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{file} is not valid JSON ({' '.join(str(error).split())}): it may be cut short by a failed download; "
            "download or save the config again"
        ) from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise CheckpointError(f"{file} has no 'model_type': it is not a HuggingFace config")
    return values


def _from_checkpoint(transformers: Any, path: Path, changes: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """The causal LM saved in the folder ``path`` (``from_pretrained``, offline), in eval mode.

    Weights of other sizes than the config gives are refused rather than drawn at random (transformers' own
    refusal is a multi-line report); parameters the files lack, or hold besides, are warned of.

    Args:
        transformers: the imported package.
        path: a folder with ``config.json`` and weights.
        changes: config fields to change first.
        dtype: the parameters' dtype (``None``: as saved).

    Returns:
        The model.

    Raises:
        CheckpointError: ``config.json`` is missing or not JSON, the weights are incomplete or unreadable (a
            half-finished download), or their sizes are not the config's."""
    import warnings

    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has weights but no config.json: put the config saved with them beside them")
    _read_config(path / "config.json")
    found = ", ".join(name for name in _WEIGHTS if (path / name).is_file())
    options = {"dtype": dtype} if dtype is not None else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is many lines: what matters in it is said below
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, ignore_mismatched_sizes=True, output_loading_info=True, **changes, **options
        )
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as error:
        raise CheckpointError(
            f"could not load the checkpoint in {path} ({found}): {' '.join(str(error).split())[:300]}; if a "
            "download was cut short, download the checkpoint again"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["mismatched_keys"]:
        name, saved, built = sorted(info["mismatched_keys"], key=lambda entry: entry[0])[0]
        raise CheckpointError(
            f"the weights in {path} ({found}) do not have the sizes that its config.json gives (and overrides): "
            f"{len(info['mismatched_keys'])} differ, e.g. {name} is {tuple(saved)} there, {tuple(built)} in the "
            "model: use the config.json saved with these weights, without overrides of sizes"
        )
    for kind, keys in (("missing from", info["missing_keys"]), ("unused in", info["unexpected_keys"])):
        if keys:
            warnings.warn(
                f"{len(keys)} parameters of the model are {kind} the weights in {path} (e.g. {sorted(keys)[0]}); "
                f"{'they are drawn at random' if kind == 'missing from' else 'they are ignored'}",
                stacklevel=3,
            )
    return model.eval()


# Fields that Llama-style configs derive when they are not given, from the sizes they are derived from.
_DERIVED: dict[str, tuple[tuple[str, ...], Any]] = {
    "head_dim": (("hidden_size", "num_attention_heads"), lambda hidden, heads: hidden // heads),
    "num_key_value_heads": (("num_attention_heads",), lambda heads: heads),
}


_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _special_ids_within(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``changes``, with the special token ids of ``values`` that a smaller ``vocab_size`` in ``changes`` leaves
    outside the vocabulary set to ``None`` (GPT-2's 50256 under ``vocab_size=100``): no token can have them,
    the model's forward pass never reads them, and transformers would warn about each on stderr. Ids that
    ``changes`` sets itself are left as given."""
    vocabulary = changes.get("vocab_size")
    if not isinstance(vocabulary, int):
        return changes
    changes = dict(changes)
    for field in _SPECIAL_IDS:
        value = values.get(field)
        ids = value if isinstance(value, list) else [value]
        if field not in changes and any(isinstance(i, int) and i >= vocabulary for i in ids):
            changes[field] = None
    return changes


def _with_changes(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A saved config's ``values`` with ``changes``, for the config's constructor to take together, so that
    the fields it derives follow the changed sizes as transformers derives them from the same sizes.

    A saved Llama or Mistral config lists its derived fields (``head_dim = hidden_size //
    num_attention_heads``, ``num_key_value_heads = num_attention_heads``): one that the saved sizes derive is
    left out, to be derived again, when ``changes`` set a size it comes from and not the field itself."""
    values = dict(values)
    for field, (sizes, derive) in _DERIVED.items():
        known = all(isinstance(values.get(size), int) and values[size] > 0 for size in sizes)
        resized = field not in changes and any(size in changes for size in sizes)
        if known and resized and values.get(field) == derive(*(values[size] for size in sizes)):
            del values[field]
    return {**values, **changes}
