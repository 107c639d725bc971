"""STFT features, ideal ratio masks and resynthesis for mask-based speech enhancement.

Numerical core, no I/O. Defaults follow the seed papers: 16 kHz audio, 512-point Hann-windowed FFT,
hop 256 (257 frequency bins), log-power input features, and an ideal ratio mask (IRM) target
``sqrt(|S|^2 / (|S|^2 + |N|^2))`` (Wang et al.; the MPO paper's target).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

EPS = 1e-8


@dataclass(frozen=True)
class STFTConfig:
    """How waveforms become spectra (stored with a trained model so evaluation uses the same)."""

    sample_rate: int = 16000
    n_fft: int = 512
    hop: int = 256
    window: str = "hann"

    def __post_init__(self) -> None:
        if self.n_fft < 2 or self.hop < 1 or self.hop > self.n_fft:
            raise ValueError(f"need n_fft >= 2 and 1 <= hop <= n_fft, got n_fft={self.n_fft}, hop={self.hop}")
        if self.window not in ("hann", "hamming"):
            raise ValueError(f"window must be 'hann' or 'hamming', got {self.window!r}")

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    def to_dict(self) -> dict[str, object]:
        """The settings as JSON-ready data."""
        return asdict(self)


#: the seed papers' setting: 16 kHz, 512-point FFT, hop 256, Hann (257 bins)
DEFAULT_STFT = STFTConfig()


def _window(cfg: STFTConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    fn = torch.hann_window if cfg.window == "hann" else torch.hamming_window
    return fn(cfg.n_fft, periodic=True, device=device, dtype=dtype)


def stft(wave: torch.Tensor, cfg: STFTConfig = DEFAULT_STFT) -> torch.Tensor:
    """Complex spectrum ``(..., frames, bins)`` of waveforms ``(..., samples)`` (centred frames)."""
    shape = wave.shape[:-1]
    x = wave.reshape(-1, wave.shape[-1]).float()
    spec = torch.stft(x, cfg.n_fft, cfg.hop, window=_window(cfg, x.device, x.dtype), center=True, return_complex=True)
    return spec.transpose(-1, -2).reshape(*shape, spec.shape[-1], spec.shape[-2])


def istft(spec: torch.Tensor, length: int, cfg: STFTConfig = DEFAULT_STFT) -> torch.Tensor:
    """Waveforms ``(..., length)`` from spectra ``(..., frames, bins)`` (inverse of :func:`stft`)."""
    shape = spec.shape[:-2]
    s = spec.reshape(-1, spec.shape[-2], spec.shape[-1]).transpose(-1, -2)
    x = torch.istft(s, cfg.n_fft, cfg.hop, window=_window(cfg, s.device, torch.float32), center=True, length=length)
    return x.reshape(*shape, length)


def log_power(spec: torch.Tensor) -> torch.Tensor:
    """``log(|X|^2 + eps)``: the models' input features."""
    return torch.log(spec.abs().square() + EPS)


def ideal_ratio_mask(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """IRM ``sqrt(|S|^2 / (|S|^2 + |N|^2))`` from the clean and noise spectra, in [0, 1]."""
    s2, n2 = clean.abs().square(), noise.abs().square()
    return torch.sqrt(s2 / (s2 + n2 + EPS))


def apply_mask(noisy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Enhanced spectrum: the mask scales the noisy magnitude, the noisy phase is kept."""
    return noisy * mask.to(noisy.real.dtype)


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``noise`` so that ``clean + noise`` has the given SNR. Returns ``(noisy, scaled noise)``."""
    noise = noise[..., : clean.shape[-1]]
    ps = clean.square().mean(-1, keepdim=True)
    pn = noise.square().mean(-1, keepdim=True).clamp_min(EPS)
    scaled = noise * torch.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    return clean + scaled, scaled
