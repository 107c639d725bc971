"""Language models: tied weights, model folders in and out, text data, KL distillation, perplexity,
and (with transformers installed) a Hugging Face causal LM end to end with no user code."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from mpocompress.cli import main
from mpocompress.config import TuneConfig
from mpocompress.errors import InputError
from mpocompress.format import decode_meta
from mpocompress.jobs.decompress import load_state_dict
from mpocompress.jobs.finetune import batch_loss, distill_loss, hidden_blocks, hidden_loss
from mpocompress.nn.layers import MPOLinear
from mpocompress.nn.surgery import load_compressed_
from mpocompress.text.data import read_text, text_batches, windows
from mpocompress.text.evaluate import perplexity


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class TinyLM(nn.Module):
    """Embedding -> MLP -> head tied to the embedding (the usual LM layout)."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 48)
        self.fc2 = nn.Linear(48, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def _tiny(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def test_tied_weights_are_stored_once_and_tied_again_on_load(tmp_path):
    model = _tiny()
    src, out = tmp_path / "lm.pt", tmp_path / "lm.mpo.safetensors"
    torch.save(model.state_dict(), src)  # both names, one storage
    res = run("convert", src, "-o", out, "--ratio", "2", "--json")
    assert res.exit_code == 0, res.output
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        meta = decode_meta(f.metadata()["mpocompress"])
    assert "head.weight" not in keys and meta["tied"] == {"head.weight": "embed.weight"}
    sd = load_state_dict(out)
    assert torch.equal(sd["head.weight"], sd["embed.weight"])
    loaded = load_compressed_(_tiny(1), out)
    # the embedding became cores: the head shares those very core parameters
    assert isinstance(loaded.fc1, MPOLinear) and isinstance(loaded.head, MPOLinear)
    assert all(a is b for a, b in zip(loaded.head.weight_cores, loaded.embed.weight_cores))
    assert len({id(p) for p in loaded.parameters()}) == len(list(loaded.parameters()))
    dense = _tiny(2)
    dense.load_state_dict(sd)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), dense(ids), atol=1e-5)


def _model_folder(tmp_path, name="src"):
    folder = tmp_path / name
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in _tiny().state_dict().items() if k != "head.weight"}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"architectures": ["TinyLM"]}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not copied")
    return folder


def test_a_model_folder_keeps_its_config_and_tokenizer_through_convert_and_decompress(tmp_path):
    src = _model_folder(tmp_path)
    out, dense = tmp_path / "small", tmp_path / "dense"
    assert run("convert", src, "-o", out, "--ratio", "2").exit_code == 0
    assert {"config.json", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    assert not (out / "pytorch_model.bin").exists()
    # the copies count as ours: --force replaces the folder; a stranger's file in it is refused
    assert run("convert", src, "-o", out, "--ratio", "3", "--force").exit_code == 0
    res = run("decompress", out, "-o", dense)
    assert res.exit_code == 0, res.output
    assert {f.name for f in dense.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert (dense / "config.json").read_text() == (src / "config.json").read_text()
    assert run("decompress", out, "-o", dense, "--force").exit_code == 0
    (dense / "notes.txt").write_text("mine")
    res = run("decompress", out, "-o", dense, "--force")
    assert res.exit_code == 4 and (dense / "notes.txt").read_text() == "mine"
    # the report's sizes are the weights', not the tokenizer's
    report = json.loads(run("convert", src, "-o", tmp_path / "r", "--ratio", "2", "--json").stdout)
    assert report["totals"]["output_file_bytes"] < (src / "model.safetensors").stat().st_size


def test_text_files_and_windows(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text(tmp_path / "a.jsonl") == "one\n\ntwo"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"txt": 2}\n')
    with pytest.raises(InputError, match="b.jsonl:2"):
        read_text(tmp_path / "b.jsonl")
    assert windows(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(InputError, match="fewer than one window"):
        windows(torch.arange(3), 4)

    class Chars:  # a tokenizer: one id per character
        def __call__(self, text, **_):
            return {"input_ids": [ord(c) % 40 for c in text]}

    (tmp_path / "c.txt").write_text("abcdefghij" * 5)
    batches = text_batches(tmp_path / "c.txt", Chars(), 8, 2)
    assert [tuple(b.shape) for b in batches] == [(2, 8), (2, 8), (2, 8)]


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


class Bigram(nn.Module):
    """Predicts the next token from the current one only: its perplexity needs no context, so every
    window layout must give the same number."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, ids):
        return self.table[ids]


def test_perplexity_windows_score_every_token_once():
    ids = torch.randint(0, 11, (101,), generator=torch.Generator().manual_seed(0))
    r = perplexity(Uniform(11), ids, seq_len=16)
    assert r["ppl"] == pytest.approx(11.0) and r["windows"] == 7
    model = Bigram(11)
    exact = nn.functional.cross_entropy(model(ids[:-1]), ids[1:]).item()
    for seq_len, stride in [(16, 8), (16, 1), (100, 50), (7, 3)]:
        r = perplexity(model, ids, seq_len, stride)
        assert r["tokens"] == 100 and r["nll"] == pytest.approx(exact, rel=1e-5), (seq_len, stride)
    r = perplexity(model, ids, seq_len=16)  # disjoint windows: a window's first token has no context
    assert r["tokens"] == 100 - 6


def test_kl_distillation_loss():
    cfg = TuneConfig(kd_loss="kl", temperature=2.0)
    a = torch.randn(3, 5, 7)
    assert distill_loss(a, a, cfg).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(a + torch.randn(3, 5, 7), a, cfg).item() > 0
    assert distill_loss(a + 3.0, a, cfg).item() == pytest.approx(0.0, abs=1e-5)  # softmax is shift-invariant
    with pytest.raises(Exception, match="kd_loss"):
        TuneConfig(kd_loss="l1")


def test_hidden_state_distillation_compares_the_blocks_outputs():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    teacher = nn.Sequential(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), nn.Linear(16, 5)).eval()
    assert hidden_blocks(teacher) == ["0.layers.0", "0.layers.1", "0.layers.2"] and hidden_blocks(nn.Linear(2, 2)) == []
    student = copy.deepcopy(teacher)
    x = torch.randn(2, 6, 16)
    plain, hidden = TuneConfig(kd_loss="mse"), TuneConfig(kd_loss="mse", kd_hidden=2.0)
    assert batch_loss(student, teacher, x, hidden).item() == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        student[0].layers[1].linear2.weight.mul_(1.5)
    extra = batch_loss(student, teacher, x, hidden) - batch_loss(student, teacher, x, plain)
    assert extra.item() > 0  # the middle block's change is seen in its own and the next block's output
    a = [torch.randn(3, 4) * s for s in (1.0, 100.0)]
    noisy = [t + 0.1 * torch.randn(3, 4) * t.abs().mean() for t in a]
    assert hidden_loss(a, a).item() == 0.0 and 0 < hidden_loss(noisy, a).item() < 0.1  # scale-free per block
    with pytest.raises(Exception, match="kd_hidden"):
        TuneConfig(kd_hidden=-1.0)


# ---------------------------------------------------------------------------------------------
# a Hugging Face causal LM, built from its config.json (needs the [hf] extra)


def _hf_folder(tmp_path, arch: str = "llama"):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = "the a of and to in was he she it her his that with had for as not but at on be by".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers (weights stored (in, out))
        config = transformers.GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=0, bos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    folder = tmp_path / arch
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    for name, n in (("calib.txt", 1200), ("eval.txt", 600)):
        (tmp_path / name).write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)))
    return transformers, folder


def test_a_hugging_face_folder_calibrates_trains_and_evaluates_with_no_user_code(tmp_path):
    transformers, folder = _hf_folder(tmp_path)
    out, dense = tmp_path / "small", tmp_path / "dense"
    res = run("convert", folder, "-o", out, "--ratio", "2", "--include", "*proj*", "--data", tmp_path / "calib.txt",
              "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--lr", "1e-4", "--kd-hidden", "0.5", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["finetune"]["config"]["kd_hidden"] == 0.5
    assert report["calibration"]["weights"] == 14 and report["calibration"]["mode"] == "sequential-plain" and report["finetune"]["config"]["kd_loss"] == "kl"
    # --curvature auto with logits: both fits made, the lower held-out KL kept (and the start of training)
    curv = report["finetune"]["curvature"]
    assert set(curv["val_kd_loss"]) == {"kfac", "none"} and curv["chosen"] == min(curv["val_kd_loss"], key=curv["val_kd_loss"].get)
    assert report["finetune"]["val_kd_loss"]["compressed"] == pytest.approx(curv["val_kd_loss"][curv["chosen"]], rel=1e-5)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    res = run("evaluate", "--task", "lm", folder, out, "--data", tmp_path / "eval.txt", "--seq-len", "32", "--json")
    assert res.exit_code == 0, res.output
    scores = json.loads(res.stdout)["systems"]
    assert len(scores) == 2 and all(math.isfinite(s["ppl"]) and s["tokens"] > 0 for s in scores.values())
    # decompress gives a folder transformers loads; its logits are the compressed model's
    assert run("decompress", out, "-o", dense).exit_code == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(dense).eval()
    from mpocompress.text.evaluate import load_lm

    cores = load_lm(out, out)
    assert any(isinstance(m, MPOLinear) for m in cores.modules())
    ids = torch.randint(0, 20, (1, 12))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, cores(ids).logits, atol=1e-4)
    s = scores[str(out)]
    assert s["ppl"] == pytest.approx(json.loads(run("evaluate", "--task", "lm", dense, "--data", tmp_path / "eval.txt",
                                                     "--seq-len", "32", "--json").stdout)["systems"][str(dense)]["ppl"], rel=1e-4)  # fmt: skip


def test_gpt2_conv1d_layers_are_calibrated_in_their_stored_orientation(tmp_path):
    """GPT-2's Conv1D weights (stored (in, out)) are recorded and fitted to their inputs; the cores
    are of the stored matrix, so the compressed folder runs and decompresses like the model."""
    transformers, folder = _hf_folder(tmp_path, "gpt2")
    losses = {}
    for mode in ("none", "auto"):
        out = tmp_path / f"small-{mode}"
        res = run("convert", folder, "-o", out, "--ratio", "2", "--include", "*.h.*", "--data", tmp_path / "calib.txt", "--seq-len", "32",
                  "--batch-size", "4", "--steps", "0", "--calibration", mode, "--json")  # fmt: skip
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        losses[mode] = report["finetune"]["val_kd_loss"]["compressed"]
    assert report["calibration"]["weights"] == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    fits = {r["name"]: r["refine"].get("calibrated") for r in report["layers"] if r["status"] == "mpo"}
    # each fit lowers its objective (the K-FAC loss when --calibration auto picked the curvature)
    assert all(f is not None and f["objective_after"] < f["objective_before"] for f in fits.values()), fits
    assert losses["auto"] < losses["none"]
    dense = tmp_path / "dense"
    assert run("decompress", out, "-o", dense).exit_code == 0
    from mpocompress.text.evaluate import load_lm

    plain = transformers.AutoModelForCausalLM.from_pretrained(dense).eval()
    cores = load_lm(out, out)
    ids = torch.randint(0, 20, (1, 12))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, cores(ids).logits, atol=1e-4)


def test_a_square_conv1d_is_not_error_compensated_in_the_wrong_orientation(tmp_path):
    """GPTQ assumes (out, in) weights: a square GPT-2 c_proj (stored (in, out)) quantized with data is
    stored as without data, not compensated along its outputs."""
    _, folder = _hf_folder(tmp_path, "gpt2")
    common = ("--quantize", "int8", "--include", "*attn.c_proj*", "--json")
    assert run("convert", folder, "-o", tmp_path / "plain", *common).exit_code == 0
    res = run("convert", folder, "-o", tmp_path / "data", *common, "--data", tmp_path / "calib.txt", "--seq-len", "32", "--batch-size", "4", "--steps", "0")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["calibration"]["weights"] == 2
    plain, data = load_state_dict(tmp_path / "plain"), load_state_dict(tmp_path / "data")
    name = "transformer.h.0.attn.c_proj.weight"
    assert plain[name].shape[0] == plain[name].shape[1] and torch.equal(plain[name], data[name])


def test_hugging_face_bad_input(tmp_path):
    _, folder = _hf_folder(tmp_path)
    calib = tmp_path / "calib.txt"
    config = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    res = run("convert", bad, "-o", tmp_path / "o1", "--ratio", "2", "--data", calib, "--steps", "0")
    assert res.exit_code == 2 and "NoSuchModelForCausalLM" in res.output
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer_config.json").unlink()
    res = run("convert", bad, "-o", tmp_path / "o2", "--ratio", "2", "--data", calib, "--steps", "0")
    assert res.exit_code == 3 and "tokenizer" in res.output
    (tmp_path / "short.txt").write_text("the a of")
    res = run("convert", folder, "-o", tmp_path / "o3", "--ratio", "2", "--data", tmp_path / "short.txt", "--seq-len", "32", "--steps", "0")
    assert res.exit_code == 3 and "fewer than one window" in res.output
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.name in ("o1", "o2", "o3"))


def test_target_size_on_a_hugging_face_folder_with_text_data(tmp_path):
    """--target-size with text data: the allocation weighs layers by their Fisher sensitivity (KL on
    the logits), the file fits, and the folder runs."""
    _, folder = _hf_folder(tmp_path)
    out = tmp_path / "budget"
    size = (folder / "model.safetensors").stat().st_size
    res = run("convert", folder, "-o", out, "--target-size", "75%", "--data", tmp_path / "calib.txt", "--seq-len", "32",
              "--batch-size", "4", "--steps", "0", "--sensitivity", "fisher", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert "Fisher" in report["allocation"]["damage"] and report["allocation"]["written_bytes"] <= int(0.75 * size)
    res = run("evaluate", "--task", "lm", folder, out, "--data", tmp_path / "eval.txt", "--seq-len", "32", "--json")
    assert res.exit_code == 0, res.output
    assert all(math.isfinite(s["ppl"]) for s in json.loads(res.stdout)["systems"].values())
