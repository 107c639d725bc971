"""Hostile use: every bad input or output path gets its exit code and one line, no partial file is
left, and every input's bytes stay as they were (issue: "nothing is ever lost")."""

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mpocompress import MPOConfig
from mpocompress.cli import main
from mpocompress.errors import InputError, Interrupted
from mpocompress.format import FORMAT_VERSION, decode_meta, encode_meta, read_meta
from mpocompress.io import open_checkpoint, read_safetensors_header
from mpocompress.jobs.convert import convert
from mpocompress.jobs.decompress import load_state_dict
from mpocompress.jobs.workdir import OutputLock


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) with its SHA-256: what must not change."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_line_error(res, code: int, fragment: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.stderr, res.stdout)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("mpocompress: error: "), res.stderr
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in res.stderr


def no_leftovers(folder: Path, allowed: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == allowed


# --------------------------------------------------------------------------------------------
# side outputs never overwrite anything


def test_report_over_the_input_is_refused_before_any_work(tmp_path, trained_like):
    before = digest(tmp_path)
    out = tmp_path / "o.safetensors"
    res = run("convert", trained_like, "-o", out, "--ratio", 3, "--report", trained_like)
    one_line_error(res, 4, "input")
    assert not out.exists() and digest(tmp_path) == before
    res = run("convert", trained_like, "-o", out, "--ratio", 3, "--report", out)
    one_line_error(res, 4, "written twice")
    res = run("convert", trained_like, "-o", out, "--ratio", 3, "--report", tmp_path / "nope" / "r.json")
    one_line_error(res, 4, "does not exist")
    assert not out.exists()  # found before converting
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    res = run("convert", trained_like, "-o", out, "--ratio", 3, "--report", tmp_path / "notes.json", "--force")
    one_line_error(res, 4, "not an earlier mpocompress report")
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}' and not out.exists()
    # our own report is replaced with --force
    res = run("convert", trained_like, "-o", out, "--ratio", 3, "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.stderr
    res = run("convert", trained_like, "-o", out, "--ratio", 4, "--report", tmp_path / "r.json", "--force")
    assert res.exit_code == 0 and json.loads((tmp_path / "r.json").read_text())["config"]["ratio"] == 4.0


def test_plot_over_the_input_is_refused(tmp_path, trained_like):
    pytest.importorskip("matplotlib")
    before = digest(trained_like)
    res = run("inspect", trained_like, "--plot", trained_like)
    one_line_error(res, 4, "input")
    assert digest(trained_like) == before
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    res = run("inspect", trained_like, "--plot", tmp_path / "photo.png", "--force")
    one_line_error(res, 4, "not an earlier mpocompress plot")
    res = run("inspect", trained_like, "--plot", tmp_path / "s.png")
    assert res.exit_code == 0
    res = run("inspect", trained_like, "--plot", tmp_path / "s.png", "--force")
    assert res.exit_code == 0, res.stderr


def test_force_never_wipes_a_folder_or_an_input_index(tmp_path, trained_like):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    res = run("convert", trained_like, "-o", folder, "--ratio", 3, "--force")
    one_line_error(res, 4, "not an earlier mpocompress checkpoint")
    assert (folder / "thesis.tex").read_text() == "years of work"
    # a sharded input: its index, a shard, the folder, '..' and symlinked paths to them
    sharded = tmp_path / "sharded"
    convert(trained_like, sharded, MPOConfig(bond_dim=4, cores=2), max_shard_bytes=2000)
    before = digest(sharded)
    (tmp_path / "link").symlink_to(sharded / "model.safetensors.index.json")
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    os.link(shard, tmp_path / "hard.safetensors")
    for target in (
        sharded / "model.safetensors.index.json", shard, sharded, tmp_path / "x" / ".." / "sharded",
        tmp_path / "link", tmp_path / "hard.safetensors",
    ):  # fmt: skip
        res = run("convert", sharded, "-o", target, "--ratio", 2, "--force")
        assert res.exit_code in (2, 4), (target, res.stderr)
        assert digest(sharded) == before
    # our own sharded output is replaced by --force, the old one kept until the new one is in place
    out = tmp_path / "again"
    assert run("convert", trained_like, "-o", out, "--ratio", 3).exit_code == 0
    assert run("convert", trained_like, "-o", out, "--ratio", 4, "--force").exit_code == 0
    assert read_meta(open_checkpoint(out))["config"]["ratio"] == 4.0


def test_output_names_that_look_like_files_never_become_folders(tmp_path, trained_like):
    for name in ("x.safetensor", "x.SAFETENSORS", "small.pt"):
        res = run("convert", trained_like, "-o", tmp_path / name, "--ratio", 3)
        one_line_error(res, 2, "NAME.safetensors")
        assert not (tmp_path / name).exists()


# --------------------------------------------------------------------------------------------
# concurrent runs, interrupts


def test_a_second_run_on_a_locked_output_fails_fast(tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    lock = OutputLock(out)
    lock.acquire()
    try:
        res = run("convert", trained_like, "-o", out, "--ratio", 3)
        one_line_error(res, 4, f"another conversion is writing {out}")
        assert (out.parent / ".o.safetensors.partial" / "lock").is_file()  # the owner's lock untouched
        assert not out.exists()
    finally:
        lock.release()
    # a lock file left by a dead process is stale: taken over
    work = tmp_path / ".o.safetensors.partial"
    work.mkdir(exist_ok=True)
    (work / "lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    res = run("convert", trained_like, "-o", out, "--ratio", 3)
    assert res.exit_code == 0, res.stderr
    assert out.is_file() and not work.exists()


def test_ctrl_c_after_the_final_rename_tells_the_truth(tmp_path, trained_like, monkeypatch):
    from mpocompress.jobs.workdir import GroupStore

    original = GroupStore.discard

    def interrupted_discard(self):  # Ctrl-C lands while the work folder is being removed
        os.kill(os.getpid(), signal.SIGINT)
        original(self)

    monkeypatch.setattr(GroupStore, "discard", interrupted_discard)
    out = tmp_path / "o.safetensors"
    res = run("convert", trained_like, "-o", out, "--ratio", 3)
    one_line_error(res, 130, "written completely")
    assert load_state_dict(out).keys() == load_state_dict(trained_like).keys()
    assert not (tmp_path / ".o.safetensors.partial").exists()
    assert not any(p.name.endswith(tuple(f"old-{os.getpid()}" for _ in [0])) for p in tmp_path.iterdir())


def test_ctrl_c_during_the_work_says_nothing_was_written(tmp_path, trained_like, monkeypatch):
    import mpocompress.jobs.workers as pl

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "compress_tensor", boom)
    out = tmp_path / "o.safetensors"
    with pytest.raises(Interrupted, match="was not written"):
        convert(trained_like, out, MPOConfig(ratio=3))
    assert not out.exists()
    no_leftovers(tmp_path, {"trained.safetensors"})


# --------------------------------------------------------------------------------------------
# inputs that used to crash


def test_non_finite_weights_pass_through_or_fail_with_strict(tmp_path, trained_like):
    sd = load_file(str(trained_like))
    sd["mask"] = torch.triu(torch.full((16, 16), float("-inf")), diagonal=1)  # a causal-mask buffer
    sd["b.weight"][3, 5] = float("nan")
    src = tmp_path / "nan.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "o.safetensors"
    res = run("convert", src, "-o", out, "--ratio", 3, "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)  # nothing but the JSON on stdout
    rows = {r["name"]: r for r in report["layers"]}
    assert "NaN/Inf" in rows["mask"]["reason"] and "NaN/Inf" in rows["b.weight"]["reason"]
    assert "mask" in res.stderr and "b.weight" in res.stderr
    back = load_state_dict(out)
    assert torch.equal(back["mask"], sd["mask"]) and torch.equal(back["b.weight"].isnan(), sd["b.weight"].isnan())
    assert rows["a.weight"]["status"] == "mpo"
    res = run("convert", src, "-o", tmp_path / "s.safetensors", "--ratio", 3, "--strict")
    one_line_error(res, 3, "NaN/Inf")
    assert not (tmp_path / "s.safetensors").exists()
    res = run("inspect", src, "--json")
    assert res.exit_code == 0 and {s["name"] for s in json.loads(res.stdout)["skipped"]} == {"mask", "b.weight"}


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--include", "re:["], 2, "regular expression"),
        (["--cores", "50"], 2, "2..8"),
        (["--quantize", "kmeans:inf"], 2, "finite"),
        (["--max-shard-size", "nan"], 2, "size"),
        (["--ratio", "abc"], 2, "abc"),
        (["--prune", "magnitude:x"], 2, "number"),
    ],
)
def test_usage_errors_exit_2_on_one_line(tmp_path, trained_like, args, code, fragment):
    res = run("convert", trained_like, "-o", tmp_path / "o.safetensors", "--ratio", 3, *args) if "--ratio" not in args else run(
        "convert", trained_like, "-o", tmp_path / "o.safetensors", *args
    )
    one_line_error(res, code, fragment)
    assert "could not convert" not in res.stderr and "not supported between" not in res.stderr
    no_leftovers(tmp_path, {"trained.safetensors"})


def test_bad_inputs_exit_3(tmp_path, trained_like):
    text = tmp_path / "notes.pt"
    text.write_text("just some text\n" * 10)
    one_line_error(run("convert", text, "-o", tmp_path / "o.safetensors", "--ratio", 3), 3, "not a readable torch checkpoint")
    # an all-zero Gram matrix of recorded inputs: refused as bad input
    acts = tmp_path / "acts.safetensors"
    save_file({"a.weight.gram": torch.zeros(160, 160)}, str(acts))
    res = run("convert", trained_like, "-o", tmp_path / "o.safetensors", "--ratio", 3, "--cores", 3, "--activations", acts)
    one_line_error(res, 3, "a.weight")
    assert not (tmp_path / "o.safetensors").exists()


def test_full_or_read_only_output_folder_exits_4(tmp_path, trained_like, monkeypatch):
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    res = run("convert", trained_like, "-o", tmp_path / "o.safetensors", "--ratio", 3)
    one_line_error(res, 4, "No space left")
    no_leftovers(tmp_path, {"trained.safetensors"})


def _tamper(path: Path, out: Path, edit) -> None:
    header, start = read_safetensors_header(path)
    meta = decode_meta(header["__metadata__"]["mpocompress"])
    edit(meta)
    header["__metadata__"]["mpocompress"] = encode_meta(meta)
    raw = path.read_bytes()
    new = json.dumps(header).encode()
    new += b" " * (-(len(new) + 8) % 8)
    out.write_bytes(len(new).to_bytes(8, "little") + new + raw[start:])


def test_tampered_or_newer_metadata_is_refused_by_every_reader(tmp_path, trained_like):
    from mpocompress.nn.surgery import load_compressed_

    good = tmp_path / "good.safetensors"
    convert(trained_like, good, MPOConfig(ratio=3, cores=2, quantize="kmeans:16"))
    edits = {
        "newer": lambda m: m.update(format_version=99),
        "shape": lambda m: m["layers"]["a.weight"].update(shape=[7, 7]),
        "dtype": lambda m: m["layers"]["a.weight"].update(dtype="complex64"),
        "modes": lambda m: m["layers"]["a.weight"].update(out_modes=[1]),
        "parts": lambda m: next(iter(m["layers"]["a.weight"]["encoded"].values())).update(shape=[3, 3]),
        "narrowed": lambda m: m.update(narrowed={"a.bias": "int8"}),
        "narrowed-missing": lambda m: m.update(narrowed={"nothing.bias": "float32"}),
    }
    for what, edit in edits.items():
        bad = tmp_path / f"{what}.safetensors"
        _tamper(good, bad, edit)
        with pytest.raises(InputError) as e:
            load_state_dict(bad)
        if what == "newer":
            assert "99" in str(e.value) and f"({FORMAT_VERSION})" in str(e.value)
            with pytest.raises(InputError, match="newer"):
                load_compressed_(torch.nn.Module(), bad)
        one_line_error(run("decompress", bad, "-o", tmp_path / "d.safetensors"), 3, str(bad))
        if what not in ("parts", "narrowed-missing"):  # inspect reads the metadata only, not the tensors
            one_line_error(run("inspect", bad), 3, str(bad))
        assert not (tmp_path / "d.safetensors").exists()


def test_sharded_inputs_are_checked(tmp_path, trained_like):
    sharded = tmp_path / "sharded"
    convert(trained_like, sharded, MPOConfig(bond_dim=4, cores=2), max_shard_bytes=2000)
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    for evil in ("../trained.safetensors", str(trained_like)):
        bad = json.loads(index.read_text())
        bad["weight_map"][name] = evil
        index.write_text(json.dumps(bad))
        one_line_error(run("convert", sharded, "-o", tmp_path / "o.safetensors", "--ratio", 2), 3, "outside its folder")
    by_shard: dict[str, list[str]] = {}
    for k, v in data["weight_map"].items():
        by_shard.setdefault(v, []).append(k)
    shared = next(names for names in by_shard.values() if len(names) > 1)
    lonely = next((names for names in by_shard.values() if len(names) == 1), None)
    bad = json.loads(json.dumps(data))
    del bad["weight_map"][shared[0]]  # the shard still holds it: unlisted
    index.write_text(json.dumps(bad))
    one_line_error(run("convert", sharded, "-o", tmp_path / "o.safetensors", "--ratio", 2), 3, "does not list")
    if lonely is not None:  # a shard the index no longer names at all
        bad = json.loads(json.dumps(data))
        del bad["weight_map"][lonely[0]]
        index.write_text(json.dumps(bad))
        one_line_error(run("convert", sharded, "-o", tmp_path / "o.safetensors", "--ratio", 2), 3, "names none")
    # the usual Hugging Face layout: a folder with one model.safetensors
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(trained_like.read_bytes())
    (hf / "config.json").write_text("{}")
    res = run("convert", hf, "-o", tmp_path / "hf.safetensors", "--ratio", 3)
    assert res.exit_code == 0, res.stderr


def test_training_checkpoints_say_what_they_drop(tmp_path, trained_like, caplog):
    sd = load_file(str(trained_like))
    optim = {"state": {0: {"exp_avg": torch.zeros(96, 160), "exp_avg_sq": torch.zeros(96, 160)}}, "param_groups": []}
    path = tmp_path / "train.pt"
    torch.save({"model": sd, "optimizer": optim, "epoch": 3}, path)
    res = run("convert", path, "-o", tmp_path / "o.safetensors", "--ratio", 3, "--json")
    assert res.exit_code == 0, res.stderr
    assert "optimizer" in res.stderr and "epoch" in res.stderr
    totals = json.loads(res.stdout)["totals"]
    weights = sum(t.numel() * t.element_size() for t in sd.values())
    assert totals["input_file_bytes"] == weights < path.stat().st_size


# --------------------------------------------------------------------------------------------
# fuzzing the two parsers of untrusted bytes: never a crash (exit 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_reader(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fz") / "x.safetensors"
    path.write_bytes(data)
    try:
        with open_checkpoint(path) as ck:
            read_meta(ck)
            for n in ck.keys():
                ck.get(n)
    except InputError:
        pass


@pytest.fixture(scope="module")
def small_compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    src = root / "s.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"fc.weight": torch.randn(12, 10, generator=g), "fc.bias": torch.zeros(12)}, str(src))
    out = root / "c.safetensors"
    convert(src, out, MPOConfig(bond_dim=2, cores=2, quantize="kmeans:4"))
    return out.read_bytes()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_headers_and_metadata_never_crash(tmp_path_factory, small_compressed, data):
    raw = bytearray(small_compressed)
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(header) - 1))
        header[i] = data.draw(st.sampled_from(b'0123456789{}[]":,-.aez '))
    path = tmp_path_factory.mktemp("fz") / "m.safetensors"
    path.write_bytes(bytes(raw[:8]) + bytes(header) + bytes(raw[8 + n :]))
    try:
        load_state_dict(path)
    except InputError:
        pass
    # the CLI maps the same to exit 0 or 3, never 1
    res = run("inspect", path, "--json")
    assert res.exit_code in (0, 3), res.stderr


def test_a_foreign_work_folder_is_refused_and_an_empty_one_taken(tmp_path, trained_like):
    """``.NAME.partial`` holding someone's file: exit 4, the file untouched. An empty one (what a
    second torchrun rank sees for a moment while rank 0 takes the lock) holds nothing to lose: used,
    then removed with the conversion's work folder."""
    out = tmp_path / "o.safetensors"
    work = tmp_path / ".o.safetensors.partial"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    res = run("convert", trained_like, "-o", out, "--ratio", 3)
    one_line_error(res, 4, "not an mpocompress work folder")
    assert (work / "notes.txt").read_text() == "mine" and not out.exists()
    (work / "notes.txt").unlink()
    res = run("convert", trained_like, "-o", out, "--ratio", 3)
    assert res.exit_code == 0, res.stderr
    assert out.is_file() and not work.exists()
