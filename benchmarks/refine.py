"""Data-free and activation-based refits of MPO cores on the bundled trained SE model, in one run.

    python benchmarks/refine.py      # a few seconds

For each weight of the bundled example (``mpocompress/data/se_lstm.safetensors``), 3-core MPOs at max
bond 8: the relative weight error of TT-SVD and after 2/6 ALS sweeps (``mpocompress.core.refine.als_refine``),
with the same-size truncated SVD beside it. For the two Linear layers, the relative *output* error on
recorded inputs (``mpocompress.jobs.calibrate.record_grams`` over 8 fresh batches of the example's data,
held-out: a second 8 batches) of TT-SVD vs ``activation_refit`` fitted on the first set.

Writes ``benchmarks/results/refine.json`` and the ``refine`` block of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _docs import write_block  # noqa: E402

from mpocompress import load_state_dict  # noqa: E402
from mpocompress.core.compress import singular_values  # noqa: E402
from mpocompress.core.modes import choose_modes  # noqa: E402
from mpocompress.core.refine import activation_refit, als_refine, output_error  # noqa: E402
from mpocompress.core.tt import relative_error, svd_tail_error, tt_svd  # noqa: E402
from mpocompress.data import example_checkpoint  # noqa: E402
from mpocompress.jobs.calibrate import record_grams  # noqa: E402
from mpocompress.speech.example import batches, se_lstm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOND = 8


def main() -> None:
    torch.set_num_threads(1)
    sd = load_state_dict(example_checkpoint())
    model = se_lstm()
    model.load_state_dict(sd)
    fit = record_grams(model, batches(n=8, seed=11))[0]
    held = record_grams(model, batches(n=8, seed=12))[0]
    als_rows, act_rows = [], []
    for name in ("inp.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "out.weight"):
        w = sd[name]
        om, im = choose_modes(*w.shape, 3)
        tt = tt_svd(w, om, im, max_bond=BOND)
        res = als_refine(w, tt, sweeps=6)
        rank = tt.num_params // sum(w.shape)
        s, _ = singular_values(w, rank_hint=rank)
        als_rows.append({
            "name": name, "shape": list(w.shape), "params": tt.num_params, "tt_svd": res.history[0],
            "als_2": res.history[2], "als_6": res.history[6], "svd_same_size": svd_tail_error(s, rank), "svd_rank": rank,
        })  # fmt: skip
        if name in fit:
            refit = activation_refit(w, tt, fit[name]).tt
            act_rows.append({
                "name": name,
                "fit_before": output_error(w, tt.to_matrix(), fit[name]),
                "fit_after": output_error(w, refit.to_matrix(), fit[name]),
                "held_out_before": output_error(w, tt.to_matrix(), held[name]),
                "held_out_after": output_error(w, refit.to_matrix(), held[name]),
                "weight_error_before": relative_error(w, tt.to_matrix()),
                "weight_error_after": relative_error(w, refit.to_matrix()),
            })
    result = {"machine": platform.platform(), "torch": torch.__version__, "bond": BOND, "als": als_rows, "activation": act_rows}
    out = ROOT / "benchmarks" / "results" / "refine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))

    lines = [
        f"Bundled SE LSTM, 3-core MPOs at max bond {BOND}. Relative weight error:",
        "",
        "| weight | shape | MPO params | TT-SVD | + 2 ALS sweeps | + 6 ALS sweeps | same-size SVD |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in als_rows:
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['params']:,} | {r['tt_svd']:.4f} | "
                     f"{r['als_2']:.4f} | {r['als_6']:.4f} | {r['svd_same_size']:.4f} (r={r['svd_rank']}) |")  # fmt: skip
    lines += [
        "",
        "Relative output error on recorded inputs (fitted on 8 batches, held out: 8 other batches):",
        "",
        "| weight | TT-SVD (fit) | refit (fit) | TT-SVD (held out) | refit (held out) | weight error TT-SVD -> refit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in act_rows:
        lines.append(f"| {r['name']} | {r['fit_before']:.4f} | {r['fit_after']:.4f} | {r['held_out_before']:.4f} | "
                     f"{r['held_out_after']:.4f} | {r['weight_error_before']:.3f} -> {r['weight_error_after']:.3f} |")  # fmt: skip
    write_block("refine", "\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
