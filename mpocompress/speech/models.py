"""Reference speech-enhancement models from the seed papers, dense or with MPO layers from scratch.

All map log-power features ``(batch, frames, bins)`` to a mask in [0, 1] of the same shape (ideal
ratio mask target), are causal unless said otherwise, and train on two CPU cores in minutes at the
default sizes. ``mpo=MPOSpec(bond_dim, cores)`` builds their Linear and LSTM weights as MPO cores
from the start (the MPO paper trains the cores from scratch rather than decomposing a trained model).

* :class:`LSTMMask`: Linear -> LSTM x L -> Linear + sigmoid (the MPO and MPO-LSTM papers' LSTM model).
* :class:`MLPMask`: a frame with ``context`` past and future frames -> 3 hidden layers -> mask (the MPO
  paper's MLP with context frames; not causal when ``future > 0``).
* :class:`GCRN`: a small gated convolutional recurrent network (encoder of gated 2-D convolutions over
  frequency, LSTM bottleneck, gated transposed-convolution decoder with skip connections; as in the
  IPKD paper, reduced in size). Its convolutions stay dense with ``mpo`` (only Linear/LSTM are MPO).

Each model normalises its input with ``feature_mean``/``feature_std`` buffers set at training time and
stored with the weights, so a checkpoint alone is enough to run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpocompress.core.modes import bond_dims_for, choose_modes
from mpocompress.core.tt import TTMatrix
from mpocompress.nn.layers import MPOLSTM, MPOLinear, random_cores


@dataclass(frozen=True)
class MPOSpec:
    """MPO layers trained from scratch: ``cores`` cores per matrix, bonds capped at ``bond_dim``."""

    bond_dim: int
    cores: int = 3


def _structure(out_f: int, in_f: int, mpo: MPOSpec) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
    """``(out_modes, in_modes, bond_dims)`` of an ``(out_f, in_f)`` matrix under ``mpo``."""
    out_modes, in_modes = choose_modes(out_f, in_f, mpo.cores)
    return out_modes, in_modes, bond_dims_for(out_modes, in_modes, mpo.bond_dim)


def linear(in_f: int, out_f: int, mpo: MPOSpec | None) -> nn.Module:
    """``nn.Linear``, or an :class:`~mpocompress.nn.layers.MPOLinear` with random cores."""
    if mpo is None:
        return nn.Linear(in_f, out_f)
    return MPOLinear(in_f, out_f, *_structure(out_f, in_f, mpo))


def lstm(in_f: int, hidden: int, layers: int, mpo: MPOSpec | None) -> nn.Module:
    """Batch-first ``nn.LSTM``, or an :class:`~mpocompress.nn.layers.MPOLSTM` whose weight matrices are
    random MPO cores (each stacked 4-gate matrix one MPO, as in MPO-LSTM)."""
    rnn = nn.LSTM(in_f, hidden, num_layers=layers, batch_first=True)
    if mpo is None:
        return rnn
    tts = {}
    for name, p in rnn.named_parameters():
        if name.startswith("weight_"):
            out_f, in_f_ = p.shape
            cores = random_cores(out_f, in_f_, *_structure(out_f, in_f_, mpo), None, None)
            tts[name] = TTMatrix(cores, (out_f, in_f_))
    return MPOLSTM(rnn, tts)


class _Normalised(nn.Module):
    def __init__(self, bins: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(bins))
        self.register_buffer("feature_std", torch.ones(bins))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.feature_mean) / self.feature_std

    def set_normalisation(self, features: torch.Tensor) -> None:
        """Store the mean and std of training features (per frequency bin)."""
        flat = features.reshape(-1, features.shape[-1]).float()
        with torch.no_grad():
            self.feature_mean.copy_(flat.mean(0))
            self.feature_std.copy_(flat.std(0).clamp_min(1e-3))


class LSTMMask(_Normalised):
    """Causal LSTM mask estimator (MPO / MPO-LSTM papers)."""

    def __init__(self, bins: int = 257, hidden: int = 256, layers: int = 2, mpo: MPOSpec | None = None):
        super().__init__(bins)
        self.inp = linear(bins, hidden, mpo)
        self.lstm = lstm(hidden, hidden, layers, mpo)
        self.out = linear(hidden, bins, mpo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask ``(batch, frames, bins)`` from log-power features of the same shape."""
        h = torch.relu(self.inp(self.normalise(x)))
        h, _ = self.lstm(h)
        return torch.sigmoid(self.out(h))


class MLPMask(_Normalised):
    """MLP over a window of frames (``past`` before, ``future`` after), predicting the centre frame's mask."""

    def __init__(self, bins: int = 257, hidden: int = 512, past: int = 5, future: int = 0, mpo: MPOSpec | None = None):
        super().__init__(bins)
        self.past, self.future = past, future
        width = bins * (past + 1 + future)
        self.net = nn.Sequential(
            linear(width, hidden, mpo), nn.ReLU(),
            linear(hidden, hidden, mpo), nn.ReLU(),
            linear(hidden, hidden, mpo), nn.ReLU(),
            linear(hidden, bins, mpo), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask ``(batch, frames, bins)`` from log-power features of the same shape."""
        x = self.normalise(x)
        frames = x.shape[1]
        padded = nn.functional.pad(x, (0, 0, self.past, self.future))  # repeat nothing: zeros = mean
        window = padded.unfold(1, self.past + 1 + self.future, 1)  # (batch, frames, bins, window)
        window = window.permute(0, 1, 3, 2).reshape(x.shape[0], frames, -1)
        return self.net(window)


class _GatedConv(nn.Module):
    """Conv2d over (frames, frequency) with a sigmoid gate (GLU), causal in time (kernel 1 in time)."""

    def __init__(self, cin: int, cout: int, transpose: bool = False):
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.conv = conv(cin, 2 * cout, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1))
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return nn.functional.elu(self.norm(a * torch.sigmoid(b)))


class GCRN(_Normalised):
    """A small gated convolutional recurrent network (IPKD paper's family, reduced)."""

    def __init__(self, bins: int = 257, channels: tuple[int, ...] = (8, 16, 16), hidden: int = 128, mpo: MPOSpec | None = None):
        super().__init__(bins)
        self.bins = bins
        chans = (1, *channels)
        self.enc = nn.ModuleList(_GatedConv(chans[i], chans[i + 1]) for i in range(len(channels)))
        sizes = [bins]
        for _ in channels:
            sizes.append((sizes[-1] - 1) // 2 + 1)
        self.sizes = sizes
        flat = channels[-1] * sizes[-1]
        self.rnn_in = linear(flat, hidden, mpo)
        self.lstm = lstm(hidden, hidden, 1, mpo)
        self.rnn_out = linear(hidden, flat, mpo)
        self.dec = nn.ModuleList(
            _GatedConv(2 * chans[i + 1], chans[i] if i > 0 else 8, transpose=True) for i in reversed(range(len(channels)))
        )
        self.head = nn.Conv2d(8, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask ``(batch, frames, bins)`` from log-power features of the same shape."""
        b, t, _ = x.shape
        h = self.normalise(x).unsqueeze(1)  # (batch, 1, frames, bins)
        skips = []
        for enc in self.enc:
            h = enc(h)
            skips.append(h)
        c, f = h.shape[1], h.shape[3]
        r = torch.relu(self.rnn_in(h.permute(0, 2, 1, 3).reshape(b, t, c * f)))
        r, _ = self.lstm(r)
        h = self.rnn_out(r).reshape(b, t, c, f).permute(0, 2, 1, 3)
        for k, dec in enumerate(self.dec):
            skip = skips[-1 - k]
            h = dec(torch.cat([h, skip], dim=1))
            want = self.sizes[-2 - k]
            h = h[..., :want] if h.shape[-1] >= want else nn.functional.pad(h, (0, want - h.shape[-1]))
        return torch.sigmoid(self.head(h)).squeeze(1)


MODELS = {"lstm": LSTMMask, "mlp": MLPMask, "gcrn": GCRN}


def build(name: str, mpo: MPOSpec | None = None, **kwargs: object) -> nn.Module:
    """A reference model by name (``lstm``, ``mlp``, ``gcrn``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    return MODELS[name](mpo=mpo, **kwargs)


def lstm_mask() -> LSTMMask:
    """The default :class:`LSTMMask` (a ``--model`` factory)."""
    return LSTMMask()


def mlp_mask() -> MLPMask:
    """The default :class:`MLPMask` (a ``--model`` factory)."""
    return MLPMask()


def gcrn() -> GCRN:
    """The default :class:`GCRN` (a ``--model`` factory)."""
    return GCRN()
