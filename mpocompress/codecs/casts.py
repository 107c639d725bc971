"""``fp16`` / ``bf16`` -- casts of the stored values to half precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mpocompress.codecs.base import Codec, register


@dataclass(frozen=True)
class _Cast(Codec):
    kind = "quantizer"
    parts = ("values",)
    dtype: ClassVar[torch.dtype]

    def encode(self, values: torch.Tensor, rows: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"values": values.reshape(-1).to(self.dtype)}, {}

    def decode(self, parts: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        return parts["values"].reshape(-1).to(dtype)


@register
@dataclass(frozen=True)
class FP16(_Cast):
    """Values stored as IEEE float16."""

    name = "fp16"
    dtype = torch.float16


@register
@dataclass(frozen=True)
class BF16(_Cast):
    """Values stored as bfloat16."""

    name = "bf16"
    dtype = torch.bfloat16


#: how far (relative L2 error) a tensor passed through may move when stored in a narrower float dtype:
#: float16 rounds normal values by <= 2^-11 (~3e-4 relative L2 on real biases and norm gains);
#: bfloat16 by <= 2^-8. A tensor out of float16's range (overflow, or tiny values such as a
#: batch-norm variance of 1e-7 lost to underflow) misses it and is kept as it is.
NARROW_TOLERANCE = {"float16": 1e-3, "bfloat16": 1e-2}


def narrowed(values: torch.Tensor, dtype: str) -> torch.Tensor | None:
    """``values`` (a float32/float64 tensor) stored as ``dtype`` (``"float16"``/``"bfloat16"``), or
    None when that would change it: a value overflowing, or a relative L2 error over
    :data:`NARROW_TOLERANCE`. Non-floating, already-narrow, empty and non-finite tensors give None."""
    if values.dtype not in (torch.float32, torch.float64) or values.numel() == 0:
        return None
    if not bool(torch.isfinite(values).all()):
        return None  # NaN/Inf: kept exactly as they are
    narrow = values.to(getattr(torch, dtype))
    back = narrow.to(values.dtype)
    if not bool(torch.isfinite(back).all()):
        return None  # out of range
    ref = values.double()
    norm = float(torch.linalg.vector_norm(ref))
    err = float(torch.linalg.vector_norm(ref - back.double()))
    return narrow if err <= NARROW_TOLERANCE[dtype] * norm else None
