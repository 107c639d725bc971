"""Train the bundled example checkpoint: a small LSTM speech-enhancement mask estimator.

    python examples/train_example.py            # writes mpocompress/data/se_lstm.safetensors

The model follows the seeds' LSTM SE setup at toy scale: log-power STFT features (257 bins at 16 kHz,
512-point FFT, hop 256) -> Linear(257, 128) + ReLU -> LSTM(128, 128) -> Linear(128, 257) + sigmoid,
trained to predict the ideal ratio mask (IRM) with MSE. The data are synthetic so that nothing is
downloaded: harmonic "voiced" signals (random pitch glides, a formant-like spectral envelope, random
on/off segments) mixed with white, pink or brown noise at -5..15 dB SNR. Everything is seeded; the
settings and final losses are stored in the checkpoint's metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from mpocompress.speech.example import BINS, SELSTM, make_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "mpocompress" / "data" / "se_lstm.safetensors")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = SELSTM(hidden=args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    val_x, val_y = make_batch(32, args.seconds, torch.Generator().manual_seed(10_000 + args.seed))
    with torch.no_grad():
        mu, sd = val_x.mean(), val_x.std()
        model.feature_mean.fill_(float(mu))
        model.feature_std.fill_(float(sd))
    start = time.time()
    for step in range(1, args.steps + 1):
        x, y = make_batch(args.batch, args.seconds, g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                val = nn.functional.mse_loss(model(val_x), val_y).item()
            print(f"step {step} train {loss.item():.4f} val {val:.4f} ({time.time() - start:.0f}s)")
    with torch.no_grad():
        val = nn.functional.mse_loss(model(val_x), val_y).item()
        base = nn.functional.mse_loss(torch.full_like(val_y, float(val_y.mean())), val_y).item()
    from safetensors.torch import save_file

    sd_ = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {
        "made_by": "examples/train_example.py",
        "model": f"SELSTM(bins={BINS}, hidden={args.hidden})",
        "task": "IRM estimation from log-power STFT (16 kHz, n_fft 512, hop 256) on synthetic voiced speech + noise",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "val_mse": val,
        "val_mse_constant_baseline": base,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd_, str(args.out), metadata={"format": "pt", "training": json.dumps(meta)})
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
