"""How long ``--target-size`` takes to plan a ~100 MB checkpoint, beside ``convert --ratio 4`` on it.

    python benchmarks/budget_speed.py

On all-MiniLM-L6-v2 (91 MB, fetched as in ``real_checkpoint.py``), 1 thread, one run: the allocation
(measuring every layer's options and solving the knapsack, ``plan_budget``) at 12.5 % of the file, and
``convert --ratio 4``. Writes ``benchmarks/results/budget_speed.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from real_checkpoint import WORK, fetch  # noqa: E402

from mpocompress import MPOConfig  # noqa: E402
from mpocompress.jobs.budget import plan_budget  # noqa: E402
from mpocompress.jobs.convert import convert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    torch.set_num_threads(1)
    src = fetch()
    t0 = time.perf_counter()
    convert(src, WORK / "speed-ratio4.safetensors", MPOConfig(ratio=4), force=True)
    ratio4 = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan_budget(src, src.stat().st_size // 8, MPOConfig(quantize="int8"))
    plan = time.perf_counter() - t0
    out = {"input_bytes": src.stat().st_size, "convert_ratio4_seconds": ratio4, "plan_seconds": plan, "plan_vs_convert": plan / ratio4}
    (ROOT / "benchmarks" / "results" / "budget_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
