"""Text calibration and fine-tuning data: ``.txt`` or ``.jsonl`` (a ``text`` field per line) files,
tokenized with the model folder's tokenizer into windows of ``seq_len`` tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import InputError

TEXT_SUFFIXES = (".txt", ".jsonl")


def is_text(spec: str | Path) -> bool:
    """Whether a ``--data`` value names a text file."""
    return str(spec).endswith(TEXT_SUFFIXES)


def read_text(path: Path) -> str:
    """The text of a ``.txt`` file, or the ``text`` fields of a ``.jsonl`` file joined by blank lines."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable UTF-8 text file ({e})") from e
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{i}: not a JSON object with a 'text' field") from e
        if not isinstance(text, str):
            raise InputError(f"{path}:{i}: 'text' is not a string")
        texts.append(text)
    return "\n\n".join(texts)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The token ids of ``text`` (one long sequence, no special tokens added), as int64."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, where: str = "the text") -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` of a token sequence (the tail shorter than a window is dropped).

    Raises:
        InputError: fewer tokens than one window (exit 3).
    """
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise InputError(f"{where}: {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def text_batches(path: Path, tokenizer: Any, seq_len: int, batch_size: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Batches ``[batch_size, seq_len]`` of token windows from a text file, in order (``max_windows``: at most that many)."""
    w = windows(tokenize(tokenizer, read_text(path)), seq_len, str(path))
    if max_windows is not None:
        w = w[:max_windows]
    return list(w.split(batch_size))
