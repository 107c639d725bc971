"""``convert``: a dense checkpoint in, a compressed checkpoint and its report out.

Walks a checkpoint one group of tensors at a time (reading lazily through :mod:`mpocompress.io`),
hands each selected weight to :func:`mpocompress.jobs.plan.compress_tensor`, keeps finished groups in
the work folder (:mod:`mpocompress.jobs.workdir`) so an interrupted run resumes, and writes the output
through :mod:`mpocompress.format`. Output format: docs/format.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mpocompress.config import MAX_CORES, MPOConfig, Recipe, TuneConfig
from mpocompress.errors import ConfigError, InputError, Interrupted, OutputError
from mpocompress.format import core_name, file_metadata, part_suffixes
from mpocompress.io import (
    IN_PLACE,
    Checkpoint,
    check_output,
    open_checkpoint,
    path_size,
    side_files,
)
from mpocompress.jobs.dist import barrier, rank_world, shared_error, together
from mpocompress.jobs.plan import (
    DEFAULT_MAX_SHARD_BYTES,
    GROUP_MAX_BYTES,
    LayerPlan,
    Progress,
    check_output_name,
    global_threshold,
    plan_groups,
    select_layers,
)
from mpocompress.jobs.tune import finetune_in_memory
from mpocompress.jobs.workdir import GroupStore, OutputLock
from mpocompress.jobs.workers import (
    Job,
    convert_group,
    job_fingerprint,
    one_thread,
    worker_init,
    worker_run,
)
from mpocompress.report import LayerRow, Report

log = logging.getLogger(__name__)

































def convert(
    input_path: str | Path,
    output_path: str | Path,
    config: MPOConfig,
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
    recipe: Recipe | None = None,
    activations: dict[str, torch.Tensor] | None = None,
    tune: TuneConfig | None = None,
    model: Any = None,
    train_batches: list[Any] | None = None,
    val_batches: list[Any] | None = None,
    tune_progress: Any = None,
    workers: int = 1,
    strict: bool = False,
    calibrate: bool = True,
    calibration_samples: int | None = None,
    sequential: bool | str = True,
    narrow: str | None = None,
) -> Report:
    """Convert a dense checkpoint into MPO cores and write the compact checkpoint.

    Memory stays bounded by a few tensors plus one group's output (``GROUP_MAX_BYTES`` of input)
    per worker, whatever the checkpoint's size: tensors are read one at a time, each group of
    tensors is written to a work folder (``.NAME.partial`` beside the output) as soon as it is done,
    and the groups are packed into the output at the end by streaming copies. An interrupted run
    resumes from the groups already written, each verified against its SHA-256 and the job's
    fingerprint. Under an initialised ``torch.distributed`` group (``torchrun``) each rank converts
    every ``world``-th group and rank 0 packs the output; the output is the same whatever the number
    of workers or ranks.

    Args:
        input_path: checkpoint to read (see :func:`mpocompress.io.open_checkpoint`).
        output_path: a ``.safetensors`` file, or any other path for a sharded folder
            (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
        config: how to compress.
        force: replace an existing output (never the input).
        max_shard_bytes: shard size of a folder output.
        progress: called before each selected layer (after each group with ``workers > 1``).
        recipe: per-layer overrides of ``config`` by name pattern (a rule may also skip a tensor).
        activations: Gram matrices ``X^T X`` of recorded layer inputs by weight name; the MPO cores of
            those weights are refit to minimise the output error on them
            (:func:`mpocompress.core.refine.activation_refit`).
        tune: fine-tune the compressed model (needs ``model`` and ``train_batches``; ``steps=0``:
            calibrate only, no training): the model is
            loaded with the checkpoint, compressed in memory, trained against the dense one as
            teacher (:mod:`mpocompress.jobs.finetune`; data-parallel under ``torch.distributed``), and
            what it learnt is written.
        model: an ``nn.Module`` with the checkpoint's architecture (its state dict keys must be in
            the checkpoint).
        train_batches: fine-tuning batches.
        val_batches: held-out batches (default: a ``tune.val_fraction`` share of ``train_batches``).
        tune_progress: called after each fine-tuning step (see :data:`mpocompress.jobs.finetune.TuneProgress`).
        workers: local processes converting groups in parallel (1: in this process).
        strict: refuse (:class:`InputError`) a selected weight holding NaN or Inf; by default such a
            weight is stored unchanged, with a warning naming it.
        calibrate: with ``model`` and ``train_batches``, record the inputs of every selected layer in
            the dense model first (:func:`mpocompress.jobs.tune.calibrate_checkpoint`) and fit
            each layer to its outputs on them (whitened SVD, activation-aware MPO, GPTQ); recorded
            ``activations`` given explicitly take precedence.
        calibration_samples: calibrate on at most this many samples.
        sequential: with fine-tuning (``tune``, ``steps=0`` included), calibrate sequentially: each
            group of layers is fitted to its inputs in the model compressed so far
            (:func:`mpocompress.jobs.calibrate.compress_sequentially_`; ``"plain"``: each layer fitted
            to its own outputs there, not the dense layer's); False: every layer to its
            inputs in the dense model.
        narrow: store the tensors passed through (biases, norm gains, buffers: every tensor not
            selected) as this float dtype (``"float16"``/``"bfloat16"``) where that keeps each
            within :data:`mpocompress.codecs.casts.NARROW_TOLERANCE`; reading restores their dtype.

    Returns:
        The :class:`~mpocompress.report.Report` (also stored, without file sizes, in the output).
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    input_path, output_path = Path(input_path), Path(output_path)
    check_output_name(output_path)
    rank, world = rank_world()
    with open_checkpoint(input_path) as ckpt:
        check_output(output_path, ckpt.inputs, force)
        lock = OutputLock(output_path)
        error = None
        if rank == 0:
            try:
                lock.acquire()
            except OutputError as e:
                error = str(e)
        error = shared_error(error)
        if error is not None:
            raise OutputError(error)
        log.info("reading %s: %d tensors, %s on disk; writing %s (locked: %s)", input_path, len(ckpt.keys()),
                 ckpt.nbytes_on_disk, output_path, lock.path)  # fmt: skip
        try:
            report = _convert_locked(
                ckpt, input_path, output_path, config, rank=rank, world=world, max_shard_bytes=max_shard_bytes,
                progress=progress, recipe=recipe, activations=activations, tune=tune, model=model,
                train_batches=train_batches, val_batches=val_batches, tune_progress=tune_progress,
                workers=workers, strict=strict, calibrate=calibrate, calibration_samples=calibration_samples,
                sequential=sequential, narrow=narrow,
            )  # fmt: skip
        finally:
            lock.release()
    report.output_file_bytes = path_size(output_path)
    return report


def _convert_locked(
    ckpt: Checkpoint,
    input_path: Path,
    output_path: Path,
    config: MPOConfig,
    *,
    rank: int,
    world: int,
    max_shard_bytes: int,
    progress: Progress | None,
    recipe: Recipe | None,
    activations: dict[str, torch.Tensor] | None,
    tune: TuneConfig | None,
    model: Any,
    train_batches: list[Any] | None,
    val_batches: list[Any] | None,
    tune_progress: Any,
    workers: int,
    strict: bool,
    calibrate: bool = True,
    calibration_samples: int | None = None,
    sequential: bool | str = True,
    narrow: str | None = None,
) -> Report:
    """The body of :func:`convert`, run while this job holds the output's lock."""
    layers = select_layers(ckpt, config.include, config.exclude)
    names = ckpt.keys()
    shapes = {n: ckpt.shape(n) for n in names}
    _check_no_clash(input_path, names, layers)
    threshold = None
    if config.prune_scope == "global":
        threshold = global_threshold(ckpt, layers, config.chain[0].param)
    tuned: dict[str, torch.Tensor] = {}
    plans: dict[str, LayerPlan] = {}
    tune_summary = None
    calibration = None
    if tune is not None and (model is None or not train_batches):
        raise ConfigError("fine-tuning needs the model (--model) and data (--data)")
    calibrating = calibrate and model is not None and bool(train_batches)
    if calibrating and not (tune is not None and sequential):  # (sequential calibration records its own inputs)
        from mpocompress.jobs.tune import calibrate_checkpoint

        grams, calibration = calibrate_checkpoint(ckpt, model, train_batches, val_batches, layers, tune or TuneConfig(),
                                                  calibration_samples)  # fmt: skip
        log.info("calibrated %d weight(s) on %d sample(s) in %.1fs", calibration["weights"], calibration["samples"], calibration["seconds"])
        activations = {**grams, **(activations or {})}
    if tune is not None:  # (steps=0 too: the held-out losses, unit masks and cores come from the in-memory model)
        if calibrating and sequential:
            activations = dict(activations or {})  # filled with the inputs the sequential calibration records
        tuned, plans, tune_summary = finetune_in_memory(
            ckpt, layers, config, recipe, tune, model, train_batches, val_batches, tune_progress, grams=activations,
            sequential=calibrating and sequential, calibration_samples=calibration_samples,
        )  # fmt: skip
        if "calibration" in tune_summary:
            calibration = tune_summary.pop("calibration")
            log.info("calibrated %d weight(s) sequentially on %d sample(s) in %.1fs", calibration["weights"], calibration["samples"],
                     calibration["seconds"])  # fmt: skip
    if model is not None and activations:  # a Conv1D's Gram weighs its stored rows: only the in-memory fit reads it
        from mpocompress.jobs.calibrate import transposed_weights

        transposed = transposed_weights(model)
        activations = {k: g for k, g in activations.items() if k not in transposed}
    groups = plan_groups(ckpt, names, min(max_shard_bytes, GROUP_MAX_BYTES))
    log.info("%d of %d tensors selected (%s); %d group(s) of work", len(layers), len(names), config.to_json(), len(groups))
    job = Job(
        input_path=input_path, output_path=output_path, config=config, recipe=recipe, layers=set(layers),
        shapes=shapes, groups=groups, fingerprint="", threshold=threshold, tune=tune is not None,
        tuned=tuned, plans=plans, activations=dict(activations or {}), strict=strict, narrow=narrow,
    )  # fmt: skip
    job.fingerprint = job_fingerprint(ckpt, job)
    store = GroupStore(output_path, job.fingerprint, len(groups))
    resumed = False
    if rank == 0:
        resumed = store.prepare()
    barrier()
    mine = [i for i in range(len(groups)) if i % world == rank]
    records: dict[int, dict[str, Any]] = {}
    if resumed or rank > 0:
        for i in mine:
            rec = store.verified(i)
            if rec is not None:
                records[i] = rec
    reused = len(records)
    todo = [i for i in mine if i not in records]
    if reused:
        log.info("resuming: %d group(s) verified in %s, %d to do", reused, store.path, len(todo))
    try:
        with together():  # (a rank that fails stops every rank with its message, not a broken process group)
            _run_groups(job, ckpt, store, todo, records, workers=workers, progress=progress, n_layers=len(layers))
    except Exception:
        if world > 1 and rank == 0 and not any(store.group_file(i).exists() for i in range(len(groups))):
            store.discard()  # (every rank has stopped writing by now)
        raise
    with together():  # (rank 0 verifies, reports and packs; the others wait for its outcome)
        _gather(store, records, len(groups), rank)
        report = _report(ckpt, input_path, output_path, config, recipe, records, len(groups), tune_summary,
                         work={"groups": len(groups), "reused_groups": reused, "workers": workers, "ranks": world})  # fmt: skip
        report.calibration = calibration
        meta_layers: dict[str, Any] = {}
        narrowed: dict[str, str] = {}
        for i in range(len(groups)):
            meta_layers.update(records[i]["entries"])
            narrowed.update(records[i].get("narrowed", {}))
        metadata = file_metadata(
            config.to_dict(), meta_layers, recipe=recipe.to_list() if recipe is not None else [],
            totals={k: v for k, v in report.totals().items() if not k.startswith(("output_", "file_"))},
            finetune={k: v for k, v in tune_summary.items() if k != "history"} if tune_summary is not None else None,
            tied=ckpt.tied, narrowed=narrowed,
        )  # fmt: skip
        if rank == 0:
            side = side_files(input_path) if output_path.suffix != ".safetensors" else []
            _finish(store, output_path, metadata, max_shard_bytes, side)
    return report


def _check_no_clash(input_path: Path, names: list[str], layers: list[str]) -> None:
    """Refuse an input holding a tensor under a name mpocompress writes for another one."""
    taken = set(names)
    suffixes = part_suffixes()
    for n in layers:
        ours = [core_name(n, k) for k in range(MAX_CORES)] + [f"{n}{sfx}" for sfx in suffixes]
        clash = next((c for c in ours if c in taken), None)
        if clash:
            raise InputError(f"{input_path}: tensor {clash!r} clashes with a name mpocompress writes for {n!r}")


def _run_groups(
    job: Job,
    ckpt: Checkpoint,
    store: GroupStore,
    todo: list[int],
    records: dict[int, dict[str, Any]],
    *,
    workers: int,
    progress: Progress | None,
    n_layers: int,
) -> None:
    """Convert the groups in ``todo`` (here, or in ``workers`` spawned processes), writing each to the
    work folder as it finishes and its record into ``records``. On an interrupt, say exactly what
    was kept."""
    groups = job.groups
    output_path = job.output_path
    try:
        if workers == 1 or len(todo) <= 1:
            done = sum(len(r["rows"]) for r in records.values())
            for i in todo:
                with one_thread():
                    tensors, rec = convert_group(job, ckpt, i, progress, done, n_layers)
                store.write(i, tensors, rec)
                del tensors
                records[i] = rec
                done += len(rec["rows"])
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("spawn")  # fork would copy this process's threads and locks
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=worker_init,
                                     initargs=(job,)) as pool:  # fmt: skip
                futures = [pool.submit(worker_run, i) for i in todo]
                try:
                    for fut in as_completed(futures):
                        i, rec = fut.result()
                        records[i] = rec
                        if progress is not None and rec["rows"]:
                            progress(rec["rows"][-1]["name"], len(records), len(groups))
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    except BaseException as e:
        kept = sum(store.group_file(i).exists() for i in range(len(groups)))
        if not kept and rank_world()[1] == 1:  # (under torchrun other ranks may still be writing there)
            store.discard()
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(
                f"interrupted: {output_path} was not written"
                + (f"; {kept} finished group(s) are kept in {store.path}: run the same command to resume" if kept else "")
            ) from None
        if kept:
            log.warning("stopped: finished groups are kept in %s; run the same command to resume", store.path)
        raise


def _gather(store: GroupStore, records: dict[int, dict[str, Any]], n_groups: int, rank: int) -> None:
    """Fill in the records of groups other ranks converted (rank 0 verifies each from the work folder)."""
    empty = {"rows": [], "entries": {}, "passthrough": [0, 0, 0, 0], "narrowed": {}}
    for i in range(n_groups):
        if i not in records:
            if rank > 0:  # rank 0 verifies every group, packs and reports
                records[i] = empty
                continue
            rec = store.verified(i)
            if rec is None:
                raise OutputError(f"{store.path}: group {i} is missing (did a rank fail?)")
            records[i] = rec


def _report(
    ckpt: Checkpoint,
    input_path: Path,
    output_path: Path,
    config: MPOConfig,
    recipe: Recipe | None,
    records: dict[int, dict[str, Any]],
    n_groups: int,
    tune_summary: dict[str, Any] | None,
    work: dict[str, Any],
) -> Report:
    """The conversion's report from every group's record."""
    order = range(n_groups)
    rows = [LayerRow(**{k: v for k, v in r.items() if k != "ratio"}) for i in order for r in records[i]["rows"]]
    pass_n, pass_params, pass_bytes, pass_dense = (sum(records[i]["passthrough"][k] for i in order) for k in range(4))
    return Report(
        input=str(input_path),
        output=str(output_path),
        config={**config.to_dict(), "recipe": recipe.to_list() if recipe is not None else []},
        rows=rows,
        passthrough_tensors=pass_n,
        passthrough_params=pass_params,
        passthrough_bytes=pass_bytes,
        passthrough_dense_bytes=pass_dense,
        passthrough_narrowed=sum(len(records[i].get("narrowed", {})) for i in order),
        input_file_bytes=ckpt.nbytes_on_disk,
        finetune=tune_summary,
        work=work,
    )


def _finish(store: GroupStore, output_path: Path, metadata: dict[str, str], max_shard_bytes: int, side: list[Path]) -> None:
    """Pack the groups into the output (with the input folder's ``side`` files: config, tokenizer...);
    an interrupt's message says whether it is in place."""
    IN_PLACE.discard(output_path.resolve())
    try:
        store.finish(metadata, max_shard_bytes, side)
    except KeyboardInterrupt:
        if output_path.resolve() in IN_PLACE:
            raise Interrupted(f"interrupted after {output_path} was written completely") from None
        raise Interrupted(
            f"interrupted: {output_path} was not written; the finished groups are kept in {store.path}: "
            "run the same command to finish"
        ) from None
