"""Walking a model: swap supported modules for MPO ones in place, or load a ``convert`` output.

For users who have the model's code. Users with only a checkpoint use :mod:`mpocompress.jobs.convert`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpocompress.config import MPOConfig, Recipe
from mpocompress.core.compress import compress_matrix
from mpocompress.core.tt import TTMatrix
from mpocompress.errors import ConfigError, InputError
from mpocompress.nn.layers import (
    MPOGRU,
    MPOLSTM,
    MPOConv,
    MPOConv1D,
    MPOEmbedding,
    MPOGRUCell,
    MPOLinear,
    MPOLSTMCell,
    MPOMatrices,
    MPOMultiheadAttention,
)
from mpocompress.select import layer_filter

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RNN = {nn.LSTM: MPOLSTM, nn.GRU: MPOGRU, nn.LSTMCell: MPOLSTMCell, nn.GRUCell: MPOGRUCell}
SUPPORTED = (nn.Linear, nn.Embedding, nn.MultiheadAttention, *_CONV, *_RNN)


def _weights(module: nn.Module) -> list[str]:
    if isinstance(module, tuple(_RNN)):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    if type(module) is nn.MultiheadAttention:
        return [n for n, p in module.named_parameters(recurse=False) if n.endswith("proj_weight") and p is not None]
    return ["weight"]


def _replacement(module: nn.Module, tts: dict[str, TTMatrix], mode: str) -> nn.Module:
    """The MPO version of ``module`` holding ``tts`` (weights not in ``tts`` stay dense)."""
    device = next(module.parameters()).device
    if isinstance(module, MPOMatrices):
        for name, tt in tts.items():
            module._set_matrix(name, tt)
        return module
    if isinstance(module, nn.Linear):
        new = MPOLinear.from_cores(tts["weight"], module.in_features, module.out_features, module.bias, mode=mode)
    elif type(module) is nn.MultiheadAttention:
        new = MPOMultiheadAttention(module, tts, mode=mode)
    elif is_hf_conv1d(module):
        new = MPOConv1D(module, tts["weight"], mode=mode)
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
    codecs: bool = True,
    grams: dict[str, torch.Tensor] | None = None,
    out_grams: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Compress ``model`` in place under the **whole** ``config``: MPO, pruning and quantization.

    Supported modules (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``,
    ``nn.LSTM``, ``nn.GRU``, ``nn.LSTMCell``, ``nn.GRUCell``) whose weight is selected
    (:func:`mpocompress.select.layer_filter` of ``include``/``exclude``, default the config's, and
    ``names``) become MPO modules with the TT-SVD cores where ``config`` asks for MPO and the MPO is
    smaller than the dense matrix. Then the codec chain (``prune``, ``quantize``) is applied to what
    would be stored (each core, or the dense weight): its values are replaced by the codec's decoded
    values, so the model computes exactly what the compressed checkpoint computes (quantized values
    are held as floats in memory; :func:`save_compressed` stores them packed).

    Args:
        recipe: per-weight overrides of ``config`` (a rule may skip a weight, or leave it without MPO).
        names: compress only these weight names (on top of ``include``/``exclude``).
        codecs: apply the codec chain (False: MPO only, for callers that prune/quantize later).
        grams: Gram matrices of recorded inputs by weight name
            (:func:`mpocompress.jobs.calibrate.record_grams`): those weights' cores are fitted to
            their outputs (:func:`mpocompress.core.compress.compress_matrix`).
        out_grams: the loss's curvature at those weights' outputs by name
            (:func:`mpocompress.jobs.calibrate.record_output_curvature`), used with ``grams``.

    Returns:
        One dict per selected weight: ``name``, ``status`` (``"mpo"``/``"codec"``/``"dense"``),
        ``params``, ``dense_params``, ``rel_error`` (of what the model now holds), ``svd_rel_error``,
        ``bond_dims``, ``candidates``, ``reason``, ``codecs``, ``config`` (the weight's config).

    Raises:
        ConfigError: ``units:F`` pruning (it needs the model traced with data: use ``convert`` with
            ``--model``/``--data``).
    """
    include = config.include if include is None else tuple(include)
    exclude = config.exclude if exclude is None else tuple(exclude)
    chosen = layer_filter(include, exclude, names)
    rows = []
    plans: list[tuple[str, str, MPOConfig, torch.Tensor]] = []  # (module, weight, config, original)
    for mod_name, module in list(model.named_modules()):
        if not _supported(module):
            continue
        tts: dict[str, TTMatrix] = {}
        for w in _weights(module):
            full = f"{mod_name}.{w}" if mod_name else w
            cfg = config if recipe is None else recipe.config_for(full, config)
            if not chosen(full) or cfg is None:
                continue
            weight = getattr(module, w).detach()
            if cfg.chain and codecs and any(c.name == "units" for c in cfg.chain):
                raise ConfigError("compress_ cannot prune whole units (units:F): use convert with --model and --data")
            plans.append((mod_name, w, cfg, weight.clone()))
            if not cfg.mpo:
                continue
            if not bool(torch.isfinite(weight).all()):
                rows.append(_row(full, "dense", weight.numel(), weight.numel(), cfg, reason="non-finite values (NaN/Inf)"))
                continue
            gram = (grams or {}).get(full)
            out_gram = (out_grams or {}).get(full) if gram is not None else None
            if gram is not None and is_hf_conv1d(module):  # stored (in, out): fit the (out, in) matrix, store it transposed back
                res = compress_matrix(weight.T, cfg, gram=gram, out_gram=out_gram)
                res.tt = res.tt.transpose() if res.tt is not None else None
            else:
                res = compress_matrix(weight.reshape(weight.shape[0], -1), cfg, gram=gram, out_gram=out_gram)
            rows.append(_row(full, res.status, res.params, res.dense_params, cfg, res=res))
            if res.tt is not None:
                tts[w] = res.tt
        if tts:
            _set_module(model, mod_name, _replacement(module, tts, mode))
    if codecs:
        _apply_codecs(model, plans, rows, config)
    return rows


def _supported(module: nn.Module) -> bool:
    """Modules with an MPO form: the supported types, and subclasses of ``nn.Linear`` that compute
    as it does (no ``forward`` of their own, e.g. ``nn.MultiheadAttention``'s ``out_proj``, which
    the attention reads as ``out_proj.weight``: ``MPOLinear.weight`` rebuilds it). Other subclasses
    may compute differently and are left dense."""
    if type(module) in SUPPORTED or is_hf_conv1d(module):
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D`` (``transformers.pytorch_utils``), recognised without importing
    transformers: by name, its ``nf`` and an ``(in, out)`` weight."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == module.nf)  # fmt: skip


def _row(name: str, status: str, params: int, dense_params: int, cfg: MPOConfig, *, res=None, reason=None) -> dict[str, Any]:
    return {
        "name": name, "status": status, "params": params, "dense_params": dense_params,
        "rel_error": res.rel_error if res is not None else 0.0, "svd_rel_error": res.svd_rel_error if res is not None else 0.0,
        "bond_dims": res.tt.bond_dims if res is not None and res.tt is not None else None,
        "candidates": [c.to_dict() for c in res.candidates] if res is not None else [],
        "reason": res.reason if res is not None else reason, "codecs": [], "config": cfg.to_dict(),
        **({"fit": res.fit} if res is not None and res.fit is not None else {}),
    }  # fmt: skip


def _apply_codecs(model: nn.Module, plans: list[tuple[str, str, MPOConfig, torch.Tensor]], rows: list[dict[str, Any]],
                  config: MPOConfig) -> None:  # fmt: skip
    """Replace each stored tensor (cores, or the dense weight) by its codec chain's decoded values."""
    from mpocompress.codecs import decode, encode, magnitude_threshold
    from mpocompress.core.tt import relative_error

    by_name = {r["name"]: r for r in rows}
    modules = dict(model.named_modules())
    targets = []  # (row name, parameter, chain, original weight, module, weight name)
    for mod_name, w, cfg, original in plans:
        if not cfg.chain:
            continue
        module = modules[mod_name]
        full = f"{mod_name}.{w}" if mod_name else w
        stored = module.cores_of(w) if isinstance(module, MPOMatrices) and module.is_mpo(w) else [getattr(module, w)]
        targets.extend((full, p, cfg.chain, original, module, w) for p in stored)
    threshold = None
    if config.prune_scope == "global" and targets:
        threshold = magnitude_threshold([p.detach() for _, p, *_ in targets], config.chain[0].param)
    with torch.no_grad():
        for _full, p, chain, _, _, _ in targets:
            if bool(torch.isfinite(p).all()):
                p.copy_(decode(*encode(p.detach(), chain, threshold=threshold)))
    for full, _, chain, original, module, w in targets:
        row = by_name.get(full)
        if row is None:
            row = by_name[full] = _row(full, "codec", original.numel(), original.numel(), config)
            rows.append(row)
        elif row["status"] == "dense":
            row["status"] = "codec"
        row["codecs"] = [str(c) for c in chain]
        now = _current_weight(module, w)
        row["rel_error"] = relative_error(original.reshape(now.shape), now)


def _current_weight(module: nn.Module, w: str) -> torch.Tensor:
    """The weight ``w`` as the module now computes it (dense, rebuilt from cores if MPO)."""
    if isinstance(module, MPOMatrices) and module.is_mpo(w):
        return module.matrix(w).detach()
    return getattr(module, w).detach()


def load_compressed_(model: nn.Module, path: str | Path, *, mode: str = "auto") -> nn.Module:
    """Load a ``mpocompress convert`` output into ``model``, in place, keeping the MPO cores.

    Modules whose weights the file holds as cores become MPO modules with exactly those cores; every
    other tensor is loaded as usual. The model must have the architecture the checkpoint came from.

    Raises:
        InputError: not a compressed checkpoint, a layer the model lacks, a shape mismatch, or
            missing/unexpected tensors (named in the message).
    """
    from mpocompress.format import read_meta, stored_tensors, untie
    from mpocompress.io import fill_tied, open_checkpoint

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
    shared = _tied_mpo(model, meta, groups)
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
        if not isinstance(module, MPOMatrices) and not _supported(module):
            raise InputError(f"{path}: {mod_name!r} is a {type(module).__name__}, which has no MPO form")
        _set_module(model, mod_name, _replacement(module, tts, mode))
    modules = dict(model.named_modules())
    for alias, source in shared:  # one set of cores for both (tied again)
        (am, _, aw), (sm, _, sw) = alias.rpartition("."), source.rpartition(".")
        setattr(modules[am], aw + "_cores", getattr(modules[sm], sw + "_cores"))
    try:
        model.load_state_dict(fill_tied(model.state_dict(), untie(meta, tensors)), strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise InputError(f"{path}: does not fit the model: {' '.join(lines[1:3])[:300]}") from e
    return model


def _tied_mpo(model: nn.Module, meta: dict[str, Any], groups: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    """Weights tied to a weight stored as cores (by the checkpoint's ``tied`` names or by the model
    itself, e.g. an ``lm_head`` tied to its embedding): added to ``groups`` with the same cores;
    ``[(alias, source)]`` whose modules then share one set of core parameters."""
    from mpocompress.io import tied_aliases

    shared = []
    for alias, source in {**tied_aliases(model.state_dict()), **meta.get("tied", {})}.items():
        entry = meta["layers"].get(source)
        if entry is not None and entry.get("method", "mpo") == "mpo" and alias not in meta["layers"]:
            mod_name, _, w = alias.rpartition(".")
            groups.setdefault(mod_name, {})[w] = entry
            shared.append((alias, source))
    return shared


def _current_shape(module: nn.Module, w: str) -> tuple[int, ...] | None:
    if isinstance(module, MPOMatrices) and module.is_mpo(w):
        if isinstance(module, MPOConv):
            return module.kernel_shape
        return module._shapes[w]
    p = getattr(module, w, None)
    return tuple(p.shape) if isinstance(p, torch.Tensor) else None


def save_compressed(model: nn.Module, path: str | Path, *, config: MPOConfig | None = None, force: bool = False) -> None:
    """Write a model holding MPO modules in the ``convert`` format (docs/format.md), through
    :mod:`mpocompress.format` like ``convert``.

    MPO weights are stored as their cores; every other tensor of ``model.state_dict()`` as it is.
    With a ``config`` whose codec chain is set (the one given to :func:`compress_`), the stored
    tensors of the selected weights are written packed by that chain (re-encoding values that
    :func:`compress_` already quantized is exact for ``kmeans``/``int8``/``seofp``/casts and keeps
    pruned zeros). :func:`load_compressed_` and :func:`mpocompress.load_state_dict` read it back.
    """
    from mpocompress.codecs import encode
    from mpocompress.format import core_name, file_metadata, layer_entry, set_encoded, set_mpo
    from mpocompress.io import check_output, dtype_name, save_safetensors
    from mpocompress.select import is_candidate, kind_of, matrix_shape

    path = Path(path)
    check_output(path, [], force)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    dense_shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    mpo: dict[str, tuple[nn.Module, str, tuple[int, ...]]] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, MPOMatrices):
            for w, (out_f, in_f) in module._shapes.items():
                full = f"{mod_name}.{w}" if mod_name else w
                shape = tuple(module.kernel_shape) if isinstance(module, MPOConv) else (out_f, in_f)
                mpo[full] = (module, w, shape)
                dense_shapes[full] = shape
    core_names = {core_name(full, k) for full, (module, w, _) in mpo.items() for k in range(len(module.cores_of(w)))}
    chosen = layer_filter(config.include, config.exclude) if config is not None else (lambda name: False)
    chain = config.chain if config is not None else []
    layers: dict[str, Any] = {}
    dense_bytes = stored_bytes = 0
    for full, shape in dense_shapes.items():
        if full in core_names:
            continue  # written with its weight's entry
        if full in mpo:
            module, w, _ = mpo[full]
            cores = module.cores_of(w)
            entry = layer_entry(kind_of(full, shape, dense_shapes), list(shape), dtype_name(cores[0].dtype), matrix_shape(shape))
            stored = set_mpo(entry, full, TTMatrix([c.detach() for c in cores], module._shapes[w]))
            for k in stored:
                del tensors[k]
        elif chain and chosen(full) and is_candidate(shape, dtype_name(tensors[full].dtype)):
            entry = layer_entry(kind_of(full, shape, dense_shapes), list(shape), dtype_name(tensors[full].dtype), matrix_shape(shape))
            stored = {full: tensors.pop(full)}
        else:
            continue
        itemsize = next(iter(stored.values())).element_size()
        if chain and chosen(full):
            stored = set_encoded(entry, {k: encode(v, chain) for k, v in stored.items()})
        nbytes = sum(v.numel() * v.element_size() for v in stored.values())
        entry.update(dense_params=math.prod(shape), bytes=nbytes,
                     params=sum(v.numel() for v in stored.values()))  # fmt: skip
        dense_bytes += math.prod(shape) * itemsize
        stored_bytes += nbytes
        tensors.update(stored)
        layers[full] = entry
    totals = {"layers_compressed": len(layers), "dense_bytes": dense_bytes, "bytes": stored_bytes,
              "compressed_layers_ratio": dense_bytes / stored_bytes if stored_bytes else 1.0}  # fmt: skip
    metadata = file_metadata(config.to_dict() if config is not None else {}, layers, totals=totals, source="save_compressed")
    save_safetensors(tensors, path, metadata)
