"""Structured removal of whole hidden units (mpocompress.nn.units) and its sub-grid storage."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mpocompress import load_state_dict
from mpocompress.cli import main
from mpocompress.codecs import decode, encode, nbytes, parse_codec
from mpocompress.data import example_checkpoint
from mpocompress.jobs.finetune import apply_masks
from mpocompress.nn.units import find_unit_groups, masks_for, unit_masks
from mpocompress.speech.example import batches, se_lstm


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)
        self.c = nn.Linear(8, 8)
        self.rnn = nn.GRU(8, 6, num_layers=2)
        self.d = nn.Linear(6, 3)
        self.shared = nn.Linear(3, 3)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        h = h + self.c(h)  # residual: b's and c's outputs escape to an add
        y, _ = self.rnn(h)
        z = self.d(nn.functional.dropout(y, 0.0))
        return self.shared(self.shared(z))  # called twice: left alone


def test_groups_follow_the_data_flow():
    groups = {g.name: g for g in find_unit_groups(Res())}
    assert set(groups) == {"a", "rnn.l0", "rnn.l1"}
    assert groups["a"].rows == {"a.weight": 1, "a.bias": 1} and groups["a"].cols == ["b.weight"]
    assert groups["rnn.l0"].rows["rnn.weight_ih_l0"] == 3  # GRU: 3 gates together
    assert groups["rnn.l0"].cols == ["rnn.weight_hh_l0", "rnn.weight_ih_l1"]
    assert groups["rnn.l1"].cols == ["rnn.weight_hh_l1", "d.weight"]
    se = {g.name: g for g in find_unit_groups(se_lstm())}
    assert se["lstm.l0"].rows == {f"lstm.{p}_l0": 4 for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    assert se["lstm.l0"].cols == ["lstm.weight_hh_l0", "out.weight"]
    assert se["inp"].cols == ["lstm.weight_ih_l0"]


def test_untraceable_model_has_no_groups():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.a(x)
            return x

    assert find_unit_groups(Dyn()) == []


def _smaller_se(model, masks, removed):
    """The SE model physically without the removed units."""
    keep_in = [j for j in range(128) if j not in removed["inp"]]
    keep_h = [j for j in range(128) if j not in removed["lstm.l0"]]
    small = copy.deepcopy(model)
    sd = model.state_dict()
    small.inp = nn.Linear(257, len(keep_in))
    small.lstm = nn.LSTM(len(keep_in), len(keep_h), batch_first=True)
    small.out = nn.Linear(len(keep_h), 257)
    gate_rows = torch.tensor([g * 128 + j for g in range(4) for j in keep_h])
    with torch.no_grad():
        small.inp.weight.copy_(sd["inp.weight"][keep_in])
        small.inp.bias.copy_(sd["inp.bias"][keep_in])
        small.lstm.weight_ih_l0.copy_(sd["lstm.weight_ih_l0"][gate_rows][:, keep_in])
        small.lstm.weight_hh_l0.copy_(sd["lstm.weight_hh_l0"][gate_rows][:, keep_h])
        small.lstm.bias_ih_l0.copy_(sd["lstm.bias_ih_l0"][gate_rows])
        small.lstm.bias_hh_l0.copy_(sd["lstm.bias_hh_l0"][gate_rows])
        small.out.weight.copy_(sd["out.weight"][:, keep_h])
        small.out.bias.copy_(sd["out.bias"])
    return small


def test_removing_units_equals_the_smaller_network():
    model = se_lstm()
    model.load_state_dict(load_state_dict(example_checkpoint()))
    masks, removed = unit_masks(model, 0.4)
    assert {k: len(v) for k, v in removed.items()} == {"inp": 51, "lstm.l0": 51}
    small = _smaller_se(model, masks, removed)
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    x = torch.randn(2, 7, 257, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(x), small(x), atol=1e-6)
        assert not torch.allclose(pruned(x), model(x), atol=1e-3)
    # the lowest-scoring units went: on speech-like inputs, removing them hurts less than removing
    # random units (every one of 5 seeded draws)
    feats = batches(n=1, batch=4, seconds=0.5, seed=3)[0][0]
    with torch.no_grad():
        y = model(feats)
        ours = (pruned(feats) - y).norm()
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            rand_removed = {k: torch.randperm(128, generator=g)[:51].tolist() for k in removed}
            rand = copy.deepcopy(model)
            apply_masks(rand, _masks_for(model, rand_removed))
            assert ours < (rand(feats) - y).norm()


def _masks_for(model, removed):
    return masks_for(find_unit_groups(model), dict(model.named_parameters()), removed)


def test_subgrid_masks_are_stored_as_kept_rows_and_columns():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 24, generator=g)
    rows = torch.rand(40, generator=g) > 0.5
    cols = torch.rand(24, generator=g) > 0.3
    mask = rows[:, None] & cols[None, :]
    parts, meta = encode(x, [parse_codec("units:0.5")], mask=mask)
    assert meta["layout"] == "rowcol" and set(parts) == {"rows", "cols", "values"}
    assert nbytes(parts) == 5 + 3 + 4 * int(mask.sum())
    assert torch.equal(decode(parts, meta), x * mask)
    # with a quantizer after it
    parts, meta = encode(x, [parse_codec("units:0.5"), parse_codec("kmeans:4")], mask=mask)
    y = decode(parts, meta)
    assert (y[~mask] == 0).all() and y[mask].unique().numel() <= 4


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_convert_removes_units(tmp_path):
    out = tmp_path / "units.safetensors"
    res = run("convert", example_checkpoint(), "-o", out, "--prune", "units:0.5", "--quantize", "fp16",
              "--model", "mpocompress.speech.example:se_lstm", "--data", "mpocompress.speech.example:batches", "--steps", "0", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["finetune"]["units"] == {"inp": {"size": 128, "removed": 64}, "lstm.l0": {"size": 128, "removed": 64}}
    # with no training, the file holds exactly the teacher minus the removed units (in fp16)
    model = se_lstm()
    model.load_state_dict(load_state_dict(example_checkpoint()))
    masks, _ = unit_masks(model, 0.5)
    apply_masks(model, masks)
    loaded = se_lstm()
    loaded.load_state_dict(load_state_dict(out))
    x = torch.randn(1, 5, 257)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=2e-3)
    rows = {r["name"]: r for r in rep["layers"]}
    # LSTM weights keep half their gate rows and (hh) half their columns: a quarter of the values
    assert rows["lstm.weight_hh_l0"]["bytes"] == 2 * 256 * 64 + (512 + 128) // 8
    assert out.stat().st_size < 0.25 * example_checkpoint().stat().st_size
    res = run("convert", example_checkpoint(), "-o", tmp_path / "x.safetensors", "--prune", "units:0.5")
    assert res.exit_code == 2 and "--model" in res.stderr
    res = run("convert", example_checkpoint(), "-o", tmp_path / "y.safetensors", "--prune", "units:0.5", "--ratio", "4")
    assert res.exit_code == 2 and "not with MPO" in res.stderr


def test_units_with_fine_tuning_recovers(tmp_path):
    res = run("convert", example_checkpoint(), "-o", tmp_path / "u.safetensors", "--prune", "units:0.5",
              "--model", "mpocompress.speech.example:se_lstm", "--data", "mpocompress.speech.example:batches", "--steps", "30", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    kd = json.loads(res.stdout)["finetune"]["val_kd_loss"]
    assert kd["finetuned"] < kd["compressed"]
    sd = load_state_dict(tmp_path / "u.safetensors")
    zero_rows = (sd["lstm.weight_hh_l0"].abs().sum(1) == 0).reshape(4, 128)
    assert torch.equal(zero_rows, zero_rows[:1].expand(4, -1))  # all four gates of a unit go together
    assert int(zero_rows[0].sum()) == 64
    assert (sd["lstm.bias_ih_l0"].reshape(4, 128)[zero_rows] == 0).all()
    assert (sd["out.weight"][:, zero_rows[0]] == 0).all()


@pytest.mark.parametrize("bad", ["units", "units:1.0", "units:-0.1"])
def test_units_codec_parse(bad):
    with pytest.raises(ValueError):
        parse_codec(bad)
