"""MPO LSTM execution paths: a training step, a whole utterance, and streaming, against nn.LSTM.

    python benchmarks/rnn_paths.py          # ~1 min; writes benchmarks/results/rnn_paths.json

Model: the speech workbench's LSTM mask estimator (257 -> 256 -> LSTM 2 x 256 -> 257), dense and with
3-core MPO weights of bond 8 and 32 (``mpocompress.speech.models.build("lstm", mpo=MPOSpec(D))``), one
thread. Training step: Adam on 16 x 200-frame batches (mask MSE). Utterance: one 200-frame sequence,
no grad. Streaming: one frame per call with the state carried, no grad. The script also runs on older
commits (it only needs ``build`` and ``MPOSpec``), which is how docs/layers.md's before/after figures
were taken.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mpocompress.speech.models import MPOSpec, build  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "rnn_paths.json"


def per_call(fn, min_time: float = 2.0) -> float:
    for _ in range(3):
        fn()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < min_time or n < 5:
        fn()
        n += 1
    return (time.perf_counter() - t) / n


def measure(bond: int | None) -> dict:
    torch.manual_seed(0)
    model = build("lstm", mpo=MPOSpec(bond) if bond else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(16, 200, 257), torch.rand(16, 200, 257)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    train = per_call(step, 4.0)
    model.eval()
    utt = torch.randn(1, 200, 257)
    lstm = model.lstm  # batch-first: a frame is (1, 1, hidden)
    frames = torch.randn(200, 1, 1, lstm.input_size)

    def stream() -> None:
        state = None
        for t in range(40):
            _, state = lstm(frames[t], state)

    with torch.no_grad():
        utterance = per_call(lambda: model(utt))
        streaming = per_call(stream) / 40
    return {"bond": bond, "train_step_s": train, "utterance_ms": utterance * 1e3, "stream_us_per_frame": streaming * 1e6}


def main() -> None:
    torch.set_num_threads(1)
    rows = [measure(b) for b in (None, 8, 32)]
    for r in rows:
        name = "dense" if r["bond"] is None else f"MPO bond {r['bond']}"
        print(f"{name:>12}: train step {r['train_step_s']:.3f} s, "
              f"200-frame utterance {r['utterance_ms']:.1f} ms, streaming {r['stream_us_per_frame']:.0f} us/frame")  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
