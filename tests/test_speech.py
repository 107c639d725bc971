"""The speech workbench on generated signals (no espeak-ng, no downloads)."""

import math

import numpy as np
import pytest
import torch

from mpocompress.errors import ConfigError, InputError
from mpocompress.speech import (
    METRICS,
    MPOSpec,
    STFTConfig,
    available,
    build,
    ideal_ratio_mask,
    istft,
    mix_at_snr,
    paired_ci,
    score,
    si_sdr,
    stft,
)
from mpocompress.speech.data import enhance, load_pairs, make_batches, utterance_features
from mpocompress.speech.evaluate import evaluate_systems
from mpocompress.speech.wav import paired_wavs, read_wav, write_wav

SR = 16000


def voiced(seconds: float, seed: int) -> np.ndarray:
    """A harmonic, speech-like signal with a pitch glide and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 60 * rng.random() + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    gate = (np.sin(2 * np.pi * (1.3 + rng.random()) * t) > -0.3).astype(float)
    return (0.1 * x * gate).astype(np.float32)


def test_stft_round_trip_and_shapes():
    x = torch.randn(2, 8000)
    spec = stft(x)
    assert spec.shape == (2, 8000 // 256 + 1, 257)
    assert torch.allclose(istft(spec, 8000), x, atol=1e-4)
    with pytest.raises(ValueError):
        STFTConfig(hop=600)


def test_mix_at_snr_and_irm():
    clean, noise = torch.randn(16000), torch.randn(20000)
    for snr in (-5.0, 0.0, 15.0):
        noisy, scaled = mix_at_snr(clean, noise, snr)
        got = 10 * math.log10(float(clean.square().mean() / scaled.square().mean()))
        assert abs(got - snr) < 1e-3
        assert torch.allclose(noisy, clean + scaled)
    m = ideal_ratio_mask(stft(clean), stft(torch.zeros(16000)))
    assert float(m.min()) > 0.99 and float(m.max()) <= 1.0


def test_si_sdr_is_scale_invariant_and_orders_noise_levels():
    s = voiced(1.0, 0)
    n = np.random.default_rng(1).standard_normal(len(s)).astype(np.float32)
    assert si_sdr(s, 3.0 * s) > 100
    lo, hi = si_sdr(s, s + 0.1 * n), si_sdr(s, s + 0.01 * n)
    assert hi > lo + 15
    assert abs(si_sdr(s, s + 0.01 * n) - si_sdr(s, 5 * (s + 0.01 * n))) < 1e-6


def test_metric_errors_are_clear():
    s = voiced(0.5, 0)
    with pytest.raises(ConfigError, match="unknown metric"):
        score(s, s, SR, ["mos"])
    for m in set(METRICS) - set(available()):
        with pytest.raises(ConfigError, match="pip install"):
            score(s, s, SR, [m])


@pytest.mark.skipif("stoi" not in available() or "pesq_wb" not in available(), reason="needs mpocompress[speech]")
def test_pesq_and_stoi_rank_cleaner_higher():
    s = voiced(2.0, 2)
    n = np.random.default_rng(3).standard_normal(len(s)).astype(np.float32)
    noisy = score(s, s + 0.05 * n, SR, METRICS)
    cleaner = score(s, s + 0.005 * n, SR, METRICS)
    for m in METRICS:
        assert cleaner[m] > noisy[m], m


def test_paired_ci_covers_a_known_shift_and_excludes_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 0.5, 200)
    b = a + 0.1 + rng.normal(0, 0.05, 200)  # a paired gain far below the spread between utterances
    ci = paired_ci(a, b)
    assert ci["low"] < 0.1 < ci["high"] and ci["low"] > 0
    same = paired_ci(a, a + rng.normal(0, 0.05, 200))
    assert same["low"] < 0 < same["high"]
    with pytest.raises(ValueError):
        paired_ci([1.0], [1.0, 2.0])


@pytest.mark.parametrize("name", ["lstm", "mlp", "gcrn"])
@pytest.mark.parametrize("mpo", [None, MPOSpec(bond_dim=4, cores=3)])
def test_reference_models_map_features_to_masks(name, mpo):
    torch.manual_seed(0)
    model = build(name, mpo=mpo, **({"hidden": 64} if name != "gcrn" else {}))
    x = torch.randn(2, 30, 257)
    y = model(x)
    assert y.shape == (2, 30, 257) and float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    y.mean().backward()
    dense = build(name, **({"hidden": 64} if name != "gcrn" else {}))
    n_params = sum(p.numel() for p in model.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert (n_params < n_dense) if mpo is not None else (n_params == n_dense)


@pytest.mark.parametrize("name", ["lstm", "gcrn"])
def test_causal_models_do_not_look_ahead(name):
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.randn(1, 40, 257)
    y = model(x)
    x2 = x.clone()
    x2[:, 25:] = torch.randn(1, 15, 257)
    assert torch.allclose(model(x2)[:, :25], y[:, :25], atol=1e-6)


@pytest.fixture
def se_set(tmp_path):
    """A small paired set: harmonic 'speech' in white noise at 0-10 dB."""
    rng = np.random.default_rng(0)
    for d in ("noisy", "clean"):
        (tmp_path / d).mkdir()
    for k in range(6):
        clean = voiced(1.0 + 0.25 * k, k)
        noise = rng.standard_normal(len(clean)).astype(np.float32)
        noisy, _ = mix_at_snr(torch.from_numpy(clean), torch.from_numpy(noise), float(rng.uniform(0, 10)))
        write_wav(tmp_path / "clean" / f"u{k}.wav", clean, SR)
        write_wav(tmp_path / "noisy" / f"u{k}.wav", noisy.numpy(), SR)
    return tmp_path


def test_wav_round_trip_and_bad_sets(tmp_path, se_set):
    x = voiced(0.3, 5)
    write_wav(tmp_path / "x.wav", x, SR)
    y, rate = read_wav(tmp_path / "x.wav")
    assert rate == SR and np.max(np.abs(x - y)) < 1e-4
    (tmp_path / "junk.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(InputError, match="not a readable wav"):
        read_wav(tmp_path / "junk.wav")
    with pytest.raises(InputError, match="noisy/ and clean/"):
        paired_wavs(tmp_path / "nowhere")
    (se_set / "clean" / "u0.wav").unlink()
    with pytest.raises(InputError, match="clean partner"):
        paired_wavs(se_set)


def test_training_reduces_the_mask_loss_and_improves_si_sdr(se_set):
    torch.manual_seed(0)
    pairs = load_pairs(se_set)
    batches = make_batches(pairs, batch_size=2, segment=40)
    assert all(x.shape == y.shape and x.shape[1:] == (40, 257) for x, y in batches)
    model = build("lstm", hidden=64)
    model.set_normalisation(torch.cat([utterance_features(n, c)[0] for n, c in pairs]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_of() -> float:
        with torch.no_grad():
            return float(sum(torch.nn.functional.mse_loss(model(x), y) for x, y in batches))

    before = loss_of()
    for _ in range(15):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert loss_of() < 0.6 * before
    res = evaluate_systems({"noisy": None, "model": model}, pairs, ["si_sdr"])
    assert res["baseline"] == "model" and res["utterances"] == len(pairs)
    assert res["systems"]["model"]["si_sdr"] > res["systems"]["noisy"]["si_sdr"]
    assert len(res["per_utterance"]["model"]["si_sdr"]) == len(pairs)
    assert res["paired"]["noisy"]["si_sdr"]["diff"] < 0
    out = enhance(model, pairs[0][0])
    assert out.shape == pairs[0][0].shape


def test_convert_task_and_evaluate_cli(tmp_path, se_set):
    """Train a small model, compress it with --task speech-enhancement fine-tuning, score both."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from mpocompress.cli import main

    torch.manual_seed(0)
    pairs = load_pairs(se_set)
    model = build("lstm", hidden=32, layers=1)
    model.set_normalisation(torch.cat([utterance_features(n, c)[0] for n, c in pairs]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        for x, y in make_batches(pairs, batch_size=2, segment=40):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    dense = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense))
    (tmp_path / "factory.py").write_text(
        "from mpocompress.speech import build\n\ndef small():\n    return build('lstm', hidden=32, layers=1)\n"
    )
    small = tmp_path / "small.safetensors"
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(dense), "-o", str(small), "--ratio", "3", "--task", "speech-enhancement",
                               "--model", f"{tmp_path / 'factory.py'}:small", "--data", str(se_set),
                               "--batch-size", "2", "--steps", "5", "--kd-weight", "0.5", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    ft = json.loads(res.stdout)["finetune"]
    assert ft["steps"] == 5 and set(ft["val_task_loss"]) == {"dense", "compressed", "finetuned"}
    res = runner.invoke(main, ["evaluate", str(dense), str(small), "--model", f"{tmp_path / 'factory.py'}:small",
                               "--data", str(se_set), "--metrics", "si_sdr", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out["systems"]) == {"noisy", str(dense), str(small)} and out["baseline"] == str(dense)
    assert out["systems"][str(dense)]["si_sdr"] > out["systems"]["noisy"]["si_sdr"]
    assert out["paired"][str(small)]["si_sdr"]["n"] == len(pairs)
    bad = runner.invoke(main, ["evaluate", str(dense), "--model", f"{tmp_path / 'factory.py'}:small",
                               "--data", str(se_set), "--metrics", "mos"])  # fmt: skip
    assert bad.exit_code == 2 and "unknown metric" in bad.output
    wrong = runner.invoke(main, ["evaluate", str(dense), "--model", "mpocompress.speech.models:gcrn",
                                 "--data", str(se_set), "--metrics", "si_sdr"])  # fmt: skip
    assert wrong.exit_code == 3 and "does not fit" in wrong.output


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_espeak_corpus(tmp_path):
    """The corpus generator: paired files, disjoint train/test voices, mixtures at the planned SNR."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "speech_enhancement" / "make_corpus.py"
    out = tmp_path / "corpus"
    subprocess.run([sys.executable, str(script), str(out), "--train", "6", "--test", "4", "--seed", "1"], check=True)
    manifest = json.loads((out / "manifest.json").read_text())["utterances"]
    assert len(manifest) == 10
    train_voices = {u["variant"] for u in manifest if u["split"] == "train"}
    test_voices = {u["variant"] for u in manifest if u["split"] == "test"}
    assert not train_voices & test_voices
    for u in manifest:
        clean, rate = read_wav(out / u["split"] / "clean" / f"{u['name']}.wav")
        noisy, _ = read_wav(out / u["split"] / "noisy" / f"{u['name']}.wav")
        assert rate == SR and len(clean) == len(noisy) > SR // 2
        noise = noisy - clean
        snr = 10 * math.log10(float(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2)))
        assert abs(snr - u["snr_db"]) < 0.5, (u["name"], snr, u["snr_db"])
    assert len(load_pairs(out / "test")) == 4


def _speech_benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speech.py"
    spec = importlib.util.spec_from_file_location("speech_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_comparison_matches_file_sizes_from_below(tmp_path):
    """benchmarks/speech.py: each method's knob gives the largest file <= the target, so methods are
    compared at the same size; a slightly gentler knob would overshoot."""
    from mpocompress.io import save_safetensors

    bench = _speech_benchmark()
    torch.manual_seed(0)
    dense = tmp_path / "dense.safetensors"
    save_safetensors({"a.weight": torch.randn(96, 128), "a.bias": torch.randn(96), "b.weight": torch.randn(64, 96)}, dense)
    target = int(0.2 * dense.stat().st_size)
    for method in ("mpo", "svd-ft", "prune-ft", "seofp", "mpo-kmeans-ft"):
        opts, size = bench.fit_knob(method, dense, target)
        assert size <= target and size == bench.trial_size(dense, opts), method
        if "ratio" in opts:
            gentler = {**opts, "ratio": round(opts["ratio"] / 1.02, 3)}
        elif "prune" in opts:
            gentler = {**opts, "prune": f"magnitude:{float(opts['prune'].split(':')[1]) - 0.003:.4f}"}
        else:
            gentler = {"quantize": f"seofp:{int(opts['quantize'].split(':')[1]) + 1}"}
        assert bench.trial_size(dense, gentler) > target, method
    assert bench.fit_knob("seofp", dense, int(0.05 * dense.stat().st_size)) is None  # 3 bits at least
    assert bench.cli_args({"ratio": 2.5, "cores": 3}) == ["--ratio", "2.5", "--cores", "3"]
