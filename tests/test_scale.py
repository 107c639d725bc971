"""Scale: bounded-memory groups, resumable work folder, workers and torchrun ranks give one output."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mpocompress.codecs import magnitude_threshold
from mpocompress.config import MPOConfig
from mpocompress.io import pack_safetensors, partial_path
from mpocompress.jobs.convert import convert

#: small enough that the test checkpoint splits into several groups and shards
from mpocompress.jobs.decompress import load_state_dict

#: small enough that the test checkpoint splits into several groups and shards
SHARD = 40_000


@pytest.fixture
def many(tmp_path) -> Path:
    """Eight weights of mixed sizes and dtypes, biases and an integer buffer."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for k, (o, i) in enumerate([(64, 96), (96, 64), (48, 48), (80, 40), (40, 80), (64, 64), (33, 70), (70, 33)]):
        w = torch.randn(o, i, generator=g)
        sd[f"l{k}.weight"] = w.half() if k == 5 else w
        sd[f"l{k}.bias"] = torch.randn(o, generator=g)
    sd["steps"] = torch.arange(7)
    path = tmp_path / "many.safetensors"
    save_file(sd, str(path))
    return path


def files_of(path: Path) -> dict[str, bytes]:
    """A folder's files by name, or a file's bytes (names differ between the outputs compared)."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {"": path.read_bytes()}


CFG = MPOConfig(ratio=3, cores=3, quantize="kmeans:16")


@pytest.mark.parametrize(("suffix", "shard"), [(".safetensors", SHARD), ("", 4000)])
def test_workers_give_identical_output(tmp_path, many, suffix, shard):
    one, two = tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"
    r1 = convert(many, one, CFG, max_shard_bytes=shard)
    r2 = convert(many, two, CFG, max_shard_bytes=shard, workers=2)
    assert r1.work["groups"] > 2 and r2.work["workers"] == 2
    assert files_of(one) == files_of(two)
    assert [r.to_dict() for r in r1.rows] == [r.to_dict() for r in r2.rows]
    if not suffix:
        assert len(list(one.glob("model-*.safetensors"))) > 1
    assert not partial_path(one).exists() and not partial_path(two).exists()
    sd = load_state_dict(one)
    assert set(sd) == set(load_state_dict(many))


def interrupt_after(n_layers: int):
    seen = []

    def progress(name, index, total):
        seen.append(name)
        if len(seen) > n_layers:
            raise KeyboardInterrupt

    return progress


def interrupted(src: Path, out: Path, n_layers: int, config: MPOConfig = CFG) -> list[Path]:
    """Convert until interrupted after ``n_layers`` layers; the group files left in the work folder."""
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, config, max_shard_bytes=SHARD, progress=interrupt_after(n_layers))
    return sorted(partial_path(out).glob("group-*.safetensors"))


def test_interrupted_run_resumes(tmp_path, many):
    fresh = tmp_path / "fresh"
    convert(many, fresh, CFG, max_shard_bytes=SHARD)
    out = tmp_path / "out"
    done = interrupted(many, out, 4)
    assert not out.exists()
    work = partial_path(out)
    assert len(done) >= 2
    report = convert(many, out, CFG, max_shard_bytes=SHARD)
    assert report.work["reused_groups"] == len(done)
    assert files_of(out) == files_of(fresh)
    assert not work.exists()


def test_corrupt_or_incomplete_group_is_redone(tmp_path, many):
    fresh = tmp_path / "fresh.safetensors"
    convert(many, fresh, CFG, max_shard_bytes=SHARD)
    out = tmp_path / "out.safetensors"
    groups = interrupted(many, out, 6)
    assert len(groups) >= 3
    raw = bytearray(groups[0].read_bytes())  # a flipped bit in the data: the header still parses
    raw[-3] ^= 0x10
    groups[0].write_bytes(bytes(raw))
    groups[1].with_suffix(".json").unlink()  # a group written without its manifest (killed between)
    report = convert(many, out, CFG, max_shard_bytes=SHARD)
    assert report.work["reused_groups"] == len(groups) - 2
    assert files_of(out) == files_of(fresh)


def test_work_folder_of_another_job_is_discarded(tmp_path, many, caplog):
    out = tmp_path / "out.safetensors"
    interrupted(many, out, 3, MPOConfig(ratio=2, cores=2))
    report = convert(many, out, CFG, max_shard_bytes=SHARD)
    assert report.work["reused_groups"] == 0
    assert "different or unreadable job" in caplog.text
    fresh = tmp_path / "fresh.safetensors"
    convert(many, fresh, CFG, max_shard_bytes=SHARD)
    assert out.read_bytes() == fresh.read_bytes()


def test_pack_keeps_every_tensor_aligned(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = {"u8": torch.arange(5, dtype=torch.uint8), "f64": torch.randn(3, dtype=torch.float64)}
    save_file(tensors, str(a))
    save_file({"f32": torch.randn(2, 3), "h": torch.randn(7).half(), "i64": torch.arange(3)}, str(b))
    out = tmp_path / "packed.safetensors"
    pack_safetensors([a, b], out, {"k": "v"})
    n = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8 : 8 + n])
    for name, info in header.items():
        if name != "__metadata__":
            size = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "U8": 1}[info["dtype"]]
            assert (8 + n + info["data_offsets"][0]) % size == 0, name
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert torch.equal(f.get_tensor("u8"), tensors["u8"]) and torch.equal(f.get_tensor("f64"), tensors["f64"])
        assert sorted(f.keys()) == ["f32", "f64", "h", "i64", "u8"]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    sparsity=st.floats(0, 1),
    levels=st.sampled_from([None, 3, 50]),
    seed=st.integers(0, 1000),
)
def test_streaming_threshold_is_the_exact_kth_magnitude(sizes, sparsity, levels, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g) for s in sizes]
    if levels is not None:  # heavy ties
        ts = [torch.round(t * levels) / levels for t in ts]
    mags = torch.cat([t.abs() for t in ts])
    k = int(round(sparsity * mags.numel()))
    expected = float(torch.kthvalue(mags, k).values) if k >= 1 else -1.0
    assert magnitude_threshold(lambda: iter(ts), sparsity) == expected
    assert magnitude_threshold(ts, sparsity) == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "mpocompress", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_torchrun_two_ranks_match_one_process(tmp_path, many):
    one = tmp_path / "one"
    convert(many, one, CFG, max_shard_bytes=SHARD)
    ranks = tmp_path / "ranks"
    res = torchrun("convert", str(many), "-o", str(ranks), "--ratio", "3", "--cores", "3", "--quantize", "kmeans:16",
                   "--max-shard-size", str(SHARD), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)  # only rank 0 prints
    assert report["work"]["ranks"] == 2
    assert files_of(ranks) == files_of(one)


def test_torchrun_data_parallel_finetune(tmp_path):
    from mpocompress.data import example_checkpoint

    out = tmp_path / "tuned.safetensors"
    res = torchrun("convert", str(example_checkpoint()), "-o", str(out), "--ratio", "8", "--cores", "3",
                   "--model", "mpocompress.speech.example:se_lstm", "--data", "mpocompress.speech.example:batches",
                   "--steps", "6", "--calibration", "none", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["work"]["ranks"] == 2
    ft = report["finetune"]
    assert ft["steps"] == 6
    assert ft["val_kd_loss"]["finetuned"] < ft["val_kd_loss"]["compressed"]  # the start is kept if no better
    assert out.is_file()


def test_torchrun_a_rank_with_bad_input_stops_every_rank_with_its_message(tmp_path, many):
    """Bad input met by rank 1 only (a NaN weight under --strict, in a group rank 1 converts): rank 1
    exits 3 with its message, and rank 0 stops with exit 3 too, naming rank 1 and the cause -- not
    with a broken process group reported as an internal error; nothing is written."""
    from mpocompress.io import open_checkpoint
    from mpocompress.jobs.plan import GROUP_MAX_BYTES, plan_groups

    sd = load_state_dict(many)
    with open_checkpoint(many) as ckpt:
        groups = plan_groups(ckpt, ckpt.keys(), min(SHARD, GROUP_MAX_BYTES))
    victim = next(n for i, g in enumerate(groups) if i % 2 == 1 for n in g if n.endswith(".weight") and sd[n].dtype == torch.float32)
    sd[victim][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    out = tmp_path / "out"
    res = torchrun("convert", str(bad), "-o", str(out), "--ratio", "3", "--max-shard-size", str(SHARD), "--strict")
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("mpocompress: error:")]
    assert any(victim in line and "rank" not in line for line in lines), res.stderr[-3000:]  # rank 1's own
    assert any("rank 1 of 2 stopped" in line and victim in line for line in lines), res.stderr[-3000:]  # rank 0's
    assert "internal error" not in res.stderr and "exitcode  : 1" not in res.stderr
    assert not out.exists()
