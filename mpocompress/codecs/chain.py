"""Codec chains: at most one pruner, then at most one quantizer, on one stored tensor.

A pruner leaves the kept values as one float tensor (``values``), which a quantizer then encodes
(PP+PQ: prune, then k-means); MPO cores are tensors like any other, so MPO + k-means or MPO + SEOFP
are chains too. :func:`decode` rebuilds exactly what the size report counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mpocompress.codecs.base import Codec, parse_codec
from mpocompress.codecs.pruning import decode_positions, encode_positions


def split_chain(chain: Sequence[Codec | str]) -> tuple[Codec | None, Codec | None]:
    """``(pruner, quantizer)`` of a chain (either may be None).

    Raises:
        ValueError: more than one of a kind, or a quantizer before the pruner.
    """
    codecs = [parse_codec(c) for c in chain]
    pruners = [c for c in codecs if c.is_pruner]
    quants = [c for c in codecs if not c.is_pruner]
    if len(pruners) > 1 or len(quants) > 1 or (pruners and quants and codecs.index(pruners[0]) > codecs.index(quants[0])):
        raise ValueError(f"a chain is at most one pruner then one quantizer, got {' '.join(map(str, codecs))}")
    return (pruners[0] if pruners else None), (quants[0] if quants else None)


def encode(
    x: torch.Tensor,
    chain: Sequence[Codec | str],
    *,
    threshold: float | None = None,
    mask: torch.Tensor | None = None,
    grid: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode ``x`` with at most one pruner followed by at most one quantizer.

    Args:
        x: the tensor.
        chain: codecs (or their string forms), a pruner first.
        threshold: a global magnitude threshold for a ``magnitude`` pruner.
        mask: the keep-mask to use instead of the pruner's own (a model pruned and fine-tuned
            with this mask keeps exactly its zeros).
        grid: the quantizer's grid (:meth:`Codec.grid`) to encode on, for a quantizer with ``has_grid``.

    Returns:
        ``(parts, meta)``: packed tensors by part name, and JSON-ready metadata (the chain, shapes,
        sparse layout) that :func:`decode` needs.
    """
    pruner, quant = split_chain(chain)
    meta: dict[str, Any] = {
        "chain": [str(c) for c in (pruner, quant) if c is not None],
        "shape": list(x.shape),
        "dtype": str(x.dtype).replace("torch.", ""),
    }
    parts: dict[str, torch.Tensor] = {}
    values = x.detach().reshape(-1)
    if pruner is not None:
        if mask is None:
            mask = pruner.mask(x, threshold)
        elif mask.shape != x.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the tensor's {tuple(x.shape)}")
        pos_parts, pos_meta = encode_positions(mask, x.shape)
        parts.update(pos_parts)
        meta.update(pos_meta)
        values = values[mask.reshape(-1).bool()]
    if quant is not None:
        rows = None if pruner is not None else (x.shape[0] if x.dim() >= 1 else None)
        qparts, qmeta = quant.encode(values, rows) if grid is None else quant.encode(values, rows, grid=grid)
        parts.update(qparts)
        meta["quant"] = qmeta
    else:
        parts["values"] = values.clone()
    return parts, meta


def decode(parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """Rebuild the tensor :func:`encode` packed (exactly what the size report counts)."""
    pruner, quant = split_chain(meta["chain"])
    dtype = getattr(torch, meta["dtype"])
    shape = meta["shape"]
    values = quant.decode(parts, meta["quant"], dtype) if quant is not None else parts["values"].reshape(-1).to(dtype)
    if pruner is None:
        return values.reshape(shape)
    keep = decode_positions(parts, meta, shape)
    out = torch.zeros(keep.numel(), dtype=dtype, device=values.device)
    out[keep] = values
    return out.reshape(shape)


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes the parts take on disk."""
    return sum(t.numel() * t.element_size() for t in parts.values())
