"""Training data: the built-in corpus, a byte-level BPE tokenizer trained on it, file inputs and packing.

The built-in corpus is the Python standard library's own `.py` source files: text that every machine running this
package has, so the demo and the tests never download anything. Files are split into train and validation by a
hash of their path relative to the standard library folder, so the split is the same on every run and machine
(for a given Python version) and does not depend on how many files there are.

Everything here checks its input and raises `DataError` (a `ValueError`) with a one-line message before any
training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"
BUILTIN = "builtin"


class DataError(ValueError):
    """Bad training data or data settings; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------------------------------------
# The built-in corpus


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# Folders left out of the corpus: installed packages, and generated or data-like sources (codec tables, pydoc's
# topic texts, test suites full of byte-string fixtures) that would dominate a small sample.
EXCLUDED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's own `.py` modules, sorted (see `EXCLUDED_FOLDERS`)."""
    root = stdlib_folder()
    files = [path for path in root.rglob("*.py") if not EXCLUDED_FOLDERS & set(path.relative_to(root).parts[:-1])]
    if not files:
        raise DataError(f"no Python source files found in the standard library folder {root}")
    return tuple(sorted(files))


def is_validation_file(relative_path: str, validation_fraction: float) -> bool:
    """Deterministic file-level split: a file is in validation iff the hash of its relative path says so."""
    digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def builtin_corpus(
    split: str, validation_fraction: float = 0.05, max_chars: int | None = None, shuffle_key: str = "default-moe"
) -> list[str]:
    """Texts of the standard library's source files in `split` ("train" or "validation").

    Files come in a fixed pseudo-random order (hash of `shuffle_key` and the path) so that a `max_chars` cap takes a
    sample from the whole library rather than its alphabetically first packages.
    """
    if split not in ("train", "validation"):
        raise DataError(f"unknown split {split!r}: expected 'train' or 'validation'")
    root = stdlib_folder()
    want_validation = split == "validation"
    chosen = []
    for path in stdlib_files():
        relative = path.relative_to(root).as_posix()
        if is_validation_file(relative, validation_fraction) == want_validation:
            chosen.append((hashlib.sha256(f"{shuffle_key}/{relative}".encode()).hexdigest(), path))
    texts, total = [], 0
    for _, path in sorted(chosen):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, max_chars: int = 4_000_000):
    """A byte-level BPE tokenizer (GPT-2 style, no unknown tokens) trained on at most `max_chars` of `texts`.

    Returns a `PreTrainedTokenizerFast` with `<|endoftext|>` as BOS, EOS and padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise DataError(f"tokenizer vocab_size={vocab_size} is too small: a byte-level BPE needs at least 300")
    sample, total = [], 0
    for text in texts:
        sample.append(text[: max_chars - total])
        total += len(sample[-1])
        if total >= max_chars:
            break
    if total == 0:
        raise DataError("cannot train a tokenizer: the training texts are empty")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


@lru_cache(maxsize=4)
def builtin_tokenizer(vocab_size: int = 4096, validation_fraction: float = 0.05):
    """The BPE tokenizer trained on (a 4M-character sample of) the built-in corpus' train split; cached per process."""
    return train_tokenizer(builtin_corpus("train", validation_fraction, max_chars=4_000_000), vocab_size)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # noqa: BLE001 - turned into one readable line
        raise DataError(f"cannot load a tokenizer from {path}: {str(error).strip().splitlines()[0]}") from error


# ----------------------------------------------------------------------------------------------------------------
# File inputs


def read_text_files(paths: Sequence[str | os.PathLike], text_field: str = "text") -> list[str]:
    """Documents from `.jsonl` files (one JSON object per line, text under `text_field`) or plain text files
    (one document per file)."""
    if not paths:
        raise DataError("no data files given")
    texts = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if not path.is_file():
            raise DataError(f"data path is not a file: {path}")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"data file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        if not content.strip():
            raise DataError(f"data file is empty: {path}")
        if path.suffix == ".jsonl":
            file_texts = []
            for number, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{number}: expected an object with a string field {text_field!r}")
                if record[text_field].strip():
                    file_texts.append(record[text_field])
            if not file_texts:
                raise DataError(f"data file {path} holds no non-empty {text_field!r} texts")
            texts.extend(file_texts)
        else:
            texts.append(content)
    return texts


def load_hub_dataset(name: str, split: str, config_name: str | None = None, text_field: str = "text") -> list[str]:
    """Texts of a `datasets` data set (needs the optional `datasets` package and, usually, the network)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--dataset {name} needs the optional 'datasets' package: pip install datasets "
            "(or pass --data FILE... / use the built-in corpus)"
        ) from None
    try:
        data = datasets.load_dataset(name, config_name, split=split)
    except Exception as error:  # noqa: BLE001 - network, missing split, ...
        raise DataError(
            f"cannot load data set {name!r} split {split!r}: {str(error).strip().splitlines()[0]}"
        ) from None
    if text_field not in data.column_names:
        raise DataError(f"data set {name!r} has no column {text_field!r} (columns: {', '.join(data.column_names)})")
    return [text for text in data[text_field] if isinstance(text, str) and text.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Packing


def pack(texts: Sequence[str], tokenizer, seq_len: int, max_tokens: int | None = None, what: str = "data"):
    """Tokenise `texts`, join them with EOS and cut the stream into `(N, seq_len)` blocks (the tail is dropped)."""
    if seq_len < 2:
        raise DataError(f"sequence length {seq_len} is too short: expected at least 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    budget = None if max_tokens is None else max(max_tokens, seq_len)
    position = 0
    while position < len(texts) and (budget is None or len(ids) < budget):
        # Tokenise in chunks; under a token budget, only about as much text as the budget needs.
        chunk, chars = [], 0
        wanted = None if budget is None else (budget - len(ids)) * 6 + 1000
        while position < len(texts) and len(chunk) < 256 and (wanted is None or chars < wanted):
            text = texts[position] if wanted is None else texts[position][: wanted - chars]
            chunk.append(text)
            chars += len(text)
            position += 1
        for doc in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    if budget is not None:
        ids = ids[: budget - budget % seq_len]
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise DataError(f"{what} yields no full sequence: {len(ids)} tokens, fewer than the sequence length {seq_len}")
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length blocks for causal LM training: each item is `{"input_ids", "labels"}` (the model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def check_seq_len(seq_len: int, max_position_embeddings: int) -> None:
    if seq_len > max_position_embeddings:
        raise DataError(
            f"sequence length {seq_len} is above the model's max_position_embeddings={max_position_embeddings}"
        )


__all__ = [
    "BUILTIN",
    "DataError",
    "EOS_TOKEN",
    "PackedDataset",
    "builtin_corpus",
    "builtin_tokenizer",
    "check_seq_len",
    "load_hub_dataset",
    "load_tokenizer",
    "pack",
    "read_text_files",
    "stdlib_files",
    "train_tokenizer",
]
