"""Score speech-enhancement systems on the same noisy/clean utterances, with paired intervals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from mpocompress.speech.data import enhance
from mpocompress.speech.features import DEFAULT_STFT, STFTConfig
from mpocompress.speech.metrics import paired_ci, score

#: called after each utterance with (system, index, total)
Progress = Callable[[str, int, int], None]


def evaluate_systems(
    systems: dict[str, nn.Module | None],
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    metrics: Sequence[str],
    cfg: STFTConfig = DEFAULT_STFT,
    *,
    baseline: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Enhance every utterance with every system and score it against the clean speech.

    Args:
        systems: name -> mask model; ``None`` means the unprocessed noisy input.
        pairs: ``(noisy, clean)`` waveforms.
        metrics: names from :data:`mpocompress.speech.metrics.METRICS`.
        baseline: the system the others are compared with (default: the first model that is not None).

    Returns:
        ``{"metrics", "utterances", "systems": {name: {metric: mean}}, "per_utterance": {name:
        {metric: [..]}}, "baseline", "paired": {name: {metric: paired_ci(baseline, name)}}}``.
    """
    names = list(systems)
    if baseline is None:
        baseline = next((n for n in names if systems[n] is not None), names[0])
    per: dict[str, dict[str, list[float]]] = {n: {m: [] for m in metrics} for n in names}
    for name in names:
        model = systems[name]
        for i, (noisy, clean) in enumerate(pairs):
            est = noisy if model is None else enhance(model, noisy, cfg)
            for m, v in score(clean, est, cfg.sample_rate, metrics).items():
                per[name][m].append(v)
            if progress is not None:
                progress(name, i + 1, len(pairs))
    summary = {n: {m: float(np.mean(v)) for m, v in per[n].items()} for n in names}
    paired = {
        n: {m: paired_ci(per[baseline][m], per[n][m]) for m in metrics} for n in names if n != baseline
    }
    return {"metrics": list(metrics), "utterances": len(pairs), "systems": summary, "per_utterance": per,
            "baseline": baseline, "paired": paired}  # fmt: skip
