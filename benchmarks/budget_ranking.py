"""Does the damage ``--target-size`` predicts rank layers like their true effect on the task?

    python benchmarks/budget_ranking.py

On two development models of ``benchmarks/budget.py`` (silero-vad, Resemblyzer; Conv-TasNet's ~100
layers through onnxruntime would take hours here, left out): every
compressible layer alone is stored as 3-bit k-means (``kmeans:8``) and the task metric is measured on
the test utterances (the true effect: the mean drop from dense). The prediction without data is the
layer's relative squared weight error; with data, that error times the layer's measured sensitivity
(``mpocompress.jobs.budget.sensitivities`` on 4 calibration utterances, which are not test
utterances), and that error times the layer's Fisher sensitivity
(``mpocompress.jobs.budget.fisher_weights``, the default of ``--target-size`` with data: one backward
pass per batch). Reported: Spearman's rank correlation of each prediction with the true effect.

``--models smollm2`` (after ``python benchmarks/lm.py prepare``): 22 of SmolLM2-135M's 211 weights
(every tenth, the tied embedding included), each alone as ``kmeans:8``; the true effect is the rise in
log perplexity on 2048 tokens of *Persuasion*; calibration: 16 windows of 256 tokens of *Emma*, KL
distillation for both sensitivities.
Writes ``benchmarks/results/budget_ranking.json`` and the ``budget-ranking`` block of docs/results.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from budget import ROOT, WORK, fetch, model_input, models, outputs, scores  # noqa: E402

from mpocompress.core.allocate import Option  # noqa: E402
from mpocompress.io import open_checkpoint  # noqa: E402
from mpocompress.jobs.budget import _decoded, fisher_weights, sensitivities  # noqa: E402
from mpocompress.jobs.decompress import load_state_dict  # noqa: E402
from mpocompress.select import is_candidate  # noqa: E402
from mpocompress.speech.wav import paired_wavs, read_wav  # noqa: E402

PROBE = Option("kmeans:8", {"bond_dim": None, "ratio": None, "tol": None, "prune": "none", "quantize": "kmeans:8"}, 0, 0.0)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _row(layers: list[str], err: dict[str, float], truth: dict[str, float], probe: dict[str, float], fisher: dict[str, float]) -> dict[str, Any]:
    t = [truth[n] for n in layers]
    return {"layers": len(layers), "spearman_no_data": spearman([err[n] for n in layers], t),
            "spearman_data": spearman([err[n] * probe[n] for n in layers], t),
            "spearman_fisher": spearman([err[n] * fisher[n] for n in layers], t),
            "per_layer": {n: {"true_drop": truth[n], "weight_error": err[n], "sensitivity": probe[n], "fisher": fisher[n]} for n in layers}}  # fmt: skip


def speech_model(name: str, spec: dict[str, Any], pairs: list[Any], calib: list[Any]) -> dict[str, Any]:
    dense_sd = load_state_dict(spec["ckpt"])
    model = spec["build"](dense_sd)
    dense_outs = outputs(name, model, pairs)
    base = float(np.mean(scores(name, dense_outs, dense_outs, pairs)))
    with open_checkpoint(spec["ckpt"]) as ck:
        layers = [n for n in ck.keys() if is_candidate(ck.shape(n), ck.dtype(n))]
        truth, err = {}, {}
        for n in layers:
            w = dense_sd[n]
            q = _decoded(n, w, PROBE)
            err[n] = float((w.double() - q.double()).square().sum() / w.double().square().sum())
            sd = dict(dense_sd)
            sd[n] = q
            truth[n] = base - float(np.mean(scores(name, outputs(name, spec["build"](sd), pairs), dense_outs, pairs)))
        curves = {n: [Option("kmeans:8", PROBE.overrides, 0, err[n])] for n in layers}
        batches = [model_input(name, a, b) for a, b in calib]
        weights = {n: w["codec"] for n, w in sensitivities(spec["build"](dense_sd), batches, curves, ck).items()}  # (the probe: k-means)
        fisher = fisher_weights(spec["build"](dense_sd), batches, curves, ck)
    return _row(layers, err, truth, weights, fisher)


def language_model() -> dict[str, Any]:
    from lm import WORK as LM_WORK

    from mpocompress.text.data import read_text, tokenize, windows
    from mpocompress.text.evaluate import load_lm, perplexity
    from mpocompress.text.hf import load_tokenizer

    src = LM_WORK / "smollm2"
    tok = load_tokenizer(src)
    ids = tokenize(tok, read_text(LM_WORK / "austen" / "persuasion.txt"))[:2048]
    cal = list(windows(tokenize(tok, read_text(LM_WORK / "austen" / "emma.txt")), 256)[:16].split(4))
    model = load_lm(src, src)
    base = perplexity(model, ids, 256)["nll"]
    with open_checkpoint(src) as ck:
        names = [n for n in ck.keys() if is_candidate(ck.shape(n), ck.dtype(n))]
        layers = names[::10]
        own = model.state_dict()
        truth, err = {}, {}
        for n in layers:
            w = ck.get(n)
            q = _decoded(n, w, PROBE)
            err[n] = float((w.double() - q.double()).square().sum() / w.double().square().sum())
            with torch.no_grad():
                own[n].copy_(q)
                truth[n] = perplexity(model, ids, 256)["nll"] - base  # the rise in log perplexity
                own[n].copy_(w)
            print(f"  {n}: error {err[n]:.2e}, log-perplexity rise {truth[n]:+.4f}", flush=True)
        curves = {n: [Option("kmeans:8", PROBE.overrides, 0, err[n])] for n in layers}
        weights = {n: w["codec"] for n, w in sensitivities(model, cal, curves, ck, kd_loss="kl").items()}
        fisher = fisher_weights(model, cal, curves, ck, kd_loss="kl")
    return _row(layers, err, truth, weights, fisher)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["silero-vad", "resemblyzer", "smollm2"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = ROOT / "benchmarks" / "results" / "budget_ranking.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # a run of some models keeps the others
    speech = [m for m in args.models if m != "smollm2"]
    if speech:
        specs = models(fetch())
        corpus = WORK / "corpus"
        pairs = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "test")][:20]
        calib = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "train")]
        for name in speech:
            results[name] = speech_model(name, specs[name], pairs, calib)
    if "smollm2" in args.models:
        results["smollm2"] = language_model()
    lines = ["| model | layers | Spearman: weight error (no data) | x probed sensitivity (data) | x Fisher sensitivity (data) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, row in results.items():
        fisher = f"{row['spearman_fisher']:+.2f}" if "spearman_fisher" in row else "-"
        lines.append(f"| {name} | {row['layers']} | {row['spearman_no_data']:+.2f} | {row['spearman_data']:+.2f} | {fisher} |")
    path.write_text(json.dumps(results, indent=2) + "\n")
    text = "\n".join(lines)
    doc = ROOT / "docs" / "results.md"
    import re

    body = (f"Command: `python benchmarks/budget_ranking.py` (each layer alone as `kmeans:8`; speech models: 20 test utterances; "
            f"smollm2: every tenth weight, log perplexity on 2048 tokens).\n\n{text}")  # fmt: skip
    block = f"<!-- budget-ranking:start -->\n{body}\n<!-- budget-ranking:end -->"
    s = doc.read_text()
    pat = re.compile(r"<!-- budget-ranking:start -->.*?<!-- budget-ranking:end -->", re.S)
    doc.write_text(pat.sub(lambda _: block, s) if pat.search(s) else s.rstrip("\n") + "\n\n### Which layers matter\n\n" + block + "\n")
    print(text)


if __name__ == "__main__":
    main()
