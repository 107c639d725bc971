"""Frozen configuration objects, stored as JSON in every output checkpoint.

No torch here: the CLI imports this module to validate options before paying for ``import torch``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from mpocompress.errors import ConfigError

#: core counts that ``cores="auto"`` chooses between (2 = plain truncated SVD)
AUTO_CORES: tuple[int, ...] = (2, 3, 4)
#: with ``cores="auto"`` and only ``bond_dim`` given, the per-layer parameter budget is what a
#: ``bond_dim`` MPO with this many cores costs; every candidate then gets that budget.
AUTO_REFERENCE_CORES = 3
#: the most cores an MPO may have (more modes than this gain nothing on real layer sizes)
MAX_CORES = 8
SVD_METHODS = ("auto", "full", "randomized")
def check_pattern(pattern: str) -> None:
    """Raise :class:`ConfigError` for a name pattern that is not a string or not a valid ``re:`` regex."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"a name pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"pattern {pattern!r} is not a valid regular expression ({e})") from None


@dataclass(frozen=True)
class MPOConfig:
    """How weight matrices become MPO cores.

    Exactly one way of choosing bond dimensions must be given: ``bond_dim`` (a maximum bond
    dimension), ``tol`` (relative Frobenius error per layer, split over the bonds so that the total
    bound holds) or ``ratio`` (dense/compressed parameters per layer). ``bond_dim`` and ``tol`` may be
    combined: the bond is then capped at ``bond_dim``.

    Args:
        bond_dim: maximum bond dimension, >= 1.
        tol: relative Frobenius error target per layer, in (0, 1).
        ratio: target compression ratio per layer (dense / compressed parameters), > 1.
        cores: number of cores (>= 2; 2 is a truncated SVD) or ``"auto"`` to pick per layer the core
            count in :data:`AUTO_CORES` with the least error at the layer's parameter budget.
        svd: ``"full"``, ``"randomized"`` (when the bond is known) or ``"auto"`` (randomized where
            the bond is small next to the matrix).
        prune: a pruning codec, ``"magnitude:SPARSITY"``, ``"channel:THETA"`` (see
            :mod:`mpocompress.codecs`) or ``"units:FRACTION"`` (whole hidden units, found from the
            model's code: :mod:`mpocompress.nn.units`), applied to what is stored (the dense weight, or
            the cores).
        quantize: a quantization codec, ``"kmeans:K"``, ``"int8"``, ``"seofp:E"``, ``"fp16"``, ``"bf16"``,
            applied after pruning.
        prune_scope: ``"layer"`` (each tensor to the sparsity) or ``"global"`` (one magnitude threshold
            over all selected tensors, reaching the sparsity overall).
        include: name patterns (globs, or ``re:REGEX``) of the tensors to compress; empty = all
            floating tensors with >= 2 dimensions.
        exclude: name patterns of tensors to leave untouched.
        seed: seed of the randomized SVD.
        als_sweeps: alternating-least-squares sweeps refining the cores after TT-SVD (data-free;
            lowers the weight error at the same bond dimensions, see :mod:`mpocompress.core.refine`).
            With a lossy ``quantize``/``prune`` on the cores, the cores are then quantized one at a
            time with an ALS refit of the others after each.
    """

    bond_dim: int | None = None
    tol: float | None = None
    ratio: float | None = None
    cores: int | str = "auto"
    svd: str = "auto"
    prune: str | None = None
    quantize: str | None = None
    prune_scope: str = "layer"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    als_sweeps: int = 0

    def __post_init__(self) -> None:
        # tuples, not lists, so the object stays hashable and immutable
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for key in ("ratio", "tol"):  # 3 and 3.0 are one setting (and one job fingerprint)
            value = getattr(self, key)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, key, float(value))
        if not self.mpo and self.prune is None and self.quantize is None:
            raise ConfigError(
                "give one of bond_dim (--bond-dim), tol (--tol) or ratio (--ratio), or a codec (--prune/--quantize)"
            )
        from mpocompress.codecs import parse_codec  # the codec registry (imports torch)

        for kind, text in (("prune", self.prune), ("quantize", self.quantize)):
            if text is None:
                continue
            try:
                codec = parse_codec(text)
            except ValueError as e:
                raise ConfigError(f"--{kind}: {e}") from None
            if codec.is_pruner != (kind == "prune"):
                raise ConfigError(f"--{kind}: {codec.name} is a {'pruning' if codec.is_pruner else 'quantization'} codec")
        if self.prune_scope not in ("layer", "global"):
            raise ConfigError(f"prune_scope must be 'layer' or 'global', got {self.prune_scope!r}")
        if self.mpo and self.prune is not None and self.prune.startswith(("channel", "units")):
            raise ConfigError("channel and unit pruning apply to dense weights; combine them with --quantize, not with MPO")
        if self.prune_scope == "global" and (self.mpo or self.prune is None or not self.prune.startswith("magnitude")):
            raise ConfigError("prune_scope 'global' needs --prune magnitude:S without MPO")
        if self.ratio is not None and (self.bond_dim is not None or self.tol is not None):
            raise ConfigError("ratio (--ratio) cannot be combined with bond_dim or tol")
        if self.bond_dim is not None and (not isinstance(self.bond_dim, int) or self.bond_dim < 1):
            raise ConfigError(f"bond dimension must be an integer >= 1, got {self.bond_dim!r}")
        if self.tol is not None and not (0.0 < self.tol < 1.0):
            raise ConfigError(f"tol must be in (0, 1), got {self.tol!r}")
        if self.ratio is not None and not (self.ratio > 1.0):
            raise ConfigError(f"ratio must be > 1, got {self.ratio!r}")
        if self.cores != "auto" and (
            not isinstance(self.cores, int) or isinstance(self.cores, bool) or not 2 <= self.cores <= MAX_CORES
        ):
            raise ConfigError(f"cores must be an integer in 2..{MAX_CORES} or 'auto', got {self.cores!r}")
        for pattern in (*self.include, *self.exclude):
            check_pattern(pattern)
        if self.svd not in SVD_METHODS:
            raise ConfigError(f"svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}")
        if not isinstance(self.als_sweeps, int) or self.als_sweeps < 0:
            raise ConfigError(f"als_sweeps must be an integer >= 0, got {self.als_sweeps!r}")
        if self.als_sweeps and not self.mpo:
            raise ConfigError("ALS refinement (--als) refines MPO cores: give --bond-dim, --tol or --ratio too")

    @property
    def mpo(self) -> bool:
        """MPO is applied when a bond dimension, tolerance or ratio is given."""
        return self.bond_dim is not None or self.tol is not None or self.ratio is not None

    @property
    def chain(self) -> list:
        """The codecs applied to each stored tensor, in order (pruner, then quantizer), as codec
        objects (:mod:`mpocompress.codecs`)."""
        from mpocompress.codecs import parse_codec

        return [parse_codec(t) for t in (self.prune, self.quantize) if t is not None]

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (stored in every output)."""
        d = dataclasses.asdict(self)
        d["include"] = list(self.include)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MPOConfig:
        """The config from :meth:`to_dict` data (unknown fields are an error)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown MPOConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_json(self) -> str:
        """The config as canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> MPOConfig:
        """The config from :meth:`to_json` text."""
        return cls.from_dict(json.loads(s))


@dataclass(frozen=True)
class Gates:
    """Quality gates checked after a conversion (CI fails the job when they are missed)."""

    max_error: float | None = None
    min_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_error is not None and self.max_error < 0:
            raise ConfigError(f"max_error must be >= 0, got {self.max_error!r}")
        if self.min_ratio is not None and self.min_ratio <= 0:
            raise ConfigError(f"min_ratio must be > 0, got {self.min_ratio!r}")




TRAIN_CHOICES = ("all", "central", "outer")
TASK_LOSSES = ("mse", "cross_entropy")
KD_LOSSES = ("mse", "kl", "stft")
#: (FFT size, hop, window length) of ``kd_loss="stft"``: the three resolutions of the multi-resolution
#: STFT loss of Demucs's speech denoiser at 16 kHz (our choice at any sample rate; a resolution whose
#: window is longer than the output is skipped)
STFT_RESOLUTIONS = ((512, 50, 240), (1024, 120, 600), (2048, 240, 1200))
QAT_GRIDS = ("trained", "fixed")
CURVATURES = ("auto", "kfac", "none")
#: learning rate of learned k-means centroids (``qat_grid="trained"``) relative to the weights' (our
#: choice: a centroid moves every weight that shares it)
GRID_LR_SCALE = 0.1


#: learning rates tried by the probe of ``TuneConfig(lr=None)``, largest first (our choice: the
#: 1e-3 our own models were tuned with, down to 3e-5 for converged pretrained models)
LR_CANDIDATES = (1e-3, 3e-4, 1e-4, 3e-5)
#: when the largest rate probed is the best (and helps), the probe goes on up by this factor while each
#: step up is better, to at most :data:`LR_PROBE_MAX` (our choice: a short probe that still improves at
#: its top edge has not found the best rate -- Conv-TasNet at 6.25 % picked 1e-3 by 0.90 against 1.23
#: at 3e-4)
LR_STEP_UP = 3.0
LR_PROBE_MAX = 1e-2
#: optimizer steps per probed learning rate (at most a quarter of ``steps``, at least 2; fewer when the
#: probe would take over a quarter of ``time``)
LR_PROBE_STEPS = 10


@dataclass(frozen=True)
class TuneConfig:
    """Brief fine-tuning of the compressed model against the dense one (knowledge distillation).

    Args:
        steps: optimizer steps at most.
        time: wall-clock seconds at most (None: no limit); whichever of ``steps``/``time`` comes first.
        lr: Adam learning rate; None ("auto", the default): a short probe of
            :data:`LR_CANDIDATES` from the same start picks the one with the lowest held-out loss
            (a converged pretrained model can be wrecked by a rate that suits a model we trained).
        warmup: share of the training budget over which the rate rises linearly from 0; it then
            decays on a half cosine to 10 % at the end. The budget is ``steps`` or, when it runs out
            first, ``time`` (less the probe's share): a run bounded by seconds follows its clock.
        patience: stop after this many held-out evaluations without a new best (0: never).
        train: ``"all"`` parameters, only the ``"central"`` core of each MPO matrix (its largest core),
            or only the ``"outer"`` cores (the MPO papers' auxiliary tensors); with ``central``/``outer``
            everything else is frozen.
        kd_weight: weight of the distillation loss (between student and teacher outputs); the task
            loss against the batch's targets, when it has them, gets ``1 - kd_weight``.
        kd_loss: the distillation loss: ``"mse"`` between the outputs, or ``"kl"``: KL divergence of
            the student's softmax from the teacher's over the last dimension at ``temperature``, times
            ``temperature**2`` (Hinton et al.; for logits: language models, classifiers), or
            ``"stft"``: a multi-resolution STFT loss over the last dimension (spectral convergence
            plus L1 of log magnitudes, averaged over :data:`STFT_RESOLUTIONS`; for waveform outputs:
            speech enhancers, vocoders), which weighs quiet time-frequency regions as a perceptual
            metric does, where MSE on the waveform follows the loudest samples.
        temperature: softmax temperature of ``kd_loss="kl"``.
        kd_hidden: weight of an added hidden-state term: the mean over the model's blocks (the
            children of its longest ``nn.ModuleList``: a transformer's layers) of the MSE between
            student's and teacher's block outputs, each divided by the teacher's mean square (0: off).
        task_loss: ``"mse"`` or ``"cross_entropy"`` (targets as class indices).
        eval_every: steps between held-out evaluations (the best checkpoint by held-out loss is kept).
        batch_size: batch size when a data file holds one ``inputs`` tensor to split.
        val_fraction: share of the batches held out when no separate held-out data is given.
        ipkd: rounds of iterative pruning with distillation (needs ``prune="magnitude:S"``); each round
            prunes to the next sparsity of the schedule and trains with the model from before that
            round's pruning as the teacher. 0: prune once, then fine-tune.
        seed: seed of parameter init order, batch order and dropout.
        qat_grid: quantization-aware training of k-means-coded weights: ``"fixed"`` (the starting
            codebook; weights only move between centroids) or ``"trained"`` (the centroids are learned
            with the weights, at ``GRID_LR_SCALE`` x the rate, as in Deep Compression's weight-sharing
            fine-tuning). Fixed is the default: on Resemblyzer and Conv-TasNet at 6.25 % of the file
            learned codebooks ended with a higher held-out loss (docs/methods.md).
        curvature: with calibration, ``"kfac"`` weights each SVD or MPO layer's fit by the curvature
            of the distillation loss at its outputs (a sampled Fisher, one backward pass of the dense
            model: the K-FAC estimate of the loss increase instead of the layer's output error),
            ``"none"`` (the output error alone, SVD-LLM's objective), or ``"auto"``: with
            ``kd_loss="kl"`` both, keeping the one with the lower held-out distillation loss (twice
            the calibration time), else ``"none"`` (measured: docs/methods.md).
    """

    steps: int = 200
    time: float | None = None
    lr: float | None = None
    warmup: float = 0.05
    patience: int = 5
    train: str = "all"
    kd_weight: float = 1.0
    kd_loss: str = "mse"
    temperature: float = 1.0
    kd_hidden: float = 0.0
    task_loss: str = "mse"
    eval_every: int = 20
    batch_size: int = 16
    val_fraction: float = 0.1
    ipkd: int = 0
    seed: int = 0
    qat_grid: str = "fixed"
    curvature: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {self.steps!r}")
        if self.time is not None and not self.time > 0:
            raise ConfigError(f"time must be > 0 seconds, got {self.time!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"patience must be an integer >= 0, got {self.patience!r}")
        if self.train not in TRAIN_CHOICES:
            raise ConfigError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {self.train!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError(f"kd_weight must be in [0, 1], got {self.kd_weight!r}")
        if self.kd_loss not in KD_LOSSES:
            raise ConfigError(f"kd_loss must be one of {', '.join(KD_LOSSES)}, got {self.kd_loss!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.kd_hidden, (int, float)) and 0 <= self.kd_hidden < float("inf")):
            raise ConfigError(f"kd_hidden must be a finite number >= 0, got {self.kd_hidden!r}")
        if self.qat_grid not in QAT_GRIDS:
            raise ConfigError(f"qat_grid must be one of {', '.join(QAT_GRIDS)}, got {self.qat_grid!r}")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"curvature must be one of {', '.join(CURVATURES)}, got {self.curvature!r}")
        if self.task_loss not in TASK_LOSSES:
            raise ConfigError(f"task_loss must be one of {', '.join(TASK_LOSSES)}, got {self.task_loss!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ConfigError(f"eval_every must be an integer >= 1, got {self.eval_every!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not isinstance(self.ipkd, int) or self.ipkd < 0:
            raise ConfigError(f"ipkd must be an integer >= 0 (rounds), got {self.ipkd!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fine-tuning settings as JSON-ready data (stored in the report)."""
        return dataclasses.asdict(self)


_BOND_CHOICES = ("bond_dim", "tol", "ratio")


@dataclass(frozen=True)
class Recipe:
    """Per-layer choices: the first rule whose pattern matches a tensor name overrides the base config.

    Each rule is ``(patterns, overrides)``; ``overrides`` holds :class:`MPOConfig` fields, ``"none"``
    clears a codec, and ``skip = true`` leaves the tensor untouched. Setting one of ``bond_dim``, ``tol``
    or ``ratio`` clears the base config's other two.
    """

    rules: tuple[tuple[tuple[str, ...], tuple[tuple[str, Any], ...]], ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> tuple[dict[str, Any], Recipe]:
        """``({default overrides}, Recipe)`` from a parsed TOML document (``[default]``, ``[[layers]]``)."""
        unknown = set(data) - {"default", "layers"}
        if unknown:
            raise ConfigError(f"recipe: unknown tables {', '.join(sorted(unknown))} (expected [default] and [[layers]])")
        default = dict(data.get("default", {}))
        rules = []
        fields = {f.name for f in dataclasses.fields(MPOConfig)} - {"include", "exclude"}
        for i, rule in enumerate(data.get("layers", [])):
            rule = dict(rule)
            match = rule.pop("match", None)
            if not match:
                raise ConfigError(f"recipe: [[layers]] rule {i + 1} has no 'match'")
            patterns = (match,) if isinstance(match, str) else tuple(match)
            for pattern in patterns:
                check_pattern(pattern)
            bad = set(rule) - fields - {"skip"}
            if bad:
                raise ConfigError(f"recipe: [[layers]] rule {i + 1} has unknown keys {', '.join(sorted(bad))}")
            rules.append((patterns, tuple(sorted(rule.items()))))
        bad = set(default) - fields
        if bad:
            raise ConfigError(f"recipe: [default] has unknown keys {', '.join(sorted(bad))}")
        return default, cls(tuple(rules))

    def config_for(self, name: str, base: MPOConfig) -> MPOConfig | None:
        """The config for tensor ``name`` (None: skip it)."""
        from mpocompress.select import match

        for patterns, overrides in self.rules:
            if any(match(name, p) for p in patterns):
                return apply_overrides(base, dict(overrides), where=f"recipe rule for {name!r}")
        return base

    def to_list(self) -> list[dict[str, Any]]:
        """The rules as JSON-ready data (``[{match: [...], **overrides}]``)."""
        return [{"match": list(p), **dict(o)} for p, o in self.rules]


def apply_overrides(base: MPOConfig, overrides: dict[str, Any], where: str = "recipe") -> MPOConfig | None:
    """``base`` with ``overrides`` applied (see :class:`Recipe`); None when ``skip`` is set."""
    overrides = dict(overrides)
    if overrides.pop("skip", False):
        return None
    if any(k in overrides for k in _BOND_CHOICES):
        overrides = {**{k: None for k in _BOND_CHOICES}, **overrides}
    for k in ("prune", "quantize"):
        if overrides.get(k) == "none":
            overrides[k] = None
    try:
        return dataclasses.replace(base, **overrides)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


__all__ = ["AUTO_CORES", "AUTO_REFERENCE_CORES", "Gates", "MPOConfig", "Recipe", "TuneConfig", "apply_overrides"]
