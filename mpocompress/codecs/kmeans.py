"""``kmeans:K`` -- PQ of PP+PQ (Chen et al. 2019): per-tensor k-means weight sharing.

``K`` float32 centroids and packed ``ceil(log2 K)``-bit indices. The centroids are the optimal 1-D
k-means (a dynamic program, then Lloyd to convergence: see :func:`kmeans_1d`); PP+PQ does not say
how its k-means is solved, so this is our choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpocompress.codecs.base import Codec, register
from mpocompress.codecs.packing import pack_bits, unpack_bits

#: the dynamic program runs on at most this many weighted points (contiguous groups of sorted
#: values), or KMEANS_POINTS_PER_CLUSTER per centroid where that is more, but not over
#: KMEANS_DP_MAX_POINTS; up to twice as many distinct values are clustered exactly, without grouping.
#: 16 points per centroid (256 at k = 16, 4096 at k = 256) keep every tensor of benchmarks/kmeans.py
#: within 1 % of the optimum after the Lloyd pass (its table)
KMEANS_DP_POINTS = 256
KMEANS_POINTS_PER_CLUSTER = 16
KMEANS_DP_MAX_POINTS = 4096


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

    has_grid = True

    def encode(
        self, values: torch.Tensor, rows: int | None = None, grid: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A codebook of ``k`` centroids (``grid``: those of :meth:`grid`) and the packed index of each value."""
        if grid is None:
            centroids, codes = kmeans_1d(values.reshape(-1), self.k)
        else:
            centroids, codes = grid.float(), _nearest(values.reshape(-1), grid.float())
        bits = max(1, math.ceil(math.log2(self.k)))
        return {"codebook": centroids, "codes": pack_bits(codes, bits)}, {"bits": bits, "n": values.numel()}

    def grid(self, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """The ``k`` centroids of the values, each value counted with its ``importance`` (e.g. the
        energy of the input it multiplies) when given: optimal weighted 1-D k-means."""
        return kmeans_1d_many(matrix.reshape(-1), [self.k], sample_weight=importance)[self.k][0]

    def snap(self, grid: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        """Each value of ``column`` replaced by its nearest centroid."""
        return grid.to(column.dtype)[_nearest(column, grid)].reshape(column.shape)

    def decode(self, parts: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """The flat values :meth:`encode` stored, in ``dtype``."""
        codes = unpack_bits(parts["codes"], meta["bits"], meta["n"])
        return parts["codebook"][codes].to(dtype)


@register
@dataclass(frozen=True)
class RowKMeans(Codec):
    """Weight sharing per output row: each row has its own ``k`` centroids (2..256, float16) and each
    value is replaced by the nearest of its row's. A per-channel lookup table, as in SqueezeLLM (Kim et
    al. 2024): it follows rows whose ranges differ (conv channels, attention heads) where one codebook
    for the tensor cannot, at ``2 k`` bytes per row on top of the codes."""

    k: int
    name = "rowkmeans"
    kind = "quantizer"
    arg = "K"
    parts = ("codebook", "codes")

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and 2 <= self.k <= 256):
            raise ValueError(f"rowkmeans K must be an integer in 2..256, got {self.k}")

    has_grid = True

    def encode(
        self, values: torch.Tensor, rows: int | None = None, grid: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Each row's codebook (``grid``: those of :meth:`grid`) and the packed index of each value
        (``rows``: how many rows the flat values make; one row for a pruned tensor's kept values)."""
        flat = values.reshape(-1)
        r = rows if rows and flat.numel() % rows == 0 else 1
        m = flat.reshape(r, -1)
        book = self.grid(m) if grid is None else grid
        if book.shape[0] != r:
            raise ValueError(f"a rowkmeans grid of {book.shape[0]} rows for {r} rows")
        codes = _nearest_in_rows(m, book)
        bits = max(1, math.ceil(math.log2(self.k)))
        return {"codebook": book, "codes": pack_bits(codes.reshape(-1), bits)}, {"bits": bits, "n": flat.numel()}

    def grid(self, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's ``k`` sorted centroids, ``(rows, k)``: optimal 1-D k-means of the row (each value
        counted with its ``importance`` when given), all rows in one batched program; float16 unless a
        centroid is out of its range (then float32)."""
        m = matrix.reshape(matrix.shape[0], -1)
        w = None if importance is None else importance.reshape(m.shape)
        problems = [KMeansProblem(m[i], (self.k,), sample_weight=None if w is None else w[i]) for i in range(m.shape[0])]
        book = torch.stack([res[self.k][0] for res in kmeans_1d_solve(problems)]) if problems else torch.zeros(0, self.k)
        half = book.half()
        return half if bool(torch.isfinite(half).all()) else book.float()

    def snap(self, grid: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        """Values laid out with the rows along the last dimension (one column of the matrix, or its
        transpose), each replaced by the nearest centroid of its row."""
        rows = grid.shape[0]
        xt = column.reshape(-1, rows).T
        return grid.to(column.dtype).gather(1, _nearest_in_rows(xt, grid)).T.reshape(column.shape)

    def decode(self, parts: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """The flat values :meth:`encode` stored, in ``dtype``."""
        book = parts["codebook"]
        codes = unpack_bits(parts["codes"], meta["bits"], meta["n"]).reshape(book.shape[0], -1)
        return book.gather(1, codes).reshape(-1).to(dtype)


def _nearest_in_rows(m: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """For each value of the ``(rows, n)`` matrix ``m``, the index of the nearest of its row's sorted
    centroids ``book`` (``(rows, k)``)."""
    c = book.double()
    mid = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mid, m.double().contiguous())


def kmeans_1d(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal 1-D k-means (least squared error), deterministic. Returns ``(centroids, codes)``:
    ``k`` sorted float32 centroids (repeated when there are fewer distinct values) and each value's index.

    The sorted values are grouped into contiguous weighted points (``KMEANS_POINTS_PER_CLUSTER`` per
    centroid, between ``KMEANS_DP_POINTS`` and ``KMEANS_DP_MAX_POINTS``), an exact dynamic program
    (Wang and Song 2011, Ckmeans.1d.dp, with the divide-and-conquer speed-up of Gronlund et al. 2017)
    clusters those, and Lloyd iterations on the sorted raw values (prefix sums: ``O(k log n)`` each)
    run until no boundary moves. With no grouping (up to twice as many distinct values as points) the
    result is the exact optimum; with grouping it was within 1 % of it on every tensor tried (normal,
    Laplace, Student-t(2), mixtures, k = 4..256; ``tests/test_codecs.py``, ``benchmarks/kmeans.py``).
    """
    return kmeans_1d_many(values, [k])[int(k)]


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for each value."""
    c = centroids.double()
    return torch.bucketize(values.double().reshape(-1), (c[1:] + c[:-1]) / 2)


def kmeans_1d_many(
    values: torch.Tensor | np.ndarray,
    ks: list[int],
    *,
    errors_only: bool = False,
    sample_weight: torch.Tensor | None = None,
    presorted: bool = False,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | dict[int, float]:
    """:func:`kmeans_1d` for several ``k`` at once: one sort, one grouping and one dynamic program
    (its level ``j`` is the optimal ``j``-cluster solution), then Lloyd per ``k``. With
    ``errors_only``, each ``k``'s sum of squared errors instead, from prefix sums of the sorted values
    (no pass over the values per ``k``). ``sample_weight``: a non-negative weight per value (the
    weighted squared error is minimised; not with ``errors_only``). ``presorted``: ``values`` (a
    float64 numpy array, with ``errors_only``) are already sorted, so no sort is needed."""
    return kmeans_1d_solve([KMeansProblem(values, tuple(ks), errors_only, sample_weight, presorted)])[0]


@dataclass(frozen=True)
class KMeansProblem:
    """One tensor to cluster for :func:`kmeans_1d_solve`: the arguments of :func:`kmeans_1d_many`."""

    values: torch.Tensor | np.ndarray
    ks: tuple[int, ...]
    errors_only: bool = False
    sample_weight: torch.Tensor | None = None
    presorted: bool = False

    def __post_init__(self) -> None:
        if not self.ks:
            raise ValueError("a k-means problem needs at least one k")
        if self.presorted and (not self.errors_only or self.sample_weight is not None):
            raise ValueError("presorted values are for errors_only without sample weights")
        if self.sample_weight is not None and self.errors_only:
            raise ValueError("errors_only takes no sample_weight")


def kmeans_1d_solve(problems: list[KMeansProblem]) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]] | dict[int, float]]:
    """:func:`kmeans_1d_many` of each problem, their dynamic programs solved together (one vectorized
    program over all of them: many small tensors, such as MPO cores, or several layers' weights, cost
    little more than the largest alone). Each result is that of :func:`kmeans_1d_many` on its own."""
    ks = [sorted({max(1, int(k)) for k in p.ks}) for p in problems]
    jobs = [_Sorted.of(p.values, p.sample_weight, kk, p.presorted) for p, kk in zip(problems, ks)]
    need = [j for j in jobs if j.big]
    ends: list[dict[int, np.ndarray]] = []
    for chunk in _chunks(need):
        ends += _dp_boundaries_batch([(j.means, j.weights) for j in chunk], [j.big for j in chunk])
    for job, e in zip(need, ends):
        job.ends = e
    return [job.finish(kk, p.errors_only) for job, kk, p in zip(jobs, ks, problems)]


#: the batched program keeps one argmin per level and point: at most this many in one batch
_DP_BATCH_ENTRIES = 1 << 24


def _chunks(jobs: list[_Sorted]) -> list[list[_Sorted]]:
    """``jobs`` in batches whose program tables (levels x points) stay bounded."""
    out: list[list[_Sorted]] = []
    size = 0
    k = max((j.big[-1] for j in jobs), default=1)
    for job in jobs:
        entries = (k + 1) * (job.means.size + 1)
        if out and size + entries <= _DP_BATCH_ENTRIES:
            out[-1].append(job)
            size += entries
        else:
            out.append([job])
            size = entries
    return out


@dataclass
class _Sorted:
    """One tensor's sorted values, their prefix sums and the weighted points its program clusters."""

    v: torch.Tensor
    s: np.ndarray
    prefix: np.ndarray
    cum_w: np.ndarray
    bounds: np.ndarray
    uniq: np.ndarray
    means: np.ndarray
    weights: np.ndarray
    big: list[int]
    ends: dict[int, np.ndarray] | None = None

    @classmethod
    def of(cls, values: torch.Tensor | np.ndarray, sample_weight: torch.Tensor | None, ks: list[int], presorted: bool) -> _Sorted:
        """Sort (unless ``presorted``), group into at most the program's points, prefix sums."""
        v = torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(-1)) if presorted else values.reshape(-1).double()
        ws = None
        if sample_weight is None:
            s = v.numpy() if presorted else np.sort(v.cpu().numpy())
        else:
            sw = sample_weight.reshape(-1).double().clamp(min=0)
            if sw.numel() != v.numel():
                raise ValueError(f"{sw.numel()} sample weights for {v.numel()} values")
            sw = sw + 1e-6 * float(sw.mean()) if float(sw.sum()) > 0 else torch.ones_like(sw)
            order = np.argsort(v.cpu().numpy(), kind="stable")
            s = v.cpu().numpy()[order]
            ws = sw.cpu().numpy()[order]
        first = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]])) if s.size else np.zeros(0, dtype=np.int64)
        uniq = s[first]
        prefix = np.concatenate([[0.0], np.cumsum(s if ws is None else ws * s)])
        cum_w = np.arange(s.size + 1, dtype=np.float64) if ws is None else np.concatenate([[0.0], np.cumsum(ws)])
        bounds = np.concatenate([first, [s.size]])  # groups of equal values ...
        points = max(KMEANS_DP_POINTS, min(KMEANS_POINTS_PER_CLUSTER * ks[-1], KMEANS_DP_MAX_POINTS))
        if uniq.size > 2 * points:  # (up to twice that many: exact) ... or runs of sorted values, cut both at
            # quantiles and at evenly spaced values, so no group holds many values nor spans a wide range (the tails)
            half = points // 2
            at_quantiles = s[np.linspace(0, s.size - 1, half + 1).astype(np.int64)[1:-1]]
            scale = _median_abs(s) or 1.0  # evenly spaced in asinh(v / scale): linear near
            at_values = scale * np.sinh(np.linspace(np.arcsinh(s[0] / scale), np.arcsinh(s[-1] / scale), half + 1)[1:-1])  # 0, log in the tails
            cut = np.searchsorted(s, np.concatenate([at_quantiles, at_values]))
            bounds = np.unique(np.concatenate([[0], cut, [s.size]]))
        weights = np.diff(cum_w[bounds])
        means = (prefix[bounds[1:]] - prefix[bounds[:-1]]) / np.where(weights > 0, weights, 1.0)
        big = [k for k in ks if uniq.size > k] if s.size else []
        return cls(v, s, prefix, cum_w, bounds, uniq, means, weights, big)

    def finish(self, ks: list[int], errors_only: bool) -> dict:
        """Lloyd from the program's clusters for each ``k``: centroids and codes, or squared errors."""
        device = self.v.device
        if self.s.size == 0:
            if errors_only:
                return dict.fromkeys(ks, 0.0)
            return {k: (torch.zeros(k, device=device), torch.zeros(0, dtype=torch.int64, device=device)) for k in ks}
        s, prefix, out = self.s, self.prefix, {}
        squares = np.concatenate([[0.0], np.cumsum(s * s)]) if errors_only else None
        for k in ks:
            if self.uniq.size <= k:
                c = np.concatenate([self.uniq, np.full(k - self.uniq.size, self.uniq[-1])])
            else:
                c = _lloyd_sorted(s, prefix, self.bounds[self.ends[k]], self.cum_w)
            cent = torch.from_numpy(c).to(device)
            if errors_only:  # the float32 centroids, as stored; sorted values fall into contiguous clusters
                c32 = cent.float().double().numpy()
                cut = np.concatenate([[0], np.searchsorted(s, (c32[1:] + c32[:-1]) / 2, side="left"), [s.size]])
                n_j, s1, s2 = np.diff(cut), np.diff(prefix[cut]), np.diff(squares[cut])
                out[k] = float(np.sum(s2 - 2 * c32 * s1 + n_j * c32 * c32))
            else:
                out[k] = (cent.float(), torch.bucketize(self.v, (cent[1:] + cent[:-1]) / 2))
        return out


def kth_smallest_abs(s: np.ndarray, k: int) -> float:
    """The ``k``-th smallest (0-based) of ``|s|`` for sorted ``s``, without sorting the magnitudes:
    they are the merge of the negatives reversed and the rest, and a rank in two sorted runs is
    found by bisection (``O(log n)``)."""
    neg = int(np.searchsorted(s, 0.0, side="left"))
    a, b = -s[:neg][::-1], s[neg:]  # both ascending
    lo, hi = max(0, k + 1 - b.size), min(k + 1, a.size)  # how many of the k + 1 smallest come from a
    while lo < hi:
        i = (lo + hi) // 2
        if a[i] < b[k - i]:  # a[i] is among the k + 1 smallest: take more from a
            lo = i + 1
        else:
            hi = i
    return float(max(a[lo - 1] if lo > 0 else -np.inf, b[k - lo] if k - lo >= 0 else -np.inf))


def _median_abs(s: np.ndarray) -> float:
    """``np.median(np.abs(s))`` of sorted ``s``."""
    n = s.size
    return kth_smallest_abs(s, n // 2) if n % 2 else 0.5 * (kth_smallest_abs(s, n // 2 - 1) + kth_smallest_abs(s, n // 2))


def _dp_boundaries(x: np.ndarray, w: np.ndarray, ks: int | list[int]) -> np.ndarray | dict[int, np.ndarray]:
    """Optimal clustering of sorted weighted points into ``k`` contiguous clusters: the ``k + 1``
    cluster boundaries (indices into ``x``, from 0 to ``len(x)``); for a list of ``k``, a dict of them
    (one program: its level ``j`` is the optimal ``j``-cluster solution)."""
    many = not isinstance(ks, int)
    wanted = sorted(set(ks)) if many else [ks]
    (result,) = _dp_boundaries_batch([(x, w)], [wanted])
    return result if many else result[wanted[0]]


def _dp_boundaries_batch(problems: list[tuple[np.ndarray, np.ndarray]], wanted: list[list[int]]) -> list[dict[int, np.ndarray]]:
    """:func:`_dp_boundaries` of several problems (sorted points ``x``, weights ``w``; the ``k`` wanted
    of each) in one program.

    ``D_j(i) = min_a D_{j-1}(a) + cost(a, i)``; the best ``a`` is non-decreasing in ``i`` (the cost is
    Monge) and in ``j`` (a ``j``-th cluster can only move the last boundary right), so each level is
    solved by divide and conquer between the previous level's argmin and the interval's bounds, all
    intervals of all problems at one depth at once in numpy. Problem ``b`` owns the slots
    ``base_b .. base_b + m_b`` (its prefix sums restart there), so no candidate crosses problems.
    """
    k = max(max(ws) for ws in wanted)
    sizes = np.array([x.size for x, _ in problems], dtype=np.int64)
    levels = np.array([max(ws) for ws in wanted], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(sizes + 1)[:-1]])
    slots = int((sizes + 1).sum())

    def restart(values: np.ndarray) -> np.ndarray:  # per-problem prefix sums, laid out by slot
        return np.concatenate([np.concatenate([[0.0], np.cumsum(v)]) for v in values])

    p1 = restart([w * x for x, w in problems])
    p2 = restart([w * x * x for x, w in problems])
    pw = restart([w for _, w in problems])
    owner_base = np.repeat(base, sizes + 1)

    prev = np.maximum(p2 - p1 * p1 / np.where(pw > 0, pw, 1.0), 0.0)  # one cluster over the first i points
    arg = np.zeros((k + 1, slots), dtype=np.int32 if slots < 2**31 else np.int64)
    arg[1] = owner_base
    for j in range(2, k + 1):
        cur = np.full(slots, np.inf)
        q = prev - p2  # D_{j-1}(a) + cost(a, i) = q[a] + p2[i] - (p1[i] - p1[a])^2 / (pw[i] - pw[a])
        live = (sizes >= j) & (levels >= j)
        # intervals of slots lo..hi whose best a lies in olo..ohi
        lo, hi, olo, ohi = base[live] + j, base[live] + sizes[live], base[live] + j - 1, base[live] + sizes[live] - 1
        while lo.size:
            mid = (lo + hi) // 2
            stop = np.minimum(mid - 1, ohi)
            start = np.minimum(np.maximum(olo, arg[j - 1, mid]), stop)
            lens = stop - start + 1
            offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
            a = np.arange(int(lens.sum())) + np.repeat(start - offsets, lens)
            sw = np.repeat(pw[mid], lens)  # (in place below: these arrays are the program's bulk)
            sw -= pw[a]  # > 0: every point weighs something
            s1 = np.repeat(p1[mid], lens)
            s1 -= p1[a]
            s1 *= s1
            s1 /= sw
            vals = q[a]
            vals += np.repeat(p2[mid], lens)
            vals -= s1
            minima = np.minimum.reduceat(vals, offsets)
            at = np.where(vals <= np.repeat(minima, lens), a, slots)
            best = np.minimum.reduceat(at, offsets)  # the leftmost best of each interval
            cur[mid], arg[j, mid] = minima, best
            lo, hi, olo, ohi = (np.concatenate(pair) for pair in ((lo, mid + 1), (mid - 1, hi), (olo, best), (best, ohi)))
            keep = lo <= hi
            lo, hi, olo, ohi = lo[keep], hi[keep], olo[keep], ohi[keep]
        prev = cur
    results = []
    for b, ws in enumerate(wanted):
        result = {}
        for kk in sorted(set(ws)):
            ends = [int(base[b] + sizes[b])]
            for j in range(kk, 1, -1):
                ends.append(int(arg[j, ends[-1]]))
            ends.append(int(base[b]))
            result[kk] = np.array(ends[::-1]) - base[b]
        results.append(result)
    return results


def _lloyd_sorted(s: np.ndarray, prefix: np.ndarray, starts: np.ndarray, cum_w: np.ndarray, max_iters: int = 1000) -> np.ndarray:
    """Lloyd iterations on sorted values from cluster boundaries ``starts`` (k + 1 indices into ``s``)
    until no boundary moves; returns the sorted centroids (``prefix``/``cum_w``: prefix sums of the
    weighted values and of the weights)."""
    cuts = starts.copy()
    for _ in range(max_iters):
        counts = np.diff(cum_w[cuts])
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        c = np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)
        c = _fill_empty(c, s)
        new = np.concatenate([[0], np.searchsorted(s, (c[1:] + c[:-1]) / 2, side="right"), [s.size]])
        if np.array_equal(new, cuts):
            break
        cuts = new
    return c


def _fill_empty(c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Give empty clusters (NaN) the value of their nearest non-empty neighbour, keeping the order."""
    if not np.isnan(c).any():
        return c
    c = c.copy()
    for i in range(c.size):
        if np.isnan(c[i]):
            c[i] = c[i - 1] if i > 0 else s[0]
    return c
