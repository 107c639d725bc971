import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpocompress.config import MPOConfig
from mpocompress.core.contract import build_flops, chain_flops, mpo_chain, mpo_rows
from mpocompress.core.modes import choose_modes
from mpocompress.core.tt import tt_svd
from mpocompress.errors import InputError
from mpocompress.jobs.convert import convert
from mpocompress.jobs.decompress import load_state_dict
from mpocompress.nn.layers import (
    MPOGRU,
    MPOLSTM,
    MPOConv,
    MPOEmbedding,
    MPOGRUCell,
    MPOLinear,
    MPOLSTMCell,
    tune_,
)
from mpocompress.nn.surgery import compress_, load_compressed_, save_compressed

F64 = torch.float64


@settings(max_examples=30, deadline=None)
@given(o=st.sampled_from([1, 2, 7, 16, 61, 100, 257]), i=st.sampled_from([1, 3, 13, 64, 161, 300]), cores=st.integers(2, 4), n=st.integers(1, 9))
def test_chain_and_rows_equal_dense(o, i, cores, n):
    w = torch.randn(o, i, dtype=F64)
    tt = tt_svd(w, *choose_modes(o, i, cores))
    x = torch.randn(n, i, dtype=F64)
    assert torch.allclose(mpo_chain(x, tt.cores, o), x @ w.T, atol=1e-9)
    idx = torch.randint(o, (n, 2))
    assert torch.allclose(mpo_rows(tt.cores, idx, i), w[idx], atol=1e-9)


def test_flop_counts_match_shapes():
    shapes = [(1, 4, 4, 8), (8, 4, 4, 8), (8, 4, 4, 1)]
    assert chain_flops(1, shapes) == 16 * 4 * 32 + 4 * 4 * 32 * 32 + 16 * 32 * 4
    assert build_flops(shapes) == 16 * 8 * 16 * 8 + 256 * 8 * 16


@pytest.mark.parametrize("shape", [(64, 64), (257, 100), (10, 161), (1, 5)])
@pytest.mark.parametrize("mode", ["auto", "chain", "materialize"])
def test_mpo_linear_equals_dense_at_full_bond(shape, mode):
    lin = nn.Linear(shape[1], shape[0]).to(F64)
    m = MPOLinear.from_linear(lin, mode=mode)
    for batch in [(1, shape[1]), (33, shape[1]), (2, 3, shape[1])]:
        x = torch.randn(*batch, dtype=F64)
        assert torch.allclose(m(x), lin(x), atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(m(x), lin(x), atol=1e-9)
    back = m.to_linear()
    assert torch.allclose(back.weight, lin.weight, atol=1e-9) and back.weight.dtype == F64


def test_from_linear_inherits_dtype_and_compresses():
    lin = nn.Linear(256, 128)
    m = MPOLinear.from_linear(lin, MPOConfig(ratio=8, cores=3))
    assert all(c.dtype == torch.float32 for c in m.weight_cores)
    assert m.compression()["ratio"] >= 8


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("mode", ["chain", "materialize"])  # frame-by-frame chain vs fused kernel
def test_mpo_rnn_equals_dense(num_layers, bidirectional, batch_first, kind, mode):
    torch.manual_seed(num_layers)
    cls, mpo = (nn.LSTM, MPOLSTM) if kind == "lstm" else (nn.GRU, MPOGRU)
    rnn = cls(13, 11, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first).to(F64)
    m = mpo.from_rnn(rnn, mode=mode)
    assert all(m.is_mpo(n) for n, _ in rnn.named_parameters() if n.startswith("weight"))
    x = torch.randn(3, 5, 13, dtype=F64)
    d = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * d, 3 if batch_first else 5, 11, dtype=F64)
    hx = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
    for args in [(x,), (x, hx)]:
        ref, got = rnn(*args), m(*args)
        assert torch.allclose(got[0], ref[0], atol=1e-9)
        if kind == "lstm":
            assert torch.allclose(got[1][0], ref[1][0], atol=1e-9) and torch.allclose(got[1][1], ref[1][1], atol=1e-9)
        else:
            assert torch.allclose(got[1], ref[1], atol=1e-9)
    # unbatched input
    assert torch.allclose(m(x[0])[0], rnn(x[0])[0], atol=1e-9)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_mpo_rnn_fused_training_has_the_chain_gradients(kind):
    """In training "auto" runs the fused kernel on matrices built once per call; its gradients with
    respect to the cores must be those of the frame-by-frame chain (and the dropout flag honoured)."""
    torch.manual_seed(1)
    cls, mpo = (nn.LSTM, MPOLSTM) if kind == "lstm" else (nn.GRU, MPOGRU)
    rnn = cls(12, 10, num_layers=2, batch_first=True).to(F64)
    auto, chain = mpo.from_rnn(rnn, MPOConfig(bond_dim=3, cores=3)), mpo.from_rnn(rnn, MPOConfig(bond_dim=3, cores=3), mode="chain")
    assert auto._fused(torch.zeros(2, 7, 12, dtype=F64)) and not chain._fused(torch.zeros(2, 7, 12, dtype=F64))
    x = torch.randn(2, 7, 12, dtype=F64)
    grads = []
    for m in (auto, chain):
        m.zero_grad()
        out = m(x)[0]
        (out ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and any("_cores." in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-9), n
    with torch.no_grad():  # inference: both paths, same outputs
        assert torch.allclose(auto(x)[0], chain(x)[0], atol=1e-9)
    assert auto.state_dict().keys() == chain.state_dict().keys()  # the template adds no keys
    with torch.no_grad():  # streaming (one frame per call) never pays the fused call's fixed cost
        assert not auto._fused(torch.zeros(2, 1, 12, dtype=F64))
        auto.mode = "materialize"
        assert auto._fused(torch.zeros(2, 1, 12, dtype=F64))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cells_stream_like_the_sequence_model(kind):
    torch.manual_seed(0)
    cell_cls, mpo_cls = (nn.LSTMCell, MPOLSTMCell) if kind == "lstm" else (nn.GRUCell, MPOGRUCell)
    cell = cell_cls(9, 7).to(F64)
    m = mpo_cls.from_cell(cell)
    x = torch.randn(6, 4, 9, dtype=F64)
    h_ref = h_got = None
    for t in range(6):  # frame by frame
        h_ref = cell(x[t], h_ref)
        h_got = m(x[t], h_got)
    ref = h_ref[0] if kind == "lstm" else h_ref
    got = h_got[0] if kind == "lstm" else h_got
    assert torch.allclose(got, ref, atol=1e-9)
    assert torch.allclose((m(x[0, 0])[0] if kind == "lstm" else m(x[0, 0])), (cell(x[0, 0])[0] if kind == "lstm" else cell(x[0, 0])), atol=1e-9)


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 12, 3, padding=1), nn.Conv2d(3, 16, (3, 5), stride=2, groups=1), nn.Conv2d(4, 8, 3, groups=2, padding_mode="reflect", padding=1)])
def test_mpo_conv_equals_dense(conv):
    conv = conv.to(F64)
    m = MPOConv.from_conv(conv)
    x = torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=F64)
    assert torch.allclose(m(x), conv(x), atol=1e-9)


def test_mpo_embedding_equals_dense():
    emb = nn.Embedding(30522 // 100, 48).to(F64)
    m = MPOEmbedding.from_embedding(emb)
    idx = torch.randint(emb.num_embeddings, (3, 7))
    assert torch.allclose(m(idx), emb(idx), atol=1e-9)


def test_gradients_reach_every_core():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    lstm = nn.LSTM(5, 6, num_layers=2)
    compress_(model, MPOConfig(bond_dim=3, cores=3))
    m_lstm = MPOLSTM.from_lstm(lstm, MPOConfig(bond_dim=2, cores=3), force=True)
    for mode in ("chain", "materialize"):
        for mod in [*model, m_lstm]:
            if hasattr(mod, "mode"):
                mod.mode = mode
        model.zero_grad()
        m_lstm.zero_grad()
        y = model(torch.randn(4, 20))
        out, _ = m_lstm(y.unsqueeze(1))  # 4 time steps, so weight_hh sees a non-zero state
        out.square().sum().backward()
        cores = [p for n, p in [*model.named_parameters(), *m_lstm.named_parameters()] if "_cores" in n]
        assert cores and all(p.grad is not None and p.grad.abs().sum() > 0 for p in cores), mode


def test_materialized_cache_follows_core_updates():
    lin = MPOLinear.from_linear(nn.Linear(64, 64), MPOConfig(bond_dim=4, cores=3), mode="materialize")
    x = torch.randn(2, 64)
    with torch.no_grad():
        a = lin(x)
        lin.weight_cores[0].mul_(2.0)
        b = lin(x)
    assert torch.allclose(b - lin.bias, 2 * (a - lin.bias), atol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.lstm = nn.LSTM(32, 24, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(48, 257)

    def forward(self, idx):
        x = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        h, _ = self.lstm(torch.relu(x))
        return self.fc(h)


def test_compress_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    rows = compress_(model, MPOConfig(ratio=3, cores=3))
    assert {r["name"] for r in rows if r["status"] == "mpo"} >= {"fc.weight", "lstm.weight_ih_l0"}
    assert isinstance(model.fc, MPOLinear) and isinstance(model.lstm, MPOLSTM)
    idx = torch.randint(50, (2, 9))
    with torch.no_grad():
        y = model(idx)
    path = tmp_path / "net.safetensors"
    save_compressed(model, path)
    fresh = Net().eval()
    load_compressed_(fresh, path)
    with torch.no_grad():
        assert torch.allclose(fresh(idx), y, atol=1e-6)
    # the same file rebuilds a dense state dict the original architecture loads strictly
    dense = Net().eval()
    dense.load_state_dict(load_state_dict(path), strict=True)
    with torch.no_grad():
        assert torch.allclose(dense(idx), y, atol=1e-5)


@pytest.mark.parametrize(
    "config, check",
    [
        (MPOConfig(quantize="int8"), "int8"),
        (MPOConfig(quantize="kmeans:4"), "kmeans"),
        (MPOConfig(ratio=3, cores=3, prune="magnitude:0.9"), "pruned cores"),
        (MPOConfig(ratio=3, cores=2, quantize="seofp:5"), "seofp cores"),
    ],
)
def test_compress_honours_the_whole_config(tmp_path, config, check):
    """compress_ applies MPO, pruning and quantization: the model computes what the file stores."""
    torch.manual_seed(0)
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {r["name"]: r for r in compress_(model, config)}
    after = model.state_dict()
    assert set(after) != set(before) or any(not torch.equal(before[k], after[k]) for k in before)
    if check == "int8":  # every weight matrix sits on a 255-step grid per row
        w = model.fc.weight
        assert rows["fc.weight"]["status"] == "codec" and rows["fc.weight"]["codecs"] == ["int8"]
        steps = (w.max(1).values.clamp(min=0) - w.min(1).values.clamp(max=0)) / 255
        assert torch.allclose(((w - w.min(1, keepdim=True).values) / steps[:, None]).round() * steps[:, None],
                              w - w.min(1, keepdim=True).values, atol=1e-5)  # fmt: skip
        assert 0 < rows["fc.weight"]["rel_error"] < 0.02
    if check == "kmeans":
        assert all(p.unique().numel() <= 4 for n, p in model.named_parameters() if n.endswith("weight") or "weight_" in n)
    if check == "pruned cores":
        cores = [p for n, p in model.named_parameters() if "_cores" in n]
        assert cores and all(abs(float((c == 0).float().mean()) - 0.9) < 0.05 for c in cores if c.numel() >= 20)
    if check == "seofp cores":  # signed powers of two
        for n, c in model.named_parameters():
            if "_cores" in n:
                nz = c[c != 0].abs()
                assert torch.allclose(torch.log2(nz), torch.log2(nz).round())
    # the file written from the model computes the same, packed by the same chain
    idx = torch.randint(50, (2, 9))
    with torch.no_grad():
        y = model(idx)
    path = tmp_path / "net.safetensors"
    save_compressed(model, path, config=config)
    fresh = Net().eval()
    fresh.load_state_dict(load_state_dict(path), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(idx), y, atol=1e-4)
    assert path.stat().st_size < sum(v.numel() * v.element_size() for v in before.values())


def test_compress_refuses_what_it_cannot_do():
    from mpocompress.errors import ConfigError

    with pytest.raises(ConfigError, match="units"):
        compress_(Net(), MPOConfig(prune="units:0.5"))


def test_save_compressed_writes_the_documented_format(tmp_path):
    from mpocompress.format import KINDS, read_meta
    from mpocompress.io import open_checkpoint

    torch.manual_seed(0)
    model = Net()
    compress_(model, MPOConfig(ratio=3, cores=3))
    path = tmp_path / "n.safetensors"
    save_compressed(model, path)
    with open_checkpoint(path) as ck:
        meta = read_meta(ck)
    assert meta["source"] == "save_compressed" and meta["totals"]["bytes"] > 0
    for name, entry in meta["layers"].items():
        assert entry["kind"] in KINDS and entry["method"] == "mpo" and "rel_error" not in entry, name
    assert meta["layers"]["lstm.weight_hh_l0"]["kind"] == "lstm"


def test_load_convert_output_into_model(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = Net().eval()
    src = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    out = tmp_path / "mpo.safetensors"
    convert(src, out, MPOConfig(ratio=2, cores="auto"))
    fresh = Net().eval()
    load_compressed_(fresh, out)
    ref = Net().eval()
    ref.load_state_dict(load_state_dict(out))
    idx = torch.randint(50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(fresh(idx), ref(idx), atol=1e-5)
    assert isinstance(fresh.fc, MPOLinear)


def test_load_compressed_fails_clearly_on_mismatch(tmp_path):
    torch.manual_seed(0)
    model = Net()
    compress_(model, MPOConfig(ratio=3, cores=2))
    path = tmp_path / "n.safetensors"
    save_compressed(model, path)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 300)

    with pytest.raises(InputError, match=r"fc.weight has shape \[257, 48\] in the checkpoint but \[300, 48\]"):
        load_compressed_(Wider(), path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(48, 257)

    with pytest.raises(InputError, match="not in the model"):
        load_compressed_(Other(), path)


@pytest.fixture
def compressed_net():
    """A compressed Net, an input and its output."""
    torch.manual_seed(0)
    model = Net().eval()
    compress_(model, MPOConfig(ratio=3, cores=3))
    idx = torch.randint(50, (2, 9))
    with torch.no_grad():
        y = model(idx)
    return model, idx, y


def test_trace_and_compile(compressed_net):
    model, idx, y = compressed_net
    with torch.no_grad():
        traced = torch.jit.trace(model, (idx,), check_trace=False)
        assert torch.allclose(traced(idx), y, atol=1e-5)


def test_onnx_parity(tmp_path, compressed_net):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, idx, y = compressed_net
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, (idx,), str(path), dynamo=False, input_names=["idx"], output_names=["y"])
    got = ort.InferenceSession(str(path)).run(None, {"idx": idx.numpy()})[0]
    assert abs(got - y.numpy()).max() < 1e-4


def test_compile_fast():
    """torch.compile traces the MPO layer in one graph (aot_eager: no code generation, seconds)."""
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(48, 40), MPOConfig(bond_dim=4, cores=3))
    x = torch.randn(5, 48)
    with torch.no_grad():
        y = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(x), y, atol=1e-6)


@pytest.mark.slow
def test_compile(compressed_net):
    model, idx, y = compressed_net
    with torch.no_grad():
        compiled = torch.compile(model)
        assert torch.allclose(compiled(idx), y, atol=1e-5)


def test_auto_mode_times_once_per_power_of_two_bucket_of_rows(monkeypatch):
    m = MPOLinear.from_linear(nn.Linear(64, 32), MPOConfig(bond_dim=4, cores=3))
    timed = []
    original = MPOLinear._time_choice
    monkeypatch.setattr(MPOLinear, "_time_choice", lambda self, *a: timed.append(a[1].shape[0]) or original(self, *a))
    with torch.no_grad():
        for rows in (100, 120, 128, 129, 250):  # variable-length inputs: buckets 128, 128, 128, 256, 256
            m(torch.randn(rows, 64))
    assert sorted(k[1] for k in m._choice) == [128, 256]
    assert timed == []  # auto mode is deterministic: a cost model, never a timing
    tuned = tune_(m, torch.randn(100, 64))  # timing only on request
    assert timed == [100] and list(tuned[""]) == [("weight", 128, False)]


def test_cost_model_matches_the_measured_forward_benchmark():
    """Every point of benchmarks/results/forward.json: the model picks the faster contraction, so
    the benchmark's claims (MPO beats dense where it should) hold without timing."""
    import json
    from pathlib import Path

    from mpocompress.core.contract import choose_contraction

    data = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "forward.json").read_text())
    for r in data["linear"]:
        n = r["n"]
        modes = (4, 8, 8, 4) if n == 1024 else (8, 8, 8, 8)
        b = [1, *r["bond_dims"], 1]
        shapes = [(b[k], modes[k], modes[k], b[k + 1]) for k in range(4)]
        if max(r["mpo-chain"], r["dense"]) < 1.15 * min(r["mpo-chain"], r["dense"]):
            continue  # a near tie: either choice is right
        faster = "chain" if r["mpo-chain"] < r["dense"] else "materialize"
        assert choose_contraction(r["batch"], shapes, n, n) == faster, r


def test_auto_mode_is_bitwise_reproducible():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(96, 80), MPOConfig(bond_dim=6, cores=3))
    x = torch.randn(7, 96)
    with torch.no_grad():
        outs = []
        for _ in range(3):
            layer._choice.clear()
            layer._cache.clear()
            outs.append(layer(x))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
