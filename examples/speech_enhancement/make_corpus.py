"""Generate a paired noisy/clean speech-enhancement corpus with no downloads.

    python examples/speech_enhancement/make_corpus.py corpus/ --train 600 --test 200 --seed 0

Clean speech is synthesised by espeak-ng (Debian package ``espeak-ng``; ``apt-get install espeak-ng``)
from seeded sentences, in 8 English accents (British, American, Scottish, RP, Lancastrian, West
Midlands, Caribbean, New York) and espeak-ng voice variants, with random speaking rate and pitch.
Train and test use disjoint voice variants, so the test set is speaker-independent. Noise is
generated (seeded): white, pink, brown, babble (3-6 other synthetic talkers of the training
variants), hum (mains harmonics plus hiss) and amplitude-modulated speech-shaped noise. Each
utterance is mixed at an SNR drawn uniformly from -5 to 15 dB. Output, 16 kHz mono 16-bit wav:

    OUT/train/clean/*.wav  OUT/train/noisy/*.wav  OUT/test/clean/*.wav  OUT/test/noisy/*.wav
    OUT/manifest.json      (accent, variant, rate, pitch, text, noise type, SNR per utterance)

Resampling from espeak-ng's 22.05 kHz to 16 kHz uses ``sox`` when present, else a windowed-sinc
resampler in numpy. Same seed, same corpus (for the same espeak-ng version).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mpocompress.speech.wav import write_wav

SR = 16000
ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt", "klatt2", "croak", "adam", "linda"]
TEST_VARIANTS = ["m5", "m6", "m7", "f4", "f5", "klatt3", "john", "anika"]
NOISES = ["white", "pink", "brown", "babble", "hum", "modulated"]

ADJ = "old quiet bright small heavy green narrow warm cold early late empty busy gentle distant".split()
NOUN = ("river garden station window teacher market engine letter bridge kitchen morning village "
        "doctor harbour signal answer painter blanket mountain lantern").split()
VERB = "found passed opened carried watched followed painted moved closed reached cleaned covered".split()
PREP = "near behind under beside across before after".split()
TEMPLATES = [
    "The {a} {n} {v} the {a2} {n2} {p} the {n3}.",
    "A {a} {n} {v} the {n2} {p} the {a2} {n3}.",
    "Please take the {a} {n} to the {n2} before the {a2} {n3} arrives.",
    "We {v} a {a} {n} and a {a2} {n2} {p} the {n3}.",
    "Did the {n} see the {a} {n2} {p} the {n3}?",
]


def sentence(rng: np.random.Generator) -> str:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    t = pick(TEMPLATES)
    return t.format(a=pick(ADJ), a2=pick(ADJ), n=pick(NOUN), n2=pick(NOUN), n3=pick(NOUN), v=pick(VERB), p=pick(PREP))


def read_pcm(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768, w.getframerate()


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Windowed-sinc resampling (used when sox is missing)."""
    if src == dst:
        return x
    n_out = int(round(len(x) * dst / src))
    t = np.arange(n_out) * src / dst
    cutoff = min(1.0, dst / src)
    half = 32
    out = np.zeros(n_out, dtype=np.float64)
    base = np.floor(t).astype(int)
    for k in range(-half, half + 1):
        idx = base + k
        valid = (idx >= 0) & (idx < len(x))
        d = t - idx
        w = cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / (half + 1), -1, 1)))
        out[valid] += x[idx[valid]] * w[valid]
    return out.astype(np.float32)


def synth(text: str, voice: str, rate: int, pitch: int, tmp: Path) -> np.ndarray:
    """espeak-ng -> 16 kHz float samples, trimmed of leading/trailing silence, peak-normalised to 0.5."""
    fd, name = tempfile.mkstemp(suffix=".wav", dir=tmp)
    os.close(fd)
    raw = Path(name)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(raw), text],
                   check=True, capture_output=True)  # fmt: skip
    if shutil.which("sox"):
        out = raw.with_suffix(".16k.wav")
        subprocess.run(["sox", "-D", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(out)], check=True, capture_output=True)
        x, _ = read_pcm(out)
        out.unlink()
    else:
        x, r = read_pcm(raw)
        x = resample(x, r, SR)
    raw.unlink()
    loud = np.flatnonzero(np.abs(x) > 0.01)
    if len(loud):
        x = x[max(0, loud[0] - 800) : loud[-1] + 800]
    return (0.5 * x / max(float(np.abs(x).max()), 1e-6)).astype(np.float32)


def colored(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spec / f ** (exponent / 2), n).astype(np.float32)


def make_noise(kind: str, n: int, rng: np.random.Generator, talkers: list[np.ndarray]) -> np.ndarray:
    if kind == "white":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "pink":
        return colored(n, 1.0, rng)
    if kind == "brown":
        return colored(n, 2.0, rng)
    if kind == "babble":
        out = np.zeros(n, dtype=np.float32)
        for _ in range(int(rng.integers(3, 7))):
            s = np.tile(talkers[int(rng.integers(len(talkers)))], 1 + n // 8000)
            start = int(rng.integers(0, max(1, len(s) - n)))
            out += s[start : start + n]
        return out
    t = np.arange(n) / SR
    if kind == "hum":
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        hum = sum(np.sin(2 * np.pi * f0 * k * t + rng.random() * 6.28) / k for k in range(1, 8))
        return (hum + 0.1 * rng.standard_normal(n)).astype(np.float32)
    # modulated: speech-shaped (pink, low-passed) noise with a 2-6 Hz syllable-rate envelope
    env = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.random() * 6.28)
    return (colored(n, 1.3, rng) * env).astype(np.float32)


def mix(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> tuple[np.ndarray, np.ndarray]:
    """``(clean, noisy)`` at the SNR; both scaled down together if the mixture would clip."""
    ps = float(np.mean(clean**2))
    pn = max(float(np.mean(noise**2)), 1e-12)
    noisy = clean + noise * np.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    peak = float(np.abs(noisy).max())
    scale = 0.9 / peak if peak > 0.99 else 1.0
    return clean * scale, noisy * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=600, help="training utterances")
    ap.add_argument("--test", type=int, default=200, help="test utterances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("make_corpus: espeak-ng is not installed (Debian: apt-get install espeak-ng sox)")
    if args.out.exists() and not args.force:
        sys.exit(f"make_corpus: {args.out} exists (use --force to replace it)")
    rng = np.random.default_rng(args.seed)
    plan = []
    for split, n, variants in (("train", args.train, TRAIN_VARIANTS), ("test", args.test, TEST_VARIANTS)):
        for k in range(n):
            plan.append({
                "split": split, "name": f"{split}_{k:05d}", "accent": ACCENTS[int(rng.integers(len(ACCENTS)))],
                "variant": variants[int(rng.integers(len(variants)))], "rate": int(rng.integers(130, 200)),
                "pitch": int(rng.integers(25, 75)), "text": sentence(rng),
                "noise": NOISES[int(rng.integers(len(NOISES)))], "snr_db": float(rng.uniform(-5, 15)),
                "noise_seed": int(rng.integers(2**31)),
            })  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent.resolve()))
    try:
        with ThreadPoolExecutor(4) as pool:
            talker_texts = [sentence(rng) for _ in range(12)]
            talkers = list(pool.map(lambda i: synth(talker_texts[i], f"{ACCENTS[i % 8]}+{TRAIN_VARIANTS[i]}", 170, 50, work),
                                    range(12)))  # fmt: skip
            clean = list(pool.map(lambda u: synth(u["text"], f"{u['accent']}+{u['variant']}", u["rate"], u["pitch"], work), plan))
        for u, x in zip(plan, clean):
            r = np.random.default_rng(u["noise_seed"])
            x, noisy = mix(x, make_noise(u["noise"], len(x), r, talkers), u["snr_db"])
            for kind, sig in (("clean", x), ("noisy", noisy)):
                d = work / u["split"] / kind
                d.mkdir(parents=True, exist_ok=True)
                write_wav(d / f"{u['name']}.wav", sig, SR)
            u["seconds"] = len(x) / SR
        (work / "manifest.json").write_text(json.dumps({"seed": args.seed, "sample_rate": SR, "utterances": plan}, indent=1))
        if args.out.exists():
            shutil.rmtree(args.out)
        work.rename(args.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    hours = sum(u["seconds"] for u in plan) / 3600
    print(f"make_corpus: {len(plan)} utterances ({hours:.2f} h) in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
