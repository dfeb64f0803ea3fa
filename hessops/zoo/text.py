"""Text for language models, offline: a corpus that ships inside an installed package, cut into fixed-length
blocks of tokens with attention masks and labels, as HuggingFace batches.

The corpus is scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``: 14 documents, about
43,000 characters of English prose and tables). scikit-learn is a dependency of hessops already (the digits),
so the text is there wherever hessops is, never downloaded, and fixed for a given scikit-learn release.

Tokens are the UTF-8 bytes of the text (vocabulary 256, no tokenizer to fetch), or, with ``transformers``,
those of a tokenizer in a local folder. Each document is cut into blocks of ``block_size`` tokens; a
document's last, shorter block is padded on the right: ``attention_mask`` 0 and ``labels`` -100 there. Every
token of the corpus is in exactly one block, and the next-token loss
(:func:`hessops.operators.losses.next_token_cross_entropy`) counts each as a label once, except the first token of each
block, which no position predicts: a block of ``k`` tokens gives ``k - 1`` labels, the corpus its number of
tokens less its number of blocks.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hessops.constants import DEFAULT_IGNORE_INDEX
from hessops.errors import CorruptDatasetError, DatasetNotFoundError, EmptyDataError, InvalidArgumentError
from hessops.zoo.optional import optional_import

__all__ = ["BYTE_VOCAB_SIZE", "TextBlocks", "corpus_documents", "load_text"]

BYTE_VOCAB_SIZE = 256


def corpus_documents(source: str | os.PathLike | None = None) -> list[str]:
    """The documents of ``source``, one string per file, in file-name order: a UTF-8 ``.txt`` file, or a folder
    of them (its ``*.txt`` files, not its subfolders'); ``None``: scikit-learn's dataset descriptions, the
    bundled corpus. An empty path (``""``, an unset variable) is refused, not read as the current folder."""
    if source is not None and not str(os.fspath(source)).strip():
        raise DatasetNotFoundError(
            f"the text path {source!r} is empty (an unset variable?): pass a UTF-8 .txt file or a folder of them, "
            "or None for the bundled corpus"
        )
    if source is not None:
        return [_read_text(f) for f in _text_files(Path(source))]
    folder = resources.files("sklearn.datasets") / "descr"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".rst")), key=lambda f: f.name)
    return [f.read_text(encoding="utf-8") for f in files]


class TextBlocks(Dataset):
    """Blocks of tokens: item ``i`` is ``{"input_ids", "attention_mask", "labels"}``, three int64 tensors of
    shape ``(block_size,)`` (labels = input ids, -100 at padding). A ``DataLoader`` over it
    (``hessops.zoo.data.make_loader``) yields HuggingFace batches, which the operators take directly."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, vocab_size: int) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = torch.where(attention_mask.bool(), input_ids, DEFAULT_IGNORE_INDEX)
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def load_text(
    source: str | os.PathLike | None = None,
    *,
    block_size: int = 64,
    num_blocks: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    pad_id: int = 0,
) -> TextBlocks:
    """A corpus as :class:`TextBlocks` of ``block_size`` tokens, in corpus order.

    Args:
        source: a ``.txt`` file or a folder of them (:func:`corpus_documents`); ``None``: the bundled one.
        block_size: the tokens of a block, at least 2 (one token predicts the next).
        num_blocks: keeps the first ones; ``None``: all.
        tokenizer: a local folder of a HuggingFace tokenizer, whose ids the tokens then are
            (``local_files_only``: nothing is downloaded); ``None``: UTF-8 bytes (``vocab_size`` 256).
        pad_id: the token padding holds (ignored by the loss and masked).

    Returns:
        The :class:`TextBlocks`.

    Raises:
        InvalidArgumentError: ``block_size`` or ``num_blocks`` out of range.
        EmptyDataError: the corpus holds no block.
        DatasetNotFoundError: ``source`` does not exist.
        MissingDependencyError: ``tokenizer`` given without transformers installed."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise InvalidArgumentError(f"block_size must be an int >= 2 (one token predicts the next), got {block_size!r}")
    if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1):
        raise InvalidArgumentError(f"num_blocks must be a positive int or None (all), got {num_blocks!r}")
    documents = corpus_documents(source)
    if tokenizer is None:
        encoded, vocab_size = [list(d.encode("utf-8")) for d in documents], BYTE_VOCAB_SIZE
    else:
        encoded, vocab_size = _tokenize(documents, Path(tokenizer))
    ids, masks = [], []
    for tokens in encoded:
        for start in range(0, len(tokens), block_size):
            piece = tokens[start : start + block_size]
            pad = block_size - len(piece)
            ids.append(piece + [pad_id] * pad)
            masks.append([1] * len(piece) + [0] * pad)
    if not ids:
        raise EmptyDataError(
            f"{source} holds no text: give a .txt file (or a folder of them) with at least one character"
        )
    if num_blocks is not None:
        ids, masks = ids[:num_blocks], masks[:num_blocks]
    return TextBlocks(torch.tensor(ids, dtype=torch.int64), torch.tensor(masks, dtype=torch.int64), vocab_size)


def _tokenize(documents: list[str], folder: Path) -> tuple[list[list[int]], int]:
    transformers = optional_import("transformers", "a tokenizer needs transformers: pip install 'hessops[hf]'")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return [tokenizer(d)["input_ids"] for d in documents], len(tokenizer)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.glob("*.txt") if f.is_file())
        if not files:
            raise EmptyDataError(f"{path} has no .txt files: put the text in UTF-8 .txt files there, or pass one file")
        return files
    raise DatasetNotFoundError(f"{path} does not exist: pass a UTF-8 .txt file or a folder of .txt files")


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CorruptDatasetError(
            f"{file} is not UTF-8 text (byte {error.start}: {error.reason}): convert it to UTF-8"
        ) from None
