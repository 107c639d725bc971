import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)


class Zoo(nn.Module):
    """One of every layer kind the converter handles, with awkward sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(61, 24)
        self.fc = nn.Linear(24, 257)
        self.conv1 = nn.Conv1d(4, 12, 3)
        self.conv2 = nn.Conv2d(3, 16, (3, 5))
        self.lstm = nn.LSTM(20, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(20, 12)
        self.cell = nn.LSTMCell(10, 8)
        self.norm = nn.LayerNorm(257)
        self.bn = nn.BatchNorm1d(12)


@pytest.fixture
def zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo()


@pytest.fixture
def zoo_file(tmp_path, zoo):
    from safetensors.torch import save_file

    path = tmp_path / "zoo.safetensors"
    save_file({k: v.contiguous() for k, v in zoo.state_dict().items()}, str(path))
    return path


def low_rank(out_f: int, in_f: int, rank: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out_f, rank, generator=g, dtype=dtype)
    b = torch.randn(rank, in_f, generator=g, dtype=dtype)
    return a @ b / rank**0.5


@pytest.fixture
def trained_like(tmp_path):
    """A checkpoint whose matrices have decaying spectra, like trained weights."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, (o, i) in {"a.weight": (96, 160), "b.weight": (160, 96), "c.weight": (64, 64)}.items():
        u, _ = torch.linalg.qr(torch.randn(o, min(o, i), generator=g))
        v, _ = torch.linalg.qr(torch.randn(i, min(o, i), generator=g))
        s = torch.exp(-torch.arange(min(o, i)) / 8.0)
        sd[name] = (u * s) @ v.T
        sd[name.replace("weight", "bias")] = torch.randn(o, generator=g)
    path = tmp_path / "trained.safetensors"
    save_file(sd, str(path))
    return path
