"""What fine-tuning and calibration read besides the checkpoint: the user's model factory
(``--model``), batch files or factories (``--data``) and recorded activations (``--activations``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import ConfigError, InputError


def import_object(spec: str, what: str = "--model") -> Any:
    """The object ``spec`` names: ``pkg.module:attr`` (importable, the working directory first on the
    path) or ``path/to/file.py:attr``. This runs the user's code, by their explicit request; it
    never unpickles anything.

    Raises:
        ConfigError: a malformed spec, a module that does not import, or a missing attribute.
    """
    import importlib
    import importlib.util
    import sys


    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"{what} {spec!r}: expected 'package.module:factory' or 'file.py:factory'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"{what} {spec!r}: no such file {mod_name}")
            unique = f"_mpocompress_user_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say why, in one line
        raise ConfigError(f"{what} {spec!r}: cannot import {mod_name}: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _batches_from_file(path: Path, batch_size: int) -> list[Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from e
    if "inputs" in tensors:
        x, y = tensors["inputs"], tensors.get("targets")
        if y is not None and y.shape[0] != x.shape[0]:
            raise InputError(f"{path}: 'inputs' has {x.shape[0]} rows but 'targets' has {y.shape[0]}")
        out: list[Any] = []
        for i in range(0, x.shape[0], batch_size):
            out.append(x[i : i + batch_size] if y is None else (x[i : i + batch_size], y[i : i + batch_size]))
        return out
    keys = sorted((k for k in tensors if re.fullmatch(r"inputs\.\d+", k)), key=lambda k: int(k.split(".")[1]))
    if not keys:
        raise InputError(f"{path}: expected a tensor 'inputs' (and 'targets'), or 'inputs.0', 'inputs.1', ... (and 'targets.K')")
    return [
        tensors[k] if f"targets.{k.split('.')[1]}" not in tensors else (tensors[k], tensors[f"targets.{k.split('.')[1]}"])
        for k in keys
    ]


def read_batches(spec: str, batch_size: int = 16, max_batches: int = 100_000) -> list[Any]:
    """Fine-tuning batches from ``spec``.

    * a ``.safetensors`` file holding ``inputs`` (split along dim 0 into ``batch_size`` rows) and
      optionally ``targets``; or one batch per ``inputs.K`` (and ``targets.K``);
    * a folder of such files (sorted by name, batches concatenated);
    * ``pkg.module:factory`` / ``file.py:factory``: a callable returning an iterable of batches
      (tensors, or ``(inputs, targets)`` pairs); at most ``max_batches`` are taken.
    """

    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InputError(f"{path}: folder holds no .safetensors batch files")
        return [b for f in files for b in _batches_from_file(f, batch_size)]
    if path.is_file() or spec.endswith(".safetensors"):
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return _batches_from_file(path, batch_size)
    factory = import_object(spec, "--data")
    if not callable(factory):
        raise ConfigError(f"--data {spec!r}: not callable")
    try:
        data = factory()
        import itertools

        batches = list(itertools.islice(iter(data), max_batches))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--data {spec!r}: the factory failed: {type(e).__name__}: {e}") from e
    return batches


def read_activations(path: Path) -> dict[str, torch.Tensor]:
    """Recorded layer inputs for ``convert --activations``: a safetensors file whose tensors are named
    by weight (``fc.weight``) and hold either input rows ``(n, in)`` (any leading dims, flattened)
    or, named ``fc.weight.gram``, their Gram matrix ``(in, in)``. Returns Gram matrices by weight name.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from e
    grams: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".gram"):
            if t.dim() != 2 or t.shape[0] != t.shape[1]:
                raise InputError(f"{path}: {name} must be a square Gram matrix, got shape {list(t.shape)}")
            grams[name.removesuffix(".gram")] = t.double()
        else:
            x = t.reshape(-1, t.shape[-1]).double()
            grams[name] = x.T @ x
    for name, g in grams.items():
        if not bool(torch.isfinite(g).all()):
            raise InputError(f"{path}: the recorded inputs of {name} hold NaN/Inf")
        if float(torch.diagonal(g).sum()) <= 0.0:
            raise InputError(f"{path}: the recorded inputs of {name} are all zero (an all-zero Gram matrix): nothing to fit")
    return grams
