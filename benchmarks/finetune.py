"""Does refinement close the gap? TT-SVD alone vs + ALS vs + brief distillation, against magnitude
pruning at the same file size, on the bundled trained SE model, in one run.

    python benchmarks/finetune.py             # ~3 minutes on one thread
    python benchmarks/finetune.py --steps 60  # quicker, less trained

Model: the bundled example (``mpocompress/data/se_lstm.safetensors``, LSTM IRM estimator). Data: the
synthetic noisy-speech generator it was trained on (``mpocompress.speech.example``), fresh seeds: 32 training
batches and 4 held-out batches (checkpoint selection) of 8 one-second clips, and a separate test set of
8 batches on which every number below is measured.

For each target ratio (4x and 10x of the compressed layers' bytes), everything goes through
``mpocompress.jobs.convert.convert`` (the CLI's code path) and the written file is loaded back:

* MPO, 3 cores (the papers' structure) and ``--cores auto`` (ours): TT-SVD; + ALS (4 sweeps);
  + KD (ALS start, ``--steps`` Adam steps, distillation loss only).
* Magnitude pruning with a sparsity chosen so that the pruned layers take the same bytes
  (bitmask + fp32 values) as the 3-core MPO's: one-shot; + KD (one-shot then fine-tune with the mask);
  + IPKD (4 rounds, the same total steps).

Reported: test distillation error (MSE between the compressed and the dense model's masks), test task
error (MSE against the ideal ratio mask; the dense model's is shown for reference), the compressed
layers' bytes, and the file's bytes.

Writes ``benchmarks/results/finetune.json`` and the ``finetune`` block of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _docs import write_block  # noqa: E402

from mpocompress import MPOConfig, load_state_dict  # noqa: E402
from mpocompress.config import TuneConfig  # noqa: E402
from mpocompress.data import example_checkpoint  # noqa: E402
from mpocompress.jobs.convert import convert  # noqa: E402
from mpocompress.jobs.finetune import evaluate  # noqa: E402
from mpocompress.nn.surgery import load_compressed_  # noqa: E402
from mpocompress.speech.example import batches, se_lstm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_errors(model, teacher, test) -> tuple[float, float]:
    kd = evaluate(model, teacher, test, TuneConfig(kd_weight=1.0))
    task = evaluate(model, None, test, TuneConfig(kd_weight=0.0))
    return kd, task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0, 10.0])
    args = ap.parse_args()
    torch.set_num_threads(1)

    teacher = se_lstm()
    teacher.load_state_dict(load_state_dict(example_checkpoint()))
    teacher.eval()
    data = batches(n=36, batch=8, seed=2024)
    train, val = data[:32], data[32:]
    test = batches(n=8, batch=8, seed=4048)
    dense_kd, dense_task = test_errors(teacher, teacher, test)
    tune = TuneConfig(steps=args.steps, eval_every=20, lr=1e-3)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="mpo-ft-"))

    def run(method: str, stage: str, ratio: float, config: MPOConfig, tune_cfg: TuneConfig | None = None) -> dict:
        out = work / f"{len(rows)}.safetensors"
        t0 = time.perf_counter()
        extra = {}
        if tune_cfg is not None:
            extra = dict(tune=tune_cfg, model=se_lstm(), train_batches=train, val_batches=val)
        rep = convert(example_checkpoint(), out, config, **extra)
        seconds = time.perf_counter() - t0
        model = load_compressed_(se_lstm(), out) if config.mpo else _dense_model(out)
        kd, task = test_errors(model, teacher, test)
        layers_bytes = sum(r.bytes for r in rep.rows)
        row = {
            "method": method, "stage": stage, "ratio_target": ratio, "test_kd_mse": kd, "test_task_mse": task,
            "layers_bytes": layers_bytes, "layers_ratio": sum(r.dense_bytes for r in rep.rows) / layers_bytes,
            "file_bytes": rep.output_file_bytes, "seconds": round(seconds, 2),
            "mean_weight_error": sum(r.rel_error for r in rep.rows) / len(rep.rows),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    for ratio in args.ratios:
        for method, cores in (("MPO 3 cores", 3), ("MPO auto cores", "auto")):
            base = MPOConfig(ratio=ratio, cores=cores)
            mpo = run(method, "TT-SVD", ratio, base)
            als = MPOConfig(ratio=ratio, cores=cores, als_sweeps=4)
            run(method, "+ ALS", ratio, als)
            run(method, "+ ALS + KD", ratio, als, tune)
            if cores == 3:
                target = mpo["layers_bytes"]
        # magnitude pruning at the same bytes: n/8 (bitmask) + 4 nnz = target -> density
        dense = load_state_dict(example_checkpoint())
        n = sum(v.numel() for k, v in dense.items() if k.endswith("weight") or "weight_" in k)
        density = max((target - n / 8) / 4 / n, 0.0)
        sparsity = round(1 - density, 4)
        prune = MPOConfig(prune=f"magnitude:{sparsity}")
        run("magnitude pruning", "one-shot", ratio, prune)
        run("magnitude pruning", "+ KD", ratio, prune, tune)
        run("magnitude pruning", "+ IPKD (4 rounds)", ratio, prune, TuneConfig(steps=args.steps, eval_every=10, ipkd=4))

    result = {
        "machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "steps": args.steps, "dense_test_task_mse": dense_task, "dense_test_kd_mse": dense_kd, "rows": rows,
    }  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "finetune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        f"Bundled SE LSTM; test set of 8x8 fresh one-second clips; KD = {args.steps} Adam steps (lr 1e-3). "
        f"Dense model's test task MSE {dense_task:.4f}.",
        "",
        "| target | method | stage | layers' bytes | test KD MSE | test task MSE | mean weight error | time (s) |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ratio_target']:g}x | {r['method']} | {r['stage']} | {r['layers_bytes']:,} ({r['layers_ratio']:.1f}x) | "
            f"{r['test_kd_mse']:.5f} | {r['test_task_mse']:.4f} | {r['mean_weight_error']:.3f} | {r['seconds']:.1f} |"
        )
    write_block("finetune", "\n".join(lines))
    print(f"wrote {out}")


def _dense_model(path: Path):
    m = se_lstm()
    m.load_state_dict(load_state_dict(path))
    return m.eval()


if __name__ == "__main__":
    main()
