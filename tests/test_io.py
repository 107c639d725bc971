import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mpocompress.errors import InputError
from mpocompress.io import open_checkpoint, unwrap_state_dict


def _sd():
    return {"a.weight": torch.randn(8, 6), "a.bias": torch.randn(8), "steps": torch.tensor(3)}


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3, "optimizer_states": []},
                                  lambda sd: {"model": sd}, lambda sd: {"model_state": sd, "step": 1}])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_checkpoints_and_nesting(tmp_path, wrap, suffix):
    sd = _sd()
    p = tmp_path / f"m{suffix}"
    torch.save(wrap(sd), p)
    with open_checkpoint(p) as ck:
        assert set(ck.keys()) == set(sd)
        assert ck.shape("a.weight") == (8, 6) and ck.dtype("steps") == "int64"
        assert torch.equal(ck.get("a.weight"), sd["a.weight"])


def test_nested_dicts_are_flattened():
    sd = unwrap_state_dict({"enc": {"w": torch.ones(2, 2)}, "b": torch.zeros(1), "lr": 0.1})
    assert set(sd) == {"enc.w", "b"}


def test_sharded_safetensors(tmp_path):
    save_file({"a": torch.randn(4, 4)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.randn(3, 5)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with open_checkpoint(tmp_path) as ck:
        assert sorted(ck.keys()) == ["a", "b"] and ck.shape("b") == (3, 5)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "no model.safetensors.index.json"),
        (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"), "not a valid safetensors"),
        (lambda p: torch.save({"w": torch.ones(1), "evil": Evil()}, p), "refused to unpickle"),
        (lambda p: p.write_bytes(b"garbage" * 20), "not a readable torch checkpoint"),
    ],
)
def test_bad_inputs(tmp_path, make, message):
    suffix = {"not a valid safetensors": ".safetensors", "refused to unpickle": ".pt", "not a readable torch checkpoint": ".pt"}.get(message, "")
    p = tmp_path / f"bad{suffix}"
    make(p)
    with pytest.raises(InputError, match=message):
        open_checkpoint(p)


def test_truncated_safetensors(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(32, 32)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(InputError, match="not a valid safetensors"):
        open_checkpoint(p)


def test_pickle_payload_never_runs(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"evil": Evil()}, f)
    with pytest.raises(InputError):
        open_checkpoint(p)
    assert "pwned" not in capsys.readouterr().out
