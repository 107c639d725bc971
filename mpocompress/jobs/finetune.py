"""Brief fine-tuning with knowledge distillation, and iterative pruning with distillation (IPKD).

No file I/O: batches come in as Python objects (see :mod:`mpocompress.io` for reading them).

A *batch* is an input tensor, or a pair ``(inputs, targets)`` where ``inputs`` is a tensor or a
tuple of tensors (passed as positional arguments to the model). A model's output is its first tensor
when it returns a tuple or list (``nn.LSTM`` style).

The loss of a batch is ``kd_weight * KD(student(x), teacher(x)) + (1 - kd_weight) * task(student(x), y)``
(KD: MSE, KL divergence of softmaxes at a temperature for logits, or a multi-resolution STFT loss
for waveforms; optionally plus a
hidden-state MSE over the model's blocks, see :func:`hidden_blocks`),
the task term only when the batch has targets. Training uses Adam, a fixed seed, a fixed batch order
(cycling over the training batches), and keeps the parameters with the lowest held-out loss seen
(the starting point included, so fine-tuning never returns a model worse on the held-out batches
than the one it was given).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mpocompress.config import STFT_RESOLUTIONS, TuneConfig
from mpocompress.errors import ConfigError
from mpocompress.nn.layers import MPOMatrices

log = logging.getLogger(__name__)

#: called as progress(step, total_steps, info) with info = {"loss", "val_loss", "best_val_loss", "round"}
TuneProgress = Callable[[int, int, dict[str, Any]], None]


@dataclass
class TuneResult:
    """What a fine-tuning run did.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall-clock seconds.
        stopped_by: ``"steps"``, ``"time"`` or ``"no_improvement"`` (``patience`` ran out).
        val_before: held-out loss before training.
        val_best: best held-out loss (the returned parameters have it).
        best_step: step at which ``val_best`` was reached (0: the starting point).
        history: ``[(step, train_loss, val_loss)]`` at each evaluation.
        trained_params: number of trainable parameters.
        lr: the learning rate used (probed when the config's is None).
        lr_probe: held-out loss after the probe's few steps, per learning rate tried.
    """

    steps: int = 0
    seconds: float = 0.0
    stopped_by: str = "steps"
    val_before: float = math.nan
    val_best: float = math.nan
    best_step: int = 0
    history: list[tuple[int, float, float]] = field(default_factory=list)
    trained_params: int = 0
    lr: float | None = None
    lr_probe: dict[float, float] = field(default_factory=dict)

    @property
    def improved(self) -> bool:
        """Whether training found parameters better on the held-out batches than the start."""
        return self.best_step > 0

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (for the report)."""
        return {
            "steps": self.steps, "seconds": round(self.seconds, 3), "stopped_by": self.stopped_by,
            "val_before": self.val_before, "val_best": self.val_best, "best_step": self.best_step,
            "trained_params": self.trained_params, "history": [list(h) for h in self.history],
            "lr": self.lr, "lr_probe": {f"{k:g}": v for k, v in self.lr_probe.items()}, "improved": self.improved,
        }  # fmt: skip


def split_batch(batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """``(positional inputs, targets or None)`` of a batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        x = batch[0]
        y = batch[1] if len(batch) == 2 else None
        xs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        if not all(isinstance(t, torch.Tensor) for t in xs) or (y is not None and not isinstance(y, torch.Tensor)):
            raise ConfigError("a batch is a tensor or (inputs, targets) of tensors")
        return xs, y
    raise ConfigError(f"a batch is a tensor or (inputs, targets), got {type(batch).__name__}")


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (tensor, or tuple/list/dict holding tensors first)."""
    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict) and out:
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
        else:
            raise ConfigError(f"the model returned {type(out).__name__}, not a tensor")
    return out


def distill_loss(out: torch.Tensor, ref: torch.Tensor, config: TuneConfig) -> torch.Tensor:
    """The distillation loss between the student's and the teacher's outputs (``config.kd_loss``)."""
    if config.kd_loss == "kl":
        t = config.temperature
        s = F.log_softmax(out.float() / t, dim=-1).reshape(-1, out.shape[-1])
        r = F.log_softmax(ref.float() / t, dim=-1).reshape(-1, ref.shape[-1])
        return F.kl_div(s, r, log_target=True, reduction="batchmean") * (t * t)
    if config.kd_loss == "stft":
        return stft_loss(out, ref)
    return F.mse_loss(out, ref)


def sampled_output_loss(out: torch.Tensor, kd_loss: str, gen: torch.Generator) -> torch.Tensor:
    """A loss sampled from the model's own output distribution, whose gradients' second moment is the
    Fisher / Gauss-Newton matrix: cross-entropy against labels drawn from the softmax over the last
    dimension for ``kd_loss="kl"`` (logits), else ``<out, z>`` with ``z ~ N(0, I)`` (MSE)."""
    if kd_loss == "kl":
        logits = out.reshape(-1, out.shape[-1])
        labels = torch.multinomial(F.softmax(logits.detach(), -1), 1, generator=gen).squeeze(-1)
        return F.cross_entropy(logits, labels, reduction="sum")
    return (out * torch.randn(out.shape, generator=gen)).sum()


def _magnitudes(x: torch.Tensor, fft: int, hop: int, win: int, floor: torch.Tensor | None) -> torch.Tensor:
    spec = torch.stft(x, fft, hop, win, window=torch.hann_window(win, device=x.device), return_complex=True)
    power = torch.view_as_real(spec).pow(2).sum(-1)
    return power.clamp_min(floor * floor).sqrt() if floor is not None else power.sqrt()


def stft_loss(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss of ``out`` against ``ref`` over their last dimension: for each of
    :data:`~mpocompress.config.STFT_RESOLUTIONS` that fits, spectral convergence
    ``|| |S_r| - |S_o| ||_F / || |S_r| ||_F`` plus the mean absolute difference of log magnitudes
    (floored at 1e-5 of the reference's mean magnitude, so the loss does not depend on the output's
    scale); averaged over the resolutions (Yamamoto et al.'s Parallel WaveGAN loss, as Demucs uses it)."""
    o = out.float().reshape(-1, out.shape[-1])
    r = ref.float().reshape(-1, ref.shape[-1]).detach()
    terms = []
    for fft, hop, win in STFT_RESOLUTIONS:
        if r.shape[-1] <= max(win, fft // 2):
            continue
        mr = _magnitudes(r, fft, hop, win, None)
        floor = (1e-5 * mr.mean()).clamp_min(1e-12)
        mr = mr.clamp_min(floor)
        mo = _magnitudes(o, fft, hop, win, floor)
        sc = torch.linalg.norm(mr - mo) / torch.linalg.norm(mr)
        terms.append(sc + (mr.log() - mo.log()).abs().mean())
    if not terms:
        raise ConfigError(f"kd_loss 'stft' needs outputs longer than {STFT_RESOLUTIONS[0][2]} samples in their last dimension, "
                          f"got {r.shape[-1]}")
    return torch.stack(terms).mean()


#: ``--kd-loss auto`` takes an output for a waveform from this many samples in its last dimension
#: (0.625 s at 16 kHz; above any embedding width in use)
WAVEFORM_MIN_SAMPLES = 10_000


def kd_loss_for(model: nn.Module, batch: Any) -> str:
    """``--kd-loss auto`` for tensor data: ``"stft"`` when the model's output on ``batch`` is a
    waveform -- shape ``(T,)``, ``(B, T)`` or ``(B, 1, ..., T)`` with ``T >=``
    :data:`WAVEFORM_MIN_SAMPLES` -- else ``"mse"``. Our choice, measured on Conv-TasNet (a waveform
    enhancer; ``docs/methods.md``, stop 29): 300 s of MSE distillation halved the held-out loss and
    lowered PESQ-WB (12.5 % of the file: -0.041 -> -0.073), the STFT loss raised it (-0.041 -> -0.018;
    since format 2's larger weight budget: -0.078 -> -0.029)."""
    xs, _ = split_batch(batch)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = first_tensor(model(*xs))
    finally:
        model.train(was)
    wave = out.ndim <= 2 or all(d == 1 for d in out.shape[1:-1])
    return "stft" if wave and out.shape[-1] >= WAVEFORM_MIN_SAMPLES else "mse"


def hidden_blocks(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are a model's hidden states: the children of its longest
    ``nn.ModuleList`` (a transformer's layers; the first such list when several are as long), or
    ``[]`` when it has none."""
    best: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best):
            best = [f"{name}.{k}" if name else k for k, _ in m.named_children()]
    return best


@contextlib.contextmanager
def _recording(model: nn.Module, names: Sequence[str]):
    """Collect the first tensor of each named module's output while the block runs."""
    mods = dict(model.named_modules())
    outs: list[torch.Tensor] = []
    hooks = [mods[n].register_forward_hook(lambda _m, _i, o: outs.append(first_tensor(o))) for n in names if n in mods]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def hidden_loss(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ``MSE(student, teacher) / mean(teacher^2)`` (scale-free: a transformer's
    residual stream grows by orders of magnitude across its layers)."""
    if not outs or len(outs) != len(refs):
        raise ConfigError("hidden-state distillation: the student's and teacher's blocks do not match")
    terms = [F.mse_loss(o.float(), r.float()) / r.float().pow(2).mean().clamp_min(1e-12) for o, r in zip(outs, refs)]
    return torch.stack(terms).mean()


#: bytes of teacher outputs a :class:`TeacherCache` keeps (all batches together; beyond, recomputed)
TEACHER_CACHE_BYTES = 1 << 30


class TeacherCache:
    """The frozen teacher's outputs (and recorded hidden states) per batch, computed once. The teacher
    runs in eval mode without gradients, so for a batch seen again -- each cycle over the training
    batches, each held-out evaluation, each rate of the probe, each layer a sensitivity probe tries --
    the cached outputs are the same numbers (a Conv-TasNet step spends a quarter of its time in the
    teacher's forward pass). Keyed by the batch object, which the cache keeps alive; at most
    ``limit`` bytes are kept, batches beyond are recomputed each time (a language model's logits)."""

    def __init__(self, teacher: nn.Module, limit: int = TEACHER_CACHE_BYTES) -> None:
        self.teacher, self.limit, self.used = teacher, limit, 0
        self.store: dict[tuple[int, tuple[str, ...]], tuple[Any, torch.Tensor, list[torch.Tensor]]] = {}

    def __call__(self, batch: Any, xs: Sequence[torch.Tensor], hidden: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        key = (id(batch), tuple(hidden))
        hit = self.store.get(key)
        if hit is not None and hit[0] is batch:
            return hit[1], hit[2]
        ref, refs = _reference(self.teacher, xs, hidden)
        size = ref.nbytes + sum(r.nbytes for r in refs)
        if self.used + size <= self.limit:
            self.store[key] = (batch, ref, refs)
            self.used += size
        return ref, refs


def _reference(teacher: nn.Module, xs: Sequence[torch.Tensor], hidden: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad(), _recording(teacher, hidden) as refs:
        ref = first_tensor(teacher(*xs))
    return ref, list(refs)


def batch_loss(student: nn.Module, teacher: nn.Module | TeacherCache | None, batch: Any, config: TuneConfig) -> torch.Tensor:
    """The training loss of one batch (see the module docstring); ``teacher`` may be a
    :class:`TeacherCache` around it."""
    xs, y = split_batch(batch)
    kd_w = config.kd_weight if y is not None else 1.0
    hidden = hidden_blocks(student) if config.kd_hidden > 0 and kd_w > 0 and teacher is not None else []
    with _recording(student, hidden) as outs:
        out = first_tensor(student(*xs))
    loss = out.new_zeros(())
    if kd_w > 0 and teacher is not None:
        ref, refs = teacher(batch, xs, hidden) if isinstance(teacher, TeacherCache) else _reference(teacher, xs, hidden)
        loss = loss + kd_w * distill_loss(out, ref, config)
        if hidden:
            loss = loss + kd_w * config.kd_hidden * hidden_loss(outs, refs)
    if y is not None and kd_w < 1.0:
        if config.task_loss == "cross_entropy":
            task = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1).long())
        else:
            task = F.mse_loss(out, y.to(out.dtype))
        loss = loss + (1.0 - kd_w) * task
    return loss


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module | TeacherCache | None, batches: Sequence[Any], config: TuneConfig | None = None) -> float:
    """Mean :func:`batch_loss` over ``batches`` in eval mode."""
    config = config or TuneConfig()
    was = student.training
    student.eval()
    try:
        losses = [float(batch_loss(student, teacher, b, config)) for b in batches]
    finally:
        student.train(was)
    return sum(losses) / max(len(losses), 1)


def trainable(model: nn.Module, train: str = "all") -> list[tuple[str, nn.Parameter]]:
    """The parameters that ``train`` selects (see :class:`~mpocompress.config.TuneConfig`).

    ``central``: the largest core of each MPO matrix (the middle one for balanced modes; for
    2 cores the bigger factor); ``outer``: its other cores. Raises :class:`ConfigError` when the
    choice selects nothing (``central``/``outer`` on a model without MPO layers).
    """
    if train == "all":
        return [(n, p) for n, p in model.named_parameters()]
    chosen = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, MPOMatrices):
            continue
        for w in module._shapes:
            cores = module.cores_of(w)
            centre = max(range(len(cores)), key=lambda k: (cores[k].numel(), -abs(k - (len(cores) - 1) / 2)))
            for k, c in enumerate(cores):
                if (k == centre) == (train == "central"):
                    prefix = f"{mod_name}." if mod_name else ""
                    chosen.append((f"{prefix}{w}_cores.{k}", c))
    if not chosen:
        raise ConfigError(f"--train {train} trains MPO cores, but the model has no MPO layer")
    return chosen


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries (``masks[name]`` False) of the named parameters, in place."""
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))


#: straight-through quantizer of one stored tensor: its values -> the values the codec would store
Quantizer = Callable[[torch.Tensor], torch.Tensor]


class GridQuantizer:
    """A quantizer onto a grid of values (a k-means codebook): ``q(v) = snap(grid, v)``. With
    :attr:`trainable` the grid's values are learned with the weights (Deep Compression's centroid
    fine-tuning: a centroid's gradient is the sum of the gradients of the weights that share it),
    while each weight keeps snapping to its nearest centroid (straight-through)."""

    def __init__(self, snap: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], grid: torch.Tensor, trainable: bool = False) -> None:
        self.snap = snap
        self.trainable = trainable
        self.grid = grid.detach().float().clone().requires_grad_(trainable)

    def values(self) -> torch.Tensor:
        """The grid, sorted along its last dimension when learned (training may swap two centroids;
        a codec's starting grid is sorted already)."""
        return self.grid.sort(dim=-1).values if self.trainable else self.grid

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.snap(self.values(), v)


class _FakeQuant:
    """Quantization-aware training by the straight-through estimator: inside :meth:`applied` each
    quantized parameter holds its quantized values (forward, backward and evaluation see what will
    be stored); outside, the full-precision values the optimizer updates. Trainable grids
    (:class:`GridQuantizer`) get their gradients by :meth:`grid_gradients`, inside :meth:`applied`
    after the backward pass, and are in :attr:`grids` for the optimizer."""

    def __init__(self, model: nn.Module, quantizers: dict[str, Quantizer] | None) -> None:
        named = dict(model.named_parameters())
        self.items = [(named[n], q) for n, q in (quantizers or {}).items() if n in named]
        self.grids = [q.grid for _, q in self.items if isinstance(q, GridQuantizer) and q.trainable]
        self._latent: list[torch.Tensor] = []

    @contextlib.contextmanager
    def applied(self):
        saved = [p.detach().clone() for p, _ in self.items]
        self._latent = saved
        with torch.no_grad():
            for p, q in self.items:
                p.copy_(q(p.detach()))
        try:
            yield
        finally:
            self._latent = []
            with torch.no_grad():
                for (p, _), v in zip(self.items, saved):
                    p.copy_(v)

    def grid_gradients(self) -> None:
        """Each trainable grid's gradient from its parameter's (the loss's gradient at the quantized
        values): the chain rule through ``snap`` at the latent values."""
        for (p, q), latent in zip(self.items, self._latent):
            if not (isinstance(q, GridQuantizer) and q.trainable) or p.grad is None:
                continue
            with torch.enable_grad():
                (g,) = torch.autograd.grad(q.snap(q.values(), latent), q.grid, grad_outputs=p.grad.to(latent.dtype))
            q.grid.grad = g if q.grid.grad is None else q.grid.grad + g

    def state(self) -> list[torch.Tensor]:
        """A copy of the learned grids (kept with the best checkpoint and across the rate probe)."""
        return [g.detach().clone() for g in self.grids]

    def load(self, state: list[torch.Tensor]) -> None:
        """Put back grids saved by :meth:`state`."""
        with torch.no_grad():
            for g, v in zip(self.grids, state):
                g.copy_(v)

    def finalize(self) -> None:
        """Leave every quantized parameter at its quantized values (what will be stored)."""
        with torch.no_grad():
            for p, q in self.items:
                p.copy_(q(p.detach()))


def lr_factor(done: float, warmup: float) -> float:
    """The learning-rate multiplier for a step after which a share ``done`` (in (0, 1]) of the
    training budget is used: linear warm-up over the first ``warmup`` share, then a half cosine down
    to 0.1 at the end. The budget is whichever of ``steps`` and ``time`` ends first (:func:`budget_used`),
    so a run bounded by ``time`` warms up and decays within its seconds."""
    done = min(max(done, 0.0), 1.0)
    if warmup > 0 and done <= warmup:
        return done / warmup
    progress = (done - warmup) / (1.0 - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def budget_used(step: int, steps: int, elapsed: float, per_step: float, seconds: float | None) -> float:
    """The share of the training budget used once ``step`` (1-based) of at most ``steps`` is done:
    by steps, or by time when ``seconds`` are given and run out first (``elapsed`` seconds so far,
    plus ``per_step``, the mean step so far, for the step about to run)."""
    done = step / steps
    if seconds is not None:
        done = max(done, (elapsed + per_step) / max(seconds, 1e-9))
    return min(done, 1.0)


class _Trainer:
    """One fine-tuning run's moving parts: the model (DDP-wrapped under torchrun), the batches, masks
    and fake quantization, and the held-out evaluation every rank agrees on."""

    def __init__(self, student, teacher, batches, val, config, masks, quantizers) -> None:
        from mpocompress.jobs.dist import agreed, rank_world

        self.student, self.val, self.config, self.agreed = student, val, config, agreed
        self.teacher = None if teacher is None else TeacherCache(teacher)
        selected = trainable(student, config.train)
        names = {n for n, _ in selected}
        self.grad_was = {n: p.requires_grad for n, p in student.named_parameters()}
        for n, p in student.named_parameters():
            p.requires_grad_(n in names)
        self.params = [p for _, p in selected]
        apply_masks(student, masks)
        named = dict(student.named_parameters())
        self.mask_of = [(named[n], m.to(named[n].dtype)) for n, m in masks.items() if n in names]
        self.quant = _FakeQuant(student, quantizers)
        rank, world = rank_world()
        self.world = world
        self.forward: nn.Module = student
        if world > 1 and self.params:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(student, find_unused_parameters=True)  # copies rank 0's values
            if len(batches) >= world:
                batches = batches[rank::world]
        self.batches = batches

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam over the trained parameters and the learned codebooks, these at ``GRID_LR_SCALE`` x
        the rate (a centroid moves every weight that shares it at once)."""
        from mpocompress.config import GRID_LR_SCALE

        groups = [{"params": self.params, "lr": lr, "scale": 1.0}]
        if self.quant.grids:
            groups.append({"params": self.quant.grids, "lr": lr * GRID_LR_SCALE, "scale": GRID_LR_SCALE})
        return torch.optim.Adam(groups, lr=lr)

    def evaluate(self) -> float:
        with self.quant.applied():
            return self.agreed(evaluate(self.student, self.teacher, self.val, self.config))

    def step(self, opt: torch.optim.Optimizer, index: int) -> float:
        with self.quant.applied():
            loss = batch_loss(self.forward, self.teacher, self.batches[index % len(self.batches)], self.config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self.quant.grid_gradients()
        for p, m in self.mask_of:  # pruned weights get no update (Adam would move them through momentum)
            if p.grad is not None:
                p.grad.mul_(m)
        opt.step()
        if self.mask_of:
            with torch.no_grad():
                for p, m in self.mask_of:
                    p.mul_(m)
        return float(loss.detach())

    def probe(self, start: dict[str, torch.Tensor], val_before: float) -> tuple[float, dict[str, float]]:
        """:data:`LR_CANDIDATES`, largest first, each for a few steps from ``start``, until one is worse
        than the rate before it once some rate has improved on the start (the held-out loss is taken
        to be unimodal in the rate, as in a learning-rate range test); then, while the largest rate
        tried is the best and helps, the next one up (x :data:`LR_STEP_UP`, to :data:`LR_PROBE_MAX`).
        Returns the rate with the lowest held-out loss (the smallest candidate when none improves on
        the start) and every rate's loss."""
        from mpocompress.config import LR_CANDIDATES, LR_PROBE_MAX, LR_PROBE_STEPS, LR_STEP_UP

        found: dict[float, float] = {}
        steps = max(2, min(LR_PROBE_STEPS, self.config.steps // 4))  # a short run gets a short probe
        grids = self.quant.state()
        for previous, lr in zip((None, *LR_CANDIDATES), LR_CANDIDATES):
            steps = self._probe_rate(lr, start, grids, steps, found)
            if previous is not None and found[lr] > found[previous] and min(found.values()) < val_before:
                break
        while True:
            best = min(found, key=lambda r: (found[r], r))
            up = float(f"{max(found) * LR_STEP_UP:.3g}")
            if best != max(found) or found[best] >= val_before or up > LR_PROBE_MAX * (1 + 1e-9):
                break
            steps = self._probe_rate(up, start, grids, steps, found)
        self.student.load_state_dict(start)
        self.quant.load(grids)
        return (best if found[best] < val_before else min(LR_CANDIDATES)), found

    def _probe_rate(self, lr: float, start: dict[str, torch.Tensor], grids: Any, steps: int, found: dict[float, float]) -> int:
        """``steps`` steps at ``lr`` (warming up) from ``start``; its held-out loss into ``found``.
        Returns the steps per rate from now on (fewer when the first step shows the probe would take
        over a quarter of ``time``)."""
        from mpocompress.config import LR_CANDIDATES

        self.student.load_state_dict(start)
        self.quant.load(grids)
        opt = self.optimizer(lr)
        self.student.train()
        i = 0
        while i < steps:
            for g in opt.param_groups:
                g["lr"] = g["scale"] * lr * (i + 1) / steps
            t0 = time.perf_counter()
            self.step(opt, i)
            if not found and i == 0 and self.config.time is not None:
                # the probe takes at most a quarter of --time (at least 2 steps per rate)
                per_step = self.agreed(time.perf_counter() - t0)
                steps = max(2, min(steps, int(0.25 * self.config.time / (per_step * len(LR_CANDIDATES)))))
            i += 1
        found[lr] = self.evaluate()
        return steps

    def close(self) -> None:
        for n, p in self.student.named_parameters():
            p.requires_grad_(self.grad_was[n])
        self.student.eval()


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Sequence[Any],
    *,
    val_batches: Sequence[Any] | None = None,
    config: TuneConfig | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: TuneProgress | None = None,
    quantizers: dict[str, Quantizer] | None = None,
    val_before: float | None = None,
    **overrides: Any,
) -> TuneResult:
    """Train ``student`` for a bounded number of steps/seconds against ``teacher``, in place.
    ``val_before``: the held-out loss of the start, when the caller has measured it already.

    Args:
        student: the compressed model (any ``nn.Module``; MPO layers train their cores).
        teacher: the reference model (frozen; None: task loss only, which needs targets).
        batches: training batches, cycled in order.
        val_batches: held-out batches for picking the best checkpoint (default: the training batches).
        config: a :class:`~mpocompress.config.TuneConfig`; keyword ``overrides`` replace its fields
            (``finetune(s, t, b, steps=100, lr=3e-4)``). ``lr=None`` probes the rate first.
        masks: ``{parameter name: bool mask}``; masked-out entries stay exactly zero (pruned models).
        progress: called after each step.
        quantizers: ``{parameter name: quantizer}``: quantization-aware training (straight-through);
            those parameters end at their quantized values, and every loss is measured with them.

    Training stops at ``steps``, at ``time`` seconds (the probe included), or after ``patience``
    held-out evaluations without a new best. Under an initialised ``torch.distributed`` group
    (``torchrun``) training is data-parallel: the student is wrapped in ``DistributedDataParallel``,
    each rank trains on every ``world``-th batch, rank 0's held-out loss decides, and every rank
    stops at the same step, so all ranks end with the same parameters.

    Returns:
        A :class:`TuneResult`. ``student`` ends with the best held-out parameters.
    """
    import dataclasses

    config = dataclasses.replace(config or TuneConfig(), **overrides)
    batches = list(batches)
    if not batches:
        raise ConfigError("fine-tuning needs at least one batch")
    val = list(val_batches) if val_batches is not None else batches
    if teacher is None and all(split_batch(b)[1] is None for b in batches):
        raise ConfigError("without a teacher, fine-tuning needs batches with targets")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    torch.manual_seed(config.seed)
    run = _Trainer(student, teacher, batches, val, config, masks or {}, quantizers)
    result = TuneResult(trained_params=sum(p.numel() for p in run.params))
    start = time.perf_counter()
    result.val_before = result.val_best = run.evaluate() if val_before is None else val_before
    best_state, best_grids = copy.deepcopy(student.state_dict()), run.quant.state()
    lr = config.lr
    if lr is None and config.steps > 0 and run.params:
        lr, result.lr_probe = run.probe(best_state, result.val_before)
    result.lr = lr
    opt = run.optimizer(lr or 1e-4)
    student.train()
    running, step, stale = math.nan, 0, 0
    train_start = time.perf_counter()  # the schedule spans what the probe left of --time
    seconds = None if config.time is None else config.time - (train_start - start)
    for step in range(1, config.steps + 1):
        elapsed = time.perf_counter() - train_start
        done = budget_used(step, config.steps, elapsed, elapsed / (step - 1) if step > 1 else 0.0, seconds)
        if run.world > 1 and seconds is not None:
            done = run.agreed(done)  # one rate on every rank (the ranks' clocks differ)
        for g in opt.param_groups:
            g["lr"] = g["scale"] * (lr or 1e-4) * lr_factor(done, config.warmup)
        lv = run.step(opt, step - 1)
        running = lv if math.isnan(running) else 0.9 * running + 0.1 * lv
        out_of_time = config.time is not None and time.perf_counter() - start >= config.time
        if run.world > 1 and config.time is not None:
            out_of_time = bool(run.agreed(float(out_of_time), rank0=False))
        info: dict[str, Any] = {"loss": running}
        if step % config.eval_every == 0 or step == config.steps or out_of_time:
            v = run.evaluate()
            result.history.append((step, running, v))
            info["val_loss"] = v
            stale += 1
            if v < result.val_best:
                result.val_best, result.best_step, stale = v, step, 0
                best_state, best_grids = copy.deepcopy(student.state_dict()), run.quant.state()
        info["best_val_loss"] = result.val_best
        if progress is not None:
            progress(step, config.steps, info)
        if out_of_time or (config.patience and stale >= config.patience):
            result.stopped_by = "time" if out_of_time else "no_improvement"
            break
    result.steps = step
    result.seconds = time.perf_counter() - start
    student.load_state_dict(best_state)
    run.quant.load(best_grids)
    run.quant.finalize()
    run.close()
    if result.steps > 0 and not result.improved:
        log.warning("fine-tuning did not improve the held-out loss (%.4g) in %d steps at lr %g: keeping the "
                    "model as it was before training", result.val_before, result.steps, lr or 0)  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------
# iterative pruning with knowledge distillation (IPKD)


def ipkd_schedule(sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each round: every round removes the same share of the weights still there,
    ``s_r = 1 - (1 - sparsity) ** (r / rounds)`` (our choice; the paper's schedule is not public)."""
    if rounds < 1:
        raise ConfigError(f"IPKD needs >= 1 round, got {rounds}")
    return [1.0 - (1.0 - sparsity) ** (r / rounds) for r in range(1, rounds + 1)]


def magnitude_masks(model: nn.Module, names: Sequence[str], sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Masks keeping the ``1 - sparsity`` largest magnitudes of each named parameter (``scope="layer"``)
    or over all of them at once (``"global"``). Zeros are the smallest magnitudes, so a mask computed
    on an already-pruned model keeps what was pruned pruned."""
    from mpocompress.codecs import magnitude_mask, magnitude_threshold

    params = dict(model.named_parameters())
    threshold = magnitude_threshold([params[n] for n in names], sparsity) if scope == "global" else None
    return {n: magnitude_mask(params[n].detach(), sparsity, threshold) for n in names}


@dataclass
class IPKDRound:
    """One IPKD round: the sparsity it pruned to, its teacher, and its training."""
    sparsity: float
    teacher_fingerprint: float
    tune: TuneResult

    def to_dict(self) -> dict[str, Any]:
        """The round as JSON-ready data (for the report)."""
        return {"sparsity": self.sparsity, "teacher_fingerprint": self.teacher_fingerprint, **self.tune.to_dict()}


def _fingerprint(model: nn.Module) -> float:
    """A number that changes when any parameter does (sum of |p| weighted by position)."""
    with torch.no_grad():
        return float(sum((p.detach().double().abs().reshape(-1) * (1 + i)).sum() for i, p in enumerate(model.parameters())))


def ipkd(
    model: nn.Module,
    names: Sequence[str],
    sparsity: float,
    rounds: int,
    batches: Sequence[Any],
    *,
    val_batches: Sequence[Any] | None = None,
    config: TuneConfig | None = None,
    scope: str = "layer",
    progress: TuneProgress | None = None,
) -> tuple[dict[str, torch.Tensor], list[IPKDRound]]:
    """Iterative pruning with knowledge distillation (Interspeech 2022), in place.

    Round ``r`` copies the current model as the teacher, prunes the named weights by magnitude to
    :func:`ipkd_schedule`'s ``r``-th sparsity, and fine-tunes the pruned model against that teacher
    (the model *before* this round's pruning) for ``config.steps / rounds`` steps (and
    ``config.time / rounds`` seconds).

    Returns:
        ``(masks, rounds)``: the final masks (``sparsity`` reached) and what each round did.
    """
    import dataclasses

    config = config or TuneConfig()
    per_round = dataclasses.replace(
        config,
        steps=max(1, config.steps // rounds) if config.steps else 0,
        time=None if config.time is None else config.time / rounds,
        ipkd=0,
    )
    history = []
    masks: dict[str, torch.Tensor] = {}
    for r, s in enumerate(ipkd_schedule(sparsity, rounds), start=1):
        teacher = copy.deepcopy(model).eval()
        masks = magnitude_masks(model, names, s, scope)
        apply_masks(model, masks)

        def report(step: int, total: int, info: dict[str, Any], r: int = r) -> None:
            if progress is not None:
                progress(step + (r - 1) * total, total * rounds, {**info, "round": r})

        res = finetune(model, teacher, batches, val_batches=val_batches, config=per_round, masks=masks, progress=report)
        history.append(IPKDRound(s, _fingerprint(teacher), res))
    return masks, history
