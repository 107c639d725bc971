"""TT-SVD speed and accuracy: mpocompress vs TensorLy's ``tensor_train_matrix``, one thread, one run.

    python benchmarks/convert.py                 # full grid (1024^2 and 4096^2), ~10 min on 2 cores
    python benchmarks/convert.py --sizes 1024    # quick

Same matrices, same modes, same bond dimensions for every method. The matrices have a power-law
spectrum (s_i = i^-0.7, random singular vectors), which is how trained weights decay, unlike Gaussian
noise. Methods:

* ``ours-full``        mpocompress ``tt_svd(svd="full")`` (LAPACK gesdd, truncate)
* ``ours-auto``        mpocompress default: randomized SVD (Halko et al., 8 power iterations) where
                       the bond is small next to the unfolding, full otherwise
* ``tensorly``         ``tensor_train_matrix(svd="truncated_svd")`` (TensorLy's default)
* ``tensorly-rand``    ``tensor_train_matrix(svd="randomized_svd")``

Writes ``benchmarks/results/convert.json`` and the table in ``docs/benchmarks.md`` (between the
``convert`` markers). Ratios are tensorly time / our time (> 1: we are faster) and our error /
tensorly error (<= 1: we are at least as accurate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import tensorly as tl  # noqa: E402
import torch  # noqa: E402
from _docs import write_block  # noqa: E402
from tensorly.decomposition import tensor_train_matrix  # noqa: E402

from mpocompress.core.modes import choose_modes  # noqa: E402
from mpocompress.core.tt import cores_to_matrix, relative_error, tt_svd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def power_law_matrix(n: int, seed: int = 0, alpha: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.arange(1, n + 1, dtype=torch.float32) ** -alpha
    return (u * s) @ v.T


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_point(w: torch.Tensor, cores: int, bond: int) -> dict:
    n = w.shape[0]
    om, im = choose_modes(n, n, cores)
    row = {"n": n, "cores": cores, "bond": bond, "out_modes": list(om), "in_modes": list(im)}
    for label, svd in (("ours-full", "full"), ("ours-auto", "auto")):
        tt, dt = timed(lambda svd=svd: tt_svd(w, om, im, max_bond=bond, svd=svd))
        row[label] = {"seconds": dt, "rel_error": relative_error(w, tt.to_matrix()), "params": tt.num_params}
    tensor = w.reshape(*om, *im)
    with tl.backend_context("pytorch"):
        for label, svd in (("tensorly", "truncated_svd"), ("tensorly-rand", "randomized_svd")):
            rank = [1] + [bond] * (cores - 1) + [1]
            ttm, dt = timed(lambda svd=svd, rank=rank: tensor_train_matrix(tensor, rank, svd=svd, random_state=0))
            approx = cores_to_matrix(list(ttm.factors))
            row[label] = {"seconds": dt, "rel_error": relative_error(w, approx), "params": sum(f.numel() for f in ttm.factors)}
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| n | cores | bond | ours-full s | ours-auto s | tensorly s | tensorly-rand s | speed-up auto vs tensorly | speed-up full vs tensorly | err ours-full | err ours-auto | err tensorly | err tensorly-rand | err ratio auto/tensorly |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['cores']} | {r['bond']} | {r['ours-full']['seconds']:.3f} | {r['ours-auto']['seconds']:.3f} | "
            f"{r['tensorly']['seconds']:.3f} | {r['tensorly-rand']['seconds']:.3f} | "
            f"{r['tensorly']['seconds'] / r['ours-auto']['seconds']:.1f}x | {r['tensorly']['seconds'] / r['ours-full']['seconds']:.1f}x | "
            f"{r['ours-full']['rel_error']:.4f} | {r['ours-auto']['rel_error']:.4f} | {r['tensorly']['rel_error']:.4f} | "
            f"{r['tensorly-rand']['rel_error']:.4f} | {r['ours-auto']['rel_error'] / r['tensorly']['rel_error']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="TT-SVD: mpocompress vs tensorly")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--bonds", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--cores", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.sizes:
        w = power_law_matrix(n)
        for cores in args.cores:
            for bond in args.bonds:
                row = run_point(w, cores, bond)
                rows.append(row)
                print(
                    f"n={n} cores={cores} bond={bond}: auto {row['ours-auto']['seconds']:.3f}s err {row['ours-auto']['rel_error']:.4f} | "
                    f"full {row['ours-full']['seconds']:.3f}s err {row['ours-full']['rel_error']:.4f} | "
                    f"tensorly {row['tensorly']['seconds']:.3f}s err {row['tensorly']['rel_error']:.4f}",
                    flush=True,
                )
    env = {
        "torch": torch.__version__,
        "tensorly": tl.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    out = ROOT / "benchmarks" / "results" / "convert.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    meta = (
        f"Command: `python benchmarks/convert.py` (torch {env['torch']}, tensorly {env['tensorly']}, "
        f"{env['threads']} thread, {env['machine']}). Matrices with power-law spectrum s_i = i^-0.7."
    )
    if not args.no_docs:
        write_block("convert", f"{meta}\n\n{markdown(rows)}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
