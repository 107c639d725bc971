"""Speech-enhancement data: paired noisy/clean waveforms -> training batches; enhancing with a model.

Reading wav files goes through :mod:`mpocompress.io` (``paired_wavs``, ``read_wav``); everything here
works on arrays. A training batch is ``(features, target)``: log-power STFT features of the noisy
signal and the ideal ratio mask, both ``(batch, frames, bins)``, cut into fixed-length segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpocompress.errors import InputError
from mpocompress.speech.features import (
    DEFAULT_STFT,
    STFTConfig,
    apply_mask,
    ideal_ratio_mask,
    istft,
    log_power,
    stft,
)

#: frames per training segment (3.2 s at hop 256, 16 kHz)
SEGMENT_FRAMES = 200


def load_pairs(root: str | Path, sample_rate: int = 16000, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(noisy, clean)`` waveforms of a set folder (``noisy/``, ``clean/``), checked for rate and length."""
    from mpocompress.speech.wav import paired_wavs, read_wav

    out = []
    for noisy_path, clean_path in paired_wavs(Path(root))[:limit]:
        noisy, r1 = read_wav(noisy_path)
        clean, r2 = read_wav(clean_path)
        if r1 != sample_rate or r2 != sample_rate:
            raise InputError(f"{noisy_path}: sample rate {r1}/{r2} Hz, expected {sample_rate} (resample with sox)")
        n = min(len(noisy), len(clean))
        if abs(len(noisy) - len(clean)) > sample_rate // 100:
            raise InputError(f"{noisy_path}: {len(noisy)} samples but its clean file has {len(clean)}")
        out.append((noisy[:n], clean[:n]))
    return out


def utterance_features(noisy: np.ndarray, clean: np.ndarray, cfg: STFTConfig = DEFAULT_STFT) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-power features of ``noisy`` and the IRM target ``(frames, bins)`` (noise = noisy - clean)."""
    x = torch.as_tensor(noisy, dtype=torch.float32)
    s = torch.as_tensor(clean, dtype=torch.float32)
    spec_x, spec_s, spec_n = stft(x, cfg), stft(s, cfg), stft(x - s, cfg)
    return log_power(spec_x), ideal_ratio_mask(spec_s, spec_n)


def make_batches(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: STFTConfig = DEFAULT_STFT,
    batch_size: int = 16,
    segment: int = SEGMENT_FRAMES,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches ``(features, irm)`` of ``segment`` frames: every utterance is cut into
    consecutive segments (the last one zero-padded, with a zero mask target), shuffled with ``seed``."""
    xs, ys = [], []
    for noisy, clean in pairs:
        f, m = utterance_features(noisy, clean, cfg)
        for start in range(0, f.shape[0], segment):
            fx, my = f[start : start + segment], m[start : start + segment]
            if fx.shape[0] < segment // 4:
                continue
            pad = segment - fx.shape[0]
            if pad:
                fx = torch.cat([fx, fx.new_full((pad, fx.shape[1]), float(f.min()))])
                my = torch.cat([my, my.new_zeros((pad, my.shape[1]))])
            xs.append(fx)
            ys.append(my)
    if not xs:
        raise InputError("no utterance is long enough for a training segment")
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))
    batches = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batches.append((torch.stack([xs[j] for j in idx]), torch.stack([ys[j] for j in idx])))
    return batches


@torch.no_grad()
def enhance(model: nn.Module, noisy: np.ndarray, cfg: STFTConfig = DEFAULT_STFT) -> np.ndarray:
    """Run a mask model on one noisy waveform and resynthesise (noisy phase)."""
    was = model.training
    model.eval()
    try:
        x = torch.as_tensor(noisy, dtype=torch.float32)
        spec = stft(x, cfg)
        mask = model(log_power(spec).unsqueeze(0))[0]
        return istft(apply_mask(spec, mask), len(noisy), cfg).numpy()
    finally:
        model.train(was)


def folder_batches(root: str | Path, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches from a set folder (``noisy/``, ``clean/``): ``convert --task speech-enhancement``."""
    return make_batches(load_pairs(root), batch_size=batch_size)
