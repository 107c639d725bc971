import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mpocompress.cli import main
from mpocompress.codecs import (
    channel_mask,
    channel_scores,
    decode,
    encode,
    nbytes,
    pack_bits,
    parse_codec,
    seofp_codes,
    seofp_decode,
    unpack_bits,
)
from mpocompress.config import MPOConfig
from mpocompress.core.tt import snr_db
from mpocompress.errors import ConfigError
from mpocompress.jobs.convert import convert
from mpocompress.jobs.decompress import load_state_dict


def chain(text):
    return [parse_codec(t) for t in text.split()]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 200), seed=st.integers(0, 1000))
def test_pack_bits_round_trip(bits, n, seed):
    codes = torch.randint(2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize(
    "text, floor_db, max_bits_per_weight",
    [("int8", 40, 8.3), ("kmeans:256", 30, 8.5), ("kmeans:16", 18, 4.1), ("fp16", 60, 16), ("bf16", 45, 16), ("seofp:5", 12, 6)],
)
def test_lossy_codecs_meet_their_snr_floor(text, floor_db, max_bits_per_weight):
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(0))
    parts, meta = encode(w, chain(text))
    back = decode(parts, meta)
    assert back.shape == w.shape and back.dtype == w.dtype
    assert snr_db(w, back) >= floor_db
    assert nbytes(parts) * 8 / w.numel() <= max_bits_per_weight


def test_pruning_alone_is_exact_on_what_it_keeps():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    for sparsity in (0.0, 0.5, 0.99):
        parts, meta = encode(w, chain(f"magnitude:{sparsity}"))
        back = decode(parts, meta)
        kept = back != 0
        assert torch.equal(back[kept], w[kept])  # lossless where kept (atol=0)
        assert abs((~kept).float().mean().item() - sparsity) < 1e-3
        if sparsity:
            assert w[~kept].abs().max() <= w[kept].abs().min()
    assert meta["layout"] == "indices"  # 99 % sparse: int32 indices beat a bitmask above 1 - 1/32


def test_channel_pruning_scores_slices_as_in_pp_pq():
    w = torch.ones(2, 3, 2, 2)
    w[0, 1] = 0.01  # a whole input-channel slice of filter 0 below the filter's mean magnitude
    scores = channel_scores(w)
    assert scores[0, 1] == 1.0 and scores[0, 0] == 0.0 and scores[1].max() == 0.0
    mask = channel_mask(w, 0.65)
    assert not mask[0, 1].any() and mask[0, 0].all() and mask[1].all()


def test_seofp_multiplication_is_an_integer_add_on_the_float_bits():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(500, generator=g, dtype=torch.float64)
    codes, offset = seofp_codes(w, 5)
    pw = seofp_decode(codes, 5, offset).float()
    nz = pw != 0
    assert bool(nz.any())
    x = torch.randn(500, generator=g)[nz]
    pw = pw[nz]
    exponent = torch.log2(pw.abs()).round().to(torch.int32)
    assert torch.equal(torch.exp2(exponent.float()), pw.abs())  # weights are signed powers of two
    # x * (+-2^e): add e to the 8-bit exponent field and flip the sign bit -- no multiplier needed
    bits = x.view(torch.int32) + (exponent << 23)
    bits = bits ^ ((pw < 0).to(torch.int32) << 31)
    assert torch.equal(bits.view(torch.float32), x * pw)


@pytest.mark.parametrize("bad", ["kmeans:1", "kmeans:300", "magnitude:1.5", "seofp", "int8:3", "zip:2"])
def test_bad_codec_text(bad):
    with pytest.raises(ValueError):
        parse_codec(bad)


def test_config_rules():
    with pytest.raises(ConfigError, match="quantization codec"):
        MPOConfig(prune="kmeans:4")
    with pytest.raises(ConfigError, match="dense weights"):
        MPOConfig(ratio=4, prune="channel:0.6")
    with pytest.raises(ConfigError, match="global"):
        MPOConfig(quantize="int8", prune_scope="global")
    assert not MPOConfig(quantize="int8").mpo


CHAINS = [
    {"prune": "magnitude:0.8"},
    {"prune": "channel:0.65"},
    {"quantize": "kmeans:16"},
    {"quantize": "int8"},
    {"quantize": "seofp:5"},
    {"quantize": "fp16"},
    {"quantize": "bf16"},
    {"prune": "magnitude:0.6", "quantize": "kmeans:16"},
    {"prune": "channel:0.65", "quantize": "kmeans:32"},
    {"prune": "magnitude:0.5", "quantize": "seofp:5"},
    {"ratio": 3, "cores": 3, "quantize": "kmeans:32"},
    {"bond_dim": 4, "cores": 2, "quantize": "seofp:5"},
    {"ratio": 2, "quantize": "int8"},
]


class BigZoo(torch.nn.Module):
    """Every layer kind, large enough (~175k parameters) that file headers are a small part."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.embed = nn.Embedding(500, 64)
        self.fc = nn.Linear(64, 257)
        self.conv1 = nn.Conv1d(16, 48, 3)
        self.conv2 = nn.Conv2d(8, 32, (3, 5))
        self.lstm = nn.LSTM(64, 48, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(64, 40)
        self.cell = nn.LSTMCell(32, 32)


@pytest.fixture(scope="module")
def big_zoo(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = BigZoo()
    path = tmp_path_factory.mktemp("zoo") / "big_zoo.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.mark.parametrize("kw", CHAINS, ids=lambda kw: "+".join(f"{k}={v}" for k, v in kw.items()))
def test_report_bytes_are_the_file_bytes(tmp_path, big_zoo, kw):
    _, zoo_file = big_zoo
    out = tmp_path / "o.safetensors"
    report = convert(zoo_file, out, MPOConfig(**kw))
    t = report.totals()
    with safe_open(str(out), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert stored == t["bytes"]
    assert t["ratio"] > 1.05
    # every byte of the file is accounted for: the 8-byte length, the JSON header, the tensors
    raw = out.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert len(raw) == 8 + header_len + stored == t["output_file_bytes"]
    assert header_len < 48 * 1024 and t["output_file_bytes"] < t["input_file_bytes"]
    # LSTM/GRU weights are compressed like any other
    kinds = {r.kind for r in report.rows if r.status != "dense"}
    assert {"lstm", "gru", "linear", "conv", "embedding"} <= kinds
    # decoding gives back exactly the errors the report states, and the original model loads it
    sd = load_state_dict(out)
    ref = load_state_dict(zoo_file)
    for r in report.rows:
        err = float((sd[r.name].double() - ref[r.name].double()).norm() / ref[r.name].double().norm())
        assert err == pytest.approx(r.rel_error, rel=1e-3, abs=1e-6), r.name
    BigZoo().load_state_dict(sd, strict=True)


def test_global_magnitude_reaches_overall_sparsity(tmp_path, zoo_file):
    report = convert(zoo_file, tmp_path / "o.safetensors", MPOConfig(prune="magnitude:0.7", prune_scope="global"))
    kept = sum(r.params for r in report.rows)
    total = sum(r.dense_params for r in report.rows)
    assert abs(1 - kept / total - 0.7) < 0.01
    sparsities = [1 - r.params / r.dense_params for r in report.rows]
    assert max(sparsities) - min(sparsities) > 0.05  # one threshold, not one sparsity per layer


def test_cli_prune_quantize_and_inspect(tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    res = CliRunner().invoke(main, ["convert", str(trained_like), "-o", str(out), "--prune", "magnitude:0.5", "--quantize", "kmeans:16", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert all(r["codecs"] == ["magnitude:0.5", "kmeans:16"] for r in data["layers"])
    assert data["totals"]["ratio"] > 8
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0 and "kmeans:16" in res.stdout
    res = CliRunner().invoke(main, ["convert", str(trained_like), "-o", str(out), "--quantize", "kmeans:999", "--force"])
    assert res.exit_code == 2 and "kmeans K" in res.stderr


def test_load_compressed_with_quantized_cores(tmp_path):
    from torch import nn

    from mpocompress.nn.layers import MPOLinear
    from mpocompress.nn.surgery import load_compressed_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    src = tmp_path / "d.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    out = tmp_path / "q.safetensors"
    convert(src, out, MPOConfig(ratio=3, cores=3, quantize="kmeans:64"))
    fresh = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    load_compressed_(fresh, out)
    assert isinstance(fresh[0], MPOLinear)
    ref = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    ref.load_state_dict(load_state_dict(out))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref(x), atol=1e-5)


def test_recipe_per_layer_choices(tmp_path, trained_like):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[default]\nratio = 3\n\n[[layers]]\nmatch = "a.*"\nquantize = "kmeans:16"\nbond_dim = 4\n\n'
        '[[layers]]\nmatch = ["re:^c\\\\."]\nskip = true\n'
    )
    out = tmp_path / "o.safetensors"
    res = CliRunner().invoke(main, ["convert", str(trained_like), "-o", str(out), "--recipe", str(recipe), "--cores", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    rows = {r["name"]: r for r in data["layers"]}
    assert set(rows) == {"a.weight", "b.weight"}  # c.weight skipped by the recipe
    assert rows["a.weight"]["codecs"] == ["kmeans:16"] and rows["a.weight"]["bond_dims"] == [4]
    assert rows["b.weight"]["codecs"] == [] and rows["b.weight"]["ratio"] >= 2.9
    assert all(r["cores"] == 2 for r in rows.values())  # --cores on the command line applies to every rule
    assert set(load_state_dict(out)) == set(load_state_dict(trained_like))
    recipe.write_text('[[layers]]\nmatch = "a.*"\nwhatever = 3\n')
    res = CliRunner().invoke(main, ["convert", str(trained_like), "-o", str(out), "--recipe", str(recipe), "--ratio", "2", "--force"])
    assert res.exit_code == 2 and "unknown keys whatever" in res.stderr
    recipe.write_text("[[layers]\nbroken")
    res = CliRunner().invoke(main, ["convert", str(trained_like), "-o", str(out), "--recipe", str(recipe), "--ratio", "2", "--force"])
    assert res.exit_code == 3 and "not valid TOML" in res.stderr


@pytest.mark.parametrize("dist", ["normal", "laplace", "student-t2", "mixture", "few-values"])
@pytest.mark.parametrize("k", [4, 16, 64])
def test_kmeans_is_within_one_percent_of_the_optimum(dist, k):
    """kmeans_1d against the exact dynamic program on all values (no grouping)."""
    import numpy as np

    from mpocompress.codecs.kmeans import _dp_boundaries, kmeans_1d

    g = torch.Generator().manual_seed(7)
    n = 6000
    v = {
        "normal": lambda: torch.randn(n, generator=g),
        "laplace": lambda: torch.randn(n, generator=g).sign() * torch.rand(n, generator=g).log().neg(),
        "student-t2": lambda: torch.randn(n, generator=g) / (torch.randn(n, 2, generator=g).square().mean(1)).sqrt(),
        "mixture": lambda: torch.cat([torch.randn(n // 2, generator=g) * 0.01, torch.randn(n // 2, generator=g) * 2 + 3]),
        "few-values": lambda: torch.randint(0, 40, (n,), generator=g).float() / 7,
    }[dist]()
    s = np.sort(v.double().numpy())
    ends = _dp_boundaries(s, np.ones_like(s), k)
    optimum = sum(float(((s[a:b] - s[a:b].mean()) ** 2).sum()) for a, b in zip(ends[:-1], ends[1:]))
    centroids, codes = kmeans_1d(v, k)
    ours = float((v.double() - centroids.double()[codes]).square().sum())
    assert ours <= optimum * 1.01 + 1e-12, (ours / optimum)
    again = kmeans_1d(v, k)
    assert torch.equal(again[0], centroids) and torch.equal(again[1], codes)  # deterministic


def test_kmeans_problems_solved_together_match_each_alone():
    """One batched program for tensors of different sizes, k and options gives each tensor's own result."""
    import numpy as np

    from mpocompress.codecs import KMeansProblem, kmeans_1d_many, kmeans_1d_solve

    g = torch.Generator().manual_seed(5)
    values = [torch.randn(n, generator=g) * s for n, s in ((5000, 1.0), (300, 0.1), (17, 3.0), (3, 1.0), (0, 1.0))]
    values.append(torch.randint(0, 6, (400,), generator=g).float())
    weights = torch.rand(300, generator=g)
    problems = [KMeansProblem(values[0], (4, 256), errors_only=True), KMeansProblem(values[1], (16,), sample_weight=weights),
                KMeansProblem(values[2], (2, 8)), KMeansProblem(values[3], (4,)), KMeansProblem(values[4], (16,)),
                KMeansProblem(np.sort(values[5].double().numpy()), (4, 16), errors_only=True, presorted=True)]  # fmt: skip
    together = kmeans_1d_solve(problems)
    for p, got in zip(problems, together):
        alone = kmeans_1d_many(p.values, list(p.ks), errors_only=p.errors_only, sample_weight=p.sample_weight, presorted=p.presorted)
        assert got.keys() == alone.keys()
        for k in got:
            if p.errors_only:
                assert got[k] == pytest.approx(alone[k], rel=1e-12, abs=1e-12)
            else:
                assert torch.equal(got[k][0], alone[k][0]) and torch.equal(got[k][1], alone[k][1])
    with pytest.raises(ValueError, match="presorted"):
        KMeansProblem(values[0], (4,), presorted=True)


def test_rowkmeans_gives_each_row_its_own_optimal_codebook():
    """rowkmeans:K: a float16 codebook per row, each the row's optimal k-means; rows of different
    scales lose far less than with one codebook; packed exactly; deterministic; pruned values: one row."""
    from mpocompress.codecs import decode, encode, kmeans_1d

    g = torch.Generator().manual_seed(11)
    w = torch.randn(12, 80, generator=g) * torch.logspace(-2, 1, 12)[:, None]
    codec = parse_codec("rowkmeans:8")
    parts, meta = encode(w, [codec])
    assert parts["codebook"].shape == (12, 8) and parts["codebook"].dtype == torch.float16
    assert sum(v.numel() * v.element_size() for v in parts.values()) == 12 * 8 * 2 + math.ceil(w.numel() * 3 / 8)
    out = decode(parts, meta)
    for i in range(12):
        centroids, _ = kmeans_1d(w[i], 8)
        assert torch.equal(parts["codebook"][i], centroids.half())
        assert set(out[i].tolist()) <= set(centroids.half().float().tolist())
    shared = decode(*encode(w, [parse_codec("kmeans:8")]))
    row_error = lambda q: ((q - w).square().sum(1) / w.square().sum(1)).mean()  # noqa: E731 - each row's share lost
    assert row_error(out) < 0.1 * row_error(shared)
    again = encode(w, [codec])[0]
    assert all(torch.equal(again[k], parts[k]) for k in parts)
    grid = codec.grid(w)
    assert torch.equal(codec.snap(grid, w.T).T, out) and torch.equal(codec.snap(grid, w[:, 5]), out[:, 5])
    pruned = decode(*encode(w, [parse_codec("magnitude:0.5"), codec]))
    assert int((pruned != 0).sum()) == w.numel() // 2
    big = torch.full((2, 4), 1e5)  # beyond float16: the codebook stays float32
    assert encode(big, [codec])[0]["codebook"].dtype == torch.float32
    with pytest.raises(ValueError, match="rowkmeans K"):
        parse_codec("rowkmeans:300")
