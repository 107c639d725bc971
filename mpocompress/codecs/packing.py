"""Bit packing of small integers into uint8 tensors (little-endian bit order within each byte)."""

from __future__ import annotations

import torch


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` into a uint8 tensor: value ``j``'s bit ``b`` is bit
    ``(j * bits + b) % 8`` of byte ``(j * bits + b) // 8`` (little-endian; pinned by a golden test)."""
    codes = codes.reshape(-1).to(torch.int64)
    n, device = codes.numel(), codes.device
    if bits == 8:
        return codes.to(torch.uint8)
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    shifts = torch.arange(bits, dtype=torch.int64, device=device)
    bitplane = ((codes[:, None] >> shifts) & 1).reshape(-1)  # n * bits bits
    pad = (-bitplane.numel()) % 8
    if pad:
        bitplane = torch.cat([bitplane, bitplane.new_zeros(pad)])
    weights = 2 ** torch.arange(8, dtype=torch.int64, device=device)
    return (bitplane.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` integers as int64 (on ``packed``'s device)."""
    if bits == 8:
        return packed[:n].to(torch.int64)
    p = packed.to(torch.int64)
    device = p.device
    bitplane = ((p[:, None] >> torch.arange(8, dtype=torch.int64, device=device)) & 1).reshape(-1)[: n * bits]
    return (bitplane.reshape(n, bits) << torch.arange(bits, dtype=torch.int64, device=device)).sum(1)
