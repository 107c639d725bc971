"""The ``--lr auto`` probe against training at fixed rates, in brief fine-tuning of a real model.

    python benchmarks/lr_probe.py convtasnet 0.0625 300 auto,0.001 data

The ``--target-size`` conversion of ``benchmarks/calibrated.py`` (its data-free allocation at SHARE of
the file, or with ``data`` its allocation with data; sequential calibration on its calibration
batches) followed by SECONDS of fine-tuning with the distillation loss ``--kd-loss auto`` picks, at
each rate named (``auto``: the probe, which spends part of the seconds choosing); scored like
calibrated.py (change from dense, paired 95 % CI on its test set). Prints one JSON line per rate
(the figures quoted in docs/methods.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrated as cb  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    name, share, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    rates = [None if v == "auto" else float(v) for v in sys.argv[4].split(",")]
    torch.set_num_threads(1)
    with_data = len(sys.argv) > 5 and sys.argv[5] == "data"
    cb.finetune_variants(name, share, seconds, "lr", rates, "out-lr-probe", with_data, kd_loss_auto=True)


if __name__ == "__main__":
    main()
