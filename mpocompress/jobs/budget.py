"""``convert --target-size``: measure every layer's rate-distortion curve, allocate the budget, convert.

Each selected weight is read once and stored every way we know (keep dense; fp16/bf16; int8; k-means
at 2-8 bits; MPO with 2 (SVD) or 3 cores at a grid of bonds, alone or with int8/k-means cores;
magnitude pruning with k-means), each option's bytes and relative squared error measured exactly
(:func:`measure_options`). Damage is that error times a per-layer weight: 1 without data (every
layer's relative error counts alike), or with ``--model`` and ``--data`` the layer's measured effect
on the model's output (:func:`sensitivities`). :func:`mpocompress.core.allocate.allocate` picks one
option per layer; the picks become per-layer recipe rules for :func:`mpocompress.jobs.convert.convert`;
the written file is checked against the budget: the first pass uses a generous estimate of the
header (the metadata grows with every layer), and a second pass allocates again with the header as
measured, so the file ends as close under the target as the options allow.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpocompress.codecs import decode, encode, parse_codec
from mpocompress.config import MPOConfig, Recipe, apply_overrides
from mpocompress.core.allocate import Allocation, Option, allocate
from mpocompress.core.modes import choose_modes
from mpocompress.core.tt import cores_to_matrix, tt_svd
from mpocompress.errors import ConfigError, GateError
from mpocompress.format import decode_entry, rebuild
from mpocompress.io import Checkpoint, open_checkpoint, path_size
from mpocompress.jobs.plan import (
    Progress,
    compress_tensor,
    gptq_factor_codes,
    nbytes_of,
    select_layers,
)
from mpocompress.select import matrix_shape

log = logging.getLogger(__name__)

KMEANS_BITS = (2, 3, 4, 5, 6, 8)
#: MPO structures tried: 2 cores (a truncated SVD, ranks spaced by BOND_STEP) and 3 cores (bonds
#: spaced by MPO_BOND_STEP)
MPO_CORES = (2, 3)
BOND_STEP = 1.5
MPO_BOND_STEP = 2.0
#: MPO options stored at most this share of the dense bytes (above it a codec is smaller and better)
MPO_MAX_SHARE = 0.5
CORE_CODECS = (None, "int8", "kmeans:16")
PRUNE_LEVELS = (0.5, 0.75, 0.9)
#: header bytes a conversion adds, per compressed layer and per stored tensor (a first estimate; a
#: pass that overshoots is redone with the overshoot taken off)
HEADER_BASE, HEADER_PER_LAYER, HEADER_PER_TENSOR = 2048, 1600, 120
#: bytes kept free for a header that grows a little when the choices change between passes
HEADER_MARGIN = 512
#: a pass that leaves less than this share of the target unused is final
CLOSE_ENOUGH = 0.01
MAX_PASSES = 4
#: how data weighs the layers (:func:`plan_budget`)
SENSITIVITIES = ("auto", "fisher", "probe")
#: ``sensitivity="auto"`` probes each layer up to this many layers, and uses the Fisher estimate
#: beyond (our choice, from ``benchmarks/budget_ranking.py``: probing ranks layers by their true
#: effect better on every model measured, Spearman 0.88 / 0.89 / 0.59 against the Fisher estimate's
#: -0.31 / 0.79 / 0.41 on silero-vad / Resemblyzer / SmolLM2, but it costs a forward pass per batch
#: and layer: 211 layers on SmolLM2, against one backward pass per batch for Fisher)
AUTO_PROBE_LAYERS = 64


def parse_target(text: str, input_bytes: int) -> int:
    """``"12.5%"`` (of ``input_bytes``) or ``"900KB"``/``"2.1GB"`` (powers of 1024) -> bytes.

    Raises:
        ConfigError: not a share in (0, 100) % nor a positive size.
    """
    s = text.strip()
    if s.endswith("%"):
        try:
            share = float(s[:-1])
        except ValueError:
            raise ConfigError(f"--target-size {text!r}: expected a share like 12.5% or a size like 900KB") from None
        if not (math.isfinite(share) and 0 < share < 100):
            raise ConfigError(f"--target-size {text!r}: a share must be between 0 and 100 %")
        return int(input_bytes * share / 100)
    from mpocompress.jobs.plan import parse_size

    try:
        return parse_size(s)
    except ConfigError:
        raise ConfigError(f"--target-size {text!r}: expected a share like 12.5% or a size like 900KB") from None


def _rel2(reference: torch.Tensor, approx: torch.Tensor, norm2: float) -> float:
    d = (reference.double() - approx.double()).reshape(-1)
    return float(d @ d) / norm2 if norm2 > 0 else 0.0


def _rel2_low_rank(reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor, norm2: float) -> float:
    """:func:`_rel2` of ``a @ b`` without forming it: ``||W||^2 - 2 <A^T W, B> + <A^T A, B B^T>``."""
    a, b = a.double(), b.double()
    w = reference.double()
    cross = float(((a.T @ w) * b).sum())
    square = float(((a.T @ a) * (b @ b.T)).sum())
    return max(norm2 - 2 * cross + square, 0.0) / norm2 if norm2 > 0 else 0.0


_CLEAR = {"bond_dim": None, "ratio": None, "tol": None, "prune": "none", "quantize": "none"}


def _coded_cores(cores: list[torch.Tensor], codec: str) -> tuple[list[torch.Tensor], int]:
    """Cores through a codec as ``convert`` stores them (each core its own tensor): decoded, and bytes."""
    coded = [encode(c, [parse_codec(codec)]) for c in cores]
    return [decode(p, m) for p, m in coded], sum(nbytes_of(v) for p, _ in coded for v in p.values())


def _codec_options(t: torch.Tensor, v: torch.Tensor, norm2: float, itemsize: int) -> list[Option]:
    """Casts, int8, k-means at every bit width (one dynamic program) and magnitude pruning + k-means,
    with the bytes ``convert`` would store, computed without packing."""
    from mpocompress.codecs import Int8, kmeans_1d_many

    n, options = v.numel(), []
    dense = n * itemsize

    def add(label: str, overrides: dict[str, Any], nbytes: int, error: float) -> None:
        if nbytes < dense:  # convert keeps a tensor no codec makes smaller as it is
            options.append(Option(label, {**_CLEAR, **overrides}, nbytes, error))

    if itemsize >= 4:
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            add(name, {"quantize": name}, n * 2, _rel2(v, v.to(dt), norm2))
    parts, meta = Int8().encode(v, t.shape[0] if t.dim() >= 1 else None)
    add("int8", {"quantize": "int8"}, sum(nbytes_of(x) for x in parts.values()), _rel2(v, Int8().decode(parts, meta, torch.float64), norm2))
    ks = [2**b for b in KMEANS_BITS]
    for k, sse in kmeans_1d_many(v, ks, errors_only=True).items():
        bits = max(1, math.ceil(math.log2(k)))
        add(f"kmeans:{k}", {"quantize": f"kmeans:{k}"}, math.ceil(n * bits / 8) + 4 * k, max(sse, 0.0) / norm2 if norm2 else 0.0)
    # the kept values of magnitude pruning are the two tails of the sorted values: no sort per level
    s = np.sort(v.cpu().numpy())
    squares = np.concatenate([[0.0], np.cumsum(s * s)])
    mags = np.sort(np.abs(s))
    for level in PRUNE_LEVELS:
        n_prune = int(round(level * n))
        thr = mags[n_prune - 1] if n_prune > 0 else -1.0
        lo, hi = np.searchsorted(s, -thr, side="left"), np.searchsorted(s, thr, side="right")  # s[lo:hi] is pruned
        excess = (hi - lo) - n_prune  # values tied at the threshold: prune exactly n_prune, as the codec does
        if excess > 0:
            low_ties = min(excess, int(np.searchsorted(s, -thr, side="right") - lo))
            lo, hi = lo + low_ties, hi - (excess - low_ties)
        kept_sorted = np.concatenate([s[:lo], s[hi:]])
        (sse,) = kmeans_1d_many(kept_sorted, [16], errors_only=True, presorted=True).values()
        nnz = kept_sorted.size
        positions = min(math.ceil(n / 8), 4 * nnz)
        error = (float(squares[hi] - squares[lo]) + max(sse, 0.0)) / norm2 if norm2 else 0.0
        add(f"magnitude:{level} + kmeans:16", {"prune": f"magnitude:{level}", "quantize": "kmeans:16"},
            positions + math.ceil(nnz * 4 / 8) + 64, error)  # fmt: skip
    return options


class _Floor:
    """The best error reachable at each size by options already measured (a layer's codecs): an option
    whose *lower bound* on error is no better than what a no larger option already reaches can never
    be chosen, so it is not measured (skipping it leaves every allocation unchanged)."""

    def __init__(self, options: list[Option]) -> None:
        ranked = sorted(options, key=lambda o: o.nbytes)
        self.sizes = [o.nbytes for o in ranked]
        self.best = list(itertools.accumulate((o.error for o in ranked), min))

    def beats(self, nbytes: float, error_bound: float) -> bool:
        """Whether an option of at most ``nbytes`` already has error ``<= error_bound``."""
        i = bisect.bisect_right(self.sizes, nbytes)
        return i > 0 and self.best[i - 1] <= error_bound


_CODEC_BITS = {"int8": 8, "kmeans:16": 4}


def _svd_options(matrix: torch.Tensor, itemsize: int, norm2: float, floor: _Floor | None = None) -> list[Option]:
    """2 cores (a truncated SVD) at a grid of ranks, alone (error from the spectrum) and with
    int8 / k-means cores (not measured where ``floor`` shows them dominated: no rank-r matrix has
    less error than the spectrum's tail, and the codes alone take ``bits / 8`` bytes a value)."""
    out_f, in_f = matrix.shape
    ref = matrix.double()  # once: every error below is measured against it
    u, s, vh = torch.linalg.svd(ref, full_matrices=False)
    tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])
    options, rank, step = [], 1, 0
    while rank < min(out_f, in_f) and rank * (out_f + in_f) * itemsize <= MPO_MAX_SHARE * out_f * in_f * itemsize:
        base = {**_CLEAR, "bond_dim": rank, "cores": 2, "svd": "full"}
        label = f"mpo2 bond {rank}"
        options.append(Option(label, base, rank * (out_f + in_f) * itemsize, float(tail[rank]) / norm2 if norm2 else 0.0))
        cores = [u[:, :rank].reshape(1, out_f, 1, rank).to(matrix.dtype),
                 (s[:rank, None] * vh[:rank]).reshape(rank, 1, in_f, 1).to(matrix.dtype)]  # fmt: skip
        for codec in CORE_CODECS[1:] if step % 2 == 0 else CORE_CODECS[1:2]:  # k-means factors at every other rank
            bound = float(tail[rank]) / norm2 if norm2 else 0.0
            if floor is not None and floor.beats(rank * (out_f + in_f) * _CODEC_BITS[codec] / 8, bound):
                continue
            dec, nbytes = _coded_cores(cores, codec)
            if nbytes < rank * (out_f + in_f) * itemsize:
                options.append(Option(f"{label} + {codec}", {**base, "quantize": codec}, nbytes,
                                      _rel2_low_rank(ref, dec[0].reshape(out_f, rank), dec[1].reshape(rank, in_f), norm2)))  # fmt: skip
        rank, step = max(rank + 1, int(rank * BOND_STEP)), step + 1
    return options


def _mpo_options(matrix: torch.Tensor, itemsize: int, norm2: float, cores: int, floor: _Floor | None = None) -> list[Option]:
    """MPO with ``cores`` cores at a grid of bonds (exact SVDs shared between bonds), alone and with
    quantized cores (not measured where ``floor`` shows them dominated: no MPO with first bond ``r``
    has less error than the tail of the first unfolding's spectrum beyond ``r``)."""
    out_f, in_f = matrix.shape
    ref = matrix.double()
    dense_bytes = out_f * in_f * itemsize
    modes = choose_modes(out_f, in_f, cores)
    cache: dict = {}
    options, bond, seen = [], 1, set()
    while True:
        tt = tt_svd(matrix, *modes, max_bond=bond, svd="full", svd_cache=cache)
        params = tt.num_params
        if params * itemsize > MPO_MAX_SHARE * dense_bytes or tuple(tt.bond_dims) in seen:
            return options
        seen.add(tuple(tt.bond_dims))
        base = {**_CLEAR, "bond_dim": bond, "cores": cores, "svd": "full"}
        label = f"mpo{cores} bond {bond}"
        s0 = tt.spectra[0].double() if tt.spectra else torch.zeros(0, dtype=torch.float64)
        bound = float((s0[tt.bond_dims[0]:] ** 2).sum()) / norm2 if norm2 else 0.0
        if floor is not None and floor.beats(params * itemsize, bound):
            bond = max(bond + 1, int(bond * MPO_BOND_STEP))
            continue
        options.append(Option(label, base, params * itemsize, _rel2(ref, tt.to_matrix(), norm2)))
        for codec in CORE_CODECS[1:]:
            if floor is not None and floor.beats(params * _CODEC_BITS[codec] / 8, bound):
                continue
            dec, nbytes = _coded_cores(tt.cores, codec)
            if nbytes < params * itemsize:
                options.append(Option(f"{label} + {codec}", {**base, "quantize": codec}, nbytes,
                                      _rel2(ref, cores_to_matrix(dec, (out_f, in_f)), norm2)))  # fmt: skip
        bond = max(bond + 1, int(bond * MPO_BOND_STEP))


def measure_options(name: str, t: torch.Tensor, shapes: dict[str, tuple[int, ...]], gram: torch.Tensor | None = None) -> list[Option]:
    """Every option for one weight, with the bytes ``convert`` stores and its relative squared error:
    of the weight, or with ``gram`` (recorded inputs) of the layer's output, each option made the
    data-aware way ``convert`` makes it with data (:func:`_data_options`)."""
    w = t if t.dtype in (torch.float32, torch.float64) else t.float()
    v = w.reshape(-1).double()
    norm2 = float(v @ v)
    itemsize = t.element_size()
    out_f, in_f = matrix_shape(list(t.shape))
    if gram is not None and min(out_f, in_f) > 1:
        return [Option("dense", {"skip": True}, nbytes_of(t), 0.0)] + _data_options(t, w.reshape(out_f, in_f), gram, itemsize)
    options = [Option("dense", {"skip": True}, nbytes_of(t), 0.0)] + _codec_options(t, v, norm2, itemsize)
    if min(out_f, in_f) > 1:
        matrix = w.reshape(out_f, in_f)
        floor = _Floor(options)
        options += _svd_options(matrix, itemsize, norm2, floor)
        for cores in MPO_CORES[1:]:
            options += _mpo_options(matrix, itemsize, norm2, cores, floor)
    return options


def _data_options(t: torch.Tensor, matrix: torch.Tensor, gram: torch.Tensor, itemsize: int) -> list[Option]:
    """The options of :func:`measure_options` made and measured with recorded inputs: GPTQ for int8
    and k-means, whitened SVD factors, activation-aware MPO cores (without the refit ``convert`` adds,
    so MPO errors are upper bounds); errors are relative squared output errors on the inputs."""
    from mpocompress.codecs import kmeans_1d_many
    from mpocompress.core.gptq import gptq
    from mpocompress.core.whiten import activation_aware_tt, whitened_factors, whitened_svd

    out_f, in_f = matrix.shape
    c = gram.double()
    w = matrix.double()
    norm2 = float(torch.einsum("oi,ij,oj->", w, c, w))

    def error(approx: torch.Tensor) -> float:
        e = w - approx.double().reshape(out_f, in_f)
        return float(torch.einsum("oi,ij,oj->", e, c, e)) / norm2 if norm2 > 0 else 0.0

    dense = out_f * in_f * itemsize
    options = [Option(o.label, o.overrides, o.nbytes, error(_decoded_option(t, o))) for o in _codec_options(t, matrix.reshape(-1).double(), 1.0, itemsize)
               if not o.overrides.get("quantize", "").startswith(("int8", "kmeans")) or o.overrides.get("prune") != "none"]  # fmt: skip
    from mpocompress.codecs import Int8, KMeans

    importance = torch.diagonal(c).to(matrix.dtype)[None, :].expand_as(matrix)
    grids = [("int8", Int8(), Int8().grid(matrix))]
    cents = kmeans_1d_many(matrix.reshape(-1), [2**b for b in KMEANS_BITS], sample_weight=importance)
    grids += [(f"kmeans:{k}", KMeans(k), cents[k][0]) for k in sorted(cents)]
    for label, codec, grid in grids:
        q = gptq(matrix, gram, lambda col, q=codec, g=grid: q.snap(g, col))
        nbytes = sum(nbytes_of(x) for x in encode(q.reshape(t.shape), [codec], grid=grid)[0].values())
        if nbytes < dense:
            options.append(Option(label, {**_CLEAR, "quantize": label}, nbytes, error(q)))
    rank, step = 1, 0
    factors = whitened_factors(matrix, gram)
    while rank < min(out_f, in_f) and rank * (out_f + in_f) * itemsize <= MPO_MAX_SHARE * dense:
        tt = whitened_svd(matrix, gram, rank, factors=factors)
        base = {**_CLEAR, "bond_dim": rank, "cores": 2, "svd": "full"}
        options += _with_core_codecs(f"mpo2 bond {rank}", base, tt, error, itemsize, CORE_CODECS if step % 2 == 0 else CORE_CODECS[:2],
                                     matrix, gram)  # fmt: skip
        rank, step = max(rank + 1, int(rank * BOND_STEP)), step + 1
    for cores in MPO_CORES[1:]:
        modes = choose_modes(out_f, in_f, cores)
        bond, seen, cache, plain_cache = 1, set(), {}, {}
        while True:
            plain = tt_svd(matrix, *modes, max_bond=bond, svd="full", svd_cache=plain_cache)
            if plain.num_params * itemsize > MPO_MAX_SHARE * dense or tuple(plain.bond_dims) in seen:
                break
            seen.add(tuple(plain.bond_dims))
            tt = activation_aware_tt(matrix, gram, *modes, plain.bond_dims, cache=cache)
            base = {**_CLEAR, "bond_dim": bond, "cores": cores, "svd": "full"}
            options += _with_core_codecs(f"mpo{cores} bond {bond}", base, tt, error, itemsize, CORE_CODECS)
            bond = max(bond + 1, int(bond * MPO_BOND_STEP))
    return options


def _with_core_codecs(label: str, base: dict[str, Any], tt: Any, error: Any, itemsize: int, codecs: tuple,
                      matrix: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> list[Option]:  # fmt: skip
    """An MPO option alone and with each codec on its cores (those that make it smaller); 2 cores with
    recorded inputs: quantized with error compensation, as ``convert`` does with data."""
    shape = tt.shape
    plain = tt.num_params * itemsize
    out = [Option(label, base, plain, error(tt.to_matrix()))]
    for codec in codecs[1:]:
        if gram is not None and len(tt.cores) == 2:
            coded = gptq_factor_codes(matrix, tt, parse_codec(codec), gram)
            dec, nbytes = [decode(p, m) for p, m in coded], sum(nbytes_of(v) for p, _ in coded for v in p.values())
        else:
            dec, nbytes = _coded_cores(tt.cores, codec)
        if nbytes < plain:
            out.append(Option(f"{label} + {codec}", {**base, "quantize": codec}, nbytes, error(cores_to_matrix(dec, shape))))
    return out


def _decoded_option(t: torch.Tensor, option: Option) -> torch.Tensor:
    """A codec option's stored values (casts, pruning + k-means) as ``convert`` stores them."""
    chain = [parse_codec(c) for c in (option.overrides.get("prune"), option.overrides.get("quantize")) if c and c != "none"]
    return decode(*encode(t, chain))


def sensitivities(
    model: torch.nn.Module,
    batches: list[Any],
    curves: dict[str, list[Option]],
    dense: Checkpoint,
    progress: Progress | None = None,
    grams: dict[str, torch.Tensor] | None = None,
    kd_loss: str = "mse",
) -> dict[str, float]:
    """Each layer's damage per unit of relative squared weight error, measured on the model's output.

    For each layer alone, its probe option (the option nearest to 1 % relative squared error, our
    choice) replaces the weight; the distillation loss (MSE between the model's outputs with and
    without it) over ``batches``, divided by the probe's error, is the layer's weight. With
    ``grams`` (the curves then hold output errors) the probe is made the data-aware way too.
    """
    from mpocompress.config import TuneConfig
    from mpocompress.io import fill_tied
    from mpocompress.jobs.finetune import evaluate

    own = model.state_dict()
    have = set(dense.keys())
    model.load_state_dict(fill_tied(own, {k: dense.get(k) for k in own if k in have}), strict=True)
    teacher = copy.deepcopy(model).eval()
    model.eval()
    kd = TuneConfig(kd_weight=1.0, kd_loss=kd_loss)
    weights: dict[str, float] = {}
    for i, (name, options) in enumerate(curves.items()):
        if progress is not None:
            progress(name, i, len(curves))
        lossy = [o for o in options if o.error > 0]
        if name not in own or not lossy:
            continue
        probe = min(lossy, key=lambda o: abs(math.log(o.error / 1e-2)))
        original = own[name].detach().clone()
        with torch.no_grad():
            own[name].copy_(_decoded(name, dense.get(name), probe, (grams or {}).get(name)).to(original.dtype))
            loss = evaluate(model, teacher, batches, kd)
            own[name].copy_(original)
        weights[name] = loss / probe.error
    if weights:  # layers the model lacks get the median weight
        median = sorted(weights.values())[len(weights) // 2]
        weights = {n: weights.get(n, median) for n in curves}
    return weights


#: samples of the output distribution per batch in :func:`fisher_weights`
FISHER_SAMPLES = 1


class NoGradient(RuntimeError):
    """The model's output does not depend differentiably on its weights (run outside autograd)."""


def _weight_tensors(model: torch.nn.Module, names: Any) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The model's floating tensors (parameters or buffers: some models run from buffers) among
    ``names``, by name, and each distinct one once (a tied weight is one tensor)."""
    tensors = model.state_dict(keep_vars=True)
    wanted = {n: tensors[n] for n in names if n in tensors and tensors[n].is_floating_point()}
    return wanted, list({id(p): p for p in wanted.values()}.values())


@contextlib.contextmanager
def _gradients_for(model: torch.nn.Module, tensors: list[torch.Tensor]):
    """Eval mode, gradients for ``tensors`` only; everything restored after."""
    flags = {id(p): p.requires_grad for p in (*model.parameters(), *model.buffers())}
    was = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in tensors:
            p.requires_grad_(True)
        yield
    finally:
        for p in (*model.parameters(), *model.buffers()):
            p.requires_grad_(flags.get(id(p), False))
        model.train(was)


def differentiable(model: torch.nn.Module, batch: Any, names: Any) -> bool:
    """Whether the model's output has a gradient with respect to the weights ``names`` (False for a
    model run outside autograd, e.g. by an exported runtime): :func:`fisher_weights` needs one."""
    from mpocompress.jobs.finetune import first_tensor, split_batch

    _, unique = _weight_tensors(model, names)
    if not unique:
        return False
    with _gradients_for(model, unique):
        xs, _ = split_batch(batch)
        return bool(first_tensor(model(*xs)).requires_grad)


def fisher_weights(
    model: torch.nn.Module,
    batches: list[Any],
    curves: dict[str, list[Option]],
    dense: Checkpoint,
    kd_loss: str = "mse",
    progress: Progress | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Each layer's damage per unit of relative squared weight error, predicted from one backward pass
    per batch: ``mean(diag H) * ||W||^2``, ``H`` the Gauss-Newton Hessian of the distillation loss at
    the dense model (the Fisher information of its outputs; an error ``E`` costs about
    ``E^T H E / 2``, and the errors our codecs make are spread about evenly over a weight's entries).

    ``diag H`` is estimated by sampling the output distribution: for ``kd_loss="mse"`` the gradient
    of ``<output, eps>`` with ``eps ~ N(0, 1)`` (``E[g^2] = diag J^T J``); for ``"kl"`` (logits) the
    gradient of the cross-entropy against labels drawn from the model's own softmax (the Fisher of
    the softmax, the Hessian of the KL at the teacher). A weight used twice (tied) gets both uses'
    gradient. Layers the model lacks get the median weight.
    """
    from torch.nn import functional as F  # noqa: N812

    from mpocompress.io import fill_tied
    from mpocompress.jobs.finetune import first_tensor, split_batch

    own = model.state_dict()
    have = set(dense.keys())
    model.load_state_dict(fill_tied(own, {k: dense.get(k) for k in own if k in have}), strict=True)
    wanted, unique = _weight_tensors(model, curves)
    acc = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in unique}
    gen = torch.Generator().manual_seed(seed)
    with _gradients_for(model, unique):
        for i, batch in enumerate(batches):
            if progress is not None:
                progress("fisher", i, len(batches))
            xs, _ = split_batch(batch)
            out = first_tensor(model(*xs)).float()
            if not out.requires_grad:
                raise NoGradient("the model's output has no gradient with respect to its weights")
            for k in range(FISHER_SAMPLES):
                if kd_loss == "kl":
                    logits = out.reshape(-1, out.shape[-1])
                    labels = torch.multinomial(F.softmax(logits.detach(), -1), 1, generator=gen).squeeze(-1)
                    loss = F.cross_entropy(logits, labels, reduction="sum")
                else:
                    loss = (out * torch.randn(out.shape, generator=gen)).sum()
                grads = torch.autograd.grad(loss, unique, retain_graph=k < FISHER_SAMPLES - 1, allow_unused=True)
                for p, g in zip(unique, grads):
                    if g is not None:
                        acc[id(p)] += g.double() ** 2
    weights = {}
    for n, p in wanted.items():
        h = acc[id(p)] / max(len(batches) * FISHER_SAMPLES, 1)
        weights[n] = float(h.mean()) * float(p.detach().double().pow(2).sum())
    if weights:
        median = sorted(weights.values())[len(weights) // 2]
        weights = {n: weights.get(n, median) for n in curves}
    return weights


def _decoded(name: str, t: torch.Tensor, option: Option, gram: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as ``option`` would store it (through the same code as ``convert``; with ``gram``,
    fitted to those recorded inputs as ``convert`` does with data)."""
    if option.overrides.get("skip"):
        return t
    cfg = apply_overrides(MPOConfig(quantize="int8"), option.overrides)
    _, entry, stored = compress_tensor(name, t, cfg, {name: tuple(t.shape)}, gram=gram)
    if not entry:
        return t
    decoded = decode_entry(entry, stored.__getitem__)
    return rebuild(entry, [decoded[c] for c in entry["cores"]], name) if entry["method"] == "mpo" else decoded[name]


@dataclasses.dataclass
class BudgetPlan:
    """What ``--target-size`` decided before converting."""

    target: int
    fixed_bytes: int
    header_estimate: int
    allocation: Allocation
    recipe: Recipe
    config: MPOConfig
    data_driven: bool
    sensitivity: str = "probe"
    #: each layer's damage weight (None: all alike), for a later pass to reuse
    weights: dict[str, float] | None = None

    @property
    def damage(self) -> str:
        """What the allocation minimised, in words."""
        if not self.data_driven:
            return "relative weight error (x uses of a tied weight)"
        if self.sensitivity == "probe":
            return "layer output error on recorded inputs x measured sensitivity"
        return "relative weight error x Fisher sensitivity (mean diagonal Gauss-Newton Hessian x ||W||^2)"

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (the report's ``allocation``; what ``inspect --target-size`` prints)."""
        return {
            "target_bytes": self.target,
            "fixed_bytes": self.fixed_bytes,
            "header_estimate": self.header_estimate,
            "damage": self.damage,
            **self.allocation.to_dict(),
        }


def plan_budget(
    input_path: str | Path,
    target: int,
    config: MPOConfig,
    *,
    recipe: Recipe | None = None,
    model: torch.nn.Module | None = None,
    batches: list[Any] | None = None,
    progress: Progress | None = None,
    header: int | None = None,
    curves: dict[str, list[Option]] | None = None,
    sensitivity: str = "auto",
    kd_loss: str = "mse",
    weights: dict[str, float] | None = None,
) -> tuple[BudgetPlan, dict[str, list[Option]]]:
    """Measure the curves and the layers' weights (unless given: an earlier pass's ``curves`` and
    ``plan.weights``) and allocate ``target`` bytes for the whole output file.

    ``config`` supplies ``include``/``exclude`` (the options themselves are chosen here); layers a
    user ``recipe`` matches keep the recipe's setting and their measured bytes count as fixed.
    With ``model`` and ``batches``, ``sensitivity`` says how the data weighs the layers:
    ``"fisher"`` (weight-error curves, each layer weighted by :func:`fisher_weights`: one backward
    pass per batch), ``"probe"`` (output-error curves on recorded inputs, each layer weighted by
    :func:`sensitivities`: one forward pass per batch and layer), or ``"auto"``: probe up to
    :data:`AUTO_PROBE_LAYERS` layers, Fisher beyond (and probe when the model runs outside autograd).

    Raises:
        GateError: the target cannot be met even with the smallest option of every layer.
    """
    with open_checkpoint(input_path) as ckpt:
        layers = select_layers(ckpt, config.include, config.exclude)
        shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
        chosen = set(layers)
        fixed = sum(ckpt.nbytes(n) for n in ckpt.keys() if n not in chosen)  # header sizes: no reads
        free: list[str] = []
        for n in layers:
            cfg = recipe.config_for(n, config) if recipe is not None else config
            if cfg is not config:  # a user's recipe rule fixes this layer: it is not reallocated
                if cfg is None:
                    fixed += nbytes_of(ckpt.get(n))
                else:
                    _, _, stored = compress_tensor(n, ckpt.get(n), cfg, shapes)
                    fixed += sum(nbytes_of(v) for v in stored.values())
            else:
                free.append(n)
        if sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {sensitivity!r}")
        data = model is not None and bool(batches)
        measure = curves is None or (data and weights is None)  # (a later pass reuses both)
        if sensitivity == "auto":
            sensitivity = "probe" if len(free) <= AUTO_PROBE_LAYERS else "fisher"
        if measure and data and sensitivity == "fisher" and not differentiable(model, batches[0], free):
            log.warning("the model's output has no gradient with respect to its weights (run outside autograd): "
                        "weighing the layers by probing each instead of by their Fisher sensitivity")  # fmt: skip
            sensitivity = "probe"
        grams = _grams(model, batches, ckpt, set(free)) if measure and data and sensitivity == "probe" else {}
        if curves is None:
            curves = {}
            for i, n in enumerate(free):
                if progress is not None:
                    progress(n, i, len(free))
                t = ckpt.get(n)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    curves[n] = [Option("dense", {"skip": True}, nbytes_of(t), 0.0)]
                else:
                    curves[n] = measure_options(n, t, shapes, grams.get(n))
        if not data:
            weights = _uses(ckpt, input_path, free)  # data-free prior: a tied weight's error counts once per use
        elif weights is None and sensitivity == "probe":
            weights = sensitivities(model, batches, curves, ckpt, grams=grams, kd_loss=kd_loss)
        elif weights is None:
            weights = fisher_weights(model, batches, curves, ckpt, kd_loss=kd_loss)
        if header is None:  # a first, generous estimate; the next pass uses the measured one
            header = HEADER_BASE + HEADER_PER_LAYER * len(layers) + HEADER_PER_TENSOR * (len(shapes) + 3 * len(layers))
        smallest = fixed + header + sum(min(o.nbytes for o in opts) for opts in curves.values())
        if smallest > target:
            raise GateError(f"a file of {target:,} bytes cannot be reached: the smallest choice for every layer gives "
                            f"about {smallest:,} bytes ({fixed:,} in tensors left as they are, ~{header:,} of header)")  # fmt: skip
        alloc = allocate(curves, target - fixed - header, weights)
    rules = [((f"re:^{re.escape(n)}$",), tuple(sorted(o.overrides.items()))) for n, o in alloc.picks.items()]
    ours = Recipe(tuple((recipe.rules if recipe is not None else ()) + tuple(rules)))
    base = dataclasses.replace(config, bond_dim=None, tol=None, ratio=None, prune=None, quantize="int8", als_sweeps=0)
    plan = BudgetPlan(target=target, fixed_bytes=fixed, header_estimate=header, allocation=alloc, recipe=ours,
                      config=base, data_driven=data, sensitivity=sensitivity, weights=weights)  # fmt: skip
    return plan, curves


def _uses(ckpt: Checkpoint, input_path: str | Path, layers: list[str]) -> dict[str, float] | None:
    """How many times the model uses each weight, where more than once: names tied to it in a torch
    checkpoint, and a Hugging Face folder's word embedding when its ``config.json`` ties the output
    projection to it (``tie_word_embeddings``, true unless set false) and the file has no ``lm_head``.
    Measured on SmolLM2 at 20 % of the file: the tied embedding got 4-bit k-means by its weight error
    alone (perplexity 2.19x dense); at 8 bits the same budget gives 1.08x."""
    uses = {n: 1.0 + sum(1 for s in ckpt.tied.values() if s == n) for n in layers}
    config = Path(input_path) / "config.json"
    if config.is_file():
        try:
            tied = json.loads(config.read_text()).get("tie_word_embeddings", True) is not False
        except (OSError, ValueError, AttributeError):
            tied = False
        names = set(ckpt.keys())
        if tied and not any(n.endswith("lm_head.weight") for n in names):
            for n in layers:
                if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
                    uses[n] += 1.0
    return {n: u for n, u in uses.items() if u > 1} or None


def _grams(model: torch.nn.Module, batches: list[Any], ckpt: Checkpoint, layers: set[str]) -> dict[str, torch.Tensor]:
    """Recorded inputs of ``layers`` in the dense model (loaded into ``model``), usable ones only."""
    from mpocompress.io import fill_tied
    from mpocompress.jobs.calibrate import gram_ok, record_grams, transposed_weights

    own = model.state_dict()
    have = set(ckpt.keys())
    model.load_state_dict(fill_tied(own, {k: ckpt.get(k) for k in own if k in have}), strict=True)
    grams, _ = record_grams(model, batches, weights=layers - transposed_weights(model))
    return {k: g for k, g in grams.items() if gram_ok(g)}


def convert_to_size(
    input_path: str | Path,
    output_path: str | Path,
    target: int,
    config: MPOConfig,
    *,
    recipe: Recipe | None = None,
    calibration_model: torch.nn.Module | None = None,
    calibration_batches: list[Any] | None = None,
    progress: Progress | None = None,
    sensitivity: str = "auto",
    kd_loss: str | None = None,
    **convert_kwargs: Any,
) -> Any:
    """Plan, convert, and check the file against ``target`` (redone with the overshoot taken off
    when the header was larger than estimated). ``calibration_model``/``calibration_batches`` make the
    damage data-driven (:func:`sensitivities`); ``convert_kwargs`` go to
    :func:`mpocompress.jobs.convert.convert` (fine-tuning, if asked, runs after the allocation).
    Returns the :class:`~mpocompress.report.Report`, with the plan under ``report.allocation``."""
    from mpocompress.jobs.convert import convert

    header, curves, weights = None, None, None
    force = convert_kwargs.pop("force", False)
    if kd_loss is None:  # the fine-tuning's distillation loss, if any (KL for logits)
        kd_loss = getattr(convert_kwargs.get("tune"), "kd_loss", "mse")
    for attempt in range(MAX_PASSES):
        plan, curves = plan_budget(input_path, target, config, recipe=recipe, model=calibration_model,
                                   batches=calibration_batches, progress=progress, header=header, curves=curves,
                                   sensitivity=sensitivity, kd_loss=kd_loss, weights=weights)  # fmt: skip
        sensitivity, weights = plan.sensitivity, plan.weights  # (measured once, for every pass)
        report = convert(input_path, output_path, plan.config, recipe=plan.recipe, force=force or attempt > 0,
                         progress=progress, **convert_kwargs)  # fmt: skip
        size = path_size(Path(output_path))
        report.allocation = {**plan.to_dict(), "written_bytes": size, "passes": attempt + 1}
        measured = size - report.totals()["bytes"] + HEADER_MARGIN  # header and other overhead, as written
        fits = size <= target
        if fits and (target - size <= CLOSE_ENOUGH * target or measured >= plan.header_estimate or attempt == MAX_PASSES - 1):
            return report
        log.info("written %d bytes for a target of %d (header %d, estimated %d): allocating again", size, target,
                 measured - HEADER_MARGIN, plan.header_estimate)  # fmt: skip
        # after an overshoot, never allocate more than the pass that overshot (the header can grow
        # when choices change), so the passes converge under the target
        header = measured if fits else max(measured, plan.header_estimate) + (size - target)
    raise GateError(f"{output_path} is {size:,} bytes, over the target of {target:,} after {MAX_PASSES} passes")
