"""Peak memory and throughput of converting generated checkpoints of 1, 2 and 4 GB, in one run.

    python benchmarks/scale.py                 # about 10 minutes on 2 cores, 7 GB of scratch disk
    python benchmarks/scale.py --sizes 0.25 0.5 --scratch /tmp/x    # a quick look

For each size, a safetensors checkpoint of 8192 x 8192 float32 weights (256 MiB each, with a bias
each) is generated with a fixed seed, then converted by ``mpocompress convert --bond-dim 32 --cores 2``
(a randomized truncated SVD per weight, the same-size SVD reference beside it) into a sharded folder,
with 1 and 2 worker processes. Each run is a subprocess; its process tree's resident memory (the sum
of VmRSS over the process and its children, sampled every 20 ms from /proc) gives the peak. The peer
is what tools without streaming do first: ``safetensors.torch.load_file`` of the whole checkpoint
(every tensor summed, so its pages are read; peak memory measured the same way). The 1- and 2-worker outputs are compared byte for byte.

Writes ``benchmarks/results/scale.json`` and the ``scale`` block of ``docs/benchmarks.md``.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _docs import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIDE = 8192
CONVERT = ["--bond-dim", "32", "--cores", "2", "--max-shard-size", "1GB"]


def generate(path: Path, gib: float, seed: int = 0) -> int:
    """Write a checkpoint of about ``gib`` GiB, one tensor at a time (never whole in memory)."""
    from safetensors.torch import save_file

    from mpocompress.io import pack_safetensors

    n = max(1, round(gib * 1024**3 / (SIDE * SIDE * 4)))
    g = torch.Generator().manual_seed(seed)
    parts = []
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for k in range(n):
            part = Path(tmp) / f"{k}.safetensors"
            # low rank plus noise, so the SVD has structure to find
            u = torch.randn(SIDE, 64, generator=g)
            v = torch.randn(64, SIDE, generator=g)
            w = (u @ v) / 64 + 0.05 * torch.randn(SIDE, SIDE, generator=g)
            save_file({f"layers.{k}.weight": w, f"layers.{k}.bias": torch.randn(SIDE, generator=g)}, str(part))
            parts.append(part)
            del u, v, w
        pack_safetensors(parts, path, {"format": "pt"})
    return path.stat().st_size


def tree_rss(pid: int) -> int:
    """Sum of VmRSS (bytes) of ``pid`` and all its descendants."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and the peak resident memory of its process tree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": seconds, "peak_rss_bytes": peak, "stdout": out}


def files_equal(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="checkpoint sizes in GiB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scratch", type=Path, help="folder for the generated checkpoints (default: a temporary one)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mpo-scale-", dir=args.scratch))
    rows = []
    try:
        for gib in args.sizes:
            ckpt = scratch / f"ckpt-{gib:g}G.safetensors"
            t0 = time.perf_counter()
            size = generate(ckpt, gib)
            print(f"generated {ckpt.name}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            load = measure([sys.executable, "-c",
                            "import sys; from safetensors.torch import load_file; "
                            "sd = load_file(sys.argv[1]); print(sum(float(t.float().sum()) for t in sd.values()))", str(ckpt)])  # fmt: skip
            row = {"gib": gib, "input_bytes": size, "load_file_peak_rss_bytes": load["peak_rss_bytes"],
                   "load_file_seconds": load["seconds"], "runs": []}  # fmt: skip
            outs = []
            for n in args.workers:
                out = scratch / f"out-{gib:g}G-w{n}"
                res = measure([sys.executable, "-m", "mpocompress", "convert", str(ckpt), "-o", str(out),
                               *CONVERT, "--workers", str(n), "--json"])  # fmt: skip
                report = json.loads(res["stdout"])
                run = {
                    "workers": n,
                    "seconds": res["seconds"],
                    "mb_per_s": size / 1e6 / res["seconds"],
                    "peak_rss_bytes": res["peak_rss_bytes"],
                    "peak_rss_vs_load_file": res["peak_rss_bytes"] / load["peak_rss_bytes"],
                    "ratio": report["totals"]["ratio"],
                    "max_rel_error": report["totals"]["max_rel_error"],
                    "groups": report["work"]["groups"],
                }
                row["runs"].append(run)
                outs.append(out)
                print(f"{gib:g} GiB, {n} worker(s): {run['seconds']:.0f}s, {run['mb_per_s']:.0f} MB/s, "
                      f"peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB (load_file: "
                      f"{load['peak_rss_bytes'] / 2**20:.0f} MiB)", file=sys.stderr)  # fmt: skip
            row["outputs_identical"] = all(files_equal(outs[0], o) for o in outs[1:])
            rows.append(row)
            ckpt.unlink()
            for o in outs:
                shutil.rmtree(o)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "convert_args": CONVERT,
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / "scale.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "Command: `python benchmarks/scale.py` (results: `benchmarks/results/scale.json`). Checkpoints of "
        f"{SIDE}x{SIDE} float32 weights, `mpocompress convert {' '.join(CONVERT)} --workers N`; peak RSS is "
        "the sum over the process tree; the peer column is `safetensors.torch.load_file` of the whole "
        f"checkpoint. Machine: {os.cpu_count()} CPUs.",
        "",
        "| checkpoint | workers | seconds | MB/s | peak RSS (MiB) | load_file peak (MiB) | peak / load_file | identical output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for run in r["runs"]:
            lines.append(
                f"| {r['input_bytes'] / 1e9:.2f} GB | {run['workers']} | {run['seconds']:.0f} | {run['mb_per_s']:.0f} | "
                f"{run['peak_rss_bytes'] / 2**20:.0f} | {r['load_file_peak_rss_bytes'] / 2**20:.0f} | "
                f"{run['peak_rss_vs_load_file']:.2f} | {'yes' if r['outputs_identical'] else 'NO'} |"
            )
    write_block("scale", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
