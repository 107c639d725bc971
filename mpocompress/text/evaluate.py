"""Perplexity of causal language models (dense or compressed checkpoints) on a text file."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from mpocompress.errors import InputError


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, seq_len: int, stride: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Perplexity of ``model`` on the token sequence ``ids`` with a sliding window.

    Windows of ``seq_len`` tokens start every ``stride`` tokens (default ``seq_len``: disjoint
    windows); each token is scored once, in the first window that reaches it, with the window's
    earlier tokens as context (the usual sliding-window evaluation of causal LMs). The first token
    of the text is never scored.

    Returns:
        ``{"ppl", "nll" (mean per token, nats), "tokens" (scored), "windows", "seq_len", "stride"}``.
    """
    from mpocompress.jobs.finetune import first_tensor

    stride = stride or seq_len
    if not 1 <= stride <= seq_len:
        raise InputError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    n = ids.numel()
    starts = list(range(0, max(n - 1, 1), stride))
    total, count, scored_to = 0.0, 0, 1  # tokens before scored_to are scored (token 0 never is)
    for i, begin in enumerate(starts):
        end = min(begin + seq_len, n)
        if end - begin < 2 or end <= scored_to:
            continue
        window = ids[begin:end].unsqueeze(0)
        logits = first_tensor(model(window)).float()[0, :-1]
        targets = window[0, 1:]
        first = max(scored_to - begin - 1, 0)  # predictions of already-scored tokens are skipped
        total += F.cross_entropy(logits[first:], targets[first:], reduction="sum").item()
        count += targets.numel() - first
        scored_to = end
        if progress is not None:
            progress(i + 1, len(starts))
    if count == 0:
        raise InputError(f"{n} tokens: nothing to score with --seq-len {seq_len}")
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(starts), "seq_len": seq_len, "stride": stride}


def load_lm(path: Path, config_folder: Path) -> Any:
    """The model of ``config_folder``'s ``config.json`` with the weights of ``path`` (a dense
    checkpoint, or an mpocompress output, loaded with its cores: :func:`mpocompress.nn.load_compressed_`)."""
    from mpocompress.format import read_meta
    from mpocompress.io import fill_tied, open_checkpoint
    from mpocompress.nn.surgery import load_compressed_
    from mpocompress.text.hf import build_model

    model = build_model(config_folder)
    with open_checkpoint(path) as ckpt:
        compressed = read_meta(ckpt) is not None
        if not compressed:
            own = model.state_dict()
            tensors = fill_tied(own, {k: ckpt.get(k) for k in ckpt.keys() if k in own})
            try:
                model.load_state_dict(tensors, strict=True)
            except RuntimeError as e:
                raise InputError(f"{path}: does not fit the model of {config_folder}/config.json ({str(e).splitlines()[0][:200]})") from e
    if compressed:
        load_compressed_(model, path)
    return model.eval()


def evaluate_lm(paths: list[Path], text_path: Path, seq_len: int, stride: int | None = None, max_tokens: int | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Perplexity of every checkpoint in ``paths`` (model folders, or files beside the first folder's
    config) on a text file; the first is the baseline every other is compared with."""
    from mpocompress.text.data import read_text, tokenize
    from mpocompress.text.hf import is_model_folder, load_tokenizer

    folders = [p for p in paths if is_model_folder(p)]
    if not folders:
        raise InputError("--task lm needs at least one model folder (config.json and tokenizer) among the checkpoints")
    tokenizer = load_tokenizer(folders[0])
    ids = tokenize(tokenizer, read_text(text_path))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < seq_len:
        raise InputError(f"{text_path}: {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    systems: dict[str, Any] = {}
    for path in paths:
        t0 = time.perf_counter()
        model = load_lm(path, path if is_model_folder(path) else folders[0])
        name = str(path) if str(path) not in systems else f"{path}#{len(systems)}"
        result = perplexity(model, ids, seq_len, stride, None if progress is None else lambda i, n, name=name: progress(name, i, n))
        result["seconds"] = round(time.perf_counter() - t0, 2)
        systems[name] = result
    base = systems[next(iter(systems))]["ppl"]
    for r in systems.values():
        r["ppl_ratio"] = r["ppl"] / base
    return {"task": "lm", "data": str(text_path), "baseline": next(iter(systems)), "systems": systems}
