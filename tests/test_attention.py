"""Transformers run compressed: nn.MultiheadAttention (packed and separate projections), its out_proj
(an nn.Linear subclass), and nn.Linear subclasses in general."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from mpocompress import MPOConfig
from mpocompress.cli import main
from mpocompress.jobs.decompress import load_state_dict
from mpocompress.nn.layers import MPOLinear, MPOMultiheadAttention
from mpocompress.nn.surgery import _supported, compress_, load_compressed_


def _encoder(seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def test_a_transformer_encoder_converts_and_runs_with_its_cores(tmp_path):
    src, out = tmp_path / "enc.safetensors", tmp_path / "enc.mpo.safetensors"
    save_file({k: v.contiguous() for k, v in _encoder().state_dict().items()}, str(src))
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--ratio", "2", "--json"])
    assert res.exit_code == 0, res.output
    model = load_compressed_(_encoder(1), out)
    attn = model.layers[0].self_attn
    assert isinstance(attn, MPOMultiheadAttention) and attn.is_mpo("in_proj_weight")
    assert isinstance(attn.out_proj, MPOLinear)
    dense = _encoder(2)
    dense.load_state_dict(load_state_dict(out))
    x = torch.randn(3, 7, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        for kwargs in ({}, {"mask": mask, "is_causal": True}):
            assert torch.allclose(model(x, **kwargs), dense(x, **kwargs), atol=1e-5)
    model.train()
    model(x).sum().backward()  # trains through the cores
    assert attn.cores_of("in_proj_weight")[0].grad is not None


def test_separate_q_k_v_projections():
    import copy

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True).eval()
    reference = copy.deepcopy(mha)
    holder = nn.Module()
    holder.attn = mha
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 6, 8), torch.randn(2, 6, 12)
    rows = compress_(holder, MPOConfig(bond_dim=3, cores=2))
    assert {r["name"] for r in rows if r["status"] == "mpo"} >= {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"}
    with torch.no_grad():
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            getattr(reference, name).copy_(holder.attn.matrix(name))
        reference.out_proj.weight.copy_(holder.attn.out_proj.weight)
        assert torch.allclose(holder.attn(q, k, v)[0], reference(q, k, v)[0], atol=1e-5)


class _Scaled(nn.Linear):
    def forward(self, x):  # computes differently from nn.Linear: must not become an MPOLinear
        return 2 * super().forward(x)


class _Plain(nn.Linear):
    pass


@pytest.mark.parametrize("cls, ok", [(nn.Linear, True), (_Plain, True), (_Scaled, False)])
def test_linear_subclasses_are_compressed_only_when_they_compute_as_linear(cls, ok):
    assert _supported(cls(4, 4)) is ok


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D as transformers defines it (weight (nx, nf); y = x W + b)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def test_gpt2_conv1d_converts_and_runs_with_its_cores(tmp_path):
    from mpocompress.nn.layers import MPOConv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 32), nn.GELU(), Conv1D(32, 48))
    src, out = tmp_path / "g.safetensors", tmp_path / "g.mpo.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(src))
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--ratio", "2", "--cores", "2"])
    assert res.exit_code == 0, res.output
    torch.manual_seed(1)
    loaded = load_compressed_(nn.Sequential(Conv1D(48, 32), nn.GELU(), Conv1D(32, 48)), out)
    assert isinstance(loaded[0], MPOConv1D)
    dense = nn.Sequential(Conv1D(48, 32), nn.GELU(), Conv1D(32, 48))
    dense.load_state_dict(load_state_dict(out))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), dense(x), atol=1e-5)
    loaded(x).sum().backward()
    assert loaded[0].cores_of("weight")[0].grad is not None


def test_a_real_gpt2_block_from_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    src, out = tmp_path / "gpt2.safetensors", tmp_path / "gpt2.mpo.safetensors"
    save_file({k: v.detach().contiguous() for k, v in transformers.GPT2Model(cfg).state_dict().items()}, str(src))
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--ratio", "2", "--exclude", "w*e.weight"])
    assert res.exit_code == 0, res.output
    loaded = load_compressed_(transformers.GPT2Model(cfg).eval(), out)
    dense = transformers.GPT2Model(cfg).eval()
    dense.load_state_dict(load_state_dict(out))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).last_hidden_state, dense(ids).last_hidden_state, atol=1e-4)


def test_calibration_records_self_attention_inputs():
    from mpocompress.jobs.calibrate import record_grams

    enc = _encoder()
    x = torch.randn(3, 7, 32)
    grams, _ = record_grams(enc, [x])
    key = "layers.0.self_attn.in_proj_weight"
    assert key in grams and grams[key].shape == (32, 32)
    xs = x.reshape(-1, 32).double()
    assert torch.allclose(grams[key], xs.T @ xs, atol=1e-8)  # the first layer's attention sees the input
