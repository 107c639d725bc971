"""Optimal 1-D k-means against the exact optimum and against the old 25 Lloyd iterations.

    python benchmarks/kmeans.py

For 60,000 seeded values of several distributions (normal, Laplace, Student-t(2), a two-scale mixture)
and k = 4, 16, 64, 256 (every k groups the values: 60,000 is over twice the program's points): the
squared error of ``mpocompress.codecs.kmeans_1d`` and of the k-means this project used before
(quantile initialisation, 25 Lloyd iterations), each divided by the exact optimum (the dynamic
program on all values, no grouping); the time for 1 M values at k = 256; and the time of 200 tensors
of 20,000 values at k = 16 clustered one by one and in one batched program
(``kmeans_1d_solve``). Writes ``benchmarks/results/kmeans.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpocompress.codecs.kmeans import KMeansProblem, _dp_boundaries, kmeans_1d, kmeans_1d_solve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def old_kmeans(v: torch.Tensor, k: int, iters: int = 25) -> float:
    """The previous method: centroids at quantiles, 25 Lloyd iterations. Returns its squared error."""
    v = v.reshape(-1).double()
    c = torch.quantile(v, torch.linspace(0, 1, k + 2, dtype=torch.float64)[1:-1])
    for _ in range(iters):
        c, _ = torch.sort(c)
        codes = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, v)
        counts = torch.bincount(codes, minlength=k).double()
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if torch.allclose(new, c):
            c = new
            break
        c = new
    c, _ = torch.sort(c)
    return float((v - c[torch.bucketize(v, (c[1:] + c[:-1]) / 2)]).square().sum())


def main() -> None:
    torch.set_num_threads(1)
    n = 60_000
    rows = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        dists = {
            "normal": torch.randn(n, generator=g),
            "laplace": torch.randn(n, generator=g).sign() * torch.rand(n, generator=g).log().neg(),
            "student-t2": torch.randn(n, generator=g) / torch.randn(n, 2, generator=g).square().mean(1).sqrt(),
            "mixture": torch.cat([torch.randn(n // 2, generator=g) * 0.01, torch.randn(n // 2, generator=g) * 2 + 3]),
        }
        for name, v in dists.items():
            s = np.sort(v.double().numpy())
            for k in (4, 16, 64, 256):
                ends = _dp_boundaries(s, np.ones_like(s), k)
                optimum = sum(float(((s[a:b] - s[a:b].mean()) ** 2).sum()) for a, b in zip(ends[:-1], ends[1:]))
                c, codes = kmeans_1d(v, k)
                ours = float((v.double() - c.double()[codes]).square().sum())
                rows.append({"seed": seed, "dist": name, "k": k, "ours_over_optimum": ours / optimum,
                             "old_over_optimum": old_kmeans(v, k) / optimum})  # fmt: skip
    big = torch.randn(1_000_000, generator=torch.Generator().manual_seed(9))
    t0 = time.perf_counter()
    kmeans_1d(big, 256)
    seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(10)
    many = [torch.randn(20_000, generator=g) * (1 + i % 7) for i in range(200)]
    t0 = time.perf_counter()
    for v in many:
        kmeans_1d(v, 16)
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    kmeans_1d_solve([KMeansProblem(v, (16,)) for v in many])
    batched = time.perf_counter() - t0
    summary = {
        "worst_ours_over_optimum": max(r["ours_over_optimum"] for r in rows),
        "old_over_optimum_by_k": {k: [min(r["old_over_optimum"] for r in rows if r["k"] == k),
                                      max(r["old_over_optimum"] for r in rows if r["k"] == k)] for k in (4, 16, 64, 256)},
        "seconds_1M_k256": seconds,
        "seconds_200x20k_k16_one_by_one": one_by_one,
        "seconds_200x20k_k16_batched": batched,
    }  # fmt: skip
    (ROOT / "benchmarks" / "results" / "kmeans.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
