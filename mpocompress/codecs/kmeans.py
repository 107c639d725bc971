"""``kmeans:K`` -- PQ of PP+PQ (Chen et al. 2019): per-tensor k-means weight sharing.

``K`` float32 centroids and packed ``ceil(log2 K)``-bit indices. Initialised at evenly spaced
quantiles, Lloyd iterations until the centroids stop moving (our choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mpocompress.codecs.base import Codec, register
from mpocompress.codecs.packing import pack_bits, unpack_bits

KMEANS_ITERS = 25


@register
@dataclass(frozen=True)
class KMeans(Codec):
    """Weight sharing: each value replaced by the nearest of ``k`` centroids (2..256)."""

    k: int
    name = "kmeans"
    kind = "quantizer"
    arg = "K"
    parts = ("codebook", "codes")

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and 2 <= self.k <= 256):
            raise ValueError(f"kmeans K must be an integer in 2..256, got {self.k}")

    def encode(self, values: torch.Tensor, rows: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A codebook of ``k`` centroids and the packed index of each value."""
        centroids, codes = kmeans_1d(values.reshape(-1), self.k)
        bits = max(1, math.ceil(math.log2(self.k)))
        return {"codebook": centroids, "codes": pack_bits(codes, bits)}, {"bits": bits, "n": values.numel()}

    def decode(self, parts: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """The flat values :meth:`encode` stored, in ``dtype``."""
        codes = unpack_bits(parts["codes"], meta["bits"], meta["n"])
        return parts["codebook"][codes].to(dtype)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd), centroids initialised at evenly spaced quantiles. Returns (centroids, codes)."""
    v = values.reshape(-1).double()
    k = max(1, min(k, v.numel()))
    if v.numel() == 0:
        return torch.zeros(k, device=values.device), torch.zeros(0, dtype=torch.int64, device=values.device)
    q = torch.linspace(0, 1, k + 2, dtype=torch.float64, device=v.device)[1:-1]
    c = torch.quantile(v, q) if v.numel() <= 16_000_000 else torch.sort(v).values[(q * (v.numel() - 1)).long()]
    for _ in range(iters):
        c, _ = torch.sort(c)
        bounds = (c[1:] + c[:-1]) / 2
        codes = torch.bucketize(v, bounds)
        sums = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, codes, v)
        counts = torch.bincount(codes, minlength=k).double()
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if torch.allclose(new, c):
            c = new
            break
        c = new
    c, _ = torch.sort(c)
    codes = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
    return c.float(), codes


