"""The bundled example's model and data: a small LSTM speech-enhancement mask estimator.

Used by ``examples/train_example.py`` (which trained ``se_lstm.safetensors``), by the tests and
benchmarks, and as the ``--model``/``--data`` factories of ``convert``'s fine-tuning::

    mpocompress convert "$(mpocompress example)" -o small.safetensors --ratio 4 \
        --model mpocompress.speech.example:se_lstm --data mpocompress.speech.example:batches --steps 100

Log-power STFT features (257 bins at 16 kHz, 512-point FFT, hop 256) -> Linear(257, 128) + ReLU ->
LSTM(128, 128) -> Linear(128, 257) + sigmoid, predicting the ideal ratio mask. The data are synthetic
so that nothing is downloaded: harmonic "voiced" signals (random pitch glides, a formant-like
spectral envelope, random on/off segments) mixed with white, pink or brown noise at -5..15 dB SNR.
Everything is seeded.
"""

from __future__ import annotations

import math

import torch

from mpocompress.speech.features import DEFAULT_STFT, ideal_ratio_mask, log_power, stft
from mpocompress.speech.models import LSTMMask

SR = DEFAULT_STFT.sample_rate
BINS = DEFAULT_STFT.bins  # 257
LN10 = math.log(10.0)


class SELSTM(LSTMMask):
    """The example's architecture: :class:`~mpocompress.speech.models.LSTMMask` with one LSTM layer of
    128 units and one scalar input normalisation (as the bundled checkpoint stores it)."""

    def __init__(self, bins: int = BINS, hidden: int = 128):
        super().__init__(bins, hidden, layers=1)
        # the checkpoint was trained with one mean and std over all bins
        self.register_buffer("feature_mean", torch.zeros(1))
        self.register_buffer("feature_std", torch.ones(1))


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
    """(log10-power features, IRM targets), each (batch, frames, 257), through
    :mod:`mpocompress.speech.features` (the example was trained on log10 power)."""
    n = int(SR * seconds)
    feats, masks = [], []
    for _ in range(batch):
        clean = _voiced(n, g)
        noise = _noise(n, g)
        snr = -5 + 20 * float(torch.rand(1, generator=g))
        noise = noise * (clean.norm() / (noise.norm() * 10 ** (snr / 20) + 1e-8))
        feats.append(log_power(stft(clean + noise)) / LN10)
        masks.append(ideal_ratio_mask(stft(clean), stft(noise)))
    return torch.stack(feats), torch.stack(masks)


def se_lstm() -> SELSTM:
    """``--model`` factory: the architecture of the bundled example checkpoint (untrained)."""
    return SELSTM()


def batches(n: int = 24, batch: int = 8, seconds: float = 1.0, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--data`` factory: ``n`` seeded batches of (features, IRM targets), each ``(batch, frames, 257)``.

    The default seed differs from the one the example was trained with, so these are fresh data.
    """
    g = torch.Generator().manual_seed(seed)
    return [make_batch(batch, seconds, g) for _ in range(n)]
