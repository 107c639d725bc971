"""``convert --target-size``: measure every layer's rate-distortion curve, allocate the budget, convert.

Each selected weight is read once and stored every way we know, each option's bytes and relative
squared error measured exactly (its rate-distortion curve: :mod:`mpocompress.jobs.curves`). Damage is that error times a per-layer weight: 1 without data (every
layer's relative error counts alike), or with ``--model`` and ``--data`` the layer's measured effect
on the model's output (:func:`sensitivities`). :func:`mpocompress.core.allocate.allocate` picks one
option per layer; the picks become per-layer recipe rules for :func:`mpocompress.jobs.convert.convert`;
the written file is checked against the budget: the first pass uses a generous estimate of the
header (the metadata grows with every layer), and a second pass allocates again with the header as
measured, so the file ends as close under the target as the options allow.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mpocompress.codecs import narrowed
from mpocompress.config import MPOConfig, Recipe, apply_overrides
from mpocompress.core.allocate import FAMILIES, Allocation, Option, allocate, family
from mpocompress.errors import ConfigError, GateError
from mpocompress.format import decode_entry, rebuild
from mpocompress.io import Checkpoint, open_checkpoint, path_size
from mpocompress.jobs.curves import measure_many
from mpocompress.jobs.plan import (
    Progress,
    compress_tensor,
    nbytes_of,
    select_layers,
)

log = logging.getLogger(__name__)

#: the header of the written file, a first estimate (a pass that overshoots is redone with the
#: overshoot taken off): a base that covers a metadata document short enough to stay plain JSON
#: (:data:`mpocompress.format.COMPRESS_META_ABOVE`); per layer, the compressed metadata (~60
#: bytes a layer: Conv-TasNet's 174 KB of JSON -> 9 KB) and the index entries of its parts
#: (``.codes``, ``.codebook``, ``_cores.K``...: 2-3 on most choices); per tensor passed through, its
#: entry. A safetensors index entry is its name and ~70 bytes (``{"dtype":"F16","shape":[512,128],
#: "data_offsets":[a,b]}``). Conv-TasNet at 6.25 %: 86 KB estimated, 51-60 KB written; the rule
#: before (200 bytes a layer and 130 a tensor) said 137 KB, and a single plan (``inspect``, a plan
#: converted as it is) left 6 % of that budget unused (both numbers: ``mpocompress -v convert
#: CKPT -o OUT --target-size 6.25%`` logs the first pass's header as written and as estimated)
HEADER_BASE, HEADER_META_PER_LAYER, HEADER_PARTS_PER_LAYER = 4608, 80, 3
HEADER_PER_ENTRY, HEADER_PART_SUFFIX = 72, 12


def header_estimate(names: Iterable[str], layers: Iterable[str]) -> int:
    """A first estimate of the written header's bytes: every tensor of the checkpoint (``names``)
    passed through or stored as a compressed layer (``layers``) in parts."""
    chosen = set(layers)
    entries = sum(len(n.encode()) + HEADER_PER_ENTRY for n in names if n not in chosen)
    parts = sum(HEADER_PARTS_PER_LAYER * (len(n.encode()) + HEADER_PART_SUFFIX + HEADER_PER_ENTRY) for n in chosen)
    return HEADER_BASE + HEADER_META_PER_LAYER * len(chosen) + entries + parts
#: bytes kept free for a header that grows a little when the choices change between passes
HEADER_MARGIN = 512
#: a pass that leaves less than this share of the target unused is final
CLOSE_ENOUGH = 0.01
MAX_PASSES = 4
#: how data weighs the layers (:func:`plan_budget`)
SENSITIVITIES = ("auto", "fisher", "output-fisher", "probe")
#: ``sensitivity="auto"`` probes each layer up to this many layers, and uses the Fisher estimate
#: beyond (our choice, from ``benchmarks/budget_ranking.py``: probing ranks layers by their true
#: effect better on every model measured, Spearman 0.88 / 0.89 / 0.59 against the Fisher estimate's
#: -0.31 / 0.79 / 0.41 on silero-vad / Resemblyzer / SmolLM2, but it costs a forward pass per batch,
#: layer and option family: 211 layers on SmolLM2, against one backward pass per batch for Fisher).
#: Layers under :data:`PROBE_MIN_NUMEL` entries are not probed and not counted.
AUTO_PROBE_LAYERS = 128
#: the probe runs on at most this many of the batches, spread evenly (our choice: the probes of all
#: layers see the same batches, so their ranking is paired; Conv-TasNet's 32 batches made a plan of
#: ~110 minutes)
PROBE_BATCHES = 8
#: a layer with fewer entries is not probed (its weights: each family's largest over the probed
#: layers, so it stays near dense): Conv-TasNet's 49 PReLU slopes (1 entry each) were a third of its
#: probes and hold ~0 bytes; silero-vad's output layer (128 entries) must not look cheap
PROBE_MIN_NUMEL = 256


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


#: each layer's damage per unit of its options' error, by option family (:func:`family`; ``"*"``: every
#: family), by layer name
Weights = dict[str, dict[str, float]]


def sensitivities(
    model: torch.nn.Module,
    batches: list[Any],
    curves: dict[str, list[Option]],
    dense: Checkpoint,
    progress: Progress | None = None,
    grams: dict[str, torch.Tensor] | None = None,
    kd_loss: str = "mse",
) -> Weights:
    """Each layer's damage per unit of relative squared error, measured on the model's output, for
    each family of its options (:func:`mpocompress.core.allocate.family`: a codec's error spread over
    every entry, a truncation's in the dropped directions, pruning's in the small weights).

    For each layer alone and each family, the family's probe option (the one nearest to 1 % relative
    squared error, our choice) replaces the weight; the distillation loss (MSE between the model's
    outputs with and without it) over ``batches``, divided by the probe's error, is the weight. One
    probe per layer misjudged the families against each other: on all-MiniLM-L6-v2 the damage per
    unit error of a low-rank option is 0.01-4x its codecs' (pruning's 0.02-12x), and with one probe
    (a codec's) the allocation at 6.25 % of the file gave most linears rank 28 of 384
    (``benchmarks/budget.py``: embedding cosine -0.55; -0.39 with a probe per family). With ``grams``
    (the curves then hold output errors) the probes are made the data-aware way too.
    """
    from mpocompress.config import TuneConfig
    from mpocompress.io import fill_tied
    from mpocompress.jobs.finetune import TeacherCache, evaluate

    own = model.state_dict()
    have = set(dense.keys())
    model.load_state_dict(fill_tied(own, {k: dense.get(k) for k in own if k in have}), strict=True)
    teacher = TeacherCache(copy.deepcopy(model).eval())  # (its outputs computed once per batch, not once per probe)
    model.eval()
    kd = TuneConfig(kd_weight=1.0, kd_loss=kd_loss)
    weights: Weights = {}
    batches = spread(batches, PROBE_BATCHES)
    for i, (name, options) in enumerate(curves.items()):
        if progress is not None:
            progress(name, i, len(curves))
        if name not in own or own[name].numel() < PROBE_MIN_NUMEL:
            continue
        original = own[name].detach().clone()
        for fam in FAMILIES:
            lossy = [o for o in options if o.error > 0 and family(o) == fam]
            if not lossy:
                continue
            probe = min(lossy, key=lambda o: abs(math.log(o.error / 1e-2)))
            with torch.no_grad():
                own[name].copy_(_decoded(name, dense.get(name), probe, (grams or {}).get(name)).to(original.dtype))
                loss = evaluate(model, teacher, batches, kd)
                own[name].copy_(original)
            weights.setdefault(name, {})[fam] = loss / probe.error
    medians, largest = {}, {}  # layers the model lacks get each family's median weight; layers too small
    for fam in FAMILIES:  # to probe its largest (their bytes are next to nothing: spend them)
        values = sorted(w[fam] for w in weights.values() if fam in w)
        if values:
            medians[fam], largest[fam] = values[len(values) // 2], values[-1]
    return {n: weights.get(n, largest if n in own else medians) for n in curves} if weights else {}


def spread(items: list[Any], most: int) -> list[Any]:
    """At most ``most`` of ``items``, evenly spaced, the first included (all of them when few enough)."""
    if len(items) <= most:
        return list(items)
    return [items[(i * len(items)) // most] for i in range(most)]


def weight_of(weights: Weights | None, name: str, option: Option) -> float:
    """Layer ``name``'s damage per unit of ``option``'s error (1 when nothing is known): its family's
    weight, else the ``"*"`` weight, else the largest the layer has (a family never probed is not
    assumed harmless)."""
    w = (weights or {}).get(name)
    if not w:
        return 1.0
    return w.get(family(option), w.get("*", max(w.values())))


def per_layer(scalar: dict[str, float] | None) -> Weights | None:
    """One weight per layer, for every family."""
    return None if scalar is None else {n: {"*": v} for n, v in scalar.items()}


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
    outputs: dict[str, torch.Tensor] | None = None,
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

    ``outputs`` (``--sensitivity output-fisher``; name -> the Gram ``C`` of the inputs on which that
    layer's curve measures *output* errors): the same sampled gradients are taken at the layer's
    output ``Y = X W^T`` instead, and its weight is ``mean(g_Y^2) * tr(W C W^T)``: the Fisher of the
    layer's output (an output error ``E`` costs about ``mean(g_Y^2) ||E||^2 / 2``, BRECQ's
    Fisher-weighted reconstruction reduced to one scalar per layer) times the output energy that
    turns a relative output error into an absolute one. It suits options whose error lies in a few
    directions (a truncation), which a weight-error weight misprices. Weights whose module is not
    an ``nn.Linear``/``nn.ConvNd`` (or a subclass) keep the weight Fisher from the same pass.
    """
    from mpocompress.io import fill_tied
    from mpocompress.jobs.finetune import first_tensor, sampled_output_loss, split_batch

    own = model.state_dict()
    have = set(dense.keys())
    model.load_state_dict(fill_tied(own, {k: dense.get(k) for k in own if k in have}), strict=True)
    wanted, unique = _weight_tensors(model, curves)
    acc = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in unique}
    modules = _output_modules(model, outputs or {})
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    energy = dict.fromkeys(modules, 0.0)
    count = dict.fromkeys(modules, 0)
    hooks = [m.register_forward_hook(lambda _m, _i, y, n=n: seen[n].append(y)) for n, m in modules.items()]
    gen = torch.Generator().manual_seed(seed)
    try:
        with _gradients_for(model, unique):
            for i, batch in enumerate(batches):
                if progress is not None:
                    progress("fisher", i, len(batches))
                for ys in seen.values():
                    ys.clear()
                xs, _ = split_batch(batch)
                out = first_tensor(model(*xs)).float()
                if not out.requires_grad:
                    raise NoGradient("the model's output has no gradient with respect to its weights")
                taken = [(n, y) for n, ys in seen.items() for y in ys if isinstance(y, torch.Tensor) and y.requires_grad]
                for k in range(FISHER_SAMPLES):
                    loss = sampled_output_loss(out, kd_loss, gen)
                    grads = torch.autograd.grad(loss, unique + [y for _, y in taken], retain_graph=k < FISHER_SAMPLES - 1, allow_unused=True)
                    for p, g in zip(unique, grads):
                        if g is not None:
                            acc[id(p)] += g.double() ** 2
                    for (n, y), g in zip(taken, grads[len(unique) :]):
                        energy[n] += float(g.double().pow(2).sum()) if g is not None else 0.0
                        count[n] += y.numel()
    finally:
        for h in hooks:
            h.remove()
    weights = {}
    for n, p in wanted.items():
        if count.get(n):
            w = p.detach().double().reshape(p.shape[0], -1)
            weights[n] = energy[n] / count[n] * float(torch.einsum("oi,ij,oj->", w, outputs[n].double(), w))
            continue
        h = acc[id(p)] / max(len(batches) * FISHER_SAMPLES, 1)
        weights[n] = float(h.mean()) * float(p.detach().double().pow(2).sum())
    if weights:
        median = sorted(weights.values())[len(weights) // 2]
        weights = {n: weights.get(n, median) for n in curves}
    return weights


def _output_modules(model: torch.nn.Module, names: Any) -> dict[str, torch.nn.Module]:
    """The module whose output is ``x W^T`` (+ bias) for each weight name: an ``nn.Linear`` or
    ``nn.ConvNd`` (subclasses too) owning it as ``weight``."""
    found = {}
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for n in names:
        path, _, attr = n.rpartition(".")
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if attr == "weight" and isinstance(m, kinds):
            found[n] = m
    return found


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
    #: each layer's damage weights (None: all alike), for a later pass to reuse
    weights: Weights | None = None
    #: the methods the options were limited to (None: all)
    methods: tuple[str, ...] | None = None
    #: the dtype the tensors passed through were counted in: ``convert(..., narrow=plan.narrow)``
    #: writes what was planned
    narrow: str | None = None

    @property
    def damage(self) -> str:
        """What the allocation minimised, in words."""
        if not self.data_driven:
            return "-log(1 - relative squared weight error) (x uses of a tied weight)"
        if self.sensitivity == "probe":
            return "layer output error on recorded inputs x measured sensitivity"
        if self.sensitivity == "output-fisher":
            return "layer output error on recorded inputs x Fisher of the layer's output (mean squared gradient x output energy)"
        return "relative weight error x Fisher sensitivity (mean diagonal Gauss-Newton Hessian x ||W||^2)"

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (the report's ``allocation``; what ``inspect --target-size`` prints)."""
        return {
            "target_bytes": self.target,
            "fixed_bytes": self.fixed_bytes,
            "header_estimate": self.header_estimate,
            "damage": self.damage,
            "methods": list(self.methods) if self.methods is not None else "all",
            "passthrough_dtype": self.narrow or "kept",
            **self.allocation.to_dict(),
        }


def _passthrough_bytes(ckpt: Checkpoint, name: str, narrow: str | None) -> int:
    """The bytes ``convert`` with ``narrow`` stores a tensor passed through in (read only when a
    narrower dtype could apply)."""
    if narrow is None or ckpt.dtype(name) not in ("float32", "float64"):
        return ckpt.nbytes(name)
    t = narrowed(ckpt.get(name), narrow)
    return ckpt.nbytes(name) if t is None else nbytes_of(t)


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
    weights: Weights | None = None,
    methods: tuple[str, ...] | None = None,
    narrow: str | None = None,
    fixed: int | None = None,
) -> tuple[BudgetPlan, dict[str, list[Option]]]:
    """Measure the curves and the layers' weights (unless given: an earlier pass's ``curves`` and
    ``plan.weights``) and allocate ``target`` bytes for the whole output file (the tensors passed
    through counted as ``convert`` with ``narrow`` stores them: convert the plan with
    ``narrow=plan.narrow``; :func:`convert_to_size` does). ``fixed``: an earlier pass's
    ``plan.fixed_bytes`` (the tensors passed through and the layers a recipe fixes are then not read
    again).

    ``config`` supplies ``include``/``exclude`` (the options themselves are chosen here); layers a
    user ``recipe`` matches keep the recipe's setting and their measured bytes count as fixed.
    With ``model`` and ``batches``, ``sensitivity`` says how the data weighs the layers:
    ``"fisher"`` (weight-error curves, each layer weighted by :func:`fisher_weights`: one backward
    pass per batch), ``"probe"`` (output-error curves on recorded inputs, each layer weighted by
    :func:`sensitivities`: a forward pass per batch (at most :data:`PROBE_BATCHES`), layer and option
    family), or ``"auto"``: probe up to :data:`AUTO_PROBE_LAYERS` layers, Fisher beyond (and probe when the model runs outside autograd);
    ``"output-fisher"``: output-error curves, each layer weighted by the Fisher of its output
    (:func:`fisher_weights` with ``outputs``), what ``"auto"`` uses beyond the probe's layer count when
    ``methods`` (the options allowed: :data:`mpocompress.core.allocate.METHODS`; None: all) has no codec.

    Raises:
        GateError: the target cannot be met even with the smallest option of every layer.
    """
    with open_checkpoint(input_path) as ckpt:
        layers = select_layers(ckpt, config.include, config.exclude)
        shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
        rules = {n: recipe.config_for(n, config) if recipe is not None else config for n in layers}
        free = [n for n in layers if rules[n] is config]  # (a user's recipe rule fixes the others: not reallocated)
        if fixed is None:  # (a later pass reuses the first's)
            chosen = set(layers)
            fixed = sum(_passthrough_bytes(ckpt, n, narrow) for n in ckpt.keys() if n not in chosen)
            for n in layers:
                if rules[n] is None:
                    fixed += nbytes_of(ckpt.get(n))
                elif rules[n] is not config:
                    _, _, stored = compress_tensor(n, ckpt.get(n), rules[n], shapes)
                    fixed += sum(nbytes_of(v) for v in stored.values())
        if sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {sensitivity!r}")
        data = model is not None and bool(batches)
        measure = curves is None or (data and weights is None)  # (a later pass reuses both)
        if sensitivity == "auto":
            lowrank_only = methods is not None and "codec" not in methods
            probed = sum(1 for n in free if math.prod(shapes[n]) >= PROBE_MIN_NUMEL)
            sensitivity = "probe" if probed <= AUTO_PROBE_LAYERS else "output-fisher" if lowrank_only else "fisher"
        if measure and data and "fisher" in sensitivity and not differentiable(model, batches[0], free):
            log.warning("the model's output has no gradient with respect to its weights (run outside autograd): "
                        "weighing the layers by probing each instead of by their Fisher sensitivity")  # fmt: skip
            sensitivity = "probe"
        recorded = measure and data and sensitivity in ("probe", "output-fisher")
        grams, held = _grams(model, batches, ckpt, set(free)) if recorded else ({}, {})
        if curves is None:
            curves = _measure(ckpt, free, grams, progress, held, methods)
        if not data:
            weights = per_layer(_uses(ckpt, input_path, free))  # data-free prior: a tied weight's error counts once per use
        elif weights is None and sensitivity == "probe":
            weights = sensitivities(model, batches, curves, ckpt, grams=grams, kd_loss=kd_loss)
        elif weights is None:
            outputs = {n: held.get(n, g) for n, g in grams.items()} if sensitivity == "output-fisher" else None
            weights = per_layer(fisher_weights(model, batches, curves, ckpt, kd_loss=kd_loss, outputs=outputs))
        if header is None:  # a first, generous estimate; the next pass uses the measured one
            header = header_estimate(shapes, layers)
        smallest = fixed + header + sum(min(o.nbytes for o in opts) for opts in curves.values())
        if smallest > target:
            raise GateError(f"a file of {target:,} bytes cannot be reached: the smallest choice for every layer gives "
                            f"about {smallest:,} bytes ({fixed:,} in tensors left as they are, ~{header:,} of header)")  # fmt: skip
        alloc = allocate_damage(curves, target - fixed - header, weights, compound=not data)
    rules = [((f"re:^{re.escape(n)}$",), tuple(sorted(o.overrides.items()))) for n, o in alloc.picks.items()]
    ours = Recipe(tuple((recipe.rules if recipe is not None else ()) + tuple(rules)))
    base = dataclasses.replace(config, bond_dim=None, tol=None, ratio=None, prune=None, quantize="int8", als_sweeps=0)
    plan = BudgetPlan(target=target, fixed_bytes=fixed, header_estimate=header, allocation=alloc, recipe=ours,
                      config=base, data_driven=data, sensitivity=sensitivity, weights=weights, methods=methods, narrow=narrow)  # fmt: skip
    return plan, curves


#: a relative squared error is taken as at most this (1: a layer that passes no signal at all)
MAX_RELATIVE_ERROR = 1 - 1e-6


def allocate_damage(curves: dict[str, list[Option]], budget: int, weights: Weights | None, *, compound: bool = False) -> Allocation:
    """:func:`allocate` with each option's damage its error times its layer's weight for the option's
    family (:func:`weight_of`). With ``compound`` (our choice, for the data-free prior) the error
    counts as ``-log(1 - e)`` instead of ``e``: a layer whose stored weight keeps a share ``1 - e``
    of its output's energy (errors uncorrelated with the signal) passes that share on, shares
    multiply along the model, and the sum of ``-log(1 - e)`` is minus the log of the share that
    survives -- so errors compound, and one layer near ``e = 1`` (its output destroyed) costs more
    than the sum of its error says. For small errors it is ``e`` (the plain sum). On
    all-MiniLM-L6-v2 at 6.25 % of the file (``benchmarks/budget.py``): embedding cosine -0.77 with
    the plain sum, -0.43 with this. (With data, compounding the measured output errors changed
    nothing there: -0.554 / -0.556.)
    The picks are the original options (their true errors); the allocation's damage is the weighted one."""

    def damage(name: str, o: Option) -> float:
        e = -math.log1p(-min(o.error, MAX_RELATIVE_ERROR)) if compound else o.error
        return e * weight_of(weights, name, o)

    weighted = {n: [dataclasses.replace(o, error=damage(n, o)) for o in opts] for n, opts in curves.items()}
    original = {id(w): o for n in curves for o, w in zip(curves[n], weighted[n])}
    alloc = allocate(weighted, budget)
    return dataclasses.replace(alloc, picks={n: original[id(o)] for n, o in alloc.picks.items()})


#: layers measured together hold at most about this many values (:func:`measure_many`: their
#: k-means are solved in one program)
MEASURE_GROUP_VALUES = 1 << 22


def _measure(ckpt: Checkpoint, names: list[str], grams: dict[str, torch.Tensor], progress: Progress | None,
             held: dict[str, torch.Tensor] | None = None, methods: tuple[str, ...] | None = None) -> dict[str, list[Option]]:  # fmt: skip
    """Each layer's curve (:func:`measure_many` on groups of consecutive layers; with ``grams``, each
    option fitted on them and its output error measured on ``held`` where given); a weight with
    non-finite values can only stay dense."""
    held = held or {}
    curves: dict[str, list[Option]] = {}
    group: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        grams_of = [grams.get(n) for n, _ in group]
        for (n, _), options in zip(group, measure_many([t for _, t in group], grams_of, [held.get(n) for n, _ in group], methods)):
            curves[n] = options
        group.clear()

    for i, n in enumerate(names):
        if progress is not None:
            progress(n, i, len(names))
        t = ckpt.get(n)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            curves[n] = [Option("dense", {"skip": True}, nbytes_of(t), 0.0)]
            continue
        group.append((n, t))
        if sum(x.numel() for _, x in group) >= MEASURE_GROUP_VALUES:
            flush()
    flush()
    return {n: curves[n] for n in names}


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


def _grams(model: torch.nn.Module, batches: list[Any], ckpt: Checkpoint, layers: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Recorded inputs of ``layers`` in the dense model (loaded into ``model``), usable ones only:
    ``(fit, held)`` -- the Grams of all batches, and of a held-out half of the samples to measure the
    options fitted on the other half (:func:`_halves`), or ``(fit, {})`` when they cannot be split."""
    from mpocompress.io import fill_tied
    from mpocompress.jobs.calibrate import gram_ok, record_grams, thin_inputs, transposed_weights

    own = model.state_dict()
    have = set(ckpt.keys())
    model.load_state_dict(fill_tied(own, {k: ckpt.get(k) for k in own if k in have}), strict=True)
    wanted = layers - transposed_weights(model)
    halves = _halves(batches)
    if halves is None:
        grams, info = record_grams(model, batches, weights=wanted)
        grams = {k: g for k, g in grams.items() if gram_ok(g)}
        thin_inputs(info["rows"], grams)
        return grams, {}
    first, info = record_grams(model, halves[0], weights=wanted)
    second, _ = record_grams(model, halves[1], weights=wanted)
    both = {k for k in first if k in second and gram_ok(first[k]) and gram_ok(second[k])}
    fit = {k: first[k] for k in both}
    thin_inputs(info["rows"], fit)  # (the options are fitted on this half)
    return fit, {k: second[k] for k in both}


def _halves(batches: list[Any]) -> tuple[list[Any], list[Any]] | None:
    """The calibration samples in two halves: every other batch, or, with one batch, its samples
    (the first dimension of a tensor, or of every tensor of a dict or tuple) split in two; None when
    that is not possible."""
    if len(batches) >= 2:
        return batches[::2], batches[1::2]
    (b,) = batches

    def split(x: Any) -> tuple[Any, Any] | None:
        if isinstance(x, torch.Tensor):
            return (x[: x.shape[0] // 2], x[x.shape[0] // 2 :]) if x.dim() >= 1 and x.shape[0] >= 2 else None
        if isinstance(x, dict):
            parts = {k: split(v) for k, v in x.items()}
            if any(p is None for p in parts.values()) or len({len(v) for v in x.values()}) != 1:
                return None
            return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}
        if isinstance(x, (tuple, list)) and x:
            parts = [split(v) for v in x]
            if any(p is None for p in parts):
                return None
            return type(x)(p[0] for p in parts), type(x)(p[1] for p in parts)
        return None

    pair = split(b)
    return None if pair is None else ([pair[0]], [pair[1]])


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
    methods: tuple[str, ...] | None = None,
    narrow: str | None = "float16",
    **convert_kwargs: Any,
) -> Any:
    """Plan, convert, and check the file against ``target`` (redone with the overshoot taken off
    when the header was larger than estimated). ``calibration_model``/``calibration_batches`` make the
    damage data-driven (:func:`sensitivities`); ``methods`` limits the options (:func:`plan_budget`); the
    tensors passed through are stored as ``narrow`` where it keeps them (:func:`mpocompress.codecs.narrowed`;
    None: as they are), their bytes saved given to the layers; ``convert_kwargs`` go to
    :func:`mpocompress.jobs.convert.convert` (fine-tuning, if asked, runs after the allocation).
    Returns the :class:`~mpocompress.report.Report`, with the plan under ``report.allocation``."""
    from mpocompress.jobs.convert import convert

    header, curves, weights, fixed = None, None, None, None
    force = convert_kwargs.pop("force", False)
    if kd_loss is None:  # the fine-tuning's distillation loss, if any (KL for logits)
        kd_loss = getattr(convert_kwargs.get("tune"), "kd_loss", "mse")
    best = None  # (size, plan) of the fitting pass closest to the target
    for attempt in range(MAX_PASSES):
        plan, curves = plan_budget(input_path, target, config, recipe=recipe, model=calibration_model,
                                   batches=calibration_batches, progress=progress, header=header, curves=curves,
                                   sensitivity=sensitivity, kd_loss=kd_loss, weights=weights, methods=methods,
                                   narrow=narrow, fixed=fixed)  # fmt: skip
        sensitivity, weights, fixed = plan.sensitivity, plan.weights, plan.fixed_bytes  # (measured once, for every pass)
        report = convert(input_path, output_path, plan.config, recipe=plan.recipe, force=force or attempt > 0,
                         progress=progress, narrow=narrow, **convert_kwargs)  # fmt: skip
        size = path_size(Path(output_path))
        report.allocation = {**plan.to_dict(), "written_bytes": size, "passes": attempt + 1}
        measured = size - report.totals()["bytes"] + HEADER_MARGIN  # header and other overhead, as written
        fits = size <= target
        if fits and (target - size <= CLOSE_ENOUGH * target or measured >= plan.header_estimate or attempt == MAX_PASSES - 1):
            return report
        if fits and (best is None or size > best[0]):
            best = (size, plan)
        log.info("written %d bytes for a target of %d (header %d, estimated %d): allocating again", size, target,
                 measured - HEADER_MARGIN, plan.header_estimate)  # fmt: skip
        # after an overshoot, never allocate more than the pass that overshot (the header can grow
        # when choices change), so the passes converge under the target
        header = measured if fits else max(measured, plan.header_estimate) + (size - target)
    if best is not None:  # the header changes with the choices and the passes did not settle: the
        # largest pass that fitted, converted again (the conversion is deterministic)
        size, plan = best
        report = convert(input_path, output_path, plan.config, recipe=plan.recipe, force=True, progress=progress, narrow=narrow,
                         **convert_kwargs)  # fmt: skip
        written = path_size(Path(output_path))
        report.allocation = {**plan.to_dict(), "written_bytes": written, "passes": MAX_PASSES + 1}
        if written <= target:
            return report
        size = written
    raise GateError(f"{output_path} is {size:,} bytes, over the target of {target:,} after {MAX_PASSES} passes")
