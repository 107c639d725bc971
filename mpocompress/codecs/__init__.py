"""Codecs that make stored tensors really smaller: pruning and quantization, packed.

Numerical core (no I/O). A codec encodes one floating tensor into a few packed tensors plus JSON-ready
metadata, and decodes exactly what the size report counts. Codecs chain: a pruner leaves the kept
values as one float tensor (``values``), which a quantizer then encodes (PP+PQ: prune, then k-means);
MPO cores are tensors like any other, so MPO + k-means or MPO + SEOFP are chains too.

Methods and papers (details that are our choices are marked so; see docs/methods.md):

* ``magnitude:S`` -- unstructured magnitude pruning to sparsity ``S`` (Han et al. 2015).
* ``channel:THETA`` -- PP of PP+PQ (Chen et al. 2019, arXiv 1906.01078): each (output filter, input
  channel) kernel slice is scored by the share of its weights below the filter's mean absolute value;
  slices scoring above ``THETA`` are pruned. For Linear layers a "slice" is a block of
  ``LINEAR_BLOCK`` consecutive inputs of one output row (our choice).
* ``kmeans:K`` -- PQ of PP+PQ: per-tensor k-means weight sharing, ``K`` fp32 centroids and packed
  ``ceil(log2 K)``-bit indices. Initialised at quantiles, Lloyd iterations (our choice).
* ``seofp:E`` -- SEOFP (Wu et al. 2021, arXiv 2111.04436): sign and exponent only, i.e. signed
  powers of two, packed in ``1 + E`` bits with a per-tensor exponent offset; rounding to the nearest
  power of two in the log domain. ``E = 5`` matches the paper's 81.25 % reduction (our reading).
* ``int8`` -- per-output-channel affine int8. ``fp16`` / ``bf16`` -- casts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from mpocompress.config import PRUNERS, QUANTIZERS, Codec  # noqa: F401 (re-exported)

LINEAR_BLOCK = 8
KMEANS_ITERS = 25


# ---------------------------------------------------------------------------------------------
# bit packing


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` into a uint8 tensor, little-endian bit order."""
    codes = codes.reshape(-1).to(torch.int64)
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    bitplane = ((codes[:, None] >> shifts) & 1).reshape(-1)  # n * bits bits
    pad = (-bitplane.numel()) % 8
    if pad:
        bitplane = torch.cat([bitplane, bitplane.new_zeros(pad)])
    weights = 2 ** torch.arange(8, dtype=torch.int64)
    return (bitplane.reshape(-1, 8) * weights).sum(1).to(torch.uint8) if n else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` integers as int64."""
    if bits == 8:
        return packed[:n].to(torch.int64)
    p = packed.to(torch.int64)
    bitplane = ((p[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: n * bits]
    return (bitplane.reshape(n, bits) << torch.arange(bits, dtype=torch.int64)).sum(1)


# ---------------------------------------------------------------------------------------------
# pruning: tensor -> mask


def magnitude_mask(x: torch.Tensor, sparsity: float, threshold: float | None = None) -> torch.Tensor:
    """Keep the ``1 - sparsity`` largest magnitudes (or those above a given global ``threshold``)."""
    if threshold is not None:
        return x.abs() > threshold
    n_prune = int(round(sparsity * x.numel()))
    if n_prune <= 0:
        return torch.ones_like(x, dtype=torch.bool)
    flat = x.detach().abs().reshape(-1).float()
    keep = torch.ones(flat.numel(), dtype=torch.bool)
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

    counts = torch.zeros(THRESHOLD_BINS, dtype=torch.int64)
    for t in passes():
        counts += torch.bincount(bins_of(t.detach().abs().float().reshape(-1)), minlength=THRESHOLD_BINS)
    cum = counts.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(k)))
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


def pruner_mask(x: torch.Tensor, codec: Codec, threshold: float | None = None) -> torch.Tensor:
    """The keep-mask of a pruning codec (``magnitude:S`` or ``channel:THETA``) on ``x``."""
    if codec.name == "magnitude":
        return magnitude_mask(x, codec.param, threshold)
    if codec.name == "channel":
        return channel_mask(x, codec.param)
    if codec.name == "units":
        raise ValueError("unit pruning needs the model's code to find the units (--model, --data)")
    raise ValueError(f"{codec} is not a pruner")


def _rowcol(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows, cols)`` when a 2-D mask keeps exactly a sub-grid (whole rows and columns removed)."""
    rows, cols = mask.any(1), mask.any(0)
    if torch.equal(mask, rows[:, None] & cols[None, :]):
        return rows, cols
    return None


# ---------------------------------------------------------------------------------------------
# quantizers: float vector -> parts


def kmeans_1d(values: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd), centroids initialised at evenly spaced quantiles. Returns (centroids, codes)."""
    v = values.reshape(-1).double()
    k = max(1, min(k, v.numel()))
    if v.numel() == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.int64)
    q = torch.linspace(0, 1, k + 2, dtype=torch.float64)[1:-1]
    c = torch.quantile(v, q) if v.numel() <= 16_000_000 else torch.sort(v).values[(q * (v.numel() - 1)).long()]
    for _ in range(iters):
        c, _ = torch.sort(c)
        bounds = (c[1:] + c[:-1]) / 2
        codes = torch.bucketize(v, bounds)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, v)
        counts = torch.bincount(codes, minlength=k).double()
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if torch.allclose(new, c):
            c = new
            break
        c = new
    c, _ = torch.sort(c)
    codes = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
    return c.float(), codes


def seofp_codes(values: torch.Tensor, e_bits: int) -> tuple[torch.Tensor, int]:
    """SEOFP: round each value to a signed power of two in the log domain.

    Returns ``(codes, offset)``: code ``= sign << e_bits | field``; ``field = 0`` means zero, otherwise
    the value is ``(-1)^sign * 2^(field - 1 + offset)``. The offset places the ``2^e_bits - 1``
    representable exponents at the top of the tensor's range; smaller magnitudes underflow to the
    smallest power or to zero, whichever is nearer in the log domain.
    """
    v = values.reshape(-1).double()
    nz = v != 0
    levels = 2**e_bits - 1
    if not bool(nz.any()):
        return torch.zeros(v.numel(), dtype=torch.int64), 0
    exps = torch.round(torch.log2(v[nz].abs()))
    top = int(exps.max())
    offset = top - (levels - 1)
    field = torch.zeros(v.numel(), dtype=torch.int64)
    e = torch.round(torch.log2(v.abs().clamp(min=1e-300))).clamp(max=top)
    f = (e - offset + 1).to(torch.int64)
    # below the smallest representable power: keep it if nearer (in log2) than half a step below
    under = f < 1
    f = torch.where(under & (torch.log2(v.abs().clamp(min=1e-300)) >= offset - 1.0), torch.ones_like(f), f)
    f = torch.where(f < 1, torch.zeros_like(f), f)
    field = torch.where(nz, f, field)
    sign = (v < 0).to(torch.int64)
    return (sign << e_bits) | field, offset


def seofp_decode(codes: torch.Tensor, e_bits: int, offset: int) -> torch.Tensor:
    field = codes & (2**e_bits - 1)
    sign = (codes >> e_bits) & 1
    mag = torch.where(field > 0, torch.exp2((field - 1 + offset).double()), torch.zeros_like(field, dtype=torch.float64))
    return torch.where(sign == 1, -mag, mag)


def quantize(values: torch.Tensor, codec: Codec, rows: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode a float tensor with a quantizer. ``rows``: output channels for per-channel int8."""
    v = values.detach()
    if codec.name == "fp16":
        return {"values": v.to(torch.float16)}, {}
    if codec.name == "bf16":
        return {"values": v.to(torch.bfloat16)}, {}
    flat = v.reshape(-1)
    if codec.name == "kmeans":
        k = int(codec.param)
        centroids, codes = kmeans_1d(flat, k)
        bits = max(1, math.ceil(math.log2(k)))
        return {"codebook": centroids, "codes": pack_bits(codes, bits)}, {"bits": bits, "n": flat.numel()}
    if codec.name == "seofp":
        e = int(codec.param)
        codes, offset = seofp_codes(flat, e)
        return {"codes": pack_bits(codes, e + 1)}, {"bits": e + 1, "e_bits": e, "offset": offset, "n": flat.numel()}
    if codec.name == "int8":
        r = rows if rows and flat.numel() % rows == 0 else 1
        m = flat.reshape(r, -1).double()
        lo, hi = m.min(1).values.clamp(max=0), m.max(1).values.clamp(min=0)
        scale = ((hi - lo) / 255).clamp(min=1e-12)
        zero = torch.round(-lo / scale) - 128
        q = torch.clamp(torch.round(m / scale[:, None] + zero[:, None]), -128, 127).to(torch.int8)
        return {"codes": q.reshape(-1), "scale": scale.float(), "zero_point": zero.to(torch.int16)}, {"n": flat.numel()}
    raise ValueError(f"{codec} is not a quantizer")


def dequantize(parts: dict[str, torch.Tensor], codec: Codec, meta: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize` (flat, in ``dtype``)."""
    if codec.name in ("fp16", "bf16"):
        return parts["values"].reshape(-1).to(dtype)
    n = meta["n"]
    if codec.name == "kmeans":
        codes = unpack_bits(parts["codes"], meta["bits"], n)
        return parts["codebook"][codes].to(dtype)
    if codec.name == "seofp":
        codes = unpack_bits(parts["codes"], meta["bits"], n)
        return seofp_decode(codes, meta["e_bits"], meta["offset"]).to(dtype)
    if codec.name == "int8":
        scale, zero = parts["scale"].double(), parts["zero_point"].double()
        q = parts["codes"].double().reshape(scale.numel(), -1)
        return ((q - zero[:, None]) * scale[:, None]).reshape(-1).to(dtype)
    raise ValueError(f"{codec} is not a quantizer")


# ---------------------------------------------------------------------------------------------
# chains: tensor -> parts


def encode(
    x: torch.Tensor, chain: list[Codec], *, threshold: float | None = None, mask: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode ``x`` with at most one pruner followed by at most one quantizer.

    Args:
        x: the tensor.
        chain: codecs, a pruner first.
        threshold: a global magnitude threshold for a ``magnitude`` pruner.
        mask: the keep-mask to use instead of the pruner's own (a model pruned and fine-tuned
            with this mask keeps exactly its zeros).

    Returns:
        ``(parts, meta)``: packed tensors by part name, and JSON-ready metadata (the chain, shapes,
        sparse layout) that :func:`decode` needs.
    """
    pruners = [c for c in chain if c.is_pruner]
    quants = [c for c in chain if not c.is_pruner]
    if len(pruners) > 1 or len(quants) > 1 or (pruners and quants and chain.index(pruners[0]) > chain.index(quants[0])):
        raise ValueError(f"a chain is at most one pruner then one quantizer, got {' '.join(map(str, chain))}")
    meta: dict[str, Any] = {"chain": [str(c) for c in chain], "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    parts: dict[str, torch.Tensor] = {}
    values = x.detach().reshape(-1)
    if pruners:
        p = pruners[0]
        if mask is None:
            mask = pruner_mask(x, p, threshold)
        elif mask.shape != x.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the tensor's {tuple(x.shape)}")
        grid = _rowcol(mask.bool().reshape(x.shape[0], -1)) if x.dim() >= 2 else None
        mask = mask.reshape(-1).bool()
        nnz = int(mask.sum())
        n = mask.numel()
        # positions: kept rows + columns (whole units removed), a bitmask (n/8 bytes) or int32
        # indices (4 nnz bytes), whichever is smallest
        sizes = {"bitmask": math.ceil(n / 8), "indices": 4 * nnz}
        if grid is not None:
            sizes["rowcol"] = math.ceil(grid[0].numel() / 8) + math.ceil(grid[1].numel() / 8)
        layout = min(sizes, key=lambda k: (sizes[k], k != "rowcol"))
        if layout == "rowcol":
            parts["rows"] = pack_bits(grid[0].to(torch.int64), 1)
            parts["cols"] = pack_bits(grid[1].to(torch.int64), 1)
        elif layout == "bitmask":
            parts["mask"] = pack_bits(mask.to(torch.int64), 1)
        else:
            parts["indices"] = torch.nonzero(mask).reshape(-1).to(torch.int32)
        meta["layout"] = layout
        meta["nnz"] = nnz
        values = values[mask]
    if quants:
        qparts, qmeta = quantize(values, quants[0], rows=None if pruners else x.shape[0] if x.dim() >= 1 else None)
        parts.update(qparts)
        meta["quant"] = qmeta
    else:
        parts["values"] = values.clone()
    return parts, meta


def decode(parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """Rebuild the tensor :func:`encode` packed (exactly what the size report counts)."""
    chain = [Codec.parse(c) for c in meta["chain"]]
    dtype = getattr(torch, meta["dtype"])
    shape = meta["shape"]
    quants = [c for c in chain if not c.is_pruner]
    if quants:
        values = dequantize(parts, quants[0], meta["quant"], dtype)
    else:
        values = parts["values"].reshape(-1).to(dtype)
    if any(c.is_pruner for c in chain):
        n = math.prod(shape)
        out = torch.zeros(n, dtype=dtype)
        if meta["layout"] == "bitmask":
            mask = unpack_bits(parts["mask"], 1, n).bool()
            out[mask] = values
        elif meta["layout"] == "rowcol":
            rows = unpack_bits(parts["rows"], 1, shape[0]).bool()
            cols = unpack_bits(parts["cols"], 1, n // shape[0]).bool()
            out[(rows[:, None] & cols[None, :]).reshape(-1)] = values
        else:
            out[parts["indices"].long()] = values
        return out.reshape(shape)
    return values.reshape(shape)


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())
