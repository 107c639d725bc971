"""Does the damage ``--target-size`` predicts rank layers like their true effect on the task?

    python benchmarks/budget_ranking.py

On two development models of ``benchmarks/budget.py`` (silero-vad, Resemblyzer; Conv-TasNet's ~100
layers through onnxruntime would take hours here, left out): every
compressible layer alone is stored as 3-bit k-means (``kmeans:8``) and the task metric is measured on
the test utterances (the true effect: the mean drop from dense). The prediction without data is the
layer's relative squared weight error; with data, that error times the layer's measured sensitivity
(``mpocompress.jobs.budget.sensitivities`` on 4 calibration utterances, which are not test
utterances). Reported: Spearman's rank correlation of each prediction with the true effect.
Writes ``benchmarks/results/budget_ranking.json`` and the ``budget-ranking`` block of docs/results.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from budget import ROOT, WORK, fetch, model_input, models, outputs, scores  # noqa: E402

from mpocompress.core.allocate import Option  # noqa: E402
from mpocompress.io import open_checkpoint  # noqa: E402
from mpocompress.jobs.budget import _decoded, sensitivities  # noqa: E402
from mpocompress.jobs.decompress import load_state_dict  # noqa: E402
from mpocompress.select import is_candidate  # noqa: E402
from mpocompress.speech.wav import paired_wavs, read_wav  # noqa: E402

PROBE = Option("kmeans:8", {"bond_dim": None, "ratio": None, "tol": None, "prune": "none", "quantize": "kmeans:8"}, 0, 0.0)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    torch.set_num_threads(1)
    specs = models(fetch())
    corpus = WORK / "corpus"
    pairs = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "test")][:20]
    calib = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "train")]
    results, lines = {}, ["| model | layers | Spearman: weight error (no data) | Spearman: measured sensitivity (data) |", "|---|---|---|---|"]
    for name, spec in ((n, specs[n]) for n in ("silero-vad", "resemblyzer")):
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
            weights = sensitivities(spec["build"](dense_sd), [model_input(name, a, b) for a, b in calib], curves, ck)
        data_pred = [err[n] * weights[n] for n in layers]
        row = {"layers": len(layers), "spearman_no_data": spearman([err[n] for n in layers], [truth[n] for n in layers]),
               "spearman_data": spearman(data_pred, [truth[n] for n in layers]),
               "per_layer": {n: {"true_drop": truth[n], "weight_error": err[n], "sensitivity": weights[n]} for n in layers}}  # fmt: skip
        results[name] = row
        lines.append(f"| {name} | {len(layers)} | {row['spearman_no_data']:+.2f} | {row['spearman_data']:+.2f} |")
        print(lines[-1], flush=True)
    (ROOT / "benchmarks" / "results" / "budget_ranking.json").write_text(json.dumps(results, indent=2) + "\n")
    text = "\n".join(lines)
    doc = ROOT / "docs" / "results.md"
    import re

    body = f"Command: `python benchmarks/budget_ranking.py` (each layer alone as `kmeans:8`, 20 test utterances).\n\n{text}"
    block = f"<!-- budget-ranking:start -->\n{body}\n<!-- budget-ranking:end -->"
    s = doc.read_text()
    pat = re.compile(r"<!-- budget-ranking:start -->.*?<!-- budget-ranking:end -->", re.S)
    doc.write_text(pat.sub(lambda _: block, s) if pat.search(s) else s.rstrip("\n") + "\n\n### Which layers matter\n\n" + block + "\n")
    print(text)


if __name__ == "__main__":
    main()
