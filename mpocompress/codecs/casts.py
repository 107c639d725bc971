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
