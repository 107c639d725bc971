"""``int8`` -- per-output-channel affine int8 (a scale and a zero point per row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mpocompress.codecs.base import Codec, register


@register
@dataclass(frozen=True)
class Int8(Codec):
    """Affine int8 per output channel (one channel for a pruned tensor's kept values)."""

    name = "int8"
    kind = "quantizer"
    parts = ("codes", "scale", "zero_point")

    has_grid = True

    def encode(
        self, values: torch.Tensor, rows: int | None = None, grid: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Quantize ``values`` (flat) per row of ``rows`` (one scale and zero point each; ``grid``:
        those of :meth:`grid`, else from each row's range)."""
        flat = values.reshape(-1)
        r = rows if rows and flat.numel() % rows == 0 else 1
        m = flat.reshape(r, -1).double()
        scale, zero = self.grid(m) if grid is None else (grid[0].double(), grid[1].double())
        if scale.numel() != r:
            raise ValueError(f"an int8 grid of {scale.numel()} rows for {r} rows")
        q = torch.clamp(torch.round(m / scale[:, None] + zero[:, None]), -128, 127).to(torch.int8)
        return {"codes": q.reshape(-1), "scale": scale.float(), "zero_point": zero.to(torch.int16)}, {"n": flat.numel()}

    def grid(self, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's scale and zero point (its range, widened to hold 0), as float64."""
        m = matrix.double()
        lo, hi = m.min(1).values.clamp(max=0), m.max(1).values.clamp(min=0)
        scale = ((hi - lo) / 255).clamp(min=1e-12)
        # the stored scale is float32: round it first, so encoding with this grid reproduces it
        scale = scale.float().double()
        return scale, torch.round(-lo / scale) - 128

    def snap(self, grid: tuple[torch.Tensor, torch.Tensor], column: torch.Tensor) -> torch.Tensor:
        """``column`` (one value per row) on its rows' int8 grids."""
        scale, zero = grid
        q = torch.clamp(torch.round(column.double() / scale + zero), -128, 127)
        return ((q - zero) * scale).to(column.dtype)

    def decode(self, parts: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """The flat values :meth:`encode` stored, in ``dtype``."""
        scale, zero = parts["scale"].double(), parts["zero_point"].double()
        q = parts["codes"].double().reshape(scale.numel(), -1)
        return ((q - zero[:, None]) * scale[:, None]).reshape(-1).to(dtype)
