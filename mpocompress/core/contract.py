"""Pure contractions with MPO cores: ``x @ W^T`` and row gathers without building ``W``.

Numerical core (no modules, no I/O). Cores have shape ``(r[k-1], out_modes[k], in_modes[k], r[k])``
as produced by :func:`mpocompress.core.tt.tt_svd`; ``W`` is the (cropped) matrix they represent.

Two ways to compute ``y = x W^T`` for ``x`` of shape ``(N, in)``:

* **chain**: contract ``x`` with one core after the other (a matmul per core). Cost
  ``sum_k N * prod(out_modes[:k]) * prod(in_modes[k+1:]) * r[k-1] in_k * out_k r[k]``: the best order
  at small batches, where building ``W`` would cost more than using it.
* **dense**: contract the cores into ``W`` (cost independent of ``N``), then one GEMM. Best at large
  batches; with ``W`` cached (no-grad inference) it is exactly dense speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def chain_mats(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each core ``(r0, o, i, r1)`` as the ``(i * r1, r0 * o)`` matrix :func:`mpo_chain` multiplies by."""
    return [c.permute(2, 3, 0, 1).reshape(c.shape[2] * c.shape[3], c.shape[0] * c.shape[1]) for c in cores]


def mpo_chain(
    x: torch.Tensor, cores: list[torch.Tensor], out_features: int, mats: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """``x @ W^T`` by contracting ``x`` with each core in turn, last core first.

    One GEMM and one transpose per core (the TT-layer order of Novikov et al. 2015): the state is
    ``(o_{k+1}..o_d, N, i_1..i_k, r_k)``; contracting ``(i_k, r_k)`` with core ``k`` yields
    ``(..., r_{k-1}, o_k)``, and ``o_k`` moves to the front.

    Args:
        x: ``(N, in_features)`` with ``in_features <= prod(in_modes)`` (zero-padded here).
        cores: the MPO cores of ``W``.
        out_features: rows of ``W`` to return (cropping the padding).
        mats: :func:`chain_mats` of the cores, if already computed.

    Returns:
        ``(N, out_features)``.
    """
    n = x.shape[0]
    in_p = math.prod([c.shape[2] for c in cores])
    if x.shape[1] < in_p:
        x = F.pad(x, (0, in_p - x.shape[1]))
    if mats is None:
        mats = chain_mats(cores)
    t = x
    for core, mat in zip(reversed(cores), reversed(mats)):
        o = core.shape[1]
        t = t.reshape(-1, mat.shape[0]) @ mat  # (..., r0 * o)
        t = t.reshape(-1, o).t()  # o to the front
    # (o_1..o_d, N)
    return t.reshape(-1, n).t()[:, :out_features]


def chain_flops(n: int, cores_shapes: list[tuple[int, int, int, int]]) -> int:
    """Multiply-adds of :func:`mpo_chain` for a batch of ``n``."""
    total, o_prev = 0, 1
    rest = math.prod([s[2] for s in cores_shapes])
    for r0, o, i, r1 in cores_shapes:
        rest //= i
        total += n * o_prev * rest * r0 * i * o * r1
        o_prev *= o
    return total


#: cost model of the contraction choice (MPO layers' ``mode="auto"``), in microseconds on one CPU
#: thread; fitted once to ``benchmarks/results/forward.json`` (every point of it is chosen right) and
#: fixed, so the choice -- and so a layer's output bits -- never depend on the machine's load.
GEMM_MACS_PER_US = 40_000.0  # a large GEMM, compute-bound
CHAIN_MACS_PER_US = 20_000.0  # the chain's small GEMMs and transposes
CACHE_BYTES = 8 * 1024**2  # a weight up to this size is read from cache ...
CACHE_BYTES_PER_US = 70_000.0  # ... at this rate
MEMORY_BYTES_PER_US = 16_000.0  # a larger one from memory
STEP_US = 8.0  # fixed cost of one chain step (dispatch, reshape, transpose)


def dense_cost_us(rows: int, out_features: int, in_features: int, itemsize: int = 4) -> float:
    """Modelled microseconds of ``x @ W^T`` with ``W`` dense: the GEMM, or reading ``W``, whichever
    bounds it (at batch 1 a large weight is memory-bound)."""
    nbytes = out_features * in_features * itemsize
    read = nbytes / (CACHE_BYTES_PER_US if nbytes <= CACHE_BYTES else MEMORY_BYTES_PER_US)
    return max(rows * out_features * in_features / GEMM_MACS_PER_US, read) + STEP_US


def chain_cost_us(rows: int, cores_shapes: list[tuple[int, int, int, int]]) -> float:
    """Modelled microseconds of :func:`mpo_chain` for a batch of ``rows``."""
    return chain_flops(rows, cores_shapes) / CHAIN_MACS_PER_US + STEP_US * len(cores_shapes)


def build_cost_us(cores_shapes: list[tuple[int, int, int, int]]) -> float:
    """Modelled microseconds of contracting the cores into ``W`` (paid per call in training)."""
    return build_flops(cores_shapes) / CHAIN_MACS_PER_US + STEP_US * len(cores_shapes)


def choose_contraction(
    rows: int, cores_shapes: list[tuple[int, int, int, int]], out_features: int, in_features: int,
    *, training: bool = False, itemsize: int = 4,
) -> str:  # fmt: skip
    """``"chain"`` or ``"materialize"``, by the cost model (deterministic: no timing).

    At inference the dense matrix is cached, so it costs one dense layer; in training it is rebuilt
    from the cores at every call."""
    dense = dense_cost_us(rows, out_features, in_features, itemsize) + (build_cost_us(cores_shapes) if training else 0.0)
    return "chain" if chain_cost_us(rows, cores_shapes) < dense else "materialize"


def build_flops(cores_shapes: list[tuple[int, int, int, int]]) -> int:
    """Multiply-adds of contracting the cores into ``W``."""
    total, left = 0, 1
    for k, (r0, o, i, r1) in enumerate(cores_shapes):
        if k:
            total += left * r0 * o * i * r1
        left *= o * i
    return total


def mpo_rows(cores: list[torch.Tensor], index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows ``W[index]`` without building ``W`` (an MPO embedding lookup).

    Args:
        cores: the MPO cores of the ``(num_embeddings, dim)`` table.
        index: integer tensor of any shape.
        in_features: the true embedding dimension (cropping the padding).

    Returns:
        ``index.shape + (in_features,)``.
    """
    flat = index.reshape(-1)
    out_modes = [int(c.shape[1]) for c in cores]
    digits = []
    for o in reversed(out_modes):  # o_1 is the most significant digit
        digits.append(flat % o)
        flat = torch.div(flat, o, rounding_mode="floor")
    digits.reverse()
    n = index.numel()
    t = cores[0][0].index_select(0, digits[0])  # (N, i1, r1)
    for core, d in zip(cores[1:], digits[1:]):
        r0, _, i, r1 = (int(core.shape[0]), int(core.shape[1]), int(core.shape[2]), int(core.shape[3]))
        g = core.index_select(1, d).permute(1, 0, 2, 3).reshape(n, r0, i * r1)  # (N, r0, i*r1)
        t = torch.bmm(t, g).reshape(n, -1, r1)  # (N, I_prev*i, r1)
    return t.reshape(*index.shape, -1)[..., :in_features]
