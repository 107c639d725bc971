import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mpocompress
from mpocompress.config import Gates, MPOConfig
from mpocompress.errors import GateError, InputError, OutputError
from mpocompress.format import decode_meta
from mpocompress.jobs.convert import convert
from mpocompress.jobs.decompress import decompress, load_state_dict
from mpocompress.jobs.inspect import inspect_checkpoint as inspect
from mpocompress.report import check_gates


def test_full_bond_round_trip_loads_strict(tmp_path, zoo, zoo_file):
    out = tmp_path / "zoo.mpo.safetensors"
    report = convert(zoo_file, out, MPOConfig(bond_dim=10_000, cores=3))
    sd = mpocompress.load_state_dict(out)
    zoo.load_state_dict(sd, strict=True)
    ref = zoo.state_dict()
    for k, v in sd.items():
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape
        assert torch.allclose(v, ref[k], atol=1e-5), k
    kinds = {r.name: r.kind for r in report.rows}
    assert kinds["lstm.weight_ih_l0"] == "lstm" and kinds["lstm.weight_hh_l1_reverse"] == "lstm"
    assert kinds["gru.weight_ih_l0"] == "gru" and kinds["cell.weight_hh"] == "lstm"
    assert kinds["conv2.weight"] == "conv" and kinds["embed.weight"] == "embedding"
    # a full-bond MPO is larger than dense, so every layer is kept dense, and says so
    assert all(r.status == "dense" and r.reason for r in report.rows)


def test_compressed_layers_and_report_bytes_match_the_file(tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    report = convert(trained_like, out, MPOConfig(ratio=4, cores="auto"))
    totals = report.totals()
    assert totals["layers_compressed"] == 3
    with safe_open(str(out), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        meta = decode_meta(f.metadata()["mpocompress"])
    assert stored == totals["bytes"]
    assert totals["dense_bytes"] / totals["bytes"] == pytest.approx(totals["ratio"])
    assert report.output_file_bytes < report.input_file_bytes / 3
    assert meta["config"]["ratio"] == 4 and set(meta["layers"]) == {"a.weight", "b.weight", "c.weight"}
    dense = load_state_dict(trained_like)
    back = load_state_dict(out)
    for r in report.rows:
        err = float((back[r.name] - dense[r.name]).norm() / dense[r.name].norm())
        assert err == pytest.approx(r.rel_error, rel=1e-4, abs=1e-6)
        assert r.rel_error <= r.svd_rel_error * 1.05 + 1e-6 or r.cores != 2


def test_golden_header(tmp_path):
    """Pin the on-disk layout of a tiny deterministic conversion."""
    w = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 10
    src = tmp_path / "tiny.safetensors"
    save_file({"fc.weight": w, "fc.bias": torch.zeros(6)}, str(src))
    out = tmp_path / "tiny.mpo.safetensors"
    convert(src, out, MPOConfig(bond_dim=1, cores=2))
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = decode_meta(header.pop("__metadata__")["mpocompress"])
    assert header == {
        "fc.bias": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
        "fc.weight_cores.0": {"dtype": "F32", "shape": [1, 6, 1, 1], "data_offsets": [24, 48]},
        "fc.weight_cores.1": {"dtype": "F32", "shape": [1, 1, 8, 1], "data_offsets": [48, 80]},
    }
    assert meta["format"] == "mpocompress" and meta["format_version"] == 3
    layer = meta["layers"]["fc.weight"]
    assert {k: layer[k] for k in ("kind", "shape", "dtype", "matrix_shape", "padded_shape", "out_modes", "in_modes", "bond_dims", "cores")} == {
        "kind": "linear", "shape": [6, 8], "dtype": "float32", "matrix_shape": [6, 8], "padded_shape": [6, 8],
        "out_modes": [6, 1], "in_modes": [1, 8], "bond_dims": [1], "cores": ["fc.weight_cores.0", "fc.weight_cores.1"],
    }  # fmt: skip
    assert len(raw) == 8 + n + 80


def test_padded_layer_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(257, 40, generator=g, dtype=torch.float64)
    src = tmp_path / "p.safetensors"
    save_file({"w.weight": w}, str(src))
    out = tmp_path / "p.mpo.safetensors"
    report = convert(src, out, MPOConfig(tol=1e-10, cores=3))
    r = report.rows[0]
    assert r.status == "dense" and r.candidates[0]["params"] >= 257 * 40  # exact is not smaller: kept dense
    report = convert(src, out, MPOConfig(bond_dim=6, cores=3), force=True)
    r = report.rows[0]
    assert r.status == "mpo" and r.padded_shape[0] > 257
    back = load_state_dict(out)["w.weight"]
    assert back.shape == (257, 40) and back.dtype == torch.float64


def test_sharded_output_and_input(tmp_path, trained_like):
    out = tmp_path / "sharded"
    convert(trained_like, out, MPOConfig(bond_dim=4, cores=2), max_shard_bytes=2000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "mpocompress" in index["metadata"]
    a = load_state_dict(out)
    b = load_state_dict(trained_like)
    assert set(a) == set(b)
    # a sharded compressed checkpoint converts again (as input): its stored tensors (cores
    # included) are the new input; a.* cores are compressed again, everything else passes through
    again = tmp_path / "again.safetensors"
    report = convert(out, again, MPOConfig(bond_dim=2, cores=2, include=("a.*",)))
    assert [r.name for r in report.rows] == ["a.weight_cores.0", "a.weight_cores.1"]
    stored = load_file(str(again))
    before = {k: v for k, v in load_file(str(next(out.glob("*.safetensors")))).items()}
    assert "b.weight_cores.0" in stored and all(
        torch.equal(stored[k], v) for k, v in before.items() if k.startswith("b.") and k in stored
    )


def test_output_safety(tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="overwrite the input"):
        convert(trained_like, trained_like, MPOConfig(bond_dim=2), force=True)
    with pytest.raises(OutputError, match="does not exist"):
        convert(trained_like, tmp_path / "missing" / "o.safetensors", MPOConfig(bond_dim=2))
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        convert(trained_like, out, MPOConfig(bond_dim=2))
    assert out.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="not an earlier mpocompress"):
        convert(trained_like, out, MPOConfig(bond_dim=2), force=True)  # --force replaces only our outputs
    assert out.read_bytes() == b"keep me"
    out.unlink()
    convert(trained_like, out, MPOConfig(bond_dim=2))
    first = out.read_bytes()
    convert(trained_like, out, MPOConfig(bond_dim=3), force=True)
    assert out.read_bytes() != first


def test_failure_leaves_no_partial_output(tmp_path, trained_like, monkeypatch):
    import mpocompress.jobs.workers as pl

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pl, "compress_tensor", boom)
    for out in (tmp_path / "x.safetensors", tmp_path / "xdir"):
        with pytest.raises(RuntimeError):
            convert(trained_like, out, MPOConfig(bond_dim=2))
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained.safetensors"]


def test_no_matrix_to_compress(tmp_path):
    src = tmp_path / "v.safetensors"
    save_file({"bias": torch.zeros(3), "ids": torch.zeros(4, 4, dtype=torch.int64)}, str(src))
    with pytest.raises(InputError, match="no floating-point tensor"):
        convert(src, tmp_path / "o.safetensors", MPOConfig(bond_dim=2))


def test_include_exclude(tmp_path, zoo_file):
    report = convert(zoo_file, tmp_path / "o.safetensors", MPOConfig(bond_dim=2, include=("lstm.*", "re:^fc"), exclude=("*reverse",)))
    names = {r.name for r in report.rows}
    assert "fc.weight" in names and "lstm.weight_ih_l0" in names
    assert not any("reverse" in n or n.startswith(("gru", "conv")) for n in names)


def test_gates(tmp_path, trained_like):
    report = convert(trained_like, tmp_path / "o.safetensors", MPOConfig(ratio=8, cores=3))
    with pytest.raises(GateError, match="max-error"):
        check_gates(report, Gates(max_error=1e-6))
    with pytest.raises(GateError, match="min-ratio"):
        check_gates(report, Gates(min_ratio=100))
    check_gates(report, Gates(max_error=1.0, min_ratio=2))
    assert report.gates["passed"] is True


def test_decompress_and_inspect(tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    convert(trained_like, out, MPOConfig(bond_dim=4))
    for suffix in (".safetensors", ".pt"):
        dense = tmp_path / f"dense{suffix}"
        decompress(out, dense)
        assert set(load_state_dict(dense)) == set(load_state_dict(trained_like))
    info = inspect(out)
    assert info["compressed"] and set(info["meta"]["layers"]) == {"a.weight", "b.weight", "c.weight"}
    spectra = inspect(trained_like, cores=3, include=("c.*",))
    layer = spectra["layers"][0]
    assert layer["name"] == "c.weight" and len(layer["bonds"]) == 2
    # planted spectrum exp(-i/8): 99% of the energy needs about 8*ln(100)/2 ~ 18 singular values
    assert 15 <= layer["svd"]["energy_ranks"][1] <= 21
    errors = [p["rel_error"] for p in layer["curve"]]
    assert errors == sorted(errors, reverse=True)
