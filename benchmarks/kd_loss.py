"""Distillation losses side by side in brief fine-tuning of a real model.

    python benchmarks/kd_loss.py convtasnet 0.0625 300 mse,stft
    python benchmarks/kd_loss.py convtasnet 0.125 300 mse,stft data    # the allocation with data

The ``--target-size`` conversion of ``benchmarks/calibrated.py`` (its data-free allocation at SHARE of
the file, or with ``data`` its allocation with data; sequential calibration on its calibration batches) followed by SECONDS of fine-tuning with
``--lr auto`` and each ``--kd-loss`` named; scored like calibrated.py (change from dense, paired 95 %
CI on its test set). Prints one JSON line per loss (the figures quoted in docs/methods.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrated as cb  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    name, share, seconds, values = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(",")
    torch.set_num_threads(1)
    with_data = len(sys.argv) > 5 and sys.argv[5] == "data"
    cb.finetune_variants(name, share, seconds, "kd_loss", values, "out-kd-loss", with_data)


if __name__ == "__main__":
    main()
