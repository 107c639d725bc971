"""Data shipped with the package: a small trained example network."""

from __future__ import annotations

from pathlib import Path

EXAMPLE = "se_lstm.safetensors"


def example_checkpoint() -> Path:
    """Path of the bundled example checkpoint: a small trained LSTM speech-enhancement mask
    estimator (257 -> 128 -> LSTM 128 -> 257); how it was made is stored in its metadata and in
    ``examples/train_example.py``."""
    return Path(__file__).with_name(EXAMPLE)
