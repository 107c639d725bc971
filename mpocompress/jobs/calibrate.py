"""Calibration: record what every compressible layer of the user's model sees, as Gram matrices.

``convert --model --data`` runs the dense model over the calibration batches and accumulates, for
each weight, the Gram matrix ``X^T X`` of the inputs it multiplies (float64, batch by batch: memory is
one ``in x in`` matrix per weight, whatever the number of samples):

* ``nn.Linear`` (and subclasses): the last dimension of its input;
* ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``): the unfolded input patches, in the order of
  ``weight.reshape(out, -1)`` (channel, then kernel positions), padding included;
* ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (no projections): ``weight_ih_l{k}`` from layer ``k``'s input
  (the data, or the previous layer's outputs), ``weight_hh_l{k}`` from the hidden states the
  recurrence multiplies (``h_{t-1}``: the layer's outputs one step behind; the initial state counts
  when it is given); ``_reverse`` weights likewise for the backward direction;
* ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell``: the input and the hidden state passed in.

Other modules (embeddings, attention internals) are not recorded: their weights keep the data-free
methods. Keys are state-dict names (``"fc.weight"``), the keys of ``convert --activations``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

_RNNS = (nn.LSTM, nn.GRU, nn.RNN)
_CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)


class _Grams:
    """Gram matrices accumulated in float64 by weight name."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        g = x.T @ x
        self.grams[key] = self.grams[key] + g if key in self.grams else g
        self.rows[key] = self.rows.get(key, 0) + x.shape[0]


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """The input patches ``(rows, in * kernel)`` a conv's weight multiplies (None: not supported)."""
    if module.groups != 1:
        return None
    two_d = isinstance(module, nn.Conv2d)
    if x.dim() == (3 if two_d else 2):  # unbatched
        x = x[None]
    if not two_d:
        x = x[:, :, None, :]
    k = tuple(module.kernel_size) if two_d else (1, module.kernel_size[0])
    dil = tuple(module.dilation) if two_d else (1, module.dilation[0])
    stride = tuple(module.stride) if two_d else (1, module.stride[0])
    pad = module.padding
    if isinstance(pad, str):  # "valid" / "same" (stride 1)
        pad = (0,) * len(k) if pad == "valid" else None
    if pad is None:
        total = [d * (kk - 1) for d, kk in zip(dil, k)]
        amounts = [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
    else:
        p = tuple(pad) if two_d else (0, pad[0])
        amounts = [p[1], p[1], p[0], p[0]]
    mode = module.padding_mode if module.padding_mode != "zeros" else "constant"
    if any(amounts):
        x = F.pad(x, amounts, mode=mode)
    cols = F.unfold(x, k, dilation=dil, stride=stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2)


def _rnn_layers(module: nn.RNNBase, x: torch.Tensor, hx: Any, acc: _Grams, names: dict[int, str]) -> None:
    """Run ``module`` layer by layer, recording each layer's input and recurrent hidden states."""
    if getattr(module, "proj_size", 0):
        return
    if x.dim() == 2:
        x = x[:, None] if not module.batch_first else x[None]
    if module.batch_first:
        x = x.transpose(0, 1)  # (T, B, F)
    dirs = 2 if module.bidirectional else 1
    h0 = hx[0] if isinstance(hx, tuple) else hx
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            single = type(module)(module.input_size if layer == 0 else module.hidden_size * dirs, module.hidden_size,
                                  **({"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNN) else {}),
                                  bias=module.bias)  # fmt: skip
            with torch.no_grad():
                for p in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if module.bias else ()):
                    getattr(single, f"{p}_l0").copy_(getattr(module, f"{p}{sfx}"))
            seq = x.flip(0) if d else x
            init = None
            if h0 is not None:
                i = layer * dirs + d
                init = (hx[0][i : i + 1], hx[1][i : i + 1]) if isinstance(hx, tuple) else h0[i : i + 1]
            out, _ = single(seq, init)
            prev = out[:-1]
            if init is not None:
                first = init[0] if isinstance(init, tuple) else init
                prev = torch.cat([first, prev], 0)
            ih, hh = names.get(id(getattr(module, f"weight_ih{sfx}"))), names.get(id(getattr(module, f"weight_hh{sfx}")))
            if ih:
                acc.add(ih, x)
            if hh and prev.numel():
                acc.add(hh, prev)
            outs.append(out.flip(0) if d else out)
        x = torch.cat(outs, -1)


def _hook(module: nn.Module, acc: _Grams, names: dict[int, str]):
    """A forward hook recording ``module``'s inputs into ``acc`` (None: nothing to record)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and names.get(id(weight)):
        key = names[id(weight)]
        return lambda m, args, out: acc.add(key, args[0])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and names.get(id(weight)) and module.groups == 1:
        key = names[id(weight)]

        def conv(m: nn.Module, args: tuple, out: Any) -> None:
            patches = _conv_patches(m, args[0])
            if patches is not None:
                acc.add(key, patches)

        return conv
    if isinstance(module, _RNNS):
        return lambda m, args, out: (
            _rnn_layers(m, args[0], args[1] if len(args) > 1 else None, acc, names)
            if isinstance(args[0], torch.Tensor) else None
        )  # fmt: skip
    if isinstance(module, _CELLS):

        def cell(m: nn.Module, args: tuple, out: Any) -> None:
            x = args[0]
            ih, hh = names.get(id(m.weight_ih)), names.get(id(m.weight_hh))
            if ih:
                acc.add(ih, x)
            hx = args[1] if len(args) > 1 else None
            h = hx[0] if isinstance(hx, tuple) else hx
            if hh and h is not None:
                acc.add(hh, h)

        return cell
    return None


def record_grams(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    weights: set[str] | None = None,
    max_samples: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run ``model`` (eval, no grad) over ``batches`` and return ``(grams, info)``: the Gram matrix of
    every recordable weight's inputs by state-dict name (float64), and a summary (``samples`` used,
    input ``rows`` per weight, ``weights`` recorded).

    Args:
        weights: record only these state-dict names (default: every recordable weight).
        max_samples: use at most this many samples (entries along the first dimension of a batch's
            inputs; the last batch used is cut), like the calibration-set size of PTQ tools.
    """
    from mpocompress.jobs.finetune import split_batch

    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items() if weights is None or k in weights}
    acc = _Grams()
    hooks = []
    for module in model.modules():
        fn = _hook(module, acc, names)
        if fn is not None:
            hooks.append(module.register_forward_hook(fn))
    samples = 0
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for b in batches:
                xs, _ = split_batch(b)
                if max_samples is not None:
                    room = max_samples - samples
                    if room <= 0:
                        break
                    n = xs[0].shape[0] if xs and isinstance(xs[0], torch.Tensor) and xs[0].dim() else 1
                    if n > room:
                        xs = tuple(x[:room] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n else x for x in xs)
                        n = room
                    samples += n
                else:
                    samples += xs[0].shape[0] if xs and isinstance(xs[0], torch.Tensor) and xs[0].dim() else 1
                model(*xs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    info = {"samples": samples, "weights": len(acc.grams), "rows": dict(acc.rows)}
    return acc.grams, info


def gram_ok(gram: torch.Tensor) -> bool:
    """Whether a Gram matrix is usable: finite, with some energy."""
    return bool(torch.isfinite(gram).all()) and float(torch.diagonal(gram).sum()) > 0 and not math.isnan(float(gram.sum()))


def calibrate_checkpoint(
    ckpt: Any,
    model: nn.Module,
    train: list[Any],
    val: list[Any] | None,
    layers: list[str],
    tune: Any,
    max_samples: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The Gram matrices of the selected ``layers``' inputs in the dense model: ``model`` loaded with
    the checkpoint (checked as for fine-tuning), run over the calibration batches (``train``, less
    the held-out share when ``val`` is None: calibration never sees the held-out data).
    Returns ``(grams by weight name, summary)``; weights whose inputs were all zero are left out."""
    import time

    from mpocompress.jobs.tune import _load_models

    start = time.perf_counter()
    _, teacher, _, train, _ = _load_models(ckpt, model, train, val, tune)
    grams, info = record_grams(teacher, train, weights=set(layers), max_samples=max_samples)
    empty = sorted(k for k, g in grams.items() if not gram_ok(g))
    for k in empty:
        del grams[k]
    return grams, {
        "samples": info["samples"],
        "weights": len(grams),
        "weights_without_inputs": empty,
        "seconds": round(time.perf_counter() - start, 3),
    }
