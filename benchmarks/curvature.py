"""``--curvature kfac`` against ``--curvature none`` on real third-party models, no training.

    python benchmarks/curvature.py                       # minilm resemblyzer convtasnet
    python benchmarks/curvature.py --models minilm

For each model of ``benchmarks/calibrated.py`` (its calibration batches and test sets): every weight
as a 2-core truncated SVD at ``--ratio 8`` (where the curvature applies to every linear/conv layer),
and the data-free ``--target-size`` allocations at 12.5 % and 6.25 % of the file, each calibrated
(``--steps 0``, the default sequential calibration) with the loss's curvature at each layer's
outputs (``kfac``) and without (``none``); the functional metric's change from dense with a paired
95 % CI. Prints one JSON line per conversion and writes ``benchmarks/results/curvature.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrated as cb  # noqa: E402
import torch  # noqa: E402

from mpocompress import MPOConfig  # noqa: E402
from mpocompress.config import TuneConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "curvature.json"


def run_model(name: str, shares: list[float]) -> dict:
    ref = cb.reference(name)
    spec, batches, test, dense_outs, base, size = (ref[k] for k in ("spec", "batches", "test", "dense_outs", "base", "size"))
    src = spec["ckpt"]
    settings = {"SVD ratio 8": (MPOConfig(ratio=8, cores=2), None)}
    for share in shares:
        plan, _ = cb.plan_budget(src, int(size * share), MPOConfig(quantize="int8"))
        settings[f"target {share:.2%}"] = (plan.config, plan.recipe)
    out = cb.WORK / "out-curvature"
    out.mkdir(exist_ok=True)
    res: dict = {"metric": spec["metric"]}
    for label, (config, recipe) in settings.items():
        res[label] = {}
        for curvature in ("none", "kfac"):
            t0 = time.perf_counter()
            path = out / f"{name}-{label.replace(' ', '_').replace('%', '')}-{curvature}.safetensors"
            rep = cb.convert(src, path, config, recipe=recipe, force=True, model=spec["build"](cb.load_state_dict(src)),
                             train_batches=batches, tune=TuneConfig(steps=0, curvature=curvature), sequential=True)  # fmt: skip
            sc = cb._score(name, spec, path, test, dense_outs, base)
            ft = rep.finetune or {}
            row = {"diff": sc["diff"], "low": sc["low"], "high": sc["high"], "bytes": sc["bytes"],
                   "val_kd_loss": (ft.get("val_kd_loss") or {}).get("compressed"), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            res[label][curvature] = row
            print(json.dumps({"model": name, "setting": label, "curvature": curvature, **row}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "resemblyzer", "convtasnet"])
    ap.add_argument("--shares", default="0.125,0.0625")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.models:
        results[name] = run_model(name, [float(s) for s in args.shares.split(",") if s])
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
