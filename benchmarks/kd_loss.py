"""Distillation losses side by side in brief fine-tuning of a real model.

    python benchmarks/kd_loss.py convtasnet 0.0625 300 mse,stft

The ``--target-size`` conversion of ``benchmarks/calibrated.py`` (its data-free allocation at SHARE of
the file, sequential calibration on its calibration batches) followed by SECONDS of fine-tuning with
``--lr auto`` and each ``--kd-loss`` named; scored like calibrated.py (change from dense, paired 95 %
CI on its test set). Prints one JSON line per loss (the figures quoted in docs/methods.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrated as cb  # noqa: E402
import torch  # noqa: E402

from mpocompress import MPOConfig  # noqa: E402
from mpocompress.config import TuneConfig  # noqa: E402
from mpocompress.io import open_checkpoint  # noqa: E402


def main() -> None:
    name, share, seconds, losses = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(",")
    torch.set_num_threads(1)
    spec = cb.dev.models(cb.dev.fetch())[name]
    batches = cb.calibration_batches(name, spec, False)
    pairs = [(cb.read_wav(n)[0], cb.read_wav(c)[0]) for n, c in cb.paired_wavs(cb.WORK / "corpus" / "test")]
    test = cb.dev.tokenize(spec["folder"], cb.dev.sentences(60, 1)) if name == "minilm" else pairs
    src = spec["ckpt"]
    dense_outs = cb.dev.outputs(name, spec["build"](cb.load_state_dict(src)), test)
    base = cb.dev.dense_scores(name, dense_outs, test)
    with open_checkpoint(src) as ck:
        size = ck.nbytes_on_disk
    plan, _ = cb.plan_budget(src, int(size * share), MPOConfig(quantize="int8"))
    out = cb.WORK / "out-kd-loss"
    out.mkdir(exist_ok=True)
    for loss in losses:
        t0 = time.perf_counter()
        path = out / f"{name}-{share}-{loss}.safetensors"
        rep = cb.convert(src, path, plan.config, recipe=plan.recipe, force=True, model=spec["build"](cb.load_state_dict(src)),
                         train_batches=batches, tune=TuneConfig(steps=100_000, time=seconds, kd_loss=loss), sequential=True)  # fmt: skip
        sc = cb._score(name, spec, path, test, dense_outs, base)
        ft = rep.finetune or {}
        print(json.dumps({"model": name, "share": share, "kd_loss": loss, "diff": round(sc["diff"], 4),
                          "ci": [round(sc["low"], 4), round(sc["high"], 4)], "steps": ft.get("steps"), "lr": ft.get("lr"),
                          "lr_probe": ft.get("lr_probe"), "val_kd_loss": ft.get("val_kd_loss"),
                          "seconds": round(time.perf_counter() - t0)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
