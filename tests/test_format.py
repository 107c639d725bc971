"""Golden tests of the on-disk format (docs/format.md): a change to any byte is a format change."""

import hashlib

import torch
from safetensors.torch import save_file

from mpocompress import MPOConfig
from mpocompress.codecs import pack_bits, unpack_bits
from mpocompress.format import FORMAT_VERSION, META_KEY, decode_meta, part_suffixes
from mpocompress.io import read_safetensors_header
from mpocompress.jobs.convert import convert
from mpocompress.jobs.decompress import load_state_dict


def test_bit_order_of_packed_codes_is_little_endian():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b00000001, 0b00000011]
    # 2-bit codes 1, 2, 3: bits (1,0) (0,1) (1,1) from bit 0 of byte 0 upwards
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([5, 7]), 3).tolist() == [0b00111101]
    assert unpack_bits(torch.tensor([0b00111001], dtype=torch.uint8), 2, 3).tolist() == [1, 2, 3]


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def test_golden_file(tmp_path):
    """Magnitude pruning + 4-centroid k-means on values that quantize exactly: the header layout and
    the data bytes are pinned, and the metadata up to float rounding in its last digits."""
    w = torch.tensor([[2.0, -1.0, 0.01, 1.0], [-0.02, 2.0, -2.0, 0.03], [1.0, -0.04, 0.05, -1.0], [0.06, -2.0, 1.0, -0.07]])
    src = tmp_path / "g.safetensors"
    save_file({"fc.weight": w, "fc.bias": torch.tensor([0.5, -0.5, 0.25, 0.0])}, str(src))
    out = tmp_path / "g.mpc.safetensors"
    convert(src, out, MPOConfig(prune="magnitude:0.4375", quantize="kmeans:4"))
    header, start = read_safetensors_header(out)
    meta = decode_meta(header["__metadata__"][META_KEY])
    layout = {k: v for k, v in header.items() if k != "__metadata__"}
    assert layout == {
        "fc.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "fc.weight.codebook": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
        "fc.weight.codes": {"dtype": "U8", "shape": [3], "data_offsets": [32, 35]},
        "fc.weight.mask": {"dtype": "U8", "shape": [2], "data_offsets": [35, 37]},
    }
    data = out.read_bytes()[start:]
    assert hashlib.sha256(data).hexdigest()[:16] == hashlib.sha256(
        torch.tensor([0.5, -0.5, 0.25, 0.0]).numpy().tobytes()
        + torch.tensor([-2.0, -1.0, 1.0, 2.0]).numpy().tobytes()
        # kept values 2,-1,1 | 2,-2 | 1,-1 | -2,1 -> codes 3,1,2,3 | 0,2,1,0 | 2 (2 bits each, bit 0 first)
        + bytes([3 | 1 << 2 | 2 << 4 | 3 << 6, 0 | 2 << 2 | 1 << 4 | 0 << 6, 2])
        # kept positions 0,1,3,5,6 | 8,11,13,14 (row-major), bit 0 first
        + bytes([0b01101011, 0b01101001])
    ).hexdigest()[:16]
    assert meta["format"] == "mpocompress" and meta["format_version"] == FORMAT_VERSION == 3
    assert header["__metadata__"][META_KEY].startswith("{")  # short: plain JSON
    entry = _rounded(meta["layers"]["fc.weight"])
    assert entry == {
        "kind": "linear", "shape": [4, 4], "dtype": "float32", "matrix_shape": [4, 4], "method": "dense",
        "encoded": {"fc.weight": {
            "chain": ["magnitude:0.4375", "kmeans:4"], "shape": [4, 4], "dtype": "float32", "layout": "bitmask",
            "nnz": 9, "quant": {"bits": 2, "n": 9},
            "parts": {"mask": "fc.weight.mask", "codebook": "fc.weight.codebook", "codes": "fc.weight.codes"},
        }},
        "params": 9, "dense_params": 16, "bytes": 21, "rel_error": entry["rel_error"],
        "svd_rank": 0, "svd_rel_error": 1.0,
    }  # fmt: skip
    assert entry["rel_error"] < 0.05  # only the pruned small values are lost
    back = load_state_dict(out)["fc.weight"]
    assert torch.equal(back, torch.where(w.abs() >= 1, w, torch.zeros_like(w)))


def test_part_suffixes_come_from_the_codec_registry():
    assert set(part_suffixes()) == {".mask", ".rows", ".cols", ".indices", ".values", ".codebook", ".codes", ".scale", ".zero_point"}


def _many_layers(tmp_path, n=40):
    torch.manual_seed(0)
    src = tmp_path / "many.safetensors"
    save_file({f"l{i}.weight": torch.randn(16, 16) for i in range(n)}, str(src))
    return src


def test_long_metadata_is_stored_compressed_and_reads_back(tmp_path):
    """40 layers' entries: stored as "zlib:" + base64, several times smaller than the JSON, decoded
    to the same document; every reader (load, inspect) goes through it."""
    import json

    from mpocompress.format import COMPRESS_META_ABOVE, ZLIB_PREFIX, encode_meta

    out = tmp_path / "o.safetensors"
    convert(_many_layers(tmp_path), out, MPOConfig(quantize="kmeans:16"))
    raw = read_safetensors_header(out)[0]["__metadata__"][META_KEY]
    meta = decode_meta(raw)
    plain = json.dumps(meta, sort_keys=True)
    assert raw.startswith(ZLIB_PREFIX) and len(plain) > COMPRESS_META_ABOVE and len(raw) < len(plain) / 4
    assert encode_meta(meta) == raw and len(meta["layers"]) == 40
    assert load_state_dict(out).keys() == {f"l{i}.weight" for i in range(40)}


def test_format_version_1_files_still_read(tmp_path):
    """A file as version 1 wrote it (plain JSON, format_version 1) decompresses as before."""
    import json

    from safetensors import safe_open

    out = tmp_path / "o.safetensors"
    convert(_many_layers(tmp_path, 3), out, MPOConfig(quantize="kmeans:16"))
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = decode_meta(f.metadata()[META_KEY])
    meta["format_version"] = 1
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    a, b = load_state_dict(out), load_state_dict(old)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_compressed_metadata_is_bad_input(tmp_path, monkeypatch):
    """Not base64, not zlib, or a zlib bomb (unpacking beyond the cap): exit 3 with one line, no crash."""
    import base64
    import zlib

    from click.testing import CliRunner
    from safetensors import safe_open

    import mpocompress.format as fmt
    from mpocompress.cli import main

    out = tmp_path / "o.safetensors"
    convert(_many_layers(tmp_path, 3), out, MPOConfig(quantize="kmeans:16"))
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    monkeypatch.setattr(fmt, "MAX_META_BYTES", 1 << 16)
    bomb = fmt.ZLIB_PREFIX + base64.b64encode(zlib.compress(b"{" + b" " * (1 << 20) + b"}", 9)).decode()
    for raw in ("zlib:not base64!", "zlib:" + base64.b64encode(b"not zlib").decode(), bomb):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={"format": "pt", META_KEY: raw})
        res = CliRunner().invoke(main, ["decompress", str(bad), "-o", str(tmp_path / "d.safetensors")])
        assert res.exit_code == 3, res.output
        assert "corrupt mpocompress metadata" in res.output and "Traceback" not in res.output


def test_tensors_passed_through_may_be_stored_narrower(tmp_path):
    """``narrow="float16"``: biases and norm gains are stored in 16 bits, named in the metadata with
    their own dtype, and every reader gets that dtype back; a tensor float16 would change (a tiny
    running variance, a value out of range) and integer buffers are kept exactly."""
    from mpocompress.nn.surgery import load_compressed_

    g = torch.Generator().manual_seed(0)
    sd = {
        "lin.weight": torch.randn(48, 32, generator=g), "lin.bias": torch.randn(48, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(48, generator=g), "norm.running_var": torch.full((48,), 1e-7),
        "norm.big": torch.full((4,), 1e6), "norm.num_batches_tracked": torch.tensor(7),
    }  # fmt: skip
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    kept, narrow = tmp_path / "kept.safetensors", tmp_path / "narrow.safetensors"
    a = convert(src, kept, MPOConfig(quantize="int8", include=("lin.weight",)))
    b = convert(src, narrow, MPOConfig(quantize="int8", include=("lin.weight",)), narrow="float16")
    header = read_safetensors_header(narrow)[0]
    meta = decode_meta(header["__metadata__"][META_KEY])
    assert meta["narrowed"] == {"lin.bias": "float32", "norm.weight": "float32"}
    assert header["lin.bias"]["dtype"] == "F16" and header["norm.running_var"]["dtype"] == "F32"
    assert header["norm.big"]["dtype"] == "F32" and header["norm.num_batches_tracked"]["dtype"] == "I64"
    assert b.totals()["passthrough_narrowed"] == 2 and a.totals()["passthrough_narrowed"] == 0
    assert b.totals()["dense_bytes"] == a.totals()["dense_bytes"]
    assert a.totals()["bytes"] - b.totals()["bytes"] == 2 * 48 * 2
    dense = load_state_dict(narrow)
    for name, t in sd.items():
        assert dense[name].dtype == t.dtype, name
    assert torch.equal(dense["lin.bias"], sd["lin.bias"].half().float()) and not torch.equal(dense["lin.bias"], sd["lin.bias"])
    assert torch.equal(dense["norm.running_var"], sd["norm.running_var"])
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(32, 48)
    model.norm = torch.nn.Module()
    for name in ("weight", "running_var", "big", "num_batches_tracked"):
        model.norm.register_buffer(name, torch.zeros_like(sd[f"norm.{name}"]))
    load_compressed_(model, narrow)
    assert model.lin.bias.dtype == torch.float32 and torch.equal(model.lin.bias.detach(), dense["lin.bias"])


def test_narrowing_keeps_only_what_it_does_not_change():
    from mpocompress.codecs import narrowed

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert narrowed(x, "float16").dtype == torch.float16 and narrowed(x.double(), "bfloat16").dtype == torch.bfloat16
    assert narrowed(x * 1e5, "float16") is None and narrowed(x * 1e5, "bfloat16") is not None  # overflow
    assert narrowed(x * 1e-7, "float16") is None  # underflow: subnormal float16 loses the values
    assert narrowed(x.half(), "float16") is None and narrowed(torch.arange(3), "float16") is None
    assert narrowed(torch.tensor([1.0, float("nan")]), "float16") is None and narrowed(torch.zeros(0), "float16") is None
