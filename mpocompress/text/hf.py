"""Hugging Face model folders: build the model a ``config.json`` names, and its tokenizer, so
``convert DIR --data calib.txt`` needs no user code (the ``[hf]`` extra: ``transformers``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpocompress.errors import ConfigError, InputError

#: files one of which a folder's tokenizer needs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a model folder with a ``config.json`` (Hugging Face layout)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(
            "building a model from a folder's config.json needs transformers: pip install 'mpocompress[hf]' "
            "(or give --model MODULE:FACTORY)"
        ) from e
    return transformers


def architecture(folder: Path) -> str:
    """The model class a folder's ``config.json`` names (its first ``architectures`` entry)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        arch = (config.get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError, TypeError, IndexError) as e:
        raise InputError(f"{folder}/config.json: not a readable model config ({e})") from e
    if not isinstance(arch, str):
        raise InputError(f"{folder}/config.json: names no architecture ('architectures' is missing)")
    return arch


def build_model(folder: Path) -> Any:
    """The (randomly initialised) model a folder's ``config.json`` names, in float32, evaluation mode,
    without a key/value cache (its outputs are the logits: see :func:`mpocompress.jobs.finetune.first_tensor`).

    Raises:
        ConfigError: transformers is missing, or cannot build the named architecture (exit 2).
    """
    import torch

    transformers = _transformers()
    arch = architecture(folder)
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "_from_config"):
        raise ConfigError(f"{folder}/config.json names architecture {arch!r}, which transformers {transformers.__version__} cannot build")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{folder}/config.json: transformers cannot read it ({str(e).splitlines()[0][:200]})") from e
    config.use_cache = False
    model = cls._from_config(config, dtype=torch.float32)
    return model.eval()


def model_factory(folder: Path) -> Any:
    """A ``--model`` factory for a model folder: ``factory()`` builds :func:`build_model`."""
    folder = Path(folder)
    architecture(folder)  # a missing or broken config is reported before any work
    _transformers()
    return lambda: build_model(folder)


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in a model folder.

    Raises:
        InputError: the folder holds no tokenizer files (exit 3).
    """
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{folder}: holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); text data needs the model's tokenizer")
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise InputError(f"{folder}: its tokenizer cannot be loaded ({str(e).splitlines()[0][:200]})") from e
