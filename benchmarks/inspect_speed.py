"""`inspect` against `convert --ratio 4` on the same real checkpoint, in one run (1 thread).

    python benchmarks/inspect_speed.py

A user reported `inspect` taking 3-4x as long as `convert --ratio 4` on a 512 MB checkpoint. This
times both, as the library calls the CLI makes, on all-MiniLM-L6-v2 (fetched as in
``real_checkpoint.py``), and on the same checkpoint with inspect at 2 and 4 cores. Writes
``benchmarks/results/inspect.json`` and the ``inspect`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _docs import write_block  # noqa: E402
from real_checkpoint import WORK, fetch  # noqa: E402

from mpocompress.config import MPOConfig  # noqa: E402
from mpocompress.jobs.convert import convert  # noqa: E402
from mpocompress.jobs.inspect import inspect_checkpoint as inspect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = fetch()
    t0 = time.perf_counter()
    convert(src, WORK / "inspect-bench.safetensors", MPOConfig(ratio=4), force=True)
    convert_s = time.perf_counter() - t0
    rows = {}
    for cores in (3, 2, 4):
        t0 = time.perf_counter()
        result = inspect(src, cores=cores)
        rows[cores] = {"seconds": time.perf_counter() - t0, "layers": len(result["layers"])}
        print(f"inspect --cores {cores}: {rows[cores]['seconds']:.1f} s; convert --ratio 4: {convert_s:.1f} s", flush=True)
    out = {"torch": torch.__version__, "input_bytes": src.stat().st_size, "convert_ratio4_seconds": convert_s,
           "inspect": {str(k): v for k, v in rows.items()}}  # fmt: skip
    path = ROOT / "benchmarks" / "results" / "inspect.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| command | seconds | vs convert --ratio 4 |", "|---|---|---|", f"| convert --ratio 4 | {convert_s:.1f} | 1.00x |"]
    lines += [f"| inspect --cores {k} | {v['seconds']:.1f} | {v['seconds'] / convert_s:.2f}x |" for k, v in rows.items()]
    table = "\n".join(lines)
    print(table)
    if not args.no_docs:
        write_block(
            "inspect",
            f"Command: `python benchmarks/inspect_speed.py` (all-MiniLM-L6-v2, {src.stat().st_size / 1e6:.0f} MB, 1 thread, "
            f"one run).\n\n{table}",
        )


if __name__ == "__main__":
    main()
