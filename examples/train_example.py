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
import math
import time
from pathlib import Path

import torch
from torch import nn

SR = 16000
N_FFT = 512
HOP = 256
BINS = N_FFT // 2 + 1  # 257


class SELSTM(nn.Module):
    """Causal LSTM mask estimator: (batch, frames, 257) log-power -> (batch, frames, 257) mask."""

    def __init__(self, bins: int = BINS, hidden: int = 128):
        super().__init__()
        self.inp = nn.Linear(bins, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, bins)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(torch.relu(self.inp(feats)))
        return torch.sigmoid(self.out(h))


def _voiced(n: int, g: torch.Generator) -> torch.Tensor:
    t = torch.arange(n) / SR
    f0 = 90 + 160 * torch.rand(1, generator=g)
    glide = 1 + 0.2 * torch.sin(2 * math.pi * torch.rand(1, generator=g) * 3 * t)
    phase = 2 * math.pi * torch.cumsum(f0 * glide, 0) / SR
    formants = 300 + 2500 * torch.rand(3, generator=g)
    sig = torch.zeros(n)
    for h in range(1, 40):
        fh = f0 * h
        if fh > SR / 2 - 200:
            break
        amp = sum(torch.exp(-((fh - f) / 250) ** 2) for f in formants) + 0.02
        sig += amp * torch.sin(h * phase)
    # syllable-like on/off envelope
    env = (torch.sin(2 * math.pi * (2 + 3 * torch.rand(1, generator=g)) * t + 6 * torch.rand(1, generator=g)) > -0.3).float()
    env = torch.nn.functional.avg_pool1d(env[None, None], 161, 1, 80)[0, 0]
    return sig * env


def _noise(n: int, g: torch.Generator) -> torch.Tensor:
    white = torch.randn(n, generator=g)
    kind = int(torch.randint(3, (1,), generator=g))
    if kind == 0:
        return white
    spec = torch.fft.rfft(white)
    f = torch.arange(spec.numel()).clamp(min=1).float()
    spec = spec / f ** (0.5 if kind == 1 else 1.0)  # pink or brown
    return torch.fft.irfft(spec, n)


def make_batch(batch: int, seconds: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-power features, IRM targets), each (batch, frames, 257)."""
    n = int(SR * seconds)
    feats, masks = [], []
    win = torch.hann_window(N_FFT)
    for _ in range(batch):
        clean = _voiced(n, g)
        noise = _noise(n, g)
        snr = -5 + 20 * float(torch.rand(1, generator=g))
        noise = noise * (clean.norm() / (noise.norm() * 10 ** (snr / 20) + 1e-8))
        c = torch.stft(clean, N_FFT, HOP, window=win, return_complex=True).abs() ** 2
        v = torch.stft(noise, N_FFT, HOP, window=win, return_complex=True).abs() ** 2
        x = torch.stft(clean + noise, N_FFT, HOP, window=win, return_complex=True).abs() ** 2
        feats.append(torch.log10(x + 1e-8).T)
        masks.append(torch.sqrt(c / (c + v + 1e-8)).T)
    return torch.stack(feats), torch.stack(masks)


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
    start = time.time()
    for step in range(1, args.steps + 1):
        x, y = make_batch(args.batch, args.seconds, g)
        loss = nn.functional.mse_loss(model((x - mu) / sd), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                val = nn.functional.mse_loss(model((val_x - mu) / sd), val_y).item()
            print(f"step {step} train {loss.item():.4f} val {val:.4f} ({time.time() - start:.0f}s)")
    with torch.no_grad():
        val = nn.functional.mse_loss(model((val_x - mu) / sd), val_y).item()
        base = nn.functional.mse_loss(torch.full_like(val_y, float(val_y.mean())), val_y).item()
    from safetensors.torch import save_file

    sd_ = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd_["feature_mean"] = mu.reshape(1)
    sd_["feature_std"] = sd.reshape(1)
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
