"""Walking a model: swap supported modules for MPO ones in place, or load a ``convert`` output.

For users who have the model's code. Users with only a checkpoint use :mod:`mpocompress.jobs.convert`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpocompress.config import MPOConfig, Recipe
from mpocompress.core.compress import compress_matrix
from mpocompress.core.tt import TTMatrix
from mpocompress.errors import InputError
from mpocompress.nn.layers import (
    MPOGRU,
    MPOLSTM,
    MPOConv,
    MPOEmbedding,
    MPOGRUCell,
    MPOLinear,
    MPOLSTMCell,
    MPOMatrices,
)
from mpocompress.select import selected

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RNN = {nn.LSTM: MPOLSTM, nn.GRU: MPOGRU, nn.LSTMCell: MPOLSTMCell, nn.GRUCell: MPOGRUCell}
SUPPORTED = (nn.Linear, nn.Embedding, *_CONV, *_RNN)


def _weights(module: nn.Module) -> list[str]:
    if isinstance(module, tuple(_RNN)):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    return ["weight"]


def _replacement(module: nn.Module, tts: dict[str, TTMatrix], mode: str) -> nn.Module:
    """The MPO version of ``module`` holding ``tts`` (weights not in ``tts`` stay dense)."""
    device = next(module.parameters()).device
    if isinstance(module, MPOMatrices):
        for name, tt in tts.items():
            module._set_matrix(name, tt)
        return module
    if type(module) is nn.Linear:
        new = MPOLinear.from_cores(tts["weight"], module.in_features, module.out_features, module.bias, mode=mode)
    elif isinstance(module, _CONV):
        new = MPOConv(module, tts["weight"])
    elif type(module) is nn.Embedding:
        if module.max_norm is not None or module.sparse:
            raise ValueError("MPOEmbedding does not support max_norm or sparse embeddings")
        new = MPOEmbedding(module.num_embeddings, module.embedding_dim, tts["weight"], module.padding_idx)
    elif type(module) in _RNN:
        new = _RNN[type(module)](module, tts, mode=mode)
    else:
        raise TypeError(f"unsupported module type {type(module).__name__}")
    return new.to(device)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compress_(
    model: nn.Module,
    config: MPOConfig,
    *,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] | None = None,
    mode: str = "auto",
    recipe: Recipe | None = None,
    names: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Swap supported modules of ``model`` for MPO ones, in place (same names, so state dicts line up).

    Supported: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``, ``nn.LSTM``, ``nn.GRU``,
    ``nn.LSTMCell``, ``nn.GRUCell``. A weight is compressed when its name (``"fc.weight"``) passes
    ``include``/``exclude`` (default: the config's) and its MPO is smaller than the dense matrix.

    Args:
        recipe: per-weight overrides of ``config`` (a rule may skip a weight, or leave it without MPO).
        names: compress only these weight names (on top of ``include``/``exclude``).

    Returns:
        One dict per selected weight: ``name``, ``status`` (``"mpo"``/``"dense"``), ``params``,
        ``dense_params``, ``rel_error``, ``svd_rel_error``, ``bond_dims``, ``candidates``, ``reason``,
        ``config`` (the weight's config).
    """
    include = config.include if include is None else tuple(include)
    exclude = config.exclude if exclude is None else tuple(exclude)
    rows = []
    for mod_name, module in list(model.named_modules()):
        if type(module) not in SUPPORTED:
            continue
        tts: dict[str, TTMatrix] = {}
        for w in _weights(module):
            full = f"{mod_name}.{w}" if mod_name else w
            if not selected(full, include, exclude) or (names is not None and full not in names):
                continue
            cfg = config if recipe is None else recipe.config_for(full, config)
            if cfg is None or not cfg.mpo:
                continue
            weight = getattr(module, w)
            res = compress_matrix(weight.detach().reshape(weight.shape[0], -1), cfg)
            rows.append({
                "name": full, "status": res.status, "params": res.params, "dense_params": res.dense_params,
                "rel_error": res.rel_error, "svd_rel_error": res.svd_rel_error,
                "bond_dims": res.tt.bond_dims if res.tt is not None else None,
                "candidates": [c.to_dict() for c in res.candidates], "reason": res.reason, "config": cfg.to_dict(),
            })  # fmt: skip
            if res.tt is not None:
                tts[w] = res.tt
        if tts:
            _set_module(model, mod_name, _replacement(module, tts, mode))
    return rows


def load_compressed_(model: nn.Module, path: str | Path, *, mode: str = "auto") -> nn.Module:
    """Load a ``mpocompress convert`` output into ``model``, in place, keeping the MPO cores.

    Modules whose weights the file holds as cores become MPO modules with exactly those cores; every
    other tensor is loaded as usual. The model must have the architecture the checkpoint came from.

    Raises:
        InputError: not a compressed checkpoint, a layer the model lacks, a shape mismatch, or
            missing/unexpected tensors (named in the message).
    """
    from mpocompress.format import read_meta, stored_tensors
    from mpocompress.io import open_checkpoint

    with open_checkpoint(path) as ckpt:
        meta = read_meta(ckpt)
        if meta is None:
            raise InputError(f"{path}: not an mpocompress checkpoint (use model.load_state_dict for dense ones)")
        tensors = stored_tensors(ckpt, meta)  # codec parts decoded; MPO cores stay cores
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for full, entry in meta["layers"].items():
        if entry.get("method", "mpo") != "mpo":
            continue  # a pruned/quantized dense weight: decoded above, loaded as a plain tensor
        mod_name, _, w = full.rpartition(".")
        groups.setdefault(mod_name, {})[w] = entry
    modules = dict(model.named_modules())
    for mod_name, entries in groups.items():
        module = modules.get(mod_name)
        if module is None:
            raise InputError(f"{path}: layer {mod_name!r} is not in the model")
        tts = {}
        for w, entry in entries.items():
            full = f"{mod_name}.{w}" if mod_name else w
            current = _current_shape(module, w)
            if current is None:
                raise InputError(f"{path}: {type(module).__name__} {mod_name!r} has no weight {w!r}")
            if list(current) != list(entry["shape"]):
                raise InputError(f"{path}: {full} has shape {list(entry['shape'])} in the checkpoint but {list(current)} in the model")
            cores = [tensors[c] for c in entry["cores"]]
            tts[w] = TTMatrix(cores, tuple(entry["matrix_shape"]))
        if not isinstance(module, MPOMatrices) and type(module) not in SUPPORTED:
            raise InputError(f"{path}: {mod_name!r} is a {type(module).__name__}, which has no MPO form")
        _set_module(model, mod_name, _replacement(module, tts, mode))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise InputError(f"{path}: does not fit the model: {' '.join(lines[1:3])[:300]}") from e
    return model


def _current_shape(module: nn.Module, w: str) -> tuple[int, ...] | None:
    if isinstance(module, MPOMatrices) and module.is_mpo(w):
        if isinstance(module, MPOConv):
            return module.kernel_shape
        return module._shapes[w]
    p = getattr(module, w, None)
    return tuple(p.shape) if isinstance(p, torch.Tensor) else None


def save_compressed(model: nn.Module, path: str | Path, *, config: MPOConfig | None = None, force: bool = False) -> None:
    """Write a model holding MPO modules in the ``convert`` format (docs/format.md).

    The file's tensors are ``model.state_dict()`` (cores under ``..._cores.k``), so
    :func:`load_compressed_` and :func:`mpocompress.load_state_dict` read it back.
    """
    import json

    from mpocompress import __version__
    from mpocompress.format import FORMAT_VERSION
    from mpocompress.io import check_output, dtype_name, save_safetensors

    path = Path(path)
    check_output(path, [], force)
    layers: dict[str, Any] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, MPOMatrices):
            continue
        for w, (out_f, in_f) in module._shapes.items():
            full = f"{mod_name}.{w}" if mod_name else w
            cores = module.cores_of(w)
            shape = list(module.kernel_shape) if isinstance(module, MPOConv) else [out_f, in_f]
            out_modes = [int(c.shape[1]) for c in cores]
            in_modes = [int(c.shape[2]) for c in cores]
            layers[full] = {
                "kind": type(module).__name__.removeprefix("MPO").lower(),
                "shape": shape,
                "dtype": dtype_name(cores[0].dtype),
                "matrix_shape": [out_f, in_f],
                "padded_shape": [int(torch.tensor(out_modes).prod()), int(torch.tensor(in_modes).prod())],
                "out_modes": out_modes,
                "in_modes": in_modes,
                "bond_dims": [int(c.shape[3]) for c in cores[:-1]],
                "cores": [f"{full}_cores.{k}" for k in range(len(cores))],
                "params": sum(c.numel() for c in cores),
                "dense_params": out_f * in_f,
                "rel_error": None,
                "svd_rank": None,
                "svd_rel_error": None,
            }
    meta = {
        "format": "mpocompress",
        "format_version": FORMAT_VERSION,
        "mpocompress_version": __version__,
        "config": config.to_dict() if config is not None else {},
        "layers": layers,
        "source": "save_compressed",
    }
    save_safetensors(model.state_dict(), path, {"format": "pt", "mpocompress": json.dumps(meta, sort_keys=True)})
