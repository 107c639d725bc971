"""``seofp:E`` -- SEOFP (Wu et al. 2021, arXiv 2111.04436): sign and exponent only floats.

Signed powers of two, packed in ``1 + E`` bits with a per-tensor exponent offset; rounding to the
nearest power of two in the log domain. ``E = 5`` matches the paper's 81.25 % reduction (our reading).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mpocompress.codecs.base import Codec, register
from mpocompress.codecs.packing import pack_bits, unpack_bits


@register
@dataclass(frozen=True)
class SEOFP(Codec):
    """Sign-exponent-only floats with ``exp_bits`` exponent bits (2..8)."""

    exp_bits: int
    name = "seofp"
    kind = "quantizer"
    arg = "E"
    parts = ("codes",)

    def __post_init__(self) -> None:
        if not (isinstance(self.exp_bits, int) and 2 <= self.exp_bits <= 8):
            raise ValueError(f"seofp E must be an integer in 2..8, got {self.exp_bits}")

    def encode(self, values: torch.Tensor, rows: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Packed sign-exponent codes of the flat ``values`` and the exponent offset."""
        e = self.exp_bits
        codes, offset = seofp_codes(values.reshape(-1), e)
        return {"codes": pack_bits(codes, e + 1)}, {"bits": e + 1, "e_bits": e, "offset": offset, "n": values.numel()}

    def decode(self, parts: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """The flat values :meth:`encode` stored (signed powers of two), in ``dtype``."""
        codes = unpack_bits(parts["codes"], meta["bits"], meta["n"])
        return seofp_decode(codes, meta["e_bits"], meta["offset"]).to(dtype)


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
        return torch.zeros(v.numel(), dtype=torch.int64, device=v.device), 0
    exps = torch.round(torch.log2(v[nz].abs()))
    top = int(exps.max())
    offset = top - (levels - 1)
    field = torch.zeros(v.numel(), dtype=torch.int64, device=v.device)
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
    """The float64 values of SEOFP codes (inverse of :func:`seofp_codes` up to the rounding)."""
    field = codes & (2**e_bits - 1)
    sign = (codes >> e_bits) & 1
    mag = torch.where(field > 0, torch.exp2((field - 1 + offset).double()), torch.zeros_like(field, dtype=torch.float64))
    return torch.where(sign == 1, -mag, mag)


