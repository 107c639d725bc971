"""Fine-tuning inside a conversion: load the checkpoint into the user's model, compress and prune it
in memory, train it against the dense model (:mod:`mpocompress.jobs.finetune`), and hand back what
to write (trained tensors and, per weight, the plan fine-tuning settled).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from mpocompress.codecs import Codec, magnitude_threshold
from mpocompress.config import MPOConfig, Recipe, TuneConfig
from mpocompress.core.tt import TTMatrix
from mpocompress.errors import ConfigError, InputError
from mpocompress.format import core_name, untie
from mpocompress.io import Checkpoint, fill_tied
from mpocompress.jobs.plan import LayerPlan

log = logging.getLogger(__name__)


def finetune_in_memory(
    ckpt: Checkpoint,
    layers: list[str],
    config: MPOConfig,
    recipe: Recipe | None,
    tune: TuneConfig,
    model: Any,
    train: list[Any],
    val: list[Any] | None,
    progress: Any,
    grams: dict[str, torch.Tensor] | None = None,
    sequential: bool | str = False,
    calibration_samples: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, LayerPlan], dict[str, Any]]:
    """Load the checkpoint into ``model``, compress/prune it in memory, fine-tune it against the
    dense model, and return what to write: ``(trained tensors by name, plans by weight, summary)``.
    ``grams``: recorded inputs by weight name; those layers start from cores fitted to them.
    ``sequential``: fit each layer to its inputs in the model compressed so far
    (:func:`mpocompress.jobs.calibrate.compress_sequentially_`; ``grams`` is updated with them), to
    the dense layer's outputs (True) or to its own (``"plain"``)."""
    import copy

    from torch import nn

    from mpocompress.jobs.finetune import (
        apply_masks,
        evaluate,
        finetune,
        ipkd,
        magnitude_masks,
        split_batch,
    )

    dense, teacher, student, train, val = _load_models(ckpt, model, train, val, tune)
    start = time.perf_counter()
    rows, curvature = _calibrated_student(student, teacher, config, recipe, layers, train, val, grams, sequential, calibration_samples, tune)
    calibration = _sequential_summary(sequential, train, calibration_samples, grams, time.perf_counter() - start)

    # what gets pruned: the weight, or its cores when it became an MPO
    params = dict(student.named_parameters())
    pruned: dict[str, tuple[str, Codec]] = {}  # parameter -> (weight name, pruner)
    for name in layers:
        cfg = config if recipe is None else recipe.config_for(name, config)
        pruners = [c for c in (cfg.chain if cfg is not None else []) if c.is_pruner]
        if not pruners:
            continue
        row = rows.get(name)
        stored = [core_name(name, k) for k in range(len(row["bond_dims"]) + 1)] if row and row["status"] == "mpo" else [name]
        pruned.update({s: (name, pruners[0]) for s in stored if s in params})
    units = {c.param for _, c in pruned.values() if c.name == "units"}
    unit_summary: dict[str, Any] = {}
    if units:
        from mpocompress.nn.units import find_unit_groups, unit_masks

        if len(units) > 1:
            raise ConfigError("one --prune units:FRACTION for all weights (a recipe may not vary it)")
        groups = find_unit_groups(student)
        umasks, removed = unit_masks(student, units.pop(), groups)
        unit_summary = {g.name: {"size": g.size, "removed": len(removed.get(g.name, []))} for g in groups}
        if not groups:
            log.warning("--prune units: no hidden units are removable in this model (see mpocompress.nn.units)")
        # every tensor a removed unit touches (biases and unselected weights too) keeps its zeros
        for p in [p for p, (_, c) in pruned.items() if c.name == "units"]:
            del pruned[p]
    kd_only = dataclasses.replace(tune, kd_weight=1.0)
    has_targets = any(split_batch(b)[1] is not None for b in val)
    task_only = dataclasses.replace(tune, kd_weight=0.0)

    def losses(m: nn.Module, quantizers: dict[str, Any] | None = None) -> dict[str, float]:
        from mpocompress.jobs.finetune import _FakeQuant

        with _FakeQuant(m, quantizers).applied():
            out = {"kd": evaluate(m, teacher, val, kd_only)}
            if has_targets:
                out["task"] = evaluate(m, None, val, task_only)
        return out

    if tune.ipkd:
        if unit_summary:
            raise ConfigError("--ipkd prunes by magnitude; it does not combine with --prune units")
        codecs = {c for _, c in pruned.values()}
        if not pruned or any(c.name != "magnitude" for c in codecs) or len(codecs) > 1:
            raise ConfigError("--ipkd needs one --prune magnitude:SPARSITY for every pruned weight")
        sparsity = next(iter(codecs)).param
        one_shot = copy.deepcopy(student)
        apply_masks(one_shot, magnitude_masks(one_shot, list(pruned), sparsity, config.prune_scope))
        before = losses(one_shot)
        del one_shot
        masks, rounds = ipkd(student, list(pruned), sparsity, tune.ipkd, train, val_batches=val, config=tune,
                             scope=config.prune_scope, progress=progress)  # fmt: skip
        result: dict[str, Any] = {"rounds": [r.to_dict() for r in rounds]}
        steps = sum(r.tune.steps for r in rounds)
        seconds = sum(r.tune.seconds for r in rounds)
    else:
        threshold = None
        if config.prune_scope == "global" and pruned:
            threshold = magnitude_threshold([params[p] for p in pruned], next(iter(pruned.values()))[1].param)
        masks = {p: codec.mask(params[p].detach(), threshold) for p, (_, codec) in pruned.items()}
        if unit_summary:
            masks.update(umasks)
        apply_masks(student, masks)
        quantizers = _quantizers(student, layers, config, recipe, rows, masks, grams or {}, trained_grids=tune.qat_grid == "trained")
        before = losses(student, quantizers)
        res = finetune(student, teacher, train, val_batches=val, config=tune, masks=masks, progress=progress,
                       quantizers=quantizers, val_before=None if has_targets else before["kd"])  # fmt: skip
        result = res.to_dict()
        steps, seconds = res.steps, res.seconds
    after = losses(student) if steps else before  # (no step taken: the model is the start, quantized as measured)
    summary: dict[str, Any] = {
        "config": tune.to_dict(), "train_batches": len(train), "val_batches": len(val), "steps": steps, "seconds": round(seconds, 3),
        "val_kd_loss": {"compressed": before["kd"], "finetuned": after["kd"]},
        **({"val_task_loss": {"dense": evaluate(teacher, None, val, task_only), "compressed": before["task"], "finetuned": after["task"]}}
           if has_targets else {}),
        **result, **({"units": unit_summary} if unit_summary else {}),
        **({"calibration": calibration} if calibration is not None else {}), **({"curvature": curvature} if curvature else {}),
    }  # fmt: skip
    sd = student.state_dict()
    tensors = {n: sd[n].detach().to(dense[n].dtype) for n in dense if n in sd}
    plans = _plans(student, layers, config, recipe, rows, masks, dense)
    return tensors, plans, summary


def _sequential_summary(sequential: bool | str, train: list[Any], cap: int | None, grams: dict[str, Any] | None,
                        seconds: float) -> dict[str, Any] | None:  # fmt: skip
    """The report's ``calibration`` object of a sequential calibration (it recorded the inputs itself)."""
    if not sequential:
        return None
    from mpocompress.jobs.finetune import split_batch

    samples = sum(split_batch(b)[0][0].shape[0] for b in train)
    return {"mode": "sequential-plain" if sequential == "plain" else "sequential",
            "samples": samples if cap is None else min(samples, cap), "weights": len(grams or {}), "seconds": round(seconds, 3)}  # fmt: skip


def _calibrated_student(student: Any, teacher: Any, config: MPOConfig, recipe: Recipe | None, layers: list[str], train: list[Any],
                        val: list[Any], grams: dict[str, torch.Tensor] | None, sequential: bool | str, samples: int | None,
                        tune: TuneConfig) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:  # fmt: skip
    """:func:`_compress_student` with the ``tune.curvature`` choice: ``"kfac"`` weights each SVD
    layer's fit by the loss's curvature at its outputs (one sampled backward pass of the dense model
    over the calibration batches); ``"auto"``, with a KL (logit) distillation loss, compresses a copy
    both ways and keeps the one with the lower held-out distillation loss, and with any other loss
    is ``"none"`` (the curvature helped a language model and hurt MiniLM, Resemblyzer and Conv-TasNet,
    all distilled by MSE: docs/methods.md). Returns ``(rows, the choice's record or None)``."""
    import copy

    data_aware = bool(sequential or grams)
    if tune.curvature == "auto" and tune.kd_loss != "kl":
        tune = dataclasses.replace(tune, curvature="none")
    out_grams = None
    if tune.curvature in ("kfac", "auto") and data_aware:
        from mpocompress.jobs.calibrate import record_output_curvature

        t0 = time.perf_counter()
        out_grams = record_output_curvature(teacher, train, weights=set(layers), kd_loss=tune.kd_loss, max_samples=samples, seed=tune.seed)
        log.info("output curvature of %d weights in %.1fs", len(out_grams), time.perf_counter() - t0)
    if tune.curvature != "auto" or not out_grams:
        rows = _compress_student(student, teacher, config, recipe, layers, train, grams, sequential, samples, out_grams)
        return rows, ({"chosen": tune.curvature} if data_aware and out_grams else None)
    from mpocompress.jobs.finetune import evaluate

    kd = dataclasses.replace(tune, kd_weight=1.0)
    other = copy.deepcopy(student)
    other_grams = dict(grams) if grams is not None else None
    rows = _compress_student(student, teacher, config, recipe, layers, train, grams, sequential, samples, out_grams)
    plain = _compress_student(other, teacher, config, recipe, layers, train, other_grams, sequential, samples, None)
    losses = {"kfac": evaluate(student, teacher, val, kd), "none": evaluate(other, teacher, val, kd)}
    chosen = "kfac" if losses["kfac"] <= losses["none"] else "none"
    log.info("--curvature auto: held-out distillation loss %.4g with the curvature, %.4g without: %s", losses["kfac"], losses["none"], chosen)
    if chosen == "none":  # the other student's modules, in place (``cores="auto"`` may have chosen other core counts)
        for attr in ("_parameters", "_buffers", "_modules"):
            setattr(student, attr, getattr(other, attr))
        rows = plain
        if grams is not None:
            grams.clear()
            grams.update(other_grams or {})
    return rows, {"chosen": chosen, "val_kd_loss": losses}


def _compress_student(student: Any, teacher: Any, config: MPOConfig, recipe: Recipe | None, layers: list[str], train: list[Any],
                      grams: dict[str, torch.Tensor] | None, sequential: bool | str, samples: int | None,
                      out_grams: dict[str, torch.Tensor] | None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """MPO cores for the student in memory (codecs come later), by weight name: fitted to recorded
    inputs, sequentially (``grams`` is then updated with the inputs used) or to the dense ones;
    ``out_grams``: weighted by the loss's curvature at those weights' outputs."""
    if sequential:
        from mpocompress.jobs.calibrate import compress_sequentially_

        seq_rows, seq_grams = compress_sequentially_(student, teacher, config, recipe, layers, train, samples, correct=sequential != "plain",
                                                     out_grams=out_grams)  # fmt: skip
        if grams is not None:
            grams.update(seq_grams)  # the write (GPTQ of what training left) sees the same inputs
        return {r["name"]: r for r in seq_rows}
    from mpocompress.nn.surgery import compress_

    return {r["name"]: r for r in compress_(student, config, recipe=recipe, names=set(layers), include=(), exclude=(), codecs=False, grams=grams,
                                            out_grams=out_grams)}  # fmt: skip


def _load_models(
    ckpt: Checkpoint, model: Any, train: list[Any], val: list[Any] | None, tune: TuneConfig
) -> tuple[dict[str, torch.Tensor], Any, Any, list[Any], list[Any]]:
    """Check the user's model against the checkpoint and load it: ``(dense tensors, teacher, student,
    train batches, held-out batches)`` (a share of ``train`` is held out when ``val`` is None)."""
    import copy

    from torch import nn

    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model must give an nn.Module, got {type(model).__name__}")
    if val is None:
        if len(train) < 2:
            raise ConfigError(f"fine-tuning needs at least 2 batches (one is held out), got {len(train)}")
        n_val = max(1, round(tune.val_fraction * len(train)))
        train, val = train[:-n_val], train[-n_val:]
    own = model.state_dict()
    dense = fill_tied(own, untie({"tied": ckpt.tied}, {n: ckpt.get(n) for n in ckpt.keys()}))
    missing = [k for k in own if k not in dense]
    if missing:
        raise InputError(f"{ckpt.path}: lacks {len(missing)} tensor(s) the --model has, e.g. {missing[0]!r}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(dense[k].shape):
            raise InputError(f"{ckpt.path}: {k} has shape {list(dense[k].shape)} but the --model's is {list(v.shape)}")
    extra = [k for k in dense if k not in own]
    if extra:
        log.warning("%d checkpoint tensor(s) are not in the --model and are written unchanged, e.g. %r", len(extra), extra[0])
    model.load_state_dict({k: dense[k] for k in own}, strict=True)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    return dense, teacher, student, train, val


def _plans(
    student: Any,
    layers: list[str],
    config: MPOConfig,
    recipe: Recipe | None,
    rows: dict[str, dict[str, Any]],
    masks: dict[str, torch.Tensor],
    dense: dict[str, torch.Tensor],
) -> dict[str, LayerPlan]:
    """What fine-tuning settled for each selected weight: its trained cores (or none), the MPO
    decision, and the masks of the tensors it stores."""
    plans: dict[str, LayerPlan] = {}
    modules = dict(student.named_modules())
    for name in layers:
        row = rows.get(name)
        plan = LayerPlan(decided=row is not None)
        if row is not None:
            plan.candidates, plan.reason, plan.fit, plan.codes = row["candidates"], row["reason"], row.get("fit"), row.get("codes")
            if row["status"] == "mpo":
                mod_name, _, w = name.rpartition(".")
                module = modules[mod_name]
                plan.tt = TTMatrix([c.detach().clone() for c in module.cores_of(w)], module._shapes[w])
        prefix = f"{name}_cores." if plan.tt is not None else None
        plan.masks = {p: m for p, m in masks.items() if p == name or (prefix and p.startswith(prefix))}
        cfg = config if recipe is None else recipe.config_for(name, config)
        if cfg is not None and any(c.name == "units" for c in cfg.chain) and name not in plan.masks:
            plan.masks[name] = torch.ones(dense[name].shape, dtype=torch.bool)  # no removable unit touches it
        plans[name] = plan
    return plans


def _quantizers(
    student: Any,
    layers: list[str],
    config: MPOConfig,
    recipe: Recipe | None,
    rows: dict[str, dict[str, Any]],
    masks: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    trained_grids: bool = False,
) -> dict[str, Any]:
    """A straight-through quantizer per stored parameter whose chain quantizes (quantization-aware
    fine-tuning): a grid codec snaps to the grid of the starting values (a k-means codebook, fixed
    unless ``trained_grids``; per-row int8 scales, fixed); other codecs (casts, SEOFP)
    round-trip through the codec. A plain weight with recorded inputs starts from its GPTQ
    quantization on that grid."""
    from mpocompress.codecs import decode, encode, split_chain
    from mpocompress.jobs.calibrate import transposed_weights
    from mpocompress.jobs.plan import compensates, gptq_codec

    params = dict(student.named_parameters())
    transposed = transposed_weights(student)
    out: dict[str, Any] = {}
    for name in layers:
        cfg = config if recipe is None else recipe.config_for(name, config)
        if cfg is None or not cfg.chain:
            continue
        _, quant = split_chain(cfg.chain)
        if quant is None:
            continue
        row = rows.get(name)
        mpo = row is not None and row["status"] == "mpo"
        stored = [core_name(name, k) for k in range(len(row["bond_dims"]) + 1)] if mpo else [name]
        core_grids = {}
        if mpo and compensates(quant, len(stored)) and name in grams and name not in transposed and not any(s in masks for s in stored):
            core_grids = _compensate_cores(student, name, [params.get(s) for s in stored], quant, grams[name], row)
        for pname in (s for s in stored if s in params):
            p, mask = params[pname], masks.get(pname)
            if not quant.has_grid:
                out[pname] = lambda v, q=quant: decode(*encode(v, [q]))
                continue
            m = p.detach().reshape(p.shape[0], -1) if mask is None else p.detach()[mask.bool()].reshape(1, -1)
            gram = grams.get(name) if not mpo and mask is None and name not in transposed else None
            if mpo and stored.index(pname) in core_grids:
                grid = core_grids[stored.index(pname)]
            elif gram is not None and tuple(gram.shape) == (m.shape[1], m.shape[1]):
                q, grid = gptq_codec(m, gram, quant)
                with torch.no_grad():
                    p.copy_(q.reshape(p.shape))
            else:
                grid = quant.grid(m)
            out[pname] = _grid_quantizer(quant, grid, mask, trained_grids)
    return out


def _compensate_cores(student: Any, name: str, cores: list[Any], quant: Codec, gram: torch.Tensor, row: dict[str, Any]) -> dict[int, Any]:
    """An MPO layer's cores (its parameters ``cores``) replaced by their quantization with error
    compensation on its recorded inputs (:func:`mpocompress.jobs.plan.compensated_cores`, aiming at
    the function the fitted cores compute), where that beats rounding each core on those inputs;
    ``row["codes"]`` says which. Returns the grid of each core by index, for its quantizer
    ({} where rounding was kept)."""
    from mpocompress.codecs import decode, encode
    from mpocompress.jobs.plan import codes_outcome, compensated_cores

    mod_name, _, w = name.rpartition(".")
    shape = student.get_submodule(mod_name)._shapes[w]
    if any(c is None for c in cores) or tuple(gram.shape) != (shape[1], shape[1]):
        return {}
    tt = TTMatrix([c.detach() for c in cores], shape)
    target = tt.to_matrix()
    grids: dict[int, Any] = {}
    new, method = compensated_cores(target, tt, quant, gram, grids)
    rounded = [decode(*encode(c.detach(), [quant], grid=quant.grid(c.detach().reshape(c.shape[0], -1)))) for c in cores]
    outcome = codes_outcome(target, rounded, new, gram, method)
    row["codes"] = outcome
    if not outcome["kept"]:
        return {}
    with torch.no_grad():
        for c, v in zip(cores, new):
            c.copy_(v.to(c.dtype))
    return grids


def _grid_quantizer(quant: Codec, grid: Any, mask: torch.Tensor | None, trained: bool) -> Any:
    """``values -> values on grid`` for a whole stored tensor (rows as the codec stores them). A
    codebook (a tensor grid: k-means) is a :class:`~mpocompress.jobs.finetune.GridQuantizer`,
    learned with the weights when ``trained``; other grids (int8's scales) stay fixed."""
    from mpocompress.jobs.finetune import GridQuantizer

    def snap(g: Any, v: torch.Tensor) -> torch.Tensor:
        if mask is None:
            m = v.reshape(v.shape[0], -1)
            return quant.snap(g, m.T).T.reshape(v.shape)
        keep = mask.bool()
        return torch.zeros_like(v).index_put((keep,), quant.snap(g, v[keep].reshape(-1, 1)).reshape(-1).to(v.dtype))

    if isinstance(grid, torch.Tensor):
        return GridQuantizer(snap, grid, trainable=trained)
    return lambda v: snap(grid, v)


def calibrate_checkpoint(
    ckpt: Any,
    model: Any,
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

    from mpocompress.jobs.calibrate import gram_ok, record_grams, thin_inputs

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
        "weights_with_fewer_rows_than_inputs": thin_inputs(info["rows"], grams),
        "seconds": round(time.perf_counter() - start, 3),
    }
