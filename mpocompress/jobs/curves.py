"""Rate-distortion curves: every way to store one weight, with its bytes and its error.

Each weight is stored every way we know (keep dense; fp16/bf16; int8; k-means at 2-8 bits; MPO with
2 (SVD) or 3 cores at a grid of bonds, alone or with int8/k-means cores; magnitude pruning with
k-means), each option's bytes (what ``convert`` stores, counted without packing where exact) and
relative squared error measured exactly: of the weight (:func:`measure_options`), or with recorded
inputs of the layer's output. :mod:`mpocompress.jobs.budget` allocates a size budget over these curves.

Speed: the k-means of every option (a weight at every bit width, its pruned values, the cores of
every SVD and MPO option) is one batched dynamic program per round (:func:`kmeans_1d_solve`), and
:func:`measure_many` runs the rounds of several layers together: the program's cost per level is
mostly numpy's per-call overhead, which a batch pays once.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mpocompress.codecs import KMeansProblem, decode, encode, kmeans_1d_solve, parse_codec
from mpocompress.codecs.kmeans import kth_smallest_abs
from mpocompress.core.allocate import METHODS, Option, allowed
from mpocompress.core.modes import choose_modes
from mpocompress.core.tt import cores_to_matrix, tt_svd
from mpocompress.jobs.plan import compensates, gptq_factor_codes, nbytes_of
from mpocompress.select import matrix_shape

KMEANS_BITS = (2, 3, 4, 5, 6, 8)
#: MPO structures tried: 2 cores (a truncated SVD, ranks spaced by BOND_STEP) and 3 cores (bonds
#: spaced by MPO_BOND_STEP)
MPO_CORES = (2, 3)
BOND_STEP = 1.5
MPO_BOND_STEP = 2.0
#: MPO options stored at most this share of the dense bytes (above it a codec is smaller and better)
MPO_MAX_SHARE = 0.5
CORE_CODECS = (None, "int8", "kmeans:16")
#: without codecs (``methods`` of low rank only) nothing smaller beats a low-rank option above half
#: the dense bytes, so ranks go up to where the cores cost as much as the weight, on a finer grid
#: (every rank is cheap to measure: the error of each comes from one spectrum)
LOWRANK_ONLY_MAX_SHARE = 1.0
LOWRANK_ONLY_STEP = 1.05
LOWRANK_ONLY_MPO_STEP = 1.25
PRUNE_LEVELS = (0.5, 0.75, 0.9)




def _rel2(reference: torch.Tensor, approx: torch.Tensor, norm2: float) -> float:
    """``||reference - approx||^2 / norm2``, summed in float64 (the difference in the wider dtype)."""
    d = torch.sub(reference.reshape(-1), approx.reshape(-1))
    return float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 / norm2 if norm2 > 0 else 0.0


def _rel2_low_rank(reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor, norm2: float) -> float:
    """:func:`_rel2` of ``a @ b`` without forming it: ``||W||^2 - 2 <A^T W, B> + <A^T A, B B^T>``."""
    a, b = a.double(), b.double()
    w = reference.double()
    cross = float(((a.T @ w) * b).sum())
    square = float(((a.T @ a) * (b @ b.T)).sum())
    return max(norm2 - 2 * cross + square, 0.0) / norm2 if norm2 > 0 else 0.0


_CLEAR = {"bond_dim": None, "ratio": None, "tol": None, "prune": "none", "quantize": "none"}




class _Batch:
    """k-means problems gathered from several options (and layers), solved in one batched program."""

    def __init__(self) -> None:
        self.problems: list[KMeansProblem] = []
        self.results: list[Any] = []

    def add(self, problem: KMeansProblem) -> int:
        """Queue a problem; its result is ``self[index]`` after :meth:`solve`."""
        self.problems.append(problem)
        return len(self.problems) - 1

    def solve(self) -> None:
        """Solve every queued problem (one program)."""
        self.results = kmeans_1d_solve(self.problems)

    def __getitem__(self, index: int) -> Any:
        return self.results[index]


Finish = Callable[[], list[Option]]


def _alone(make: Callable[..., Callable[[], Any]], *args: Any) -> Any:
    """What ``make(*args, batch)`` gives once its batch alone is solved (one layer's options, at once)."""
    batch = _Batch()
    finish = make(*args, batch)
    batch.solve()
    return finish()


def _coded_cores(jobs: list[list[torch.Tensor]], codec: str, batch: _Batch) -> Callable[[], list[tuple[list[torch.Tensor], int]]]:
    """Each job's cores through a codec as ``convert`` stores them (each core its own tensor): queues
    their k-means in ``batch``; the returned function gives, once it is solved, each job's decoded
    cores and bytes (k-means: the codebook and the packed codes, counted without packing)."""
    spec = parse_codec(codec)
    flat = [c for cores in jobs for c in cores]
    kmeans = getattr(spec, "name", "") == "kmeans"
    index = [batch.add(KMeansProblem(c, (spec.k,))) for c in flat] if kmeans else []

    def finish() -> list[tuple[list[torch.Tensor], int]]:
        if kmeans:
            bits = max(1, math.ceil(math.log2(spec.k)))
            coded = [(batch[i][spec.k][0][batch[i][spec.k][1]].reshape(c.shape).to(c.dtype), 4 * spec.k + math.ceil(c.numel() * bits / 8))
                     for i, c in zip(index, flat)]  # fmt: skip
        else:
            coded = [(decode(p, m), sum(nbytes_of(v) for v in p.values())) for p, m in (encode(c, [spec]) for c in flat)]
        it = iter(coded)
        out = []
        for cores in jobs:
            mine = [next(it) for _ in cores]
            out.append(([d for d, _ in mine], sum(b for _, b in mine)))
        return out

    return finish


def _codec_options(t: torch.Tensor, v: torch.Tensor, norm2: float, itemsize: int, batch: _Batch) -> Finish:
    """Casts, int8, k-means at every bit width (one dynamic program) and magnitude pruning + k-means,
    with the bytes ``convert`` would store, computed without packing. The k-means are queued in
    ``batch``; the returned function gives the options once it is solved (:func:`_alone`: at once)."""
    from mpocompress.codecs import Int8

    n, options = v.numel(), []
    dense = n * itemsize

    def add(label: str, overrides: dict[str, Any], nbytes: int, error: float) -> None:
        if nbytes < dense:  # convert keeps a tensor no codec makes smaller as it is
            options.append(Option(label, {**_CLEAR, **overrides}, nbytes, error))

    if itemsize >= 4:
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            add(name, {"quantize": name}, n * 2, _rel2(v, v.to(dt), norm2))
    parts, meta = Int8().encode(v, t.shape[0] if t.dim() >= 1 else None)
    add("int8", {"quantize": "int8"}, sum(nbytes_of(x) for x in parts.values()), _rel2(v, Int8().decode(parts, meta, torch.float64), norm2))
    # the kept values of magnitude pruning are the two tails of the sorted values: no sort per level
    s = np.sort(v.cpu().numpy())
    whole = batch.add(KMeansProblem(s, tuple(2**b for b in KMEANS_BITS), errors_only=True, presorted=True))
    squares = np.concatenate([[0.0], np.cumsum(s * s)])
    pruned = []
    for level in PRUNE_LEVELS:
        n_prune = int(round(level * n))
        thr = kth_smallest_abs(s, n_prune - 1) if n_prune > 0 else -1.0
        lo, hi = np.searchsorted(s, -thr, side="left"), np.searchsorted(s, thr, side="right")  # s[lo:hi] is pruned
        excess = (hi - lo) - n_prune  # values tied at the threshold: prune exactly n_prune, as the codec does
        if excess > 0:
            low_ties = min(excess, int(np.searchsorted(s, -thr, side="right") - lo))
            lo, hi = lo + low_ties, hi - (excess - low_ties)
        kept_sorted = np.concatenate([s[:lo], s[hi:]])
        pruned.append((level, lo, hi, kept_sorted.size, batch.add(KMeansProblem(kept_sorted, (16,), errors_only=True, presorted=True))))

    def finish() -> list[Option]:
        for k, sse in batch[whole].items():
            bits = max(1, math.ceil(math.log2(k)))
            add(f"kmeans:{k}", {"quantize": f"kmeans:{k}"}, math.ceil(n * bits / 8) + 4 * k, max(sse, 0.0) / norm2 if norm2 else 0.0)
        for level, lo, hi, nnz, index in pruned:
            (sse,) = batch[index].values()
            positions = min(math.ceil(n / 8), 4 * nnz)
            error = (float(squares[hi] - squares[lo]) + max(sse, 0.0)) / norm2 if norm2 else 0.0
            add(f"magnitude:{level} + kmeans:16", {"prune": f"magnitude:{level}", "quantize": "kmeans:16"},
                positions + math.ceil(nnz * 4 / 8) + 64, error)  # fmt: skip
        return options

    return finish


class _Floor:
    """The best error reachable at each size by options already measured (a layer's codecs): an option
    whose *lower bound* on error is no better than what a no larger option already reaches can never
    be chosen, so it is not measured (skipping it leaves every allocation unchanged)."""

    def __init__(self, options: list[Option]) -> None:
        ranked = sorted(options, key=lambda o: o.nbytes)
        self.sizes = [o.nbytes for o in ranked]
        self.best = list(itertools.accumulate((o.error for o in ranked), min))

    def beats(self, nbytes: float, error_bound: float) -> bool:
        """Whether an option of at most ``nbytes`` already has error ``<= error_bound``."""
        i = bisect.bisect_right(self.sizes, nbytes)
        return i > 0 and self.best[i - 1] <= error_bound


_CODEC_BITS = {"int8": 8, "kmeans:16": 4}


def _svd_options(matrix: torch.Tensor, itemsize: int, norm2: float, floor: _Floor | None, batch: _Batch, *, fine: bool = False) -> Finish:
    """2 cores (a truncated SVD) at a grid of ranks, alone (error from the spectrum) and with
    int8 / k-means cores (not measured where ``floor`` shows them dominated: no rank-r matrix has
    less error than the spectrum's tail, and the codes alone take ``bits / 8`` bytes a value). Queued
    in ``batch`` as in :func:`_codec_options`. ``fine``: no codecs, ranks up to the dense bytes on
    the finer grid."""
    max_share, bond_step = (LOWRANK_ONLY_MAX_SHARE, LOWRANK_ONLY_STEP) if fine else (MPO_MAX_SHARE, BOND_STEP)
    out_f, in_f = matrix.shape
    ref = matrix.double()  # once: every error below is measured against it
    # in the weight's dtype, as convert factors it (so the coded factors are the ones it would code)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    s = s.double()
    tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])
    options, rank, step = [], 1, 0
    pending: dict[str, list[tuple[str, dict[str, Any], int, list[torch.Tensor]]]] = {c: [] for c in CORE_CODECS[1:]}
    while rank < min(out_f, in_f) and rank * (out_f + in_f) * itemsize <= max_share * out_f * in_f * itemsize:
        base = {**_CLEAR, "bond_dim": rank, "cores": 2, "svd": "full"}
        label = f"mpo2 bond {rank}"
        options.append(Option(label, base, rank * (out_f + in_f) * itemsize, float(tail[rank]) / norm2 if norm2 else 0.0))
        if fine:
            rank = max(rank + 1, int(rank * bond_step))
            continue
        cores = [u[:, :rank].reshape(1, out_f, 1, rank),
                 (s[:rank, None].to(vh.dtype) * vh[:rank]).reshape(rank, 1, in_f, 1)]  # fmt: skip
        for codec in CORE_CODECS[1:] if step % 2 == 0 else CORE_CODECS[1:2]:  # k-means factors at every other rank
            bound = float(tail[rank]) / norm2 if norm2 else 0.0
            if floor is None or not floor.beats(rank * (out_f + in_f) * _CODEC_BITS[codec] / 8, bound):
                pending[codec].append((label, base, rank, cores))
        rank, step = max(rank + 1, int(rank * bond_step)), step + 1
    coded = {codec: _coded_cores([j[3] for j in jobs], codec, batch) for codec, jobs in pending.items()}

    def finish() -> list[Option]:
        for codec, jobs in pending.items():
            for (label, base, rank, _), (dec, nbytes) in zip(jobs, coded[codec]()):
                if nbytes < rank * (out_f + in_f) * itemsize:
                    options.append(Option(f"{label} + {codec}", {**base, "quantize": codec}, nbytes,
                                          _rel2_low_rank(ref, dec[0].reshape(out_f, rank), dec[1].reshape(rank, in_f), norm2)))  # fmt: skip
        return options

    return finish


def _mpo_options(matrix: torch.Tensor, itemsize: int, norm2: float, cores: int, floor: _Floor | None, batch: _Batch, *,
                 fine: bool = False) -> Finish:  # fmt: skip
    """MPO with ``cores`` cores at a grid of bonds (exact SVDs shared between bonds), alone and with
    quantized cores (not measured where ``floor`` shows them dominated: no MPO with first bond ``r``
    has less error than the tail of the first unfolding's spectrum beyond ``r``). Queued in ``batch``
    as in :func:`_codec_options`."""
    out_f, in_f = matrix.shape
    dense_bytes = out_f * in_f * itemsize
    max_share = LOWRANK_ONLY_MAX_SHARE if fine else MPO_MAX_SHARE
    modes = choose_modes(out_f, in_f, cores)
    cache: dict = {}
    options, bond, seen = [], 1, set()
    pending: dict[str, list[tuple[str, dict[str, Any], int, list[torch.Tensor]]]] = {c: [] for c in CORE_CODECS[1:]}
    while True:
        tt = tt_svd(matrix, *modes, max_bond=bond, svd="full", svd_cache=cache)
        params = tt.num_params
        if params * itemsize > max_share * dense_bytes or tuple(tt.bond_dims) in seen:
            break
        seen.add(tuple(tt.bond_dims))
        base = {**_CLEAR, "bond_dim": bond, "cores": cores, "svd": "full"}
        label = f"mpo{cores} bond {bond}"
        if fine:  # no codecs: the cores as they are
            options.append(Option(label, base, params * itemsize, _rel2(matrix, tt.to_matrix(), norm2)))
            bond = max(bond + 1, int(bond * LOWRANK_ONLY_MPO_STEP))
            continue
        s0 = tt.spectra[0].double() if tt.spectra else torch.zeros(0, dtype=torch.float64)
        bound = float((s0[tt.bond_dims[0]:] ** 2).sum()) / norm2 if norm2 else 0.0
        if floor is not None and floor.beats(params * itemsize, bound):
            bond = max(bond + 1, int(bond * MPO_BOND_STEP))
            continue
        options.append(Option(label, base, params * itemsize, _rel2(matrix, tt.to_matrix(), norm2)))
        for codec in CORE_CODECS[1:]:
            if floor is None or not floor.beats(params * _CODEC_BITS[codec] / 8, bound):
                pending[codec].append((label, base, params, list(tt.cores)))
        bond = max(bond + 1, int(bond * MPO_BOND_STEP))
    coded = {codec: _coded_cores([j[3] for j in jobs], codec, batch) for codec, jobs in pending.items()}

    def finish() -> list[Option]:
        for codec, jobs in pending.items():
            for (label, base, params, _), (dec, nbytes) in zip(jobs, coded[codec]()):
                if nbytes < params * itemsize:
                    options.append(Option(f"{label} + {codec}", {**base, "quantize": codec}, nbytes,
                                          _rel2(matrix, cores_to_matrix(dec, (out_f, in_f)), norm2)))  # fmt: skip
        return options

    return finish


def measure_options(name: str, t: torch.Tensor, shapes: dict[str, tuple[int, ...]], gram: torch.Tensor | None = None) -> list[Option]:
    """Every option for one weight, with the bytes ``convert`` stores and its relative squared error:
    of the weight, or with ``gram`` (recorded inputs) of the layer's output, each option made the
    data-aware way ``convert`` makes it with data (:func:`_data_options`)."""
    (options,) = measure_many([t], [gram])
    return options


def measure_many(
    tensors: list[torch.Tensor], grams: list[torch.Tensor | None] | None = None, held: list[torch.Tensor | None] | None = None,
    methods: tuple[str, ...] | None = None,
) -> list[list[Option]]:
    """:func:`measure_options` of several weights, the k-means of all of them solved together: one
    program for the codecs (their errors bound which SVD/MPO options are worth measuring) and one for
    the SVD and MPO cores. ``held``: per weight, the Gram of held-out inputs on which the options
    fitted to ``grams`` are measured (None: on ``grams`` themselves). ``methods``: only options built
    from these (:data:`mpocompress.core.allocate.METHODS`; None: all); without codecs, low rank is
    measured up to the dense bytes on a finer grid of ranks."""
    if methods is not None:
        return [[o for o in options if allowed(o, methods)] for options in _measure_many(tensors, grams, held, methods)]
    return _measure_many(tensors, grams, held, None)


def _measure_many(tensors: list[torch.Tensor], grams: list[torch.Tensor | None] | None, held: list[torch.Tensor | None] | None,
                  methods: tuple[str, ...] | None) -> list[list[Option]]:  # fmt: skip
    """:func:`measure_many` before the options are filtered by ``methods`` (which only saves work here)."""
    use = set(methods if methods is not None else METHODS)
    fine = "codec" not in use
    grams = grams if grams is not None else [None] * len(tensors)
    held = held if held is not None else [None] * len(tensors)
    first, second = _Batch(), _Batch()
    staged = []
    for t, gram, gram_held in zip(tensors, grams, held):
        w = t if t.dtype in (torch.float32, torch.float64) else t.float()
        itemsize = t.element_size()
        out_f, in_f = matrix_shape(list(t.shape))
        dense = [Option("dense", {"skip": True}, nbytes_of(t), 0.0)]
        if gram is not None and min(out_f, in_f) > 1:
            staged.append((dense + _data_options(t, w.reshape(out_f, in_f), gram, itemsize, gram_held, use), None, None))
            continue
        v = w.reshape(-1).double()
        norm2 = float(v @ v)
        codecs = _codec_options(t, v, norm2, itemsize, first) if "codec" in use else (lambda: [])
        staged.append((dense, codecs, (w, itemsize, norm2, out_f, in_f)))
    first.solve()
    rest: list[list[Finish]] = []
    for options, codecs, shape in staged:
        later: list[Finish] = []
        if codecs is not None:
            options += codecs()
            w, itemsize, norm2, out_f, in_f = shape
            if min(out_f, in_f) > 1:
                matrix = w.reshape(out_f, in_f)
                floor = None if fine else _Floor(options)
                if "svd" in use:
                    later.append(_svd_options(matrix, itemsize, norm2, floor, second, fine=fine))
                if "mpo" in use:
                    later += [_mpo_options(matrix, itemsize, norm2, cores, floor, second, fine=fine) for cores in MPO_CORES[1:]]
        rest.append(later)
    second.solve()
    for (options, _, _), later in zip(staged, rest):
        for finish in later:
            options += finish()
    return [options for options, _, _ in staged]


def _data_options(t: torch.Tensor, matrix: torch.Tensor, gram: torch.Tensor, itemsize: int, held: torch.Tensor | None = None,
                  use: set[str] | None = None) -> list[Option]:  # fmt: skip
    """The options of :func:`measure_options` made and measured with recorded inputs: GPTQ for int8
    and k-means, whitened SVD factors, activation-aware MPO cores (without the refit ``convert`` adds,
    so MPO errors are upper bounds); errors are relative squared output errors on the inputs, or on
    ``held`` (the Gram of other inputs) when given: an option fitted to few samples can be far better
    on them than on any others (GPTQ with fewer samples than inputs zeroes its error on their span),
    and the allocation must not believe that. ``use``: the methods to measure (None: all)."""
    from mpocompress.core.whiten import activation_aware_tt, whitened_factors, whitened_svd

    use = use if use is not None else set(METHODS)
    fine = "codec" not in use

    out_f, in_f = matrix.shape
    c = (held if held is not None else gram).double()  # where errors are measured (fits use gram)
    w = matrix.double()
    norm2 = float(torch.einsum("oi,ij,oj->", w, c, w))

    def error(approx: torch.Tensor) -> float:
        e = w - approx.double().reshape(out_f, in_f)
        return float(torch.einsum("oi,ij,oj->", e, c, e)) / norm2 if norm2 > 0 else 0.0

    dense = out_f * in_f * itemsize
    options: list[Option] = []
    if "codec" in use:
        options += _gptq_options(t, matrix, gram, itemsize, error)
    if "svd" in use and fine:
        options += _whitened_options(matrix, gram, c, norm2, itemsize)
    rank, step = 1, 0
    factors = whitened_factors(matrix, gram) if "svd" in use and not fine else None
    while factors is not None and rank < min(out_f, in_f) and rank * (out_f + in_f) * itemsize <= MPO_MAX_SHARE * dense:
        tt = whitened_svd(matrix, gram, rank, factors=factors)
        base = {**_CLEAR, "bond_dim": rank, "cores": 2, "svd": "full"}
        options += _with_core_codecs(f"mpo2 bond {rank}", base, tt, error, itemsize, CORE_CODECS if step % 2 == 0 else CORE_CODECS[:2],
                                     matrix, gram)  # fmt: skip
        rank, step = max(rank + 1, int(rank * BOND_STEP)), step + 1
    for cores in MPO_CORES[1:] if "mpo" in use else ():
        modes = choose_modes(out_f, in_f, cores)
        bond, seen, cache, plain_cache = 1, set(), {}, {}
        while True:
            plain = tt_svd(matrix, *modes, max_bond=bond, svd="full", svd_cache=plain_cache)
            if plain.num_params * itemsize > (LOWRANK_ONLY_MAX_SHARE if fine else MPO_MAX_SHARE) * dense or tuple(plain.bond_dims) in seen:
                break
            seen.add(tuple(plain.bond_dims))
            tt = activation_aware_tt(matrix, gram, *modes, plain.bond_dims, cache=cache)
            base = {**_CLEAR, "bond_dim": bond, "cores": cores, "svd": "full"}
            options += _with_core_codecs(f"mpo{cores} bond {bond}", base, tt, error, itemsize, CORE_CODECS[:1] if fine else CORE_CODECS)
            bond = max(bond + 1, int(bond * (LOWRANK_ONLY_MPO_STEP if fine else MPO_BOND_STEP)))
    return options


def _gptq_options(t: torch.Tensor, matrix: torch.Tensor, gram: torch.Tensor, itemsize: int, error: Callable[[torch.Tensor], float]) -> list[Option]:
    """The codec options with recorded inputs: casts and pruning as without data, int8 and k-means by
    GPTQ (the k-means codebook weighted by each input's energy), each with its output error."""
    from mpocompress.codecs import Int8, KMeans, kmeans_1d_many
    from mpocompress.core.gptq import gptq

    dense = matrix.numel() * itemsize
    options = [Option(o.label, o.overrides, o.nbytes, error(_decoded_option(t, o))) for o in _alone(_codec_options, t, matrix.reshape(-1).double(), 1.0, itemsize)
               if not o.overrides.get("quantize", "").startswith(("int8", "kmeans")) or o.overrides.get("prune") != "none"]  # fmt: skip
    importance = torch.diagonal(gram).to(matrix.dtype)[None, :].expand_as(matrix)
    grids = [("int8", Int8(), Int8().grid(matrix))]
    cents = kmeans_1d_many(matrix.reshape(-1), [2**b for b in KMEANS_BITS], sample_weight=importance)
    grids += [(f"kmeans:{k}", KMeans(k), cents[k][0]) for k in sorted(cents)]
    for label, codec, grid in grids:
        q = gptq(matrix, gram, lambda col, q=codec, g=grid: q.snap(g, col))
        nbytes = sum(nbytes_of(x) for x in encode(q.reshape(t.shape), [codec], grid=grid)[0].values())
        if nbytes < dense:
            options.append(Option(label, {**_CLEAR, "quantize": label}, nbytes, error(q)))
    return options


def _whitened_options(matrix: torch.Tensor, gram: torch.Tensor, measure: torch.Tensor, norm2: float, itemsize: int) -> list[Option]:
    """Whitened SVD (2 cores, no codec) at every rank of the fine grid up to the dense bytes, each
    error from one decomposition: with ``W S = U diag(s) V^T`` and rows ``v_i`` of ``V^T S^{-1}``, the
    rank-``r`` error on inputs with Gram ``H`` is ``sum_{i>r} s_i^2 v_i H v_i^T`` (the ``U`` columns are
    orthonormal), so measuring on held-out inputs costs one product for every rank."""
    from mpocompress.core.whiten import whitened_factors

    out_f, in_f = matrix.shape
    _, s, right = whitened_factors(matrix, gram)
    per = s.pow(2) * torch.einsum("ri,ij,rj->r", right, measure, right)
    tail = torch.flip(torch.cumsum(torch.flip(per, [0]), 0), [0])
    options, rank = [], 1
    while rank < min(out_f, in_f) and rank * (out_f + in_f) <= LOWRANK_ONLY_MAX_SHARE * out_f * in_f:
        base = {**_CLEAR, "bond_dim": rank, "cores": 2, "svd": "full"}
        options.append(Option(f"mpo2 bond {rank}", base, rank * (out_f + in_f) * itemsize, float(tail[rank]) / norm2 if norm2 else 0.0))
        rank = max(rank + 1, int(rank * LOWRANK_ONLY_STEP))
    return options


def _with_core_codecs(label: str, base: dict[str, Any], tt: Any, error: Any, itemsize: int, codecs: tuple,
                      matrix: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> list[Option]:  # fmt: skip
    """An MPO option alone and with each codec on its cores (those that make it smaller); 2 cores with
    recorded inputs: quantized with error compensation where ``convert`` does it with data
    (:func:`mpocompress.jobs.plan.compensates`); 3+ cores: rounded (an upper bound of what ``convert``
    stores, as the fits here are)."""
    shape = tt.shape
    plain = tt.num_params * itemsize
    out = [Option(label, base, plain, error(tt.to_matrix()))]
    for codec in codecs[1:]:
        if gram is not None and len(tt.cores) == 2 and compensates(parse_codec(codec), 2):
            coded = gptq_factor_codes(matrix, tt, parse_codec(codec), gram)
            dec, nbytes = [decode(p, m) for p, m in coded], sum(nbytes_of(v) for p, _ in coded for v in p.values())
        else:
            ((dec, nbytes),) = _alone(_coded_cores, [list(tt.cores)], codec)
        if nbytes < plain:
            out.append(Option(f"{label} + {codec}", {**base, "quantize": codec}, nbytes, error(cores_to_matrix(dec, shape))))
    return out


def _decoded_option(t: torch.Tensor, option: Option) -> torch.Tensor:
    """A codec option's stored values (casts, pruning + k-means) as ``convert`` stores them."""
    chain = [parse_codec(c) for c in (option.overrides.get("prune"), option.overrides.get("quantize")) if c and c != "none"]
    return decode(*encode(t, chain))


