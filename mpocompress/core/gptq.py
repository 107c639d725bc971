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


def gptq_factors(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    gram: torch.Tensor,
    snapper: Callable[[torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]],
    *,
    damp: float = DEFAULT_DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both factors of ``weight ~ left @ right`` quantized with error compensation on inputs with
    Gram ``gram`` (ours, after GPTQ): ``right`` (r, in) first, by :func:`gptq` on ``gram``; then
    ``left`` is refit by least squares to the outputs of the quantized ``right``
    (``left = W C R_q^T (R_q C R_q^T)^{-1}``) and quantized by :func:`gptq` on ``R_q C R_q^T``, the Gram
    of its own inputs. ``snapper(tensor, k)`` gives the snap of factor ``k`` (0: left, 1: right) on
    a grid made for that tensor. Returns ``(left_q, right_q)``."""
    c = gram.double()
    right_q = gptq(right, gram, snapper(right, 1), damp=damp).double()
    mid = right_q @ c @ right_q.T
    mid = (mid + mid.T) / 2
    eye = torch.eye(mid.shape[0], dtype=torch.float64, device=mid.device)
    reg = damp * float(torch.diagonal(mid).mean()) if float(torch.diagonal(mid).mean()) > 0 else 1.0
    left_t = torch.linalg.solve(mid + reg * eye, (weight.double() @ c @ right_q.T).T).T.to(left.dtype)
    left_q = gptq(left_t, mid, snapper(left_t, 0), damp=damp)
    return left_q, right_q.to(right.dtype)
