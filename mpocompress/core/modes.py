"""Factorizing a matrix shape into per-core modes, padding awkward sizes.

Pure Python, no torch. An (out, in) matrix becomes ``d`` cores; core ``k`` carries the mode pair
(``out_modes[k]``, ``in_modes[k]``) with ``prod(out_modes) >= out`` and ``prod(in_modes) >= in``.
Modes are as balanced as possible with the large modes in the middle, where TT bond dimensions are
largest anyway (the ordering used in the MPO papers of Gao et al.). A size that factors badly
(a prime such as 257, or 30522 = 2*3*5087) is padded with zero rows/columns to a nearby size that
factors well; the true size is recorded and cropped on reconstruction.
"""

from __future__ import annotations

import math
from functools import lru_cache

#: largest relative padding considered (25 %)
MAX_PAD = 0.25
#: a size whose best split has a largest mode above this multiple of ``n ** (1/d)`` is padded
PAD_ABOVE_IMBALANCE = 2.0


@lru_cache(maxsize=4096)
def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """The ``d`` factors of ``n`` (ascending, 1s allowed) with the smallest largest factor.

    Ties are broken by the smallest sum of squares (the most even split).

    >>> balanced_factors(600, 3)
    (6, 10, 10)
    """
    if n < 1 or d < 1:
        raise ValueError(f"need n >= 1 and d >= 1, got n={n}, d={d}")
    best: tuple[int, ...] | None = None
    best_key: tuple[int, int] | None = None

    def search(rest: int, k: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best, best_key
        if k == 1:
            if rest >= lo:
                cand = acc + (rest,)
                key = (rest, sum(f * f for f in cand))
                if best_key is None or key < best_key:
                    best, best_key = cand, key
            return
        # factors are non-decreasing, so f**k <= rest
        f = lo
        while f**k <= rest:
            if rest % f == 0:
                search(rest // f, k - 1, f, acc + (f,))
            f += 1

    search(n, d, 1, ())
    assert best is not None  # n itself with 1s always works
    return best


def middle_heavy(factors: tuple[int, ...]) -> tuple[int, ...]:
    """Arrange factors so that the largest sit in the middle: (2, 3, 5, 7) -> (2, 5, 7, 3)."""
    s = sorted(factors)
    left: list[int] = []
    right: list[int] = []
    for i, f in enumerate(s):
        (left if i % 2 == 0 else right).append(f)
    return tuple(left + right[::-1])


def imbalance(n: int, d: int) -> float:
    """Largest balanced factor of ``n`` divided by the ideal ``n ** (1/d)`` (1.0 = perfect)."""
    return balanced_factors(n, d)[-1] / n ** (1.0 / d)


@lru_cache(maxsize=4096)
def padded_size(n: int, d: int) -> int:
    """The size ``>= n`` to pad ``n`` to before splitting it over ``d`` modes.

    A size that splits acceptably (``imbalance(n, d) <= PAD_ABOVE_IMBALANCE``; every power of two
    does) is left alone. Otherwise this minimises ``imbalance(m, d) * (m / n) ** 2`` over
    ``n <= m <= n * (1 + MAX_PAD)``: padding costs parameters, an unbalanced split costs bond
    capacity. 257 -> 294 = 6*7*7 for 3 cores; 30522 -> 30720 = 30*32*32.
    """
    if d == 1 or n <= 1 or imbalance(n, d) <= PAD_ABOVE_IMBALANCE:
        return n
    hi = max(n, math.floor(n * (1 + MAX_PAD)))
    return min(range(n, hi + 1), key=lambda m: (imbalance(m, d) * (m / n) ** 2, m))


def choose_modes(out_features: int, in_features: int, cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-core (out_modes, in_modes) for an (out_features, in_features) matrix.

    ``cores == 2`` gives ``((out, 1), (1, in))``: the interleaved unfolding is then the matrix itself,
    so a 2-core MPO is exactly a truncated SVD. More cores split both sizes, padded where needed.

    >>> choose_modes(600, 600, 3)
    ((6, 10, 10), (6, 10, 10))
    >>> choose_modes(257, 512, 2)
    ((257, 1), (1, 512))
    """
    if cores < 2:
        raise ValueError(f"cores must be >= 2, got {cores}")
    if out_features < 1 or in_features < 1:
        raise ValueError(f"matrix sizes must be >= 1, got ({out_features}, {in_features})")
    if cores == 2:
        return (out_features, 1), (1, in_features)
    out_modes = middle_heavy(balanced_factors(padded_size(out_features, cores), cores))
    in_modes = middle_heavy(balanced_factors(padded_size(in_features, cores), cores))
    return out_modes, in_modes


def full_ranks(out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> list[int]:
    """Largest possible interior bond dimensions (rank bounds of the unfoldings)."""
    sizes = [o * i for o, i in zip(out_modes, in_modes)]
    ranks = []
    for k in range(1, len(sizes)):
        ranks.append(min(math.prod(sizes[:k]), math.prod(sizes[k:])))
    return ranks


def bond_dims_for(out_modes: tuple[int, ...], in_modes: tuple[int, ...], max_bond: int) -> list[int]:
    """Interior bond dimensions of a TT-SVD capped at ``max_bond`` (assuming full numerical rank)."""
    return [min(max_bond, r) for r in full_ranks(out_modes, in_modes)]


def mpo_params(out_modes: tuple[int, ...], in_modes: tuple[int, ...], bond_dims: list[int]) -> int:
    """Number of parameters in cores of shape (r[k-1], out_modes[k], in_modes[k], r[k])."""
    r = [1, *bond_dims, 1]
    return sum(r[k] * o * i * r[k + 1] for k, (o, i) in enumerate(zip(out_modes, in_modes)))


def max_bond_for_budget(out_modes: tuple[int, ...], in_modes: tuple[int, ...], budget: int) -> int:
    """Largest uniform max bond whose MPO has at most ``budget`` parameters (at least 1)."""
    hi = max(full_ranks(out_modes, in_modes), default=1)
    lo = 1
    if mpo_params(out_modes, in_modes, bond_dims_for(out_modes, in_modes, hi)) <= budget:
        return hi
    # invariant: params(lo) <= budget or lo == 1; params(hi) > budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mpo_params(out_modes, in_modes, bond_dims_for(out_modes, in_modes, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
