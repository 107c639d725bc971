"""The speech-enhancement workbench: features, reference models, data, metrics, evaluation.

``pip install 'mpocompress[speech]'`` adds PESQ (``pesq``) and STOI/ESTOI (``pystoi``); SI-SDR and
everything else needs only torch and numpy. See docs/speech.md.
"""

from mpocompress.speech.features import (
    STFTConfig,
    ideal_ratio_mask,
    istft,
    log_power,
    mix_at_snr,
    stft,
)
from mpocompress.speech.metrics import METRICS, available, paired_ci, score, si_sdr
from mpocompress.speech.models import GCRN, LSTMMask, MLPMask, MPOSpec, build

__all__ = [
    "GCRN", "LSTMMask", "METRICS", "MLPMask", "MPOSpec", "STFTConfig", "available", "build",
    "ideal_ratio_mask", "istft", "log_power", "mix_at_snr", "paired_ci", "score", "si_sdr", "stft",
]  # fmt: skip
