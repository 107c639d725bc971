"""Calibration: record what every compressible layer of the user's model sees, as Gram matrices.

``convert --model --data`` runs the dense model over the calibration batches and accumulates, for
each weight, the Gram matrix ``X^T X`` of the inputs it multiplies (float64, batch by batch: memory is
one ``in x in`` matrix per weight, whatever the number of samples):

* ``nn.Linear`` (and subclasses): the last dimension of its input;
* Hugging Face's GPT-2 ``Conv1D`` (weight stored ``(in, out)``): the last dimension of its input --
  the Gram is of the stored weight's *rows* (:func:`transposed_weights` names these weights; the
  data-aware methods fit the transposed matrix and store cores of the weight as it is stored);
* ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``): the unfolded input patches, in the order of
  ``weight.reshape(out, -1)`` (channel, then kernel positions), padding included;
* ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (no projections): ``weight_ih_l{k}`` from layer ``k``'s input
  (the data, or the previous layer's outputs), ``weight_hh_l{k}`` from the hidden states the
  recurrence multiplies (``h_{t-1}``: the layer's outputs one step behind; the initial state counts
  when it is given); ``_reverse`` weights likewise for the backward direction;
* ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell``: the input and the hidden state passed in;
* ``nn.MultiheadAttention``: the input projections (the query, in self-attention).

Other modules (embeddings, attention internals) are not recorded: their weights keep the data-free
methods. Keys are state-dict names (``"fc.weight"``), the keys of ``convert --activations``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

log = logging.getLogger(__name__)

_RNNS = (nn.LSTM, nn.GRU, nn.RNN)
_CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)


class _Grams:
    """Gram matrices accumulated in float64 by weight name."""

    def __init__(self, collect: bool = False) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        #: with ``collect``, the input rows of the current batch by weight name, kept instead of summed
        self.collect = collect
        self.seen: dict[str, list[torch.Tensor]] = {}
        #: the last input and its float64 rows and Gram: layers fed the same tensor (q/k/v, gate/up
        #: projections) share one product
        self._last: tuple[Any, torch.Tensor | None, torch.Tensor | None] = (None, None, None)

    def add(self, key: str, x: torch.Tensor) -> None:
        src, rows, g = self._last
        if src is None or src[0] is not x or src[1] != x._version:  # (not the same tensor, or changed in place)
            src, rows, g = (x, x._version), x.detach().reshape(-1, x.shape[-1]).double(), None
        if self.collect:
            self._last = (src, rows, None)
            self.seen.setdefault(key, []).append(rows)
            return
        x = rows
        if g is None:
            g = x.T @ x
        self._last = (src, rows, g)
        self.grams[key] = self.grams[key] + g if key in self.grams else g.clone()
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


def _attention_hook(module: nn.MultiheadAttention, acc: _Grams, names: dict[int, str]):
    """``nn.MultiheadAttention``'s input projections: the packed ``in_proj_weight`` sees the query in
    self-attention (query, key and value one tensor); otherwise its three row blocks see query, key
    and value, recorded here as one Gram of all three (an approximation); separate ``q/k/v_proj_weight``
    each see their own input. ``out_proj`` is not called as a module: its inputs are not recorded."""
    packed = names.get(id(module.in_proj_weight)) if module.in_proj_weight is not None else None
    parts = [names.get(id(getattr(module, f"{c}_proj_weight"))) if getattr(module, f"{c}_proj_weight", None) is not None else None
             for c in "qkv"]  # fmt: skip

    def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key", q)
        v = args[2] if len(args) > 2 else kwargs.get("value", k)
        if packed:
            for x in (q,) if (k is q and v is q) else (q, k, v):
                acc.add(packed, x)
        for key, x in zip(parts, (q, k, v)):
            if key:
                acc.add(key, x)

    return hook


def transposed_weights(model: nn.Module) -> set[str]:
    """State-dict names of the weights stored ``(in, out)`` (Hugging Face ``Conv1D``): their Gram
    matrices weigh the stored matrix's rows, not its columns."""
    from mpocompress.nn.surgery import is_hf_conv1d

    return {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if is_hf_conv1d(m)}


def _hook(module: nn.Module, acc: _Grams, names: dict[int, str]):
    """A forward hook recording ``module``'s inputs into ``acc`` (None: nothing to record)."""
    from mpocompress.nn.surgery import is_hf_conv1d

    weight = getattr(module, "weight", None)
    if (isinstance(module, nn.Linear) or is_hf_conv1d(module)) and names.get(id(weight)):
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
    if type(module) is nn.MultiheadAttention:
        return _attention_hook(module, acc, names)
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


def _register(model: nn.Module, acc: _Grams, weights: set[str] | None) -> list[Any]:
    """Forward hooks recording the inputs of ``weights`` (state-dict names; None: all) into ``acc``."""
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items() if weights is None or k in weights}
    hooks = []
    for module in model.modules():
        fn = _hook(module, acc, names)
        if fn is not None:
            with_kwargs = type(module) is nn.MultiheadAttention
            hooks.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
    return hooks


def _capped(batches: Sequence[Any], max_samples: int | None):
    """``(inputs, samples)`` of each batch, the last one cut so that at most ``max_samples`` are used."""
    from mpocompress.jobs.finetune import split_batch

    used = 0
    for b in batches:
        xs, _ = split_batch(b)
        n = xs[0].shape[0] if xs and isinstance(xs[0], torch.Tensor) and xs[0].dim() else 1
        if max_samples is not None:
            room = max_samples - used
            if room <= 0:
                return
            if n > room:
                xs = tuple(x[:room] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n else x for x in xs)
                n = room
        used += n
        yield xs, n


class _Stop(Exception):
    """Raised by :class:`_StopAfter` to end a forward pass early."""


class _StopAfter:
    """Forward hooks that end a forward pass once every module holding one of ``weights`` has run as
    many times as it did in the first full pass (the layers after them are not needed)."""

    def __init__(self, model: nn.Module, weights: set[str]) -> None:
        ids = {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in weights}
        mods = [m for m in model.modules() if any(id(t) in ids for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))]
        self.counts = {id(m): 0 for m in mods}
        self.expected: dict[int, int] | None = None
        self.hooks = [m.register_forward_hook(self._ran) for m in mods]

    def _ran(self, module: nn.Module, *_: Any) -> None:
        self.counts[id(module)] += 1
        if self.expected is not None and all(self.counts[k] >= n for k, n in self.expected.items()):
            raise _Stop

    def run(self, model: nn.Module, xs: tuple[Any, ...]) -> None:
        """One forward pass, ended early after the first."""
        self.counts = dict.fromkeys(self.counts, 0)
        try:
            model(*xs)
        except _Stop:
            return
        if self.expected is None:
            self.expected = dict(self.counts)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def record_pairs(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    *,
    weights: set[str],
    max_samples: int | None = None,
    row_counts: dict[str, int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For each of ``weights`` (present, uncompressed, in both models), the Gram matrix ``X_s^T X_s``
    of its inputs in ``student`` and the cross matrix ``X_s^T X_t`` with its inputs in ``teacher`` on
    the same batches: what sequential calibration needs to make the student's layer reproduce the
    teacher's outputs from the student's inputs. ``row_counts``, when given, is filled with the number of
    input rows recorded for each weight."""
    s_acc, t_acc = _Grams(collect=True), _Grams(collect=True)
    hooks = _register(student, s_acc, weights) + _register(teacher, t_acc, weights)
    stops = _StopAfter(student, weights), _StopAfter(teacher, weights)  # registered after the recorders: they run first
    grams: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    was = student.training, teacher.training
    try:
        student.eval()
        teacher.eval()
        with torch.no_grad():
            for xs, _ in _capped(batches, max_samples):
                s_acc.seen.clear()
                t_acc.seen.clear()
                stops[0].run(student, xs)
                stops[1].run(teacher, xs)
                done: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # weights fed the same inputs
                for key, rows in s_acc.seen.items():
                    if key not in t_acc.seen:
                        continue
                    same = tuple(id(r) for r in rows) + (-1,) + tuple(id(r) for r in t_acc.seen[key])
                    if same not in done:
                        xs_, xt = torch.cat(rows), torch.cat(t_acc.seen[key])
                        if xs_.shape != xt.shape:
                            continue
                        done[same] = (xs_.T @ xs_, xs_.T @ xt)
                    g, c = done[same]
                    grams[key] = grams[key] + g if key in grams else g.clone()
                    cross[key] = cross[key] + c if key in cross else c.clone()
                    if row_counts is not None:
                        row_counts[key] = row_counts.get(key, 0) + sum(r.shape[0] for r in s_acc.seen[key])
    finally:
        student.train(was[0])
        teacher.train(was[1])
        for h in hooks:
            h.remove()
        for s in stops:
            s.remove()
    return grams, cross


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
    acc = _Grams()
    hooks = _register(model, acc, weights)
    samples = 0
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for xs, n in _capped(batches, max_samples):
                samples += n
                model(*xs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    info = {"samples": samples, "weights": len(acc.grams), "rows": dict(acc.rows)}
    return acc.grams, info


#: ``record_output_curvature`` keeps a diagonal instead of the full ``(out, out)`` matrix beyond this
#: many outputs (our choice: 4096^2 float64 is 128 MiB per layer)
FULL_CURVATURE_MAX = 4096


def _output_hook(module: nn.Module, key: str, seen: dict[str, list[torch.Tensor]]):
    """A forward hook keeping ``module``'s output (``(rows, out)`` view) for its gradient, or None."""
    from mpocompress.nn.surgery import is_hf_conv1d

    if isinstance(module, nn.Linear) or is_hf_conv1d(module) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1):
        return lambda m, args, out: seen[key].append(out) if isinstance(out, torch.Tensor) and out.requires_grad else None
    return None


def record_output_curvature(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    weights: set[str],
    kd_loss: str = "mse",
    max_samples: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """For each of ``weights`` held by an ``nn.Linear`` (or subclass), Hugging Face ``Conv1D`` or
    ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``), the curvature of the model's loss at that layer's
    outputs: ``G = sum g g^T`` over every output row (token, time step, pixel) of the gradients ``g``
    of a loss *sampled from the model's own output distribution* -- labels drawn from the softmax for
    ``kd_loss="kl"`` (logits), ``<y, z>`` with ``z ~ N(0, I)`` otherwise (MSE) -- so ``E[G]`` is the
    Fisher / Gauss-Newton matrix of the outputs, and ``tr(G dW C dW^T)`` (``C`` the input Gram) the
    K-FAC estimate of the loss increase of a weight change ``dW``. One forward and backward pass per
    batch (``model``'s weights are not changed, its gradients not touched); float64; a vector (the
    diagonal) for layers with over :data:`FULL_CURVATURE_MAX` outputs. Weights of other modules
    (RNNs, attention internals) get none."""
    from mpocompress.jobs.finetune import first_tensor, sampled_output_loss

    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items() if k in weights}
    seen: dict[str, list[torch.Tensor]] = {}
    convs: set[str] = set()  # outputs (batch, channels, ...): channels moved last
    hooks = []
    for module in model.modules():
        key = names.get(id(getattr(module, "weight", None)))
        fn = _output_hook(module, key, seen) if key else None
        if fn is not None:
            seen[key] = []
            hooks.append(module.register_forward_hook(fn))
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                convs.add(key)
    acc: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    was = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]  # (a teacher's are): outputs need a graph
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        for xs, _ in _capped(batches, max_samples):
            for ys in seen.values():
                ys.clear()
            with torch.enable_grad():
                out = first_tensor(model(*xs)).float()
                taken = [(k, y) for k, ys in seen.items() for y in ys]
                if not out.requires_grad or not taken:
                    continue
                grads = torch.autograd.grad(sampled_output_loss(out, kd_loss, gen), [y for _, y in taken], allow_unused=True)
            for (k, _), g in zip(taken, grads):
                if g is None:
                    continue
                g = (g.movedim(1, -1) if k in convs else g).reshape(-1, g.shape[1] if k in convs else g.shape[-1]).double()
                part = g.pow(2).sum(0) if g.shape[-1] > FULL_CURVATURE_MAX else g.T @ g
                acc[k] = acc[k] + part if k in acc else part
    finally:
        model.train(was)
        for p in frozen:
            p.requires_grad_(False)
        for h in hooks:
            h.remove()
        for ys in seen.values():
            ys.clear()
    return acc


def thin_inputs(rows: dict[str, int], grams: dict[str, torch.Tensor]) -> list[str]:
    """The weights of ``grams`` whose recorded inputs had fewer rows (samples x positions) than the
    weight has inputs, with one warning naming the worst: their Gram matrices are singular, so a
    data-aware fit (and its measured error) follows the span of the calibration samples rather than
    the inputs the model will see (PTQ tools calibrate on far more rows than inputs: GPTQ and
    SVD-LLM on 128-256 sequences of 2048 tokens)."""
    thin = sorted(k for k, g in grams.items() if rows.get(k, 0) < g.shape[0])
    if thin:
        k = min(thin, key=lambda n: rows.get(n, 0) / grams[n].shape[0])
        log.warning("calibration: %d of %d weight(s) saw fewer input rows than they have inputs (fewest: %s, %d rows for %d "
                    "inputs); data-aware fits follow the calibration samples there: give more --data", len(thin), len(grams), k,
                    rows.get(k, 0), grams[k].shape[0])  # fmt: skip
    return thin


def gram_ok(gram: torch.Tensor) -> bool:
    """Whether a Gram matrix is usable: finite, with some energy."""
    return bool(torch.isfinite(gram).all()) and float(torch.diagonal(gram).sum()) > 0


#: sequential calibration records the inputs again after compressing each of at most this many groups
#: of layers (in the order the model runs them): more groups follow the compressed model more closely
#: and cost one pass over the calibration batches each
SEQUENTIAL_GROUPS = 8


def forward_order(model: nn.Module, batch: Any, weights: set[str]) -> list[list[str]]:
    """The selected weights grouped by module, modules in the order ``model`` first runs them on
    ``batch`` (modules that do not run, last)."""
    from mpocompress.jobs.finetune import split_batch

    by_module: dict[str, list[str]] = {}
    owners = {id(t): k for k, t in model.state_dict(keep_vars=True).items() if k in weights}
    for mod_name, module in model.named_modules():
        own = [owners[id(p)] for p in module.parameters(recurse=False) if id(p) in owners]
        if own:
            by_module[mod_name] = own
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.append(n) if n not in seen else None)
             for n, m in model.named_modules() if n in by_module]  # fmt: skip
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(*split_batch(batch)[0])
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    order = seen + [n for n in by_module if n not in seen]
    return [by_module[n] for n in order]


def compress_sequentially_(
    model: nn.Module,
    teacher: nn.Module,
    config: Any,
    recipe: Any,
    layers: list[str],
    batches: list[Any],
    max_samples: int | None = None,
    correct: bool = True,
    out_grams: dict[str, torch.Tensor] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """``compress_`` (MPO only) in the order the model runs its layers, each group of layers fitted
    so that, fed the inputs ``X_s`` it gets in the model *as compressed so far*, it reproduces the
    dense layer's outputs on the dense model's inputs ``X_t`` (sequential calibration, as GPTQ
    quantizes layer after layer, but with the target corrected): each weight is first replaced by
    ``W_t = (W X_t^T X_s + lam W)(X_s^T X_s + lam I)^{-1}``, the least-squares weight for that
    (``lam``: the ridge of :mod:`mpocompress.core.whiten`, so ``W_t = W`` when nothing upstream
    changed), then compressed under ``X_s^T X_s`` -- later layers undo part of what earlier ones lost.
    A plain weight stored by a grid codec (int8, k-means) is quantized by GPTQ in its turn, so the
    layers after it see it quantized; a layer kept dense keeps its own weight. ``correct=False``:
    each layer is fitted to its *own* outputs on ``X_s`` (target ``W``; GPTQ's and SVD-LLM's
    convention) -- on a small language model the corrected targets overfit the calibration windows
    and lose badly (docs/methods.md). ``out_grams``: the loss's curvature at each layer's outputs in
    the dense model (:func:`record_output_curvature`), passed on to ``compress_``. Returns ``(compress_'s rows, the Gram matrices used, by weight name)``."""
    from mpocompress.core.whiten import DEFAULT_RIDGE
    from mpocompress.nn.surgery import compress_

    order = forward_order(model, batches[0], set(layers))
    in_order = {w for group in order for w in group}
    chunks = max(1, min(SEQUENTIAL_GROUPS, len(order)))
    size = math.ceil(len(order) / chunks)
    groups = [[w for g in order[i : i + size] for w in g] for i in range(0, len(order), size)]
    rest = [w for w in layers if w not in in_order]
    if rest:
        groups.append(rest)
    params = dict(model.named_parameters())
    transposed = transposed_weights(model)
    rows: list[dict[str, Any]] = []
    used: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for i, group in enumerate(groups):
        start = time.perf_counter()
        grams, cross = record_pairs(model, teacher, batches, weights=set(group), max_samples=max_samples, row_counts=counts)
        grams = {k: g for k, g in grams.items() if gram_ok(g)}
        originals = {}
        for k, c in grams.items():
            if k in params:
                p = params[k]
                originals[k] = p.detach().clone()
                w = p.detach().reshape(p.shape[0], -1).double()
                if not correct or k in transposed:  # (a Conv1D keeps its own target)
                    continue
                lam = DEFAULT_RIDGE * float(torch.diagonal(c).mean())
                eye = torch.eye(c.shape[0], dtype=torch.float64)
                target = torch.linalg.solve(c + lam * eye, (w @ cross[k].T + lam * w).T).T
                with torch.no_grad():
                    p.copy_(target.reshape(p.shape).to(p.dtype))
        used.update(grams)
        new_rows = compress_(model, config, recipe=recipe, names=set(group), include=(), exclude=(), codecs=False, grams=grams,
                             out_grams=out_grams)  # fmt: skip
        rows += new_rows
        params = dict(model.named_parameters())
        for r in new_rows:  # a layer kept dense keeps its own weight (unless a codec stores it: GPTQ below)
            if r["status"] == "dense" and r["name"] in originals and not _gptq_applies(r["name"], config, recipe):
                with torch.no_grad():
                    params[r["name"]].copy_(originals[r["name"]])
        _gptq_in_place(model, group, config, recipe, rows, grams)
        log.info("sequential calibration: group %d/%d (%d weights) in %.1fs", i + 1, len(groups), len(group), time.perf_counter() - start)
    thin_inputs(counts, used)
    return rows, used


def _gptq_applies(name: str, config: Any, recipe: Any) -> bool:
    from mpocompress.codecs import split_chain

    cfg = config if recipe is None else recipe.config_for(name, config)
    if cfg is None:
        return False
    pruner, quant = split_chain(cfg.chain)
    return pruner is None and quant is not None and quant.has_grid


def _gptq_in_place(model: nn.Module, group: list[str], config: Any, recipe: Any, rows: list[dict[str, Any]],
                   grams: dict[str, torch.Tensor]) -> None:  # fmt: skip
    """Plain weights of ``group`` whose chain is one grid quantizer: replaced by their GPTQ quantization."""
    from mpocompress.codecs import split_chain
    from mpocompress.jobs.plan import gptq_codec

    params = dict(model.named_parameters())
    mpo = {r["name"] for r in rows if r["status"] == "mpo"} | transposed_weights(model)  # (GPTQ assumes (out, in))
    for name in group:
        if name in mpo or name not in params or name not in grams or not _gptq_applies(name, config, recipe):
            continue
        cfg = config if recipe is None else recipe.config_for(name, config)
        quant = split_chain(cfg.chain)[1]
        p = params[name]
        m = p.detach().reshape(p.shape[0], -1)
        if tuple(grams[name].shape) != (m.shape[1], m.shape[1]):
            continue
        with torch.no_grad():
            p.copy_(gptq_codec(m, grams[name], quant)[0].reshape(p.shape))
