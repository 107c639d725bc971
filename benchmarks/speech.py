"""The speech-enhancement comparison: MPO against pruning, PP+PQ, SEOFP and IPKD at matched file sizes.

    python benchmarks/speech.py                 # the full run behind docs/results.md (2 CPU cores)
    python benchmarks/speech.py --quick         # a smoke run of every step in a few minutes (no docs)

Steps, all seeded (work files under ``_work/speech``; a step whose output exists is not redone):

1. a corpus from ``examples/speech_enhancement/make_corpus.py`` (espeak-ng speech, speaker-disjoint
   train/test, generated noise at -5..15 dB);
2. the reference models (LSTM and MLP mask estimators of the MPO papers, the small GCRN of IPKD) trained
   dense, and trained with 3-core MPO layers from scratch at each target size, the same number of steps
   (``examples/speech_enhancement/train.py``);
3. every method compressed to each target file size (a share of the dense file): its one knob (MPO ratio,
   sparsity, channel-pruning threshold, exponent bits) is searched so that the file is as large as
   possible without exceeding the target, then the final ``mpocompress convert`` command (with brief
   fine-tuning where the method has it) is run and recorded;
4. every system scored on every test utterance (PESQ-WB, STOI, ESTOI, SI-SDR), differences from the
   dense model and between method families with paired 95 % bootstrap intervals.

Results: ``benchmarks/results/speech.json`` and ``docs/results.md`` (written from the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from mpocompress.io import path_size as file_size  # noqa: E402  (bytes on disk)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speech.json"
DOC = ROOT / "docs" / "results.md"
EXAMPLES = ROOT / "examples" / "speech_enhancement"
FACTORY = {"lstm": "mpocompress.speech.models:lstm_mask", "mlp": "mpocompress.speech.models:mlp_mask",
           "gcrn": "mpocompress.speech.models:gcrn"}  # fmt: skip
METRICS = ("pesq_wb", "stoi", "estoi", "si_sdr")

#: method -> (family, fine-tuned?, description). Families group methods for the "who wins" summary.
METHODS: dict[str, tuple[str, bool, str]] = {
    "mpo": ("MPO", False, "MPO (3 cores) by TT-SVD, post hoc, no training"),
    "mpo-ft": ("MPO", True, "MPO (3 cores) post hoc + fine-tuning"),
    "mpo-scratch": ("MPO", False, "MPO (3 cores) trained from scratch"),
    "mpo-kmeans-ft": ("MPO", True, "MPO (3 cores) + fine-tuning + k-means 256 on the cores"),
    "svd-ft": ("SVD", True, "truncated SVD (2-core MPO) + fine-tuning"),
    "prune-ft": ("pruning", True, "magnitude pruning + fine-tuning"),
    "ipkd": ("pruning", True, "IPKD: 3 rounds of magnitude pruning, each distilled from the model before it"),
    "ppq-ft": ("pruning", True, "PP+PQ: channel pruning + fine-tuning + k-means weight sharing"),
    "seofp": ("SEOFP", False, "SEOFP: sign-exponent-only weights, post hoc"),
}


@dataclass(frozen=True)
class Setup:
    """Everything that decides the results (stored in the JSON)."""

    train_utts: int = 600
    test_utts: int = 200
    seed: int = 0
    train_steps: dict[str, int] = field(default_factory=lambda: {"lstm": 1000, "mlp": 800, "gcrn": 300})
    sizes: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"lstm": (0.2, 0.1, 0.05), "mlp": (0.2, 0.1, 0.05), "gcrn": (0.1,)})
    ft_steps: int = 100
    kd_weight: float = 0.5
    ipkd_rounds: int = 3
    metrics: tuple[str, ...] = METRICS
    #: tensors every method compresses, per model (default: all weight matrices). The GCRN's convolution
    #: kernels (3 to 768 weights each, 3.5 % of its parameters) stay dense, as in its MPO-from-scratch form:
    #: uniform per-layer ratios or sparsities destroy such tiny layers (an 8-weight output conv pruned
    #: to nothing makes the mask a constant).
    include: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"gcrn": ("rnn_in.weight", "rnn_out.weight", "lstm.*")})


QUICK = Setup(train_utts=40, test_utts=12, train_steps={"lstm": 20, "mlp": 20, "gcrn": 5},
              sizes={"lstm": (0.1,), "mlp": (0.1,), "gcrn": (0.1,)}, ft_steps=6)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str]) -> float:
    """Run a command (one thread), failing loudly; returns its wall time."""
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return time.time() - t0


def shown(cmd: list[str], work: Path) -> str:
    """A command as the docs show it: repo-relative scripts, work files relative to the work folder."""
    out = []
    for c in cmd:
        c = "python" if c == sys.executable else c
        c = c.replace(str(work) + "/", "").replace(str(ROOT) + "/", "")
        out.append(shlex.quote(c))
    return " ".join(out)


# -- sizes ---------------------------------------------------------------------------------------


def scratch_size(model: str, bond: int) -> int:
    """File size of ``model`` with MPO layers of max bond ``bond`` (as train.py writes it)."""
    import torch

    from mpocompress.nn.surgery import save_compressed
    from mpocompress.speech.models import MPOSpec, build

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        save_compressed(build(model, mpo=MPOSpec(bond, 3)), p)
        return file_size(p)


def dense_size(model: str) -> int:
    """File size of ``model`` dense (as train.py writes it)."""
    from mpocompress.io import save_safetensors
    from mpocompress.speech.models import build

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        save_safetensors(build(model).state_dict(), p, {"format": "pt"})
        return file_size(p)


def fit_scratch_bond(model: str, target: int) -> int | None:
    """The largest bond whose from-scratch model file is <= target bytes."""
    lo, hi = 1, 2
    if scratch_size(model, 1) > target:
        return None
    while scratch_size(model, hi) <= target and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if scratch_size(model, mid) <= target else (lo, mid)
    return lo


def knob_options(method: str, value: float | None, k: int = 16) -> dict[str, Any]:
    """``MPOConfig`` options of a method at knob ``value``."""
    if method in ("mpo", "mpo-ft"):
        return {"ratio": value, "cores": 3}
    if method == "mpo-kmeans-ft":
        return {"ratio": value, "cores": 3, "quantize": "kmeans:256"}
    if method == "svd-ft":
        return {"ratio": value, "cores": 2}
    if method in ("prune-ft", "ipkd"):
        return {"prune": f"magnitude:{value}"}
    if method == "ppq-ft":
        return {"prune": f"channel:{value}", "quantize": f"kmeans:{k}"}
    if method == "seofp":
        return {"quantize": f"seofp:{int(value)}"}
    raise ValueError(method)


def cli_args(opts: dict[str, Any]) -> list[str]:
    """``{"ratio": 2.5, "include": ("a*", "b")}`` -> ``--ratio 2.5 --include a* --include b``."""
    out = []
    for k, v in opts.items():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            out += [f"--{k.replace('_', '-')}", str(item)]
    return out


def trial_size(dense: Path, opts: dict[str, Any]) -> int:
    """File size of a conversion with these options (no fine-tuning), in this process."""
    from mpocompress.config import MPOConfig
    from mpocompress.jobs.convert import convert

    with tempfile.TemporaryDirectory(dir=dense.parent) as d:
        out = Path(d) / "trial.safetensors"
        convert(dense, out, MPOConfig(**opts))
        return file_size(out)


def fit_knob(method: str, dense: Path, target: int, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], int] | None:
    """Options of ``method`` whose file is as large as possible but <= target bytes (None: unreachable).

    Continuous knobs are bisected on their printed values (so the recorded command is exactly what was
    measured): MPO/SVD ratio in log space, sparsity, channel threshold; SEOFP tries E = 8..2. PP+PQ's
    channel threshold moves the size in steps (a slice's score is a share of 8 weights), so its
    codebook (16, 64 or 256 centroids) is chosen with it: the pair giving the largest file that fits.
    ``extra`` options (e.g. ``include``) are part of every trial and of the result."""
    extra = extra or {}

    def opts_at(v: float, k: int = 16) -> dict[str, Any]:
        return {**knob_options(method, v, k), **extra}

    if method == "seofp":
        for e in range(8, 1, -1):  # the codec allows E = 2..8
            size = trial_size(dense, opts_at(e))
            if size <= target:
                return opts_at(e), size
        return None
    if method == "ppq-ft":
        fits = [f for f in (_bisect(method, dense, target, opts_at, k) for k in (16, 64, 256)) if f is not None]
        return max(fits, key=lambda f: f[1]) if fits else None
    return _bisect(method, dense, target, opts_at, 16)


def _bisect(method: str, dense: Path, target: int, opts_at, k: int) -> tuple[dict[str, Any], int] | None:
    if method in ("mpo", "mpo-ft", "mpo-kmeans-ft", "svd-ft"):
        lo, hi, fmt, log_space, bigger_is_larger = 1.001, 1000.0, "{:.3f}", True, False
    elif method in ("prune-ft", "ipkd"):
        lo, hi, fmt, log_space, bigger_is_larger = 0.0, 0.9995, "{:.4f}", False, False
    else:  # channel threshold: slices scoring above it are pruned, so a larger threshold keeps more
        lo, hi, fmt, log_space, bigger_is_larger = 0.0, 1.0, "{:.4f}", False, True

    def size_at(v: float) -> int:
        return trial_size(dense, opts_at(float(fmt.format(v)), k))

    small, large = (lo, hi) if bigger_is_larger else (hi, lo)  # knob values giving the smallest/largest file
    if size_at(small) > target:
        return None
    if size_at(large) <= target:
        v = float(fmt.format(large))
        return opts_at(v, k), size_at(v)
    best = small
    for _ in range(14):
        mid = math.sqrt(small * large) if log_space else (small + large) / 2
        if float(fmt.format(mid)) in (float(fmt.format(small)), float(fmt.format(large))):
            break
        if size_at(mid) <= target:
            small = best = mid
        else:
            large = mid
    v = float(fmt.format(best))
    return opts_at(v, k), size_at(v)


# -- jobs (run in worker processes) -----------------------------------------------------------------


def job_train(work: Path, setup: Setup, model: str, bond: int | None, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(EXAMPLES / "train.py"), str(work / "corpus" / "train"), "-o", str(out), "--model", model,
           "--steps", str(setup.train_steps[model]), "--seed", str(setup.seed)]  # fmt: skip
    if bond is not None:
        cmd += ["--mpo-bond", str(bond)]
    seconds = run(cmd)
    return {"command": shown(cmd, work), "seconds": seconds}


def job_compress(work: Path, setup: Setup, model: str, method: str, frac: float, dense: Path, out: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    target = int(frac * file_size(dense))
    t0 = time.time()
    extra = {"include": setup.include[model]} if setup.include.get(model) else {}
    fitted = fit_knob(method, dense, target, extra)
    search_s = time.time() - t0
    if fitted is None:
        return {"reachable": False, "search_seconds": search_s}
    opts, _ = fitted
    if method == "ipkd":
        opts = {**opts, "ipkd": setup.ipkd_rounds}
    cmd = [sys.executable, "-m", "mpocompress", "convert", str(dense), "-o", str(out), *cli_args(opts)]
    if METHODS[method][1]:
        cmd += ["--task", "speech-enhancement", "--model", FACTORY[model], "--data", str(work / "corpus" / "train"),
                "--steps", str(setup.ft_steps), "--kd-weight", str(setup.kd_weight), "--seed", str(setup.seed),
                # the settings docs/results.md was measured with (the defaults before calibration and --lr auto)
                "--lr", "1e-3", "--calibration", "none"]  # fmt: skip
    report = out.with_suffix(".report.json")
    cmd += ["--report", str(report), "--force"]
    seconds = run(cmd)
    rep = json.loads(report.read_text())
    return {"reachable": True, "command": shown(cmd, work), "seconds": seconds, "search_seconds": search_s,
            "options": opts, "finetune": rep.get("finetune")}  # fmt: skip


def job_score(work: Path, setup: Setup, model: str, ckpt: Path | None) -> dict[str, list[float]]:
    """Per-utterance scores of one system (``ckpt`` None: the noisy input) on the test set."""
    import torch

    torch.set_num_threads(1)
    from mpocompress.jobs.decompress import load_state_dict
    from mpocompress.jobs.inputs import import_object
    from mpocompress.speech.data import load_pairs
    from mpocompress.speech.evaluate import evaluate_systems

    system = None
    if ckpt is not None:
        system = import_object(FACTORY[model])()
        system.load_state_dict(load_state_dict(ckpt), strict=True)
        system.eval()
    pairs = load_pairs(work / "corpus" / "test")
    return evaluate_systems({"s": system}, pairs, list(setup.metrics))["per_utterance"]["s"]


# -- the run ---------------------------------------------------------------------------------------


def cached(path: Path, fn, *args) -> Any:
    """``fn(*args)`` once: its JSON result is kept in ``path`` (written last, so a crash redoes it)."""
    if path.exists():
        return json.loads(path.read_text())
    value = fn(*args)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "_work" / "speech", help="work folder (kept; reruns reuse it)")
    ap.add_argument("--quick", action="store_true", help="tiny corpus and step counts: checks the script, no docs")
    ap.add_argument("--jobs", type=int, default=2, help="parallel single-thread jobs (default 2 = this machine's cores)")
    ap.add_argument("--models", default="lstm,mlp,gcrn")
    args = ap.parse_args()
    setup = QUICK if args.quick else Setup()
    work = args.work.resolve() / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    started = time.time()
    phases: dict[str, float] = {}

    # 1. corpus
    t0 = time.time()
    corpus = work / "corpus"
    corpus_cmd = [sys.executable, str(EXAMPLES / "make_corpus.py"), str(corpus), "--train", str(setup.train_utts),
                  "--test", str(setup.test_utts), "--seed", str(setup.seed)]  # fmt: skip
    if not (corpus / "manifest.json").exists():
        log("corpus: generating")
        run(corpus_cmd)
    phases["corpus"] = time.time() - t0

    # 2. training: dense models and MPO-from-scratch models sized to each target
    t0 = time.time()
    dense_bytes = {m: dense_size(m) for m in models}
    scratch_bond = {(m, f): fit_scratch_bond(m, int(f * dense_bytes[m])) for m in models for f in setup.sizes[m]}
    train_jobs = {(m, None): work / f"{m}.dense.safetensors" for m in models}
    train_jobs.update({(m, f): work / f"{m}.mpo-scratch.{f:g}.safetensors" for (m, f), b in scratch_bond.items() if b})
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futs = {}
        for (m, f), out in sorted(train_jobs.items(), key=lambda kv: -setup.train_steps[kv[0][0]]):
            bond = None if f is None else scratch_bond[(m, f)]
            futs[(m, f)] = pool.submit(cached, out.with_suffix(".json"), job_train, work, setup, m, bond, out)
        trained = {k: fut.result() for k, fut in futs.items()}
    for (m, f), info in trained.items():
        log(f"trained {m} {'dense' if f is None else f'MPO from scratch, bond {scratch_bond[(m, f)]}'} in {info['seconds']:.0f} s")
    phases["training"] = time.time() - t0

    # 3. compression at matched sizes
    t0 = time.time()
    todo = [(m, meth, f) for m in models for f in setup.sizes[m] for meth in METHODS if meth != "mpo-scratch"]
    cost = {"lstm": 1, "mlp": 1.3, "gcrn": 4}
    todo.sort(key=lambda t: -(cost[t[0]] * (3 if t[1] == "ipkd" else 1 if METHODS[t[1]][1] else 0.1)))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futs = {}
        for m, meth, f in todo:
            out = work / f"{m}.{meth}.{f:g}.safetensors"
            futs[(m, meth, f)] = pool.submit(cached, out.with_suffix(".json"), job_compress, work, setup, m, meth, f,
                                             work / f"{m}.dense.safetensors", out)  # fmt: skip
        compressed = {}
        for k, fut in futs.items():
            compressed[k] = fut.result()
            log(f"compressed {k}: {compressed[k].get('command', 'unreachable')}")
    phases["compression"] = time.time() - t0

    # 4. scoring
    t0 = time.time()
    systems: dict[tuple[str, str, float | None], Path | None] = {}
    for m in models:
        systems[(m, "dense", None)] = work / f"{m}.dense.safetensors"
        for f in setup.sizes[m]:
            for meth in METHODS:
                path = work / f"{m}.{meth}.{f:g}.safetensors"
                if path.exists():
                    systems[(m, meth, f)] = path
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        noisy_fut = pool.submit(cached, work / "noisy.scores.json", job_score, work, setup, models[0], None)
        futs = {k: pool.submit(cached, p.with_suffix(".scores.json"), job_score, work, setup, k[0], p) for k, p in systems.items()}
        noisy = noisy_fut.result()
        scores = {k: fut.result() for k, fut in futs.items()}
    phases["scoring"] = time.time() - t0
    total = time.time() - started
    log(f"done in {total / 60:.1f} min")

    result = summarise(setup, models, work, dense_bytes, scratch_bond, trained, compressed, noisy, scores, systems)
    result.update(phases_seconds=phases, total_seconds=total, corpus_command=shown(corpus_cmd, work), quick=args.quick,
                  machine=machine())  # fmt: skip
    out_json = RESULTS if not args.quick else work / "speech.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out_json}")
    if not args.quick:
        DOC.write_text(keep_notes(render(result)))
        log(f"wrote {DOC}")
    else:
        print(render(result))


def machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def summarise(setup, models, work, dense_bytes, scratch_bond, trained, compressed, noisy, scores, systems) -> dict[str, Any]:
    from mpocompress.speech.metrics import paired_ci

    rows = []
    for (m, meth, f), path in systems.items():
        s = scores[(m, meth, f)]
        base = scores[(m, "dense", None)]
        row = {"model": m, "method": meth, "size": f, "bytes": file_size(path), "dense_bytes": file_size(systems[(m, "dense", None)]),
               "means": {k: float(sum(v) / len(v)) for k, v in s.items()}}  # fmt: skip
        if meth != "dense":
            row["vs_dense"] = {k: paired_ci(base[k], s[k]) for k in setup.metrics}
        if meth == "mpo-scratch":
            info = trained[(m, f)]
            row.update(command=info["command"], seconds=info["seconds"], bond_dim=scratch_bond[(m, f)])
        elif meth == "dense":
            info = trained[(m, None)]
            row.update(command=info["command"], seconds=info["seconds"])
        else:
            info = compressed[(m, meth, f)]
            row.update(command=info["command"], seconds=info["seconds"], search_seconds=info["search_seconds"],
                       options=info["options"], finetune_seconds=(info.get("finetune") or {}).get("seconds"))  # fmt: skip
        rows.append(row)
    unreachable = [{"model": m, "method": meth, "size": f} for (m, meth, f), info in compressed.items() if not info["reachable"]]
    for (m, f), b in scratch_bond.items():
        if b is None:
            unreachable.append({"model": m, "method": "mpo-scratch", "size": f})
    # family duels: the best MPO system against the best of each other family, same model and size
    duels = []
    for m in models:
        for f in setup.sizes[m]:
            here = [r for r in rows if r["model"] == m and r["size"] == f]
            best = {}
            for r in here:
                fam = METHODS[r["method"]][0]
                if fam not in best or r["means"]["pesq_wb"] > best[fam]["means"]["pesq_wb"]:
                    best[fam] = r
            if "MPO" not in best:
                continue
            a = best["MPO"]
            for fam, r in best.items():
                if fam == "MPO":
                    continue
                sa, sb = scores[(m, r["method"], f)], scores[(m, a["method"], f)]
                duels.append({"model": m, "size": f, "mpo": a["method"], "other": r["method"], "family": fam,
                              "diff": {k: paired_ci(sa[k], sb[k]) for k in setup.metrics}})  # fmt: skip
    noisy_means = {k: float(sum(v) / len(v)) for k, v in noisy.items()}
    return {"setup": {**setup.__dict__, "sizes": {k: list(v) for k, v in setup.sizes.items()}}, "methods": METHODS,
            "noisy": noisy_means, "rows": rows, "unreachable": unreachable, "duels": duels,
            "test_utterances": len(next(iter(noisy.values())))}  # fmt: skip


# -- docs -----------------------------------------------------------------------------------------

NAMES = {"pesq_wb": "PESQ-WB", "stoi": "STOI", "estoi": "ESTOI", "si_sdr": "SI-SDR (dB)"}


def _ci(c: dict[str, float], digits: int = 3) -> str:
    star = "" if c["low"] <= 0 <= c["high"] else "*"
    return f"{c['diff']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]{star}"


def render(res: dict[str, Any]) -> str:
    st = res["setup"]
    mins = res["total_seconds"] / 60
    out = ["# Results: compressing speech-enhancement models at matched file sizes", "",
           "Generated by `python benchmarks/speech.py` from `benchmarks/results/speech.json`; do not edit by hand.",
           f"The whole run (corpus, {sum(1 for r in res['rows'] if r['method'] in ('dense', 'mpo-scratch'))} trainings, "
           f"{sum(1 for r in res['rows'] if r['method'] not in ('dense', 'mpo-scratch'))} compressions, scoring) took "
           f"{mins:.0f} min on {res['machine']} ({', '.join(f'{k} {v / 60:.1f} min' for k, v in res['phases_seconds'].items())}).", ""]  # fmt: skip
    out += ["## Setup", "",
            f"* Corpus: `{res['corpus_command']}` ({st['train_utts']} training utterances, "
            f"{res['test_utterances']} test utterances from voices not in training, noise at -5..15 dB).",
            f"* Models trained dense for {', '.join(f'{m} {n} steps' for m, n in st['train_steps'].items() if m in st['sizes'])} "
            "(Adam, lr 1e-3, batch 16 x 200 frames, IRM mask MSE); the MPO-from-scratch models get the same steps.",
            f"* Fine-tuning (methods marked FT): {st['ft_steps']} Adam steps, loss {st['kd_weight']} x distillation from the dense model "
            f"+ {1 - st['kd_weight']:g} x IRM mask MSE; IPKD splits the same steps over {st['ipkd_rounds']} rounds; quantizers run after it.",
            "* Sizes: the target is a share of the dense **file** (safetensors, biases and normalisation included); each method's knob is "
            "searched so that its file is as large as possible without exceeding the target (actual share shown).",
            "* Differences are from the dense model, paired over utterances, with 95 % bootstrap intervals; `*` = the interval excludes 0.",
            "* Every row's exact command is in `benchmarks/results/speech.json`.", ""]  # fmt: skip
    out += ["Methods:", ""] + [f"* `{k}`: {v[2]}" for k, v in res["methods"].items()] + [""]
    for m in res["setup"]["sizes"]:
        rows = [r for r in res["rows"] if r["model"] == m]
        if not rows:
            continue
        dense = next(r for r in rows if r["method"] == "dense")
        only = res["setup"]["include"].get(m)
        note = [f"Every method compresses only {', '.join(f'`{p}`' for p in only)} (docs/speech.md).", ""] if only else []
        out += [f"## {m.upper()}", "", *note,
                f"Dense: {dense['bytes'] / 1e6:.2f} MB; PESQ-WB {dense['means']['pesq_wb']:.3f}, STOI {dense['means']['stoi']:.3f}, "
                f"ESTOI {dense['means']['estoi']:.3f}, SI-SDR {dense['means']['si_sdr']:.2f} dB "
                f"(noisy input: {res['noisy']['pesq_wb']:.3f}, {res['noisy']['stoi']:.3f}, {res['noisy']['estoi']:.3f}, "
                f"{res['noisy']['si_sdr']:.2f} dB).", ""]  # fmt: skip
        for f in res["setup"]["sizes"][m]:
            here = sorted((r for r in rows if r["size"] == f), key=lambda r: -r["means"]["pesq_wb"])
            out += [f"### {m.upper()} at {f:.0%} of the dense file", "",
                    "| method | file | PESQ-WB | STOI | ESTOI | SI-SDR (dB) | knob |", "|---|---|---|---|---|---|---|"]
            for r in here:
                cells = [f"{r['means'][k]:.3f} ({_ci(r['vs_dense'][k], 2 if k == 'si_sdr' else 3)})" for k in ("pesq_wb", "stoi", "estoi")]
                cells.append(f"{r['means']['si_sdr']:.2f} ({_ci(r['vs_dense']['si_sdr'], 2)})")
                knob = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items() if k != "include")
                if r["method"] == "mpo-scratch":
                    knob = f"bond_dim={r['bond_dim']}"
                out.append(f"| `{r['method']}` | {r['bytes'] / 1e3:.0f} KB ({r['bytes'] / r['dense_bytes']:.1%}) | " + " | ".join(cells) + f" | {knob} |")
            gone = [u["method"] for u in res["unreachable"] if u["model"] == m and u["size"] == f]
            if gone:
                out.append(f"\nCannot reach this size: {', '.join(f'`{g}`' for g in gone)}.")
            out.append("")
    out += ["## MPO against the other families", "",
            "Best MPO system (by mean PESQ-WB among `mpo*` rows) minus the best system of each other family, paired per "
            "utterance (positive: MPO better). Choosing the best of several on the test set favours families with more "
            "variants slightly; MPO has four, pruning three.", "",
            "| model | size | best MPO | vs | PESQ-WB | STOI | ESTOI | SI-SDR (dB) |", "|---|---|---|---|---|---|---|---|"]
    for d in res["duels"]:
        out.append(f"| {d['model']} | {d['size']:.0%} | `{d['mpo']}` | `{d['other']}` ({d['family']}) | "
                   + " | ".join(_ci(d["diff"][k], 2 if k == "si_sdr" else 3) for k in ("pesq_wb", "stoi", "estoi", "si_sdr")) + " |")  # fmt: skip
    out += ["", "Read off the table above (PESQ-WB; `level` = the interval includes 0):", ""]
    for d in res["duels"]:
        c = d["diff"]["pesq_wb"]
        verdict = "MPO better" if c["low"] > 0 else "MPO worse" if c["high"] < 0 else "level"
        out.append(f"* {d['model'].upper()} at {d['size']:.0%}, vs {d['family']}: **{verdict}** ({c['diff']:+.3f})")
    out.append("")
    return "\n".join(out)


def keep_notes(new: str) -> str:
    """Carry the hand-written ``notes`` block of the existing docs/results.md into the regenerated one."""
    start, end = "<!-- notes:start -->", "<!-- notes:end -->"
    old = DOC.read_text() if DOC.exists() else ""
    notes = old[old.index(start) : old.index(end) + len(end)] if start in old and end in old else f"{start}\n{end}"
    return new + "\n" + notes + "\n"


if __name__ == "__main__":
    main()
