"""Golden tests of the on-disk format (docs/format.md): a change to any byte is a format change."""

import hashlib
import json

import torch
from safetensors.torch import save_file

from mpocompress import MPOConfig
from mpocompress.codecs import pack_bits, unpack_bits
from mpocompress.format import FORMAT_VERSION, META_KEY, part_suffixes
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
    meta = json.loads(header["__metadata__"][META_KEY])
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
    assert meta["format"] == "mpocompress" and meta["format_version"] == FORMAT_VERSION == 1
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
