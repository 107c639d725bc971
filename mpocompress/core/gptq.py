"""Quantization with error compensation on recorded inputs (GPTQ / OBQ), for any fixed grid (no I/O).

Frantar et al. (2023, GPTQ; after Optimal Brain Quantization, 2022) quantize a weight ``W`` (out, in)
one input column at a time; the rounding error of column ``j`` is spread over the columns not yet
quantized through the inverse Hessian ``H^{-1}`` of the layer's output error, ``H = X^T X``, so the
*outputs* on the recorded inputs move as little as possible. The grid is the codec's, fixed before
(per-row int8 scales, or a k-means codebook): the result lies on it exactly, so the codec stores it
without a second rounding.

Details (as GPTQ): dampening ``damp * mean(diag H)`` on the diagonal, inputs never seen (zero
diagonal) get a unit diagonal, columns in descending order of ``diag H`` ("act-order"), lazy block
updates of ``block`` columns, the upper Cholesky factor of ``H^{-1}``. All in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: GPTQ's default dampening, relative to the mean diagonal of ``H``
DEFAULT_DAMP = 0.01


def gptq(
    weight: torch.Tensor,
    gram: torch.Tensor,
    snap: Callable[[torch.Tensor], torch.Tensor],
    *,
    damp: float = DEFAULT_DAMP,
    block: int = 128,
) -> torch.Tensor:
    """``weight`` quantized column by column with ``snap`` (a column, one value per row -> its grid
    values), compensating each column's error on the columns still to come. Returns a tensor of
    ``weight``'s shape and dtype whose every column is a ``snap`` output."""
    out_f, in_f = weight.shape
    if tuple(gram.shape) != (in_f, in_f):
        raise ValueError(f"Gram matrix must be ({in_f}, {in_f}) for a weight with {in_f} inputs, got {tuple(gram.shape)}")
    h = gram.double().clone()
    h = (h + h.T) / 2
    diag = torch.diagonal(h).clone()
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean = float(torch.diagonal(h).mean())
    h += damp * mean * torch.eye(in_f, dtype=torch.float64, device=h.device)
    perm = torch.argsort(diag, descending=True, stable=True)
    inv_perm = torch.argsort(perm)
    w = weight.double()[:, perm].clone()
    h = h[perm][:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = snap(col.to(weight.dtype)).double()
            q[:, i1 + i] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q[:, inv_perm].to(weight.dtype)
