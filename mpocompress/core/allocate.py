"""Allocating a size budget across layers: one rate-distortion curve per layer, one global choice.

Numerical core (no I/O). Each layer offers options (keep dense, a cast, int8, k-means at 2-8 bits,
MPO/SVD at several bonds alone or with quantized cores, magnitude pruning with k-means), each with
the bytes it stores and the damage it does. :func:`allocate` picks one option per layer so that the
total bytes fit the budget and the total damage is as small as the options allow.

The algorithm (our choice; the problem is a multiple-choice knapsack, as in bit allocation and rank
selection: Shoham and Gersho 1988; HAWQ-V3 solves it as an integer program, AIMET greedily): keep each
layer's Pareto front, then solve it two ways and keep the better: (1) a dynamic program over the budget
cut into ``DP_UNITS`` units (each option's bytes rounded *up*, so the answer always fits; optimal up to
that rounding), and (2) the Lagrangian/convex-hull greedy (start every layer at its smallest option,
apply the hull step with the most damage saved per byte that fits; the solutions of ``min damage +
lambda * bytes``). Whatever bytes are left go to the single upgrade that saves the most damage, until
none fits. Damages add across layers (a first-order model of the output error).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpocompress.errors import GateError

#: the dynamic program's resolution: the budget in this many units
DP_UNITS = 20_000


@dataclass(frozen=True)
class Option:
    """One way to store one layer.

    Attributes:
        label: what it is, e.g. ``"int8"``, ``"kmeans:16"``, ``"mpo3 bond 8 + int8"``, ``"dense"``.
        overrides: the per-layer config (``MPOConfig`` fields, or ``{"skip": True}`` for dense) that
            makes ``convert`` store exactly this.
        nbytes: bytes the layer's stored tensors take.
        error: relative squared error of what is stored (``||W - W'||^2 / ||W||^2``).
    """

    label: str
    overrides: dict[str, Any]
    nbytes: int
    error: float

    def to_dict(self) -> dict[str, Any]:
        """The option as JSON-ready data."""
        return {"label": self.label, "bytes": self.nbytes, "error": self.error, "overrides": dict(self.overrides)}


@dataclass
class Allocation:
    """The choice per layer and what it adds up to."""

    picks: dict[str, Option]
    damage: dict[str, float]
    nbytes: int
    budget: int
    smallest: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The allocation as JSON-ready data (stored in the report)."""
        return {
            "budget_bytes": self.budget,
            "allocated_bytes": self.nbytes,
            "smallest_bytes": self.smallest,
            "predicted_damage": sum(self.damage.values()),
            "layers": {n: {**o.to_dict(), "damage": self.damage[n]} for n, o in self.picks.items()},
            **self.extra,
        }


#: the kinds of error an option makes (:func:`family`)
FAMILIES = ("codec", "lowrank", "prune")


def family(option: Option) -> str:
    """The kind of error ``option`` makes, from its label: ``"lowrank"`` (MPO/SVD cores, their cores
    coded or not: the error lies in the directions the truncation drops), ``"prune"`` (magnitude
    pruning, then a codec: the small weights lost), or ``"codec"`` (a cast, int8 or k-means of the
    whole weight: an error spread over every entry; ``"dense"`` too)."""
    used = methods_of(option)
    if used & {"svd", "mpo"}:
        return "lowrank"
    return "prune" if "prune" in used else "codec"


#: what an option may be built from (``convert --methods``): a codec of the weight or of its cores
#: (a cast, int8, k-means), a 2-core MPO (truncated SVD), an MPO of 3+ cores, magnitude pruning
METHODS = ("codec", "svd", "mpo", "prune")
#: names that stand for several methods
METHOD_ALIASES = {"lowrank": ("svd", "mpo"), "all": METHODS}


def parse_methods(text: str) -> tuple[str, ...]:
    """``"svd,codec"`` -> ``("codec", "svd")`` (in :data:`METHODS` order; ``lowrank`` = svd + mpo).

    Raises:
        ValueError: an empty list or an unknown name.
    """
    chosen: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if part in METHODS:
            chosen.add(part)
        elif part in METHOD_ALIASES:
            chosen.update(METHOD_ALIASES[part])
        else:
            names = ", ".join((*METHODS, *METHOD_ALIASES))
            raise ValueError(f"unknown method {part!r} (choose from {names}, comma-separated)")
    return tuple(m for m in METHODS if m in chosen)


def methods_of(option: Option) -> set[str]:
    """What ``option`` is built from (its label's parts): ``"mpo3 bond 8 + int8"`` -> mpo and codec."""
    used = set()
    for part in option.label.split(" + "):
        if part.startswith("mpo"):
            used.add("svd" if part.startswith("mpo2 ") else "mpo")
        elif part.startswith("magnitude"):
            used.add("prune")
        elif part != "dense":
            used.add("codec")
    return used


def allowed(option: Option, methods: tuple[str, ...] | None) -> bool:
    """Whether ``option`` uses only ``methods`` (None: every method; keeping a layer dense always)."""
    return methods is None or methods_of(option) <= set(methods)


def pareto(options: list[Option], weight: float = 1.0) -> list[Option]:
    """The options no other option beats in both bytes and damage, by increasing bytes."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.error * weight)):
        if not front or o.error < front[-1].error:
            front.append(o)
    return front


def lower_hull(front: list[Option]) -> list[Option]:
    """The lower convex hull of a Pareto front in the (bytes, error) plane."""
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> o
            if (b.error - a.error) * (o.nbytes - a.nbytes) >= (o.error - a.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def allocate(curves: dict[str, list[Option]], budget: int, weights: dict[str, float] | None = None) -> Allocation:
    """One option per layer: total bytes <= ``budget``, least total weighted damage the options allow.

    Args:
        curves: each layer's options (at least one each).
        budget: bytes the layers may take together.
        weights: each layer's damage per unit of relative squared error (default 1: every layer's
            relative error counts alike).

    Raises:
        GateError: even the smallest option of every layer exceeds ``budget`` (the message says the
            smallest total reachable).
    """
    weights = weights or {}
    fronts = {n: pareto(opts, weights.get(n, 1.0)) for n, opts in curves.items()}
    smallest = sum(f[0].nbytes for f in fronts.values())
    if smallest > budget:
        raise GateError(f"the budget cannot be met: the smallest choice for every layer takes {smallest:,} bytes, "
                        f"over the {budget:,} bytes left for them")  # fmt: skip
    candidates = [_greedy(fronts, budget, weights), _knapsack(fronts, budget, weights)]
    picks = min((c for c in candidates if c is not None), key=lambda p: sum(o.error * weights.get(n, 1.0) for n, o in p.items()))
    picks = _spend_leftover(fronts, picks, budget, weights)
    used = sum(o.nbytes for o in picks.values())
    damage = {n: o.error * weights.get(n, 1.0) for n, o in picks.items()}
    return Allocation(picks=picks, damage=damage, nbytes=used, budget=budget, smallest=smallest)


def _greedy(fronts: dict[str, list[Option]], budget: int, weights: dict[str, float]) -> dict[str, Option]:
    """The convex-hull greedy: the Lagrangian solutions, walked in order of damage saved per byte."""
    hulls = {n: lower_hull(f) for n, f in fronts.items()}
    pos = dict.fromkeys(hulls, 0)
    used = sum(h[0].nbytes for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], pos[n]
        if i + 1 < len(h):
            saved = (h[i].error - h[i + 1].error) * weights.get(n, 1.0)
            heapq.heappush(heap, (-saved / max(h[i + 1].nbytes - h[i].nbytes, 1), n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        step = h[i + 1].nbytes - h[i].nbytes
        if used + step <= budget:  # a step that does not fit ends that layer's walk
            used += step
            pos[n] = i + 1
            push(n)
    return {n: hulls[n][pos[n]] for n in hulls}


def _knapsack(fronts: dict[str, list[Option]], budget: int, weights: dict[str, float]) -> dict[str, Option] | None:
    """The multiple-choice knapsack by dynamic programming over ``DP_UNITS`` units of the budget
    (bytes rounded up, so the result fits)."""
    units = min(DP_UNITS, budget)
    if units < 1:
        return None
    per_unit = budget / units
    names = list(fronts)
    best = np.full(units + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(names), units + 1), dtype=np.int32)
    for li, n in enumerate(names):
        new = np.full(units + 1, np.inf)
        for oi, o in enumerate(fronts[n]):
            cost = math.ceil(o.nbytes / per_unit - 1e-9)
            if cost > units:
                continue
            cand = best[: units + 1 - cost] + o.error * weights.get(n, 1.0)
            better = cand < new[cost:]
            new[cost:][better] = cand[better]
            choice[li, cost:][better] = oi
        best = new
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))
    picks = {}
    for li in range(len(names) - 1, -1, -1):
        o = fronts[names[li]][choice[li, c]]
        picks[names[li]] = o
        c -= math.ceil(o.nbytes / per_unit - 1e-9)
    return picks


def _spend_leftover(fronts: dict[str, list[Option]], picks: dict[str, Option], budget: int,
                    weights: dict[str, float]) -> dict[str, Option]:  # fmt: skip
    """Spend the bytes left on the single upgrade that saves the most damage, until none fits."""
    picks = dict(picks)
    used = sum(o.nbytes for o in picks.values())
    while True:
        best = None
        for n, front in fronts.items():
            cur = picks[n]
            for o in front:
                if o.nbytes > cur.nbytes and used - cur.nbytes + o.nbytes <= budget:
                    saved = (cur.error - o.error) * weights.get(n, 1.0)
                    if saved > 0 and (best is None or saved > best[0]):
                        best = (saved, n, o)
        if best is None:
            return picks
        _, n, o = best
        used += o.nbytes - picks[n].nbytes
        picks[n] = o
