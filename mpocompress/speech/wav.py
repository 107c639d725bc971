"""16-bit PCM wav files through the standard library, and paired noisy/clean folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpocompress.errors import InputError
from mpocompress.io import atomic_path


def read_wav(path: Path) -> tuple[Any, int]:
    """A mono 16-bit PCM wav file as float32 samples in [-1, 1] (numpy) and its sample rate.

    Raises:
        InputError: not a readable mono 16-bit PCM wav file.
    """
    import wave

    import numpy as np

    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise InputError(
                    f"{path}: need mono 16-bit PCM wav, got {w.getnchannels()} channel(s) of "
                    f"{8 * w.getsampwidth()} bits (convert with: sox IN -c 1 -b 16 OUT)"
                )
            raw = w.readframes(w.getnframes())
            rate = w.getframerate()
    except (OSError, EOFError, wave.Error) as e:
        raise InputError(f"{path}: not a readable wav file ({e})") from e
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0, rate


def write_wav(path: Path, samples: Any, rate: int) -> None:
    """Write mono float samples as 16-bit PCM wav, atomically (clipped to [-1, 1])."""
    import wave

    import numpy as np

    data = (np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0 - 1 / 32768) * 32768).round().astype("<i2")
    with atomic_path(path) as tmp:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(data.tobytes())


def paired_wavs(root: Path) -> list[tuple[Path, Path]]:
    """``(noisy, clean)`` wav pairs of a speech-enhancement set: ``root/noisy/*.wav`` and the clean
    file of the same name in ``root/clean/``, sorted by name.

    Raises:
        InputError: the folders are missing, empty, or a noisy file has no clean partner.
    """
    root = Path(root)
    noisy_dir, clean_dir = root / "noisy", root / "clean"
    if not noisy_dir.is_dir() or not clean_dir.is_dir():
        raise InputError(f"{root}: a speech-enhancement set needs folders noisy/ and clean/ (wav files, same names)")
    noisy = sorted(noisy_dir.glob("*.wav"))
    if not noisy:
        raise InputError(f"{noisy_dir}: no .wav files")
    lacking = [p.name for p in noisy if not (clean_dir / p.name).is_file()]
    if lacking:
        raise InputError(f"{clean_dir}: lacks the clean partner of {len(lacking)} noisy file(s), e.g. {lacking[0]!r}")
    return [(p, clean_dir / p.name) for p in noisy]
