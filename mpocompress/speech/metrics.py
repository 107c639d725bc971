"""Speech quality and intelligibility metrics, per utterance, and paired confidence intervals.

SI-SDR is computed here (Le Roux et al., 2019). PESQ (ITU-T P.862, wide- and narrow-band) comes from
the ``pesq`` package and STOI/ESTOI (Taal et al., 2011; Jensen & Taal, 2016) from ``pystoi``: both are
the optional extra ``speech`` (``pip install 'mpocompress[speech]'``); asking for them without it is a
clear error. Numerical core, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mpocompress.errors import ConfigError

METRICS = ("pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr")
#: metrics that need no optional package
BUILTIN = ("si_sdr",)


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (both signals made zero-mean)."""
    r = np.asarray(reference, dtype=np.float64) - np.mean(reference)
    e = np.asarray(estimate, dtype=np.float64) - np.mean(estimate)
    n = min(len(r), len(e))
    r, e = r[:n], e[:n]
    alpha = float(np.dot(e, r) / max(np.dot(r, r), 1e-20))
    target = alpha * r
    noise = e - target
    return 10 * math.log10(max(float(np.dot(target, target)), 1e-20) / max(float(np.dot(noise, noise)), 1e-20))


def available() -> tuple[str, ...]:
    """The metrics this installation can compute."""
    out = list(BUILTIN)
    try:
        import pesq  # noqa: F401

        out += ["pesq_wb", "pesq_nb"]
    except ImportError:
        pass
    try:
        import pystoi  # noqa: F401

        out += ["stoi", "estoi"]
    except ImportError:
        pass
    return tuple(m for m in METRICS if m in out)


def score(reference: np.ndarray, estimate: np.ndarray, sample_rate: int, metrics: Sequence[str]) -> dict[str, float]:
    """The named metrics of one utterance (``reference``: clean speech).

    Raises:
        ConfigError: an unknown metric, or one whose package is not installed.
    """
    ref = np.asarray(reference, dtype=np.float64)
    est = np.asarray(estimate, dtype=np.float64)
    n = min(len(ref), len(est))
    ref, est = ref[:n], est[:n]
    out: dict[str, float] = {}
    for m in metrics:
        if m not in METRICS:
            raise ConfigError(f"unknown metric {m!r} (choose from {', '.join(METRICS)})")
        if m == "si_sdr":
            out[m] = si_sdr(ref, est)
        elif m.startswith("pesq"):
            try:
                from pesq import pesq
            except ImportError:
                raise ConfigError("PESQ needs the 'pesq' package: pip install 'mpocompress[speech]'") from None
            mode = "wb" if m == "pesq_wb" else "nb"
            if sample_rate not in (8000, 16000) or (mode == "wb" and sample_rate != 16000):
                raise ConfigError(f"{m} needs 16 kHz audio (8 kHz for narrow-band), got {sample_rate} Hz")
            out[m] = float(pesq(sample_rate, ref, est, mode))
        else:
            try:
                from pystoi import stoi
            except ImportError:
                raise ConfigError("STOI needs the 'pystoi' package: pip install 'mpocompress[speech]'") from None
            out[m] = float(stoi(ref, est, sample_rate, extended=(m == "estoi")))
    return out


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Mean of the paired differences ``b - a`` with a bootstrap percentile confidence interval.

    Utterances are resampled with replacement (seeded), keeping each utterance's two scores together,
    so the interval reflects how much the systems differ on the same material.

    Returns:
        ``{"mean_a", "mean_b", "diff", "low", "high", "n"}``.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"paired_ci needs two equal-length non-empty score lists, got {x.shape} and {y.shape}")
    d = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean_a": float(x.mean()), "mean_b": float(y.mean()), "diff": float(d.mean()),
            "low": float(lo), "high": float(hi), "n": int(len(d))}  # fmt: skip
