import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mpocompress.cli import main


@pytest.fixture
def run():
    def _run(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    return _run


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, mpocompress.cli; assert 'torch' not in sys.modules, 'torch imported'; assert 'rich' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_is_cheap_and_lists_exit_codes():
    out = subprocess.run([sys.executable, "-m", "mpocompress", "--help"], check=True, capture_output=True, text=True).stdout
    assert "convert" in out and "inspect" in out and "5 quality gate" in out


def test_convert_json_report(run, tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    rep = tmp_path / "r.json"
    res = run("convert", trained_like, "-o", out, "--ratio", 4, "--json", "--report", rep)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["totals"]["layers_compressed"] == 3
    assert data["totals"]["output_file_bytes"] == out.stat().st_size
    assert json.loads(rep.read_text()) == data
    assert {"rel_error", "svd_rel_error", "bond_dims", "ratio"} <= set(data["layers"][0])


def test_convert_table_and_messages(tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    p = subprocess.run([sys.executable, "-m", "mpocompress", "convert", str(trained_like), "-o", str(out), "--bond-dim", "4"],
                       capture_output=True, text=True, env={**os.environ, "CI": "true"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "a.weight" in p.stdout and "SVD error" in p.stdout
    assert "wrote" in p.stderr and "wrote" not in p.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--bond-dim", "0"], 2, "Invalid value"),
        (["--cores", "1", "--bond-dim", "2"], 2, "Invalid value"),
        ([], 2, "give one of"),
        (["--ratio", "2", "--tol", "0.1"], 2, "cannot be combined"),
        (["--bond-dim", "4", "--max-error", "0.000001"], 5, "quality gate failed"),
        (["--ratio", "3", "--min-ratio", "50"], 5, "min-ratio"),
    ],
)
def test_exit_codes(run, tmp_path, trained_like, args, code, message):
    res = run("convert", trained_like, "-o", tmp_path / "o.safetensors", *args)
    assert res.exit_code == code, res.output
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_gate_failure_still_writes_the_report(run, tmp_path, trained_like):
    rep = tmp_path / "r.json"
    res = run("convert", trained_like, "-o", tmp_path / "o.safetensors", "--bond-dim", 2, "--max-error", "0.001", "--json", "--report", rep)
    assert res.exit_code == 5
    data = json.loads(rep.read_text())
    assert data["gates"]["passed"] is False and data["gates"]["max_error"]["failed_layers"]
    assert json.loads(res.stdout) == data


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda p: p, 3),  # missing
        (lambda p: (p.mkdir(), p)[1], 3),  # folder without index
        (lambda p: (p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"), p)[1], 3),
    ],
)
def test_bad_input_one_line(run, tmp_path, make, code):
    src = make(tmp_path / "in.safetensors")
    res = run("convert", src, "-o", tmp_path / "o.safetensors", "--bond-dim", 2)
    assert res.exit_code == code
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("mpocompress: error:")
    assert not (tmp_path / "o.safetensors").exists()


def test_code_pickle_refused(run, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    src = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(4, 4), "x": Evil()}, src)
    res = run("convert", src, "-o", tmp_path / "o.safetensors", "--bond-dim", 2)
    assert res.exit_code == 3 and "refused to unpickle" in res.stderr


def test_no_matrix(run, tmp_path):
    src = tmp_path / "v.safetensors"
    save_file({"b": torch.zeros(3)}, str(src))
    res = run("convert", src, "-o", tmp_path / "o.safetensors", "--bond-dim", 2)
    assert res.exit_code == 3 and "no floating-point tensor" in res.stderr


def test_output_errors(run, tmp_path, trained_like):
    res = run("convert", trained_like, "-o", tmp_path / "nope" / "o.safetensors", "--bond-dim", 2)
    assert res.exit_code == 4 and "does not exist" in res.stderr
    res = run("convert", trained_like, "-o", trained_like, "--bond-dim", 2, "--force")
    assert res.exit_code == 4 and "overwrite the input" in res.stderr
    (tmp_path / "o.safetensors").write_text("x")
    res = run("convert", trained_like, "-o", tmp_path / "o.safetensors", "--bond-dim", 2)
    assert res.exit_code == 4 and "--force" in res.stderr


def test_debug_variable_shows_the_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mpocompress", "convert", str(tmp_path / "none.pt"), "-o", str(tmp_path / "o.safetensors"), "--bond-dim", "2"],
                       capture_output=True, text=True, env={**os.environ, "MPOCOMPRESS_DEBUG": "1"})  # fmt: skip
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_inspect_json_plot_and_compressed(run, tmp_path, trained_like):
    res = run("inspect", trained_like, "--json", "--cores", 3)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [x["name"] for x in data["layers"]] == ["a.weight", "b.weight", "c.weight"]
    assert all(len(b["energy_ranks"]) == 3 for x in data["layers"] for b in x["bonds"])
    png = tmp_path / "s.png"
    res = run("inspect", trained_like, "--include", "c.*", "--plot", png)
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "bond spectra" in res.stdout
    out = tmp_path / "o.safetensors"
    assert run("convert", trained_like, "-o", out, "--bond-dim", 3).exit_code == 0
    res = run("inspect", out, "--json")
    assert json.loads(res.stdout)["meta"]["config"]["bond_dim"] == 3
    assert "a.weight" in run("inspect", out).stdout


def test_decompress_cli(run, tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    assert run("convert", trained_like, "-o", out, "--bond-dim", 3).exit_code == 0
    res = run("decompress", out, "-o", tmp_path / "d.pt", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["tensors"] == 6
    assert set(torch.load(tmp_path / "d.pt", weights_only=True)) == {"a.weight", "a.bias", "b.weight", "b.bias", "c.weight", "c.bias"}


def test_example_runs(run, tmp_path):
    res = run("example")
    path = res.stdout.strip()
    assert os.path.exists(path)
    res = run("convert", path, "-o", tmp_path / "o.safetensors", "--ratio", 4, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["totals"]["ratio"] > 3
