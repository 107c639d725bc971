"""Fine-tuning with distillation, IPKD, and their use through convert (API and CLI)."""

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from mpocompress import MPOConfig, load_state_dict
from mpocompress.cli import main
from mpocompress.codecs import parse_codec
from mpocompress.config import TuneConfig
from mpocompress.data import example_checkpoint
from mpocompress.format import decode_meta
from mpocompress.jobs.calibrate import record_grams
from mpocompress.jobs.finetune import (
    distill_loss,
    evaluate,
    finetune,
    ipkd,
    ipkd_schedule,
    magnitude_masks,
    trainable,
)
from mpocompress.nn.surgery import compress_, load_compressed_
from mpocompress.speech.example import batches, se_lstm

WEIGHTS = ["inp.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "out.weight"]


@pytest.fixture(scope="module")
def teacher():
    m = se_lstm()
    m.load_state_dict(load_state_dict(example_checkpoint()))
    return m.eval()


@pytest.fixture(scope="module")
def data():
    b = batches(n=8, batch=4, seconds=0.5, seed=7)
    return b[:6], b[6:]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_finetune_lowers_the_held_out_distillation_loss(teacher, data):
    train, val = data
    student = copy.deepcopy(teacher)
    compress_(student, MPOConfig(ratio=10, cores=3))
    res = finetune(student, teacher, train, val_batches=val, steps=30, eval_every=10)
    assert res.steps == 30 and res.stopped_by == "steps"
    assert res.val_best < 0.5 * res.val_before
    assert evaluate(student, teacher, val) == pytest.approx(res.val_best, rel=1e-5)  # best kept
    assert [h[0] for h in res.history] == [10, 20, 30]
    assert all(p.requires_grad for p in student.parameters())  # restored


def test_finetune_never_returns_a_worse_model(teacher, data):
    train, val = data
    student = copy.deepcopy(teacher)
    compress_(student, MPOConfig(ratio=4))
    res = finetune(student, teacher, train, val_batches=val, steps=4, lr=1.0, eval_every=1)  # absurd lr
    assert res.val_best <= res.val_before
    assert evaluate(student, teacher, val) == pytest.approx(res.val_best, rel=1e-5)


@pytest.mark.parametrize("train_sel", ["central", "outer"])
def test_central_and_outer_training_freeze_the_rest(teacher, data, train_sel):
    train, val = data
    student = copy.deepcopy(teacher)
    compress_(student, MPOConfig(ratio=6, cores=3))
    chosen = {n for n, _ in trainable(student, train_sel)}
    assert chosen and all("_cores." in n for n in chosen)
    cores_per_weight = {n.rsplit("_cores.", 1)[0] for n in chosen}
    assert len(cores_per_weight) == 4
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    finetune(student, teacher, train, val_batches=train[:1], steps=5, train=train_sel, eval_every=100)
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) != (n in chosen), n
    # the central core is each MPO's largest one
    for name in cores_per_weight:
        sizes = {n: before[n].numel() for n in before if n.startswith(name + "_cores.")}
        central = max(sizes, key=sizes.get)
        assert (central in chosen) == (train_sel == "central")
    with pytest.raises(Exception, match="no MPO layer"):
        trainable(copy.deepcopy(teacher), train_sel)


def test_masks_hold_and_time_limit_stops(teacher, data):
    train, val = data
    student = copy.deepcopy(teacher)
    masks = magnitude_masks(student, WEIGHTS, 0.5)
    res = finetune(student, teacher, train, val_batches=val, steps=50, time=1e-9, masks=masks)
    assert res.stopped_by == "time" and res.steps == 1
    params = dict(student.named_parameters())
    for n, m in masks.items():
        assert (params[n][~m] == 0).all()
        assert (params[n][m] != 0).float().mean() > 0.99


def test_task_loss_without_teacher_needs_targets(teacher, data):
    train, _ = data
    student = copy.deepcopy(teacher)
    from mpocompress.errors import ConfigError

    with pytest.raises(ConfigError, match="targets"):
        finetune(student, None, [x for x, _ in train], steps=1)
    res = finetune(student, None, train, steps=2, kd_weight=0.0)
    assert res.steps == 2


def test_ipkd_reaches_the_sparsity_with_a_new_teacher_each_round(teacher, data, monkeypatch):
    import mpocompress.jobs.finetune as ft

    train, val = data
    model = copy.deepcopy(teacher)
    sched = ipkd_schedule(0.8, 3)
    assert sched[-1] == pytest.approx(0.8) and sched == sorted(sched)
    seen: list[dict[str, torch.Tensor]] = []
    original = ft.magnitude_masks
    monkeypatch.setattr(ft, "magnitude_masks", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    masks, rounds = ipkd(model, WEIGHTS, 0.8, 3, train, val_batches=val, config=TuneConfig(steps=6, eval_every=1))
    assert [r.sparsity for r in rounds] == pytest.approx(sched)
    prints = [r.teacher_fingerprint for r in rounds]
    assert len(set(prints)) == 3  # the teacher changed every round
    from mpocompress.jobs.finetune import _fingerprint

    assert prints[0] == pytest.approx(_fingerprint(teacher))  # round 1 is taught by the dense model
    params = dict(model.named_parameters())
    for n in WEIGHTS:
        zeros = int((params[n] == 0).sum())
        assert zeros == round(0.8 * params[n].numel())
        assert torch.equal(params[n] == 0, ~masks[n])
    # each round's pruning keeps what was pruned before: the kept sets only shrink
    assert len(seen) == 3
    for before, after in zip(seen, seen[1:]):
        for n in WEIGHTS:
            assert not bool((after[n] & ~before[n]).any()), f"{n}: a weight pruned earlier came back"
            assert int(after[n].sum()) < int(before[n].sum())


def test_record_inputs_is_the_gram_of_the_inputs(teacher, data):
    train, _ = data
    grams = record_grams(teacher, train[:2])[0]
    assert {"inp.weight", "out.weight"} <= set(grams)
    x = torch.cat([(b[0] - teacher.feature_mean) / teacher.feature_std for b in train[:2]]).reshape(-1, 257)
    assert torch.allclose(grams["inp.weight"], (x.double().T @ x.double()), rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# through convert


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text("from mpocompress.speech.example import SELSTM\n\n\ndef build():\n    return SELSTM()\n")
    return path


@pytest.fixture
def data_file(tmp_path, data):
    train, val = data
    x = torch.cat([b[0] for b in train + val])
    y = torch.cat([b[1] for b in train + val])
    path = tmp_path / "batches.safetensors"
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(path))
    return path


def test_convert_fine_tunes_and_the_output_loads_and_runs(tmp_path, factory_file, data_file, teacher, data):
    out = tmp_path / "ft.safetensors"
    res = run("convert", example_checkpoint(), "-o", out, "--ratio", "10", "--cores", "3",
              "--model", f"{factory_file}:build", "--data", data_file, "--batch-size", "4",
              "--steps", "20", "--kd-weight", "0.5", "--calibration", "none", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    ft = rep["finetune"]
    assert ft["train_batches"] == 7 and ft["val_batches"] == 1  # 32 rows / 4, last 10 % held out
    assert ft["val_kd_loss"]["finetuned"] < ft["val_kd_loss"]["compressed"]
    assert ft["val_task_loss"]["finetuned"] < ft["val_task_loss"]["compressed"]
    assert ft["config"]["kd_weight"] == 0.5 and ft["config"]["kd_loss"] == "mse"  # a mask, not a waveform
    assert "fine-tuned" in res.stderr
    assert all(r["refine"].get("finetuned") for r in rep["layers"])
    model = load_compressed_(se_lstm(), out)
    _, val = data
    kd = evaluate(model, teacher, val)
    assert kd < ft["val_kd_loss"]["compressed"]
    # the stored metadata records the fine-tuning too
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = decode_meta(f.metadata()["mpocompress"])
    assert meta["finetune"]["steps"] == ft["steps"]
    # the same result from the package's own factories
    res2 = run("convert", example_checkpoint(), "-o", tmp_path / "ft2.safetensors", "--ratio", "10",
               "--model", "mpocompress.speech.example:se_lstm", "--data", "mpocompress.speech.example:batches", "--steps", "2")  # fmt: skip
    assert res2.exit_code == 0, res2.output


def test_convert_ipkd(tmp_path, factory_file, data_file):
    out = tmp_path / "ipkd.safetensors"
    res = run("convert", example_checkpoint(), "-o", out, "--prune", "magnitude:0.75", "--ipkd", "3",
              "--model", f"{factory_file}:build", "--data", data_file, "--batch-size", "8", "--steps", "6", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    ft = json.loads(res.stdout)["finetune"]
    assert len(ft["rounds"]) == 3
    assert len({r["teacher_fingerprint"] for r in ft["rounds"]}) == 3
    sd = load_state_dict(out)
    for n in WEIGHTS:
        assert int((sd[n] == 0).sum()) == round(0.75 * sd[n].numel())
    # the file holds the pruned weights sparse
    assert out.stat().st_size < 0.5 * example_checkpoint().stat().st_size


def test_convert_prune_and_quantize_after_fine_tuning_keep_the_trained_zeros(tmp_path, factory_file, data_file):
    out = tmp_path / "pq.safetensors"
    res = run("convert", example_checkpoint(), "-o", out, "--prune", "channel:0.6", "--quantize", "kmeans:16",
              "--model", f"{factory_file}:build", "--data", data_file, "--steps", "3", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    sd = load_state_dict(out)
    dense = load_state_dict(example_checkpoint())
    from mpocompress.codecs import channel_mask

    for n in WEIGHTS:
        keep = channel_mask(dense[n], 0.6)
        assert (sd[n][~keep] == 0).all()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--steps", "5"], 2, "--steps needs --model"),
        (["--qat-grid", "fixed"], 2, "--qat-grid needs --model"),
        (["--model", "x:y"], 2, "both --model and --data"),
        (["--model", "no_such_module_xyz:build", "--data", "mpocompress.speech.example:batches"], 2, "cannot import"),
        (["--model", "mpocompress.speech.example:nothing", "--data", "mpocompress.speech.example:batches"], 2, "no attribute"),
        (["--model", "mpocompress.speech.example:se_lstm", "--data", "missing.safetensors"], 3, "no such file"),
        (["--model", "mpocompress.speech.example:se_lstm", "--data", "mpocompress.speech.example:batches", "--ipkd", "2"], 2, "--ipkd needs --prune"),
    ],
)
def test_fine_tuning_errors(tmp_path, args, code, message):
    out = tmp_path / "o.safetensors"
    res = run("convert", example_checkpoint(), "-o", out, "--ratio", "4", *args)
    assert res.exit_code == code, res.output
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_model_that_does_not_fit_the_checkpoint(tmp_path, data_file):
    path = tmp_path / "wrong.py"
    path.write_text("from mpocompress.speech.example import SELSTM\n\n\ndef build():\n    return SELSTM(hidden=64)\n")
    res = run("convert", example_checkpoint(), "-o", tmp_path / "o.safetensors", "--ratio", "4",
              "--model", f"{path}:build", "--data", data_file)  # fmt: skip
    assert res.exit_code == 3, res.output
    assert "has shape" in res.stderr


def test_als_and_quantization_refit_through_convert(tmp_path):
    out = tmp_path / "als.safetensors"
    res = run("convert", example_checkpoint(), "-o", out, "--ratio", "6", "--cores", "3", "--als", "3", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["config"]["als_sweeps"] == 3
    base = json.loads(run("convert", example_checkpoint(), "-o", tmp_path / "b.safetensors", "--ratio", "6",
                          "--cores", "3", "--json").stdout)  # fmt: skip
    for r, b in zip(rep["layers"], base["layers"]):
        assert r["refine"]["als_sweeps"] == 3
        assert r["rel_error"] <= b["rel_error"] + 1e-6
    assert sum(r["rel_error"] for r in rep["layers"]) < sum(b["rel_error"] for b in base["layers"])
    res = run("convert", example_checkpoint(), "-o", tmp_path / "q.safetensors", "--ratio", "6", "--cores", "3",
              "--als", "2", "--quantize", "kmeans:8", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    for r in json.loads(res.stdout)["layers"]:
        q = r["refine"]["quant_refit"]
        assert q["kept"] == (q["error_refit"] < q["error_direct"])
    sd = load_state_dict(tmp_path / "q.safetensors")
    assert set(sd) == set(load_file(str(example_checkpoint())))


def test_activation_refit_through_convert(tmp_path, teacher, data):
    train, _ = data
    grams = record_grams(teacher, train)[0]
    acts = tmp_path / "acts.safetensors"
    save_file({f"{k}.gram": v.float().contiguous() for k, v in grams.items()}, str(acts))
    res = run("convert", example_checkpoint(), "-o", tmp_path / "a.safetensors", "--ratio", "8", "--cores", "3",
              "--activations", acts, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["layers"]}
    for name in grams:
        a = rows[name]["refine"]["calibrated"]
        assert a["output_error_after"] < 0.9 * a["output_error_before"]
    res = run("convert", example_checkpoint(), "-o", tmp_path / "k.safetensors", "--ratio", "8", "--cores", "3",
              "--quantize", "kmeans:16", "--activations", acts, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    codes = [r["refine"]["calibrated_codes"] for r in json.loads(res.stdout)["layers"] if r["name"] in grams]
    assert codes and all(c["method"] == "refit_quantized" and c["output_error_after"] <= c["output_error_before"] for c in codes)
    assert any(c["output_error_after"] < c["output_error_before"] for c in codes)
    bad = tmp_path / "bad.safetensors"
    save_file({"inp.weight.gram": torch.eye(5)}, str(bad))
    res = run("convert", example_checkpoint(), "-o", tmp_path / "c.safetensors", "--ratio", "8", "--activations", bad)
    assert res.exit_code == 3 and "features" in res.stderr


@pytest.mark.parametrize("cores, method", [(3, "refit_quantized"), (2, "gptq_factors")])
def test_calibrated_conversion_quantizes_cores_with_error_compensation(tmp_path, factory_file, data_file, cores, method):
    """With --model/--data the cores fitted to the data are quantized with compensation on the same
    inputs (the sequential path hands its fitted cores to the encoder): never worse than rounding them."""
    res = run("convert", example_checkpoint(), "-o", tmp_path / "q.safetensors", "--ratio", "6", "--cores", str(cores),
              "--quantize", "kmeans:16", "--model", f"{factory_file}:build", "--data", data_file, "--batch-size", "4",
              "--steps", "0", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [r for r in json.loads(res.stdout)["layers"] if r["status"] == "mpo" and "lstm" not in r["name"]]
    assert rows
    for r in rows:
        q = r["refine"]["calibrated_codes"]
        assert q["method"] == method and q["output_error_after"] <= q["output_error_before"]
        assert q["kept"] == (q["output_error_after"] < q["output_error_before"])
    assert any(r["refine"]["calibrated_codes"]["output_error_after"] < r["refine"]["calibrated_codes"]["output_error_before"] for r in rows)
    assert set(load_state_dict(tmp_path / "q.safetensors")) == set(load_file(str(example_checkpoint())))


# ---------------------------------------------------------------------------------------------
# safe defaults: learning-rate probe, warm-up, early stop, quantization-aware training


def test_lr_schedule_warms_up_then_decays():
    from mpocompress.jobs.finetune import budget_used, lr_factor

    f = [lr_factor(budget_used(s, 100, 0.0, 0.0, None), 0.1) for s in range(1, 101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # non-increasing after the warm-up
    assert f[-1] == pytest.approx(0.1)
    assert lr_factor(0.01, 0.0) == pytest.approx(1.0, abs=1e-3)


def test_lr_schedule_follows_the_clock_when_time_runs_out_first():
    """A run with many steps but few seconds (``--steps 100000 --time 300``) warms up and decays within
    its seconds; before, it warmed up over 5 % of the 100000 steps and never got past 1 % of the rate."""
    from mpocompress.jobs.finetune import budget_used, lr_factor

    # 60 steps of 5 s in 300 s: the 3rd step is past the 5 % warm-up, the last ends at the floor
    used = [budget_used(s, 100_000, 5.0 * (s - 1), 5.0 if s > 1 else 0.0, 300.0) for s in range(1, 61)]
    assert used[-1] == pytest.approx(1.0) and used[2] == pytest.approx(0.05)
    assert lr_factor(used[2], 0.05) == pytest.approx(1.0) and lr_factor(used[-1], 0.05) == pytest.approx(0.1)
    assert budget_used(10, 20, 1.0, 0.1, 300.0) == pytest.approx(0.5)  # steps run out first: by steps


def test_a_time_bounded_run_reaches_its_full_rate(teacher, data, monkeypatch):
    """finetune wires the clock into the schedule: with steps far beyond what ``time`` allows, the
    rate still warms up to its peak and decays before the time is up."""
    import mpocompress.jobs.finetune as ft

    seen, original = [], ft.lr_factor
    monkeypatch.setattr(ft, "lr_factor", lambda done, warmup: seen.append(original(done, warmup)) or seen[-1])
    train, val = data
    student = copy.deepcopy(teacher)
    compress_(student, MPOConfig(ratio=10, cores=3))
    res = ft.finetune(student, teacher, train[:1], val_batches=val[:1], steps=100_000, time=4.0, lr=1e-4, eval_every=1000)
    assert res.stopped_by == "time" and 5 <= res.steps < 100_000
    assert max(seen) == pytest.approx(1.0, abs=0.1) and seen[-1] < 0.5


class _Counting(nn.Module):
    """A teacher that counts its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_the_teacher_runs_once_per_batch_and_the_losses_are_unchanged(teacher, data):
    from mpocompress.jobs.finetune import TeacherCache

    train, val = data
    counting = _Counting(copy.deepcopy(teacher)).eval()
    student = copy.deepcopy(teacher)
    compress_(student, MPOConfig(ratio=10, cores=3))
    res = finetune(student, counting, train[:2], val_batches=val[:1], steps=12, lr=1e-4, eval_every=3)
    assert res.steps == 12 and counting.calls == 3  # 2 training batches + 1 held-out, each once
    cache = TeacherCache(counting)
    assert evaluate(student, cache, val) == pytest.approx(evaluate(student, teacher, val), rel=1e-6)
    assert evaluate(student, cache, val) == pytest.approx(evaluate(student, teacher, val), rel=1e-6)  # from the cache
    calls = counting.calls
    small = TeacherCache(counting, limit=0)  # nothing fits: recomputed every time
    evaluate(student, small, val)
    evaluate(student, small, val)
    assert counting.calls == calls + 2 * len(val) and small.used == 0


def test_lr_probe_picks_a_rate_that_helps_and_reports_it(teacher, data):
    from mpocompress.config import LR_CANDIDATES

    train, val = data
    student = copy.deepcopy(teacher)
    compress_(student, MPOConfig(ratio=10, cores=3))
    res = finetune(student, teacher, train, val_batches=val, steps=20, eval_every=5)
    assert max(LR_CANDIDATES) in res.lr_probe and len(res.lr_probe) >= 2
    assert res.lr == min(res.lr_probe, key=lambda r: (res.lr_probe[r], r))
    assert res.improved and res.val_best < res.val_before
    assert res.to_dict()["lr"] == res.lr


@pytest.mark.parametrize(("best", "val_before", "probed"), [
    (3e-3, 1.0, [1e-3, 3e-4, 3e-3, 9e-3]),  # down until worse, then up while better
    (1e-2, 1.0, [1e-3, 3e-4, 3e-3, 9e-3]),  # up to at most 1e-2
    (3e-4, 1.0, [1e-3, 3e-4, 1e-4]),  # best inside the range: nothing more
    (1e-4, 0.6, [1e-3, 3e-4, 1e-4, 3e-5]),  # the top rates do not help (a converged model): on down
])  # fmt: skip
def test_probe_stops_where_the_loss_turns_and_goes_up_while_its_top_rate_is_best(teacher, data, monkeypatch, best, val_before, probed):
    """The probe goes down the candidates until a rate is worse than the one before (once some rate
    has helped), and, when the largest rate is the best, on up (x3, at most 1e-2) while better."""
    from mpocompress.jobs import finetune as ft

    calls = []

    def fake(self, lr, start, grids, steps, found):  # held-out loss: lowest at `best`
        calls.append(lr)
        found[lr] = 0.5 + 0.1 * abs(math.log(lr / best))
        return steps

    monkeypatch.setattr(ft._Trainer, "_probe_rate", fake)
    train, val = data
    student = copy.deepcopy(teacher)
    compress_(student, MPOConfig(ratio=10, cores=3))
    res = finetune(student, teacher, train, val_batches=val, steps=8, eval_every=4, val_before=val_before)
    assert calls == pytest.approx(probed)
    assert res.lr == pytest.approx(min(probed, key=lambda r: abs(math.log(r / best))))


def test_probe_falls_back_to_the_smallest_rate_when_nothing_helps(teacher, data):
    from mpocompress.config import LR_CANDIDATES

    train, val = data
    student = copy.deepcopy(teacher)  # dense: the teacher itself, the loss is 0 and cannot improve
    res = finetune(student, teacher, train, val_batches=val, steps=10, eval_every=2, patience=2)
    assert res.lr == min(LR_CANDIDATES)
    assert not res.improved and res.best_step == 0
    assert res.stopped_by == "no_improvement" and res.steps == 4


@pytest.mark.parametrize("spec", ["kmeans:8", "rowkmeans:8"])
@pytest.mark.parametrize("trained", [True, False])
def test_quantization_aware_training_ends_on_the_grid(teacher, data, spec, trained):
    from mpocompress.codecs import parse_codec
    from mpocompress.jobs.finetune import _FakeQuant
    from mpocompress.jobs.tune import _grid_quantizer

    train, val = data
    student = copy.deepcopy(teacher)
    codec = parse_codec(spec)
    w = student.inp.weight.detach()
    grid = codec.grid(w)
    quantizers = {"inp.weight": _grid_quantizer(codec, grid, None, trained)}
    book = grid.to(w.dtype) if grid.dim() == 2 else grid.to(w.dtype).expand(w.shape[0], -1)  # each row's centroids
    nearest = book.gather(1, (w[..., None] - book[:, None, :]).abs().argmin(-1))  # each value's own nearest centroid
    assert torch.equal(quantizers["inp.weight"](w), nearest)
    with _FakeQuant(student, quantizers).applied():
        start = evaluate(student, teacher, val)
    res = finetune(student, teacher, train, val_batches=val, steps=20, eval_every=5, quantizers=quantizers)
    assert res.val_before == pytest.approx(start)
    assert all(row.unique().numel() <= 8 for row in student.inp.weight)  # stored exactly by the codec
    assert student.inp.weight.unique().numel() <= (8 if spec == "kmeans:8" else 8 * w.shape[0])
    assert evaluate(student, teacher, val) == pytest.approx(res.val_best, rel=1e-5)
    assert res.val_best < res.val_before


@pytest.mark.parametrize("spec", ["kmeans:4", "rowkmeans:4"])
def test_a_centroids_gradient_is_the_sum_over_the_weights_sharing_it(spec):
    from mpocompress.codecs import parse_codec
    from mpocompress.jobs.finetune import GridQuantizer
    from mpocompress.jobs.tune import _grid_quantizer

    codec = parse_codec(spec)
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    q = _grid_quantizer(codec, codec.grid(w), None, True)
    assert isinstance(q, GridQuantizer) and q.trainable
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(q.snap(q.values(), w), q.grid, grad_outputs=g)
    book = q.values().detach()
    rows = book if book.dim() == 2 else book.expand(6, -1)
    codes = (w[..., None] - rows[:, None, :]).abs().argmin(-1)
    want = torch.zeros(6, 4).scatter_add_(1, codes, g)
    assert torch.allclose(grad, want if book.dim() == 2 else want.sum(0), atol=1e-6)


def test_trained_codebooks_beat_fixed_ones(teacher, data):
    """On the example model, learning the centroids (Deep Compression) lowers the held-out loss more
    than moving weights between fixed centroids, and the weights still end on k values."""
    from mpocompress.codecs import parse_codec
    from mpocompress.jobs.tune import _grid_quantizer

    train, val = data
    codec = parse_codec("kmeans:4")
    best = {}
    for trained in (False, True):
        student = copy.deepcopy(teacher)
        quantizers = {n: _grid_quantizer(codec, codec.grid(p.detach().reshape(p.shape[0], -1)), None, trained)
                      for n, p in student.named_parameters() if n.endswith("weight") and p.dim() == 2}  # fmt: skip
        start = {n: q.values().detach().clone() for n, q in quantizers.items()}
        res = finetune(student, teacher, train, val_batches=val, steps=40, eval_every=5, lr=1e-3, quantizers=quantizers)
        best[trained] = res.val_best
        params = dict(student.named_parameters())
        for n, q in quantizers.items():
            assert params[n].unique().numel() <= 4
            moved = not torch.equal(q.values().detach(), start[n])
            assert moved == trained
            assert set(params[n].unique().tolist()) <= set(q.values().detach().to(params[n].dtype).tolist())
    assert best[True] < best[False]


def test_convert_warns_when_fine_tuning_does_not_help(tmp_path, factory_file, data_file):
    res = run("convert", example_checkpoint(), "-o", tmp_path / "w.safetensors", "--quantize", "fp16",
              "--model", f"{factory_file}:build", "--data", data_file, "--batch-size", "4", "--steps", "4", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    ft = json.loads(res.stdout)["finetune"]
    assert ft["improved"] is False
    assert "did not improve" in res.stderr


def test_convert_calibrates_without_training(tmp_path, factory_file, data_file):
    common = [example_checkpoint(), "--ratio", "8", "--cores", "2", "--model", f"{factory_file}:build", "--data", data_file,
              "--batch-size", "4", "--steps", "0", "--json"]  # fmt: skip
    cal = run("convert", *common[:1], "-o", tmp_path / "c.safetensors", *common[1:])
    plain = run("convert", *common[:1], "-o", tmp_path / "p.safetensors", *common[1:], "--calibration", "none")
    assert cal.exit_code == 0 and plain.exit_code == 0, cal.output + plain.output
    rc, rp = json.loads(cal.stdout), json.loads(plain.stdout)
    assert rc["calibration"]["samples"] > 0 and "calibration" not in rp
    assert rc["totals"]["bytes"] == rp["totals"]["bytes"]
    assert rc["finetune"]["val_kd_loss"]["compressed"] < 0.7 * rp["finetune"]["val_kd_loss"]["compressed"]
    res = run("convert", *common[:1], "-o", tmp_path / "kf.safetensors", *common[1:], "--curvature", "kfac")
    assert res.exit_code == 0, res.output
    kfac = json.loads(res.stdout)
    methods = {r["name"]: r["refine"]["calibrated"]["method"] for r in kfac["layers"] if r["status"] == "mpo"}
    # the linears' outputs have a curvature; an LSTM's gates are inside the module and keep the plain fit
    assert {n: m for n, m in methods.items() if "lstm" not in n} == {"inp.weight": "kfac_whitened_svd", "out.weight": "kfac_whitened_svd"}
    assert {m for n, m in methods.items() if "lstm" in n} == {"whitened_svd"}
    flat = json.loads(run("convert", *common[:1], "-o", tmp_path / "f.safetensors", *common[1:], "--curvature", "none").stdout)
    assert all(r["refine"]["calibrated"]["method"] == "whitened_svd" for r in flat["layers"] if r["status"] == "mpo")
    assert "curvature" not in flat["finetune"] and kfac["finetune"]["curvature"] == {"chosen": "kfac"}
    # auto (the default) with MSE distillation is none: the same fit (here the curvature is also worse)
    assert "curvature" not in rc["finetune"] and rc["finetune"]["val_kd_loss"] == flat["finetune"]["val_kd_loss"]
    assert kfac["finetune"]["val_kd_loss"]["compressed"] > flat["finetune"]["val_kd_loss"]["compressed"]
    capped = run("convert", *common[:1], "-o", tmp_path / "k.safetensors", *common[1:], "--calibration-samples", "5")
    assert json.loads(capped.stdout)["calibration"]["samples"] == 5


def test_rowkmeans_with_data_and_training_stays_on_its_rows_codebooks(tmp_path, factory_file, data_file):
    """GPTQ on recorded inputs, then quantization-aware training, with a codebook per row."""
    res = run("convert", example_checkpoint(), "-o", tmp_path / "r.safetensors", "--quantize", "rowkmeans:8", "--model",
              f"{factory_file}:build", "--data", data_file, "--batch-size", "4", "--steps", "6", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert all(r["codecs"] == ["rowkmeans:8"] for r in rep["layers"])
    sd = load_state_dict(tmp_path / "r.safetensors")
    for r in rep["layers"]:
        w = sd[r["name"]].reshape(r["shape"][0], -1)
        assert all(row.unique().numel() <= 8 for row in w)


def test_convert_learns_the_codebooks_unless_told_to_keep_them(tmp_path, factory_file, data_file):
    """The stored codebook of a k-means-coded weight after training: the learned centroids by default,
    the starting ones with --qat-grid fixed (the weights moved between them)."""
    books = {}
    for grid in ("trained", "fixed"):
        out = tmp_path / f"{grid}.safetensors"
        res = run("convert", example_checkpoint(), "-o", out, "--quantize", "kmeans:4", "--model", f"{factory_file}:build",
                  "--data", data_file, "--batch-size", "4", "--steps", "30", "--lr", "1e-3", "--calibration", "none",
                  "--qat-grid", grid, "--json")  # fmt: skip
        assert res.exit_code == 0, res.output
        rep = json.loads(res.stdout)
        assert rep["finetune"]["config"]["qat_grid"] == grid and rep["finetune"]["steps"] > 0
        books[grid] = {k: v for k, v in load_file(out).items() if k.endswith(".codebook")}
    start = {n: parse_codec("kmeans:4").grid(w.reshape(w.shape[0], -1).float()) for n, w in load_state_dict(example_checkpoint()).items()}
    assert books["trained"] and books["trained"].keys() == books["fixed"].keys()

    def same(book: dict[str, torch.Tensor]) -> list[bool]:
        return [torch.allclose(v.float().sort().values, start[k.removesuffix(".codebook")].sort().values, atol=1e-6) for k, v in book.items()]

    assert all(same(books["fixed"]))
    assert not any(same(books["trained"]))


def test_sequential_calibration_corrects_for_upstream_layers(tmp_path, factory_file, data_file):
    """Each layer fitted to reproduce the dense outputs from the compressed model's inputs beats
    fitting every layer to the dense model's own inputs (measured: 2.5x lower held-out loss here)."""
    losses = {}
    for mode in ("sequential", "dense"):
        res = run("convert", example_checkpoint(), "-o", tmp_path / f"{mode}.safetensors", "--ratio", "8", "--cores", "3",
                  "--model", f"{factory_file}:build", "--data", data_file, "--batch-size", "4", "--steps", "0",
                  "--calibration", mode, "--json")  # fmt: skip
        assert res.exit_code == 0, res.output
        losses[mode] = json.loads(res.stdout)["finetune"]["val_kd_loss"]["compressed"]
    assert losses["sequential"] < 0.8 * losses["dense"]


def test_record_pairs_of_identical_models_is_the_gram_twice(teacher, data):
    from mpocompress.jobs.calibrate import record_pairs

    train, _ = data
    grams, cross = record_pairs(copy.deepcopy(teacher), teacher, train[:2], weights={"inp.weight", "lstm.weight_hh_l0"})
    dense, _ = record_grams(teacher, train[:2], weights={"inp.weight", "lstm.weight_hh_l0"})
    for k in ("inp.weight", "lstm.weight_hh_l0"):
        assert torch.allclose(grams[k], dense[k]) and torch.allclose(cross[k], dense[k])


def test_record_pairs_ends_each_pass_after_the_group_and_records_the_same():
    from mpocompress.jobs.calibrate import record_grams, record_pairs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    student = copy.deepcopy(model)
    calls = []
    model[4].register_forward_hook(lambda *_: calls.append(1))
    batches = [torch.randn(5, 6) for _ in range(4)]
    grams, cross = record_pairs(student, model, batches, weights={"2.weight"})
    assert len(calls) == 1  # the last layer ran in the first (full) pass only
    full, _ = record_grams(model, batches, weights={"2.weight"})
    assert torch.allclose(grams["2.weight"], full["2.weight"]) and torch.allclose(cross["2.weight"], full["2.weight"])


def test_stft_distillation_loss_is_scale_free_and_sees_quiet_regions():
    from mpocompress.errors import ConfigError
    from mpocompress.jobs.finetune import stft_loss

    cfg = TuneConfig(kd_loss="stft")
    torch.manual_seed(0)
    t = torch.arange(8000) / 16000
    ref = torch.sin(2 * torch.pi * 440 * t) * torch.where(t < 0.25, 1.0, 1e-3)[None, :]  # loud, then quiet
    assert distill_loss(ref, ref, cfg).item() == pytest.approx(0.0, abs=1e-6)
    err = torch.randn(1, 8000) * 1e-3
    assert distill_loss(ref + err, ref, cfg).item() == pytest.approx(distill_loss(1e3 * (ref + err), 1e3 * ref, cfg).item(), rel=1e-4)
    loud, quiet = err.clone(), err.clone()
    loud[:, 4000:] = 0
    quiet[:, :4000] = 0
    # the same error energy costs MSE alike, but the STFT loss more where the reference is quiet
    mse = torch.nn.functional.mse_loss
    assert 0.8 < mse(ref + quiet, ref).item() / mse(ref + loud, ref).item() < 1.25
    assert stft_loss(ref + quiet, ref).item() > 1.5 * stft_loss(ref + loud, ref).item()
    with pytest.raises(ConfigError, match="longer than 240"):
        stft_loss(torch.randn(2, 200), torch.randn(2, 200))


def test_stft_distillation_trains_a_waveform_model():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(1, 8, 9, padding=4), nn.Tanh(), nn.Conv1d(8, 1, 9, padding=4)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn_like(p) * p.abs().mean())
    data = [torch.randn(2, 1, 2000) for _ in range(5)]
    cfg = TuneConfig(kd_loss="stft", steps=30, lr=3e-3, eval_every=5, patience=0)
    before = evaluate(student, teacher, data[4:], cfg)
    finetune(student, teacher, data[:4], val_batches=data[4:], config=cfg)
    assert evaluate(student, teacher, data[4:], cfg) < 0.8 * before


class _Shaped(nn.Module):
    """Returns zeros of a fixed shape (what ``--kd-loss auto`` looks at)."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return torch.zeros(self.shape)


@pytest.mark.parametrize(("shape", "loss"), [((32000,), "stft"), ((2, 16000), "stft"), ((2, 1, 16000), "stft"), ((2, 257, 100), "mse"),
                                             ((2, 4096), "mse"), ((2, 100, 384), "mse"), ((2, 16000, 2), "mse")])  # fmt: skip
def test_kd_loss_auto_picks_stft_for_waveform_outputs_only(shape, loss):
    from mpocompress.jobs.finetune import kd_loss_for

    model = _Shaped(shape).train()
    assert kd_loss_for(model, torch.zeros(2, 3)) == loss
    assert model.training  # left as it was


def test_convert_distills_a_waveform_model_with_the_stft_loss_by_default(tmp_path):
    """--kd-loss auto looks at the model's output: a waveform (B, T) gets the STFT loss."""
    factory = tmp_path / "wave.py"
    factory.write_text(
        "from torch import nn\n\n\nclass Wave(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.proj = nn.Linear(16, 16)\n\n    def forward(self, x):\n"
        "        return self.proj(x.reshape(x.shape[0], -1, 16)).reshape(x.shape[0], -1)\n\n\ndef build():\n    return Wave()\n"
    )
    torch.manual_seed(0)
    ckpt, data = tmp_path / "wave.safetensors", tmp_path / "waves.safetensors"
    save_file({"proj.weight": torch.randn(16, 16) * 0.2, "proj.bias": torch.zeros(16)}, str(ckpt))
    save_file({"inputs": torch.randn(8, 12_000) * 0.1}, str(data))
    res = run("convert", ckpt, "-o", tmp_path / "out.safetensors", "--quantize", "kmeans:4", "--model", f"{factory}:build",
              "--data", data, "--batch-size", "2", "--steps", "2", "--calibration", "none", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["finetune"]["config"]["kd_loss"] == "stft"
