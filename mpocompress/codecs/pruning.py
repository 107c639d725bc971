"""Pruning codecs: which entries of a stored tensor are kept, and how their positions are stored.

* ``magnitude:S`` -- unstructured magnitude pruning to sparsity ``S`` (Han et al. 2015).
* ``channel:THETA`` -- PP of PP+PQ (Chen et al. 2019, arXiv 1906.01078): each (output filter, input
  channel) kernel slice is scored by the share of its weights below the filter's mean absolute value;
  slices scoring above ``THETA`` are pruned. For Linear layers a "slice" is a block of
  ``LINEAR_BLOCK`` consecutive inputs of one output row (our choice).
* ``units:F`` -- whole hidden units, found from the model's code (:mod:`mpocompress.nn.units`); the
  mask comes from there, this codec only stores it.

Positions are stored as a bitmask, int32 indices or, when whole rows and columns go, the kept rows
and columns (a sub-grid), whichever is smallest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpocompress.codecs.base import Codec, register
from mpocompress.codecs.packing import pack_bits, unpack_bits

LINEAR_BLOCK = 8
#: position parts a pruned tensor may write
POSITION_PARTS = ("mask", "rows", "cols", "indices")


@register
@dataclass(frozen=True)
class Magnitude(Codec):
    """Keep the ``1 - sparsity`` largest magnitudes (Han et al. 2015)."""

    sparsity: float
    name = "magnitude"
    kind = "pruner"
    arg = "SPARSITY"
    parts = POSITION_PARTS

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"magnitude sparsity must be in [0, 1), got {self.sparsity}")

    def mask(self, x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Keep-mask of ``x`` (or, with a global ``threshold``, the entries above it)."""
        return magnitude_mask(x, self.sparsity, threshold)


@register
@dataclass(frozen=True)
class Channel(Codec):
    """PP channel pruning at score threshold ``theta`` (PP+PQ, Chen et al. 2019)."""

    theta: float
    name = "channel"
    kind = "pruner"
    arg = "THETA"
    parts = POSITION_PARTS

    def __post_init__(self) -> None:
        if not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"channel theta must be in [0, 1], got {self.theta}")

    def mask(self, x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Keep-mask of ``x``: kernel slices scoring above ``theta`` removed."""
        return channel_mask(x, self.theta)


@register
@dataclass(frozen=True)
class Units(Codec):
    """A fraction of whole hidden units (the mask comes from the model's code: :mod:`mpocompress.nn.units`)."""

    fraction: float
    name = "units"
    kind = "pruner"
    arg = "FRACTION"
    parts = POSITION_PARTS

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"units fraction must be in [0, 1), got {self.fraction}")

    def mask(self, x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Not available from the tensor alone: the units come from the model's code."""
        raise ValueError("unit pruning needs the model's code to find the units (--model, --data)")


def magnitude_mask(x: torch.Tensor, sparsity: float, threshold: float | None = None) -> torch.Tensor:
    """Keep the ``1 - sparsity`` largest magnitudes (or those above a given global ``threshold``)."""
    if threshold is not None:
        return x.abs() > threshold
    n_prune = int(round(sparsity * x.numel()))
    if n_prune <= 0:
        return torch.ones_like(x, dtype=torch.bool)
    flat = x.detach().abs().reshape(-1).float()
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=x.device)
    keep[torch.topk(flat, n_prune, largest=False).indices] = False
    return keep.reshape(x.shape)


#: histogram bins of :func:`magnitude_threshold`'s second pass
THRESHOLD_BINS = 1 << 16


def magnitude_threshold(
    tensors: Sequence[torch.Tensor] | Callable[[], Iterable[torch.Tensor]], sparsity: float
) -> float:
    """The magnitude at or below which ``sparsity`` of all entries of ``tensors`` lie (global magnitude
    pruning: pass it as ``threshold`` to :func:`magnitude_mask`); -1 when nothing is to be pruned.

    Exact (the k-th smallest magnitude) and streaming: ``tensors`` may be a callable returning a fresh
    iterable, read in three passes (maximum; a histogram locating the k-th value's bin; the values in
    that bin), so only one tensor and the bin's values are held at once, whatever the total size.
    """
    passes = tensors if callable(tensors) else (lambda: tensors)
    n, top = 0, 0.0
    for t in passes():
        if t.numel():
            n += t.numel()
            top = max(top, float(t.detach().abs().max()))
    k = int(round(sparsity * n))
    if k < 1:
        return -1.0
    if top == 0.0:
        return 0.0
    scale = THRESHOLD_BINS / top

    def bins_of(a: torch.Tensor) -> torch.Tensor:  # monotone in |w|, the same in every pass
        return (a * scale).long().clamp_(max=THRESHOLD_BINS - 1)

    counts = None
    for t in passes():
        c = torch.bincount(bins_of(t.detach().abs().float().reshape(-1)), minlength=THRESHOLD_BINS).cpu()
        counts = c if counts is None else counts + c
    cum = counts.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device)))
    below = int(cum[b - 1]) if b > 0 else 0
    inside = []
    for t in passes():
        a = t.detach().abs().float().reshape(-1)
        inside.append(a[bins_of(a) == b])
    return float(torch.kthvalue(torch.cat(inside), k - below).values)


def channel_scores(x: torch.Tensor) -> torch.Tensor:
    """PP+PQ slice scores: for each (output filter, slice) the share of its weights whose magnitude is
    below the filter's mean magnitude. Conv ``(out, in, k...)``: a slice is one input channel's kernel;
    Linear ``(out, in)``: a block of ``LINEAR_BLOCK`` inputs. Returns ``(out, slices)``."""
    a = x.detach().abs().float()
    filt_mean = a.reshape(a.shape[0], -1).mean(1)
    if x.dim() >= 3:
        slices = a.reshape(a.shape[0], a.shape[1], -1)
    else:
        cols = a.shape[1]
        pad = (-cols) % LINEAR_BLOCK
        # padded entries count as "large" so they never push a block over the threshold
        a = torch.nn.functional.pad(a, (0, pad), value=float("inf"))
        slices = a.reshape(a.shape[0], -1, LINEAR_BLOCK)
        below = (slices < filt_mean[:, None, None]).float().sum(-1)
        sizes = torch.full_like(below, LINEAR_BLOCK)
        if pad:
            sizes[:, -1] = LINEAR_BLOCK - pad
        return below / sizes
    return (slices < filt_mean[:, None, None]).float().mean(-1)


def channel_mask(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Element mask of PP channel pruning: slices whose score exceeds ``theta`` are removed."""
    if x.dim() < 2:
        raise ValueError(f"channel pruning needs a >= 2-D weight, got shape {tuple(x.shape)}")
    keep_slices = channel_scores(x) <= theta  # (out, slices)
    if x.dim() >= 3:
        return keep_slices.reshape(*keep_slices.shape, *([1] * (x.dim() - 2))).expand_as(x)
    cols = x.shape[1]
    return keep_slices.repeat_interleave(LINEAR_BLOCK, 1)[:, :cols]


def _rowcol(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows, cols)`` when a 2-D mask keeps exactly a sub-grid (whole rows and columns removed)."""
    rows, cols = mask.any(1), mask.any(0)
    if torch.equal(mask, rows[:, None] & cols[None, :]):
        return rows, cols
    return None




def encode_positions(mask: torch.Tensor, shape: Sequence[int]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Store the kept positions of a mask in the smallest layout: the kept rows and columns (whole
    units removed), a bitmask (n/8 bytes) or int32 indices (4 bytes per kept entry)."""
    grid = _rowcol(mask.bool().reshape(shape[0], -1)) if len(shape) >= 2 else None
    flat = mask.reshape(-1).bool()
    nnz, n = int(flat.sum()), flat.numel()
    sizes = {"bitmask": math.ceil(n / 8), "indices": 4 * nnz}
    if grid is not None:
        sizes["rowcol"] = math.ceil(grid[0].numel() / 8) + math.ceil(grid[1].numel() / 8)
    layout = min(sizes, key=lambda k: (sizes[k], k != "rowcol"))
    if layout == "rowcol":
        parts = {"rows": pack_bits(grid[0].to(torch.int64), 1), "cols": pack_bits(grid[1].to(torch.int64), 1)}
    elif layout == "bitmask":
        parts = {"mask": pack_bits(flat.to(torch.int64), 1)}
    else:
        parts = {"indices": torch.nonzero(flat).reshape(-1).to(torch.int32)}
    return parts, {"layout": layout, "nnz": nnz}


def decode_positions(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: Sequence[int]) -> torch.Tensor:
    """The flat keep-mask (bool) that :func:`encode_positions` stored."""
    n = math.prod(shape)
    device = next(iter(parts.values())).device
    if meta["layout"] == "bitmask":
        return unpack_bits(parts["mask"], 1, n).bool()
    if meta["layout"] == "rowcol":
        rows = unpack_bits(parts["rows"], 1, shape[0]).bool()
        cols = unpack_bits(parts["cols"], 1, n // shape[0]).bool()
        return (rows[:, None] & cols[None, :]).reshape(-1)
    if meta["layout"] == "indices":
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[parts["indices"].long()] = True
        return mask
    raise ValueError(f"unknown position layout {meta['layout']!r}")
