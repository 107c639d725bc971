"""Checkpoint-level jobs: convert, load back, decompress, inspect.

Walks a checkpoint one tensor at a time (reading lazily through :mod:`mpocompress.io`), hands each
selected weight to the numerical core, and collects the report. Output format: docs/format.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpocompress import __version__
from mpocompress.codecs import decode, encode, magnitude_threshold
from mpocompress.core.compress import compress_matrix, singular_values
from mpocompress.config import Codec, Gates, MPOConfig, Recipe, TuneConfig
from mpocompress.jobs.dist import barrier, rank_world, shared_error
from mpocompress.errors import ConfigError, GateError, InputError, Interrupted, OutputError
from mpocompress.io import (
    DECOMPRESSED_KEY,
    FORMAT_VERSION,
    IN_PLACE,
    META_KEY,
    Checkpoint,
    GroupStore,
    OutputLock,
    check_output,
    dtype_name,
    input_paths,
    open_checkpoint,
    path_size,
    read_meta,
    save_safetensors,
    save_torch,
)
from mpocompress.select import is_candidate, kind_of, matrix_shape, selected
from mpocompress.report import LayerRow, Report
from mpocompress.core.spectra import analyze_matrix
from mpocompress.core.tt import TTMatrix, cores_to_matrix, relative_error, svd_tail_error

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
#: called before each layer with (tensor name, index, number of layers)
Progress = Callable[[str, int, int], None]


def core_name(name: str, k: int) -> str:
    """Name of core ``k`` of tensor ``name`` in the output file."""
    return f"{name}_cores.{k}"


def select_layers(ckpt: Checkpoint, include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """Names of the tensors to compress: floating, >= 2-D, included and not excluded.

    Raises:
        InputError: when nothing is left to compress.
    """
    names = [n for n in ckpt.keys() if is_candidate(ckpt.shape(n), ckpt.dtype(n))]
    if not names:
        raise InputError(f"{ckpt.path}: no floating-point tensor with 2 or more dimensions to compress")
    chosen = [n for n in names if selected(n, include, exclude)]
    if not chosen:
        raise InputError(
            f"{ckpt.path}: no weight matches the --include/--exclude patterns "
            f"({len(names)} candidates, e.g. {names[0]!r})"
        )
    return chosen


#: suffixes of codec parts (``fc.weight.codes``...), checked for clashes with input names
PART_SUFFIXES = (".mask", ".rows", ".cols", ".indices", ".values", ".codebook", ".codes", ".scale", ".zero_point")


def global_threshold(ckpt: Checkpoint, layers: list[str], sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of all selected weights lie (global magnitude pruning).

    Streams over the checkpoint (three passes of one tensor at a time), so memory stays bounded.
    """
    return magnitude_threshold(lambda: (ckpt.get(n) for n in layers), sparsity)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: input bytes per group, the unit of work (one worker, one resumable file); at most one shard
GROUP_MAX_BYTES = 256 * 1024**2


def plan_groups(ckpt: Checkpoint, names: list[str], max_bytes: int) -> list[list[str]]:
    """Split the checkpoint's tensors, in order, into groups of at most ``max_bytes`` input bytes (a
    larger tensor is a group of its own). The plan depends only on the input, never on the workers."""
    groups: list[list[str]] = []
    size = 0
    for n in names:
        b = math.prod(ckpt.shape(n)) * torch.empty(0, dtype=getattr(torch, ckpt.dtype(n), torch.uint8)).element_size()
        if not groups or (groups[-1] and size + b > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    return groups


@dataclass
class _Job:
    """Everything a worker needs to convert any group (picklable: sent once to each worker)."""

    input_path: Path
    output_path: Path
    config: MPOConfig
    recipe: Recipe | None
    layers: set[str]
    shapes: dict[str, tuple[int, ...]]
    groups: list[list[str]]
    fingerprint: str
    threshold: float | None
    tune: bool
    tuned: dict[str, torch.Tensor] = field(default_factory=dict)
    plans: dict[str, LayerPlan] = field(default_factory=dict)
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    strict: bool = False


def _hash_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{dtype_name(t.dtype)}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _job_fingerprint(ckpt: Checkpoint, job: _Job) -> str:
    """Hash of everything that decides the output: input files and tensors, settings, trained values."""
    import hashlib

    h = hashlib.sha256()
    desc = {
        "version": __version__,
        "format_version": FORMAT_VERSION,
        "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in ckpt.files],
        "tensors": [[n, list(job.shapes[n]), ckpt.dtype(n)] for n in ckpt.keys()],
        "config": job.config.to_dict(),
        "recipe": job.recipe.to_list() if job.recipe is not None else [],
        "groups": job.groups,
        "threshold": job.threshold,
        "tune": job.tune,
    }
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    _hash_tensors(h, job.tuned)
    _hash_tensors(h, job.activations)
    for name in sorted(job.plans):
        plan = job.plans[name]
        h.update(json.dumps([name, plan.decided, plan.candidates, plan.reason], default=str).encode())
        _hash_tensors(h, {f"core{k}": c for k, c in enumerate(plan.tt.cores)} if plan.tt is not None else {})
        _hash_tensors(h, plan.masks)
    return h.hexdigest()


def _convert_group(
    job: _Job, ckpt: Checkpoint, i: int, progress: Progress | None = None, done: int = 0, total: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert group ``i``: returns the tensors to write and the group's record (report rows,
    metadata entries, pass-through counts)."""
    out: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    entries: dict[str, Any] = {}
    passthrough = [0, 0, 0]
    for name in job.groups[i]:
        reference = ckpt.get(name)
        t = job.tuned.get(name, reference)
        cfg = None
        if name in job.layers:
            if progress is not None:
                progress(name, done + len(rows), total)
            cfg = job.config if job.recipe is None else job.recipe.config_for(name, job.config)
        if cfg is None:  # not selected, or the recipe skips it
            out[name] = t
            passthrough = [passthrough[0] + 1, passthrough[1] + t.numel(), passthrough[2] + _nbytes(t)]
            continue
        if not job.tune and any(c.name == "units" for c in cfg.chain):
            raise ConfigError(
                "--prune units:FRACTION removes whole hidden units found from the model's code: "
                "give --model and --data (--steps 0 to skip training)"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            if job.strict:
                raise InputError(f"{name} holds {bad} NaN/Inf value(s) (--strict refuses non-finite weights)")
            log.warning("%s holds %d NaN/Inf value(s): stored unchanged", name, bad)
            out[name] = t
            rows.append(_unchanged_row(name, t, job.shapes, "non-finite values (NaN/Inf): stored unchanged").to_dict())
            continue
        row, entry, stored = _compress_tensor(
            name, t, cfg, job.shapes, job.threshold if cfg.prune == job.config.prune else None,
            plan=job.plans.get(name), reference=reference, gram=job.activations.get(name),
        )  # fmt: skip
        if entry and cfg != job.config:
            entry["config"] = cfg.to_dict()
        rows.append(row.to_dict())
        if entry:
            entries[name] = entry
        out.update(stored)
    return out, {"rows": rows, "entries": entries, "passthrough": passthrough}


@contextmanager
def _one_thread():
    """Each tensor is compressed on one thread, so results are bitwise the same for any ``workers``
    (parallelism is across tensors)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_WORKER: dict[str, Any] = {}


def _worker_init(job: _Job) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    torch.set_num_threads(1)
    _WORKER["job"] = job
    _WORKER["ckpt"] = open_checkpoint(job.input_path)
    _WORKER["store"] = GroupStore(job.output_path, job.fingerprint, len(job.groups))


def _worker_run(i: int) -> tuple[int, dict[str, Any]]:
    job, ckpt, store = _WORKER["job"], _WORKER["ckpt"], _WORKER["store"]
    tensors, record = _convert_group(job, ckpt, i)
    store.write(i, tensors, record)
    return i, record


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
        tune: fine-tune the compressed model (needs ``model`` and ``train_batches``): the model is
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
                workers=workers, strict=strict,
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
) -> Report:
    """The body of :func:`convert`, run while this job holds the output's lock."""
    layers = select_layers(ckpt, config.include, config.exclude)
    names = ckpt.keys()
    shapes = {n: ckpt.shape(n) for n in names}
    taken = set(names)
    for n in layers:
        ours = [core_name(n, k) for k in range(8)] + [f"{n}{sfx}" for sfx in PART_SUFFIXES]
        clash = next((c for c in ours if c in taken), None)
        if clash:
            raise InputError(f"{input_path}: tensor {clash!r} clashes with a name mpocompress writes for {n!r}")
    threshold = None
    if config.prune_scope == "global":
        threshold = global_threshold(ckpt, layers, config.chain[0].param)
    tuned: dict[str, torch.Tensor] = {}
    plans: dict[str, LayerPlan] = {}
    tune_summary = None
    if tune is not None:
        if model is None or not train_batches:
            raise ConfigError("fine-tuning needs the model (--model) and data (--data)")
        tuned, plans, tune_summary = _tune(
            ckpt, layers, config, recipe, tune, model, train_batches, val_batches, tune_progress
        )
    groups = plan_groups(ckpt, names, min(max_shard_bytes, GROUP_MAX_BYTES))
    log.info("%d of %d tensors selected (%s); %d group(s) of work", len(layers), len(names), config.to_json(), len(groups))
    job = _Job(
        input_path=input_path, output_path=output_path, config=config, recipe=recipe, layers=set(layers),
        shapes=shapes, groups=groups, fingerprint="", threshold=threshold, tune=tune is not None,
        tuned=tuned, plans=plans, activations=dict(activations or {}), strict=strict,
    )  # fmt: skip
    job.fingerprint = _job_fingerprint(ckpt, job)
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
        if workers == 1 or len(todo) <= 1:
            n_layers = len(layers)
            done = sum(len(r["rows"]) for r in records.values())
            for i in todo:
                with _one_thread():
                    tensors, rec = _convert_group(job, ckpt, i, progress, done, n_layers)
                store.write(i, tensors, rec)
                del tensors
                records[i] = rec
                done += len(rec["rows"])
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("spawn")  # fork would copy this process's threads and locks
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                                     initargs=(job,)) as pool:  # fmt: skip
                futures = [pool.submit(_worker_run, i) for i in todo]
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
        if not kept:
            store.discard()
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(
                f"interrupted: {output_path} was not written"
                + (f"; {kept} finished group(s) are kept in {store.path}: run the same command to resume" if kept else "")
            ) from None
        if kept:
            log.warning("stopped: finished groups are kept in %s; run the same command to resume", store.path)
        raise
    barrier()
    empty = {"rows": [], "entries": {}, "passthrough": [0, 0, 0]}
    for i in range(len(groups)):
        if i not in records:
            if rank > 0:  # rank 0 verifies every group, packs and reports
                records[i] = empty
                continue
            rec = store.verified(i)
            if rec is None:
                raise OutputError(f"{store.path}: group {i} is missing (did a rank fail?)")
            records[i] = rec
    rows = [LayerRow(**{k: v for k, v in r.items() if k != "ratio"}) for i in range(len(groups)) for r in records[i]["rows"]]
    meta_layers: dict[str, Any] = {}
    for i in range(len(groups)):
        meta_layers.update(records[i]["entries"])
    pass_n, pass_params, pass_bytes = (sum(records[i]["passthrough"][k] for i in range(len(groups))) for k in range(3))
    report = Report(
        input=str(input_path),
        output=str(output_path),
        config={**config.to_dict(), "recipe": recipe.to_list() if recipe is not None else []},
        rows=rows,
        passthrough_tensors=pass_n,
        passthrough_params=pass_params,
        passthrough_bytes=pass_bytes,
        input_file_bytes=ckpt.nbytes_on_disk,
        finetune=tune_summary,
        work={"groups": len(groups), "reused_groups": reused, "workers": workers, "ranks": world},
    )
    meta = {
        "format": "mpocompress",
        "format_version": FORMAT_VERSION,
        "mpocompress_version": __version__,
        "config": config.to_dict(),
        "recipe": recipe.to_list() if recipe is not None else [],
        "layers": meta_layers,
        "totals": {k: v for k, v in report.totals().items() if not k.startswith(("output_", "file_"))},
    }
    if tune_summary is not None:
        meta["finetune"] = {k: v for k, v in tune_summary.items() if k != "history"}
    metadata = {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)}
    if rank == 0:
        IN_PLACE.discard(output_path.resolve())
        try:
            store.finish(metadata, max_shard_bytes)
        except KeyboardInterrupt:
            if output_path.resolve() in IN_PLACE:
                raise Interrupted(f"interrupted after {output_path} was written completely") from None
            raise Interrupted(
                f"interrupted: {output_path} was not written; the finished groups are kept in {store.path}: "
                "run the same command to finish"
            ) from None
    barrier()
    return report


@dataclass
class LayerPlan:
    """What fine-tuning settled for one weight before it is written.

    Attributes:
        tt: the trained MPO cores, or None when the weight stays a (possibly trained) dense tensor.
        decided: True when the MPO decision was made (``compress_`` saw this weight).
        candidates, reason: ``compress_``'s structure candidates and its reason for keeping dense.
        masks: keep-masks of the stored tensors (weight or cores) the model was pruned with.
    """

    tt: TTMatrix | None = None
    decided: bool = False
    candidates: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


def _unchanged_row(name: str, t: torch.Tensor, shapes: dict[str, tuple[int, ...]], reason: str | None = None) -> LayerRow:
    """The report row of a selected weight stored as it is."""
    shape = list(t.shape)
    out_f, in_f = matrix_shape(shape)
    numel, nbytes = t.numel(), _nbytes(t)
    return LayerRow(
        name=name, kind=kind_of(name, shape, shapes), shape=shape, dtype=dtype_name(t.dtype), status="dense",
        dense_params=numel, params=numel, dense_bytes=nbytes, bytes=nbytes, rel_error=0.0,
        svd_rank=min(out_f, in_f), svd_rel_error=0.0, reason=reason,
    )  # fmt: skip


def _compress_tensor(
    name: str,
    t: torch.Tensor,
    config: MPOConfig,
    shapes: dict[str, tuple[int, ...]],
    threshold: float | None = None,
    *,
    plan: LayerPlan | None = None,
    reference: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[LayerRow, dict[str, Any], dict[str, torch.Tensor]]:
    """Compress one weight: MPO (if configured), then the codec chain on each stored tensor.

    Args:
        plan: the decisions and trained cores of a fine-tuned model (else: TT-SVD here).
        reference: the original weight, against which errors are reported (default ``t``).
        gram: Gram matrix of recorded inputs: refit the cores to the output error on them.

    Returns:
        ``(row, entry, stored)``: the report row, the metadata entry (empty when the weight is kept
        as it is) and the tensors to write for this weight.
    """
    reference = t if reference is None else reference
    masks = plan.masks if plan is not None else {}
    shape = list(t.shape)
    kind = kind_of(name, shape, shapes)
    out_f, in_f = matrix_shape(shape)
    itemsize, numel = t.element_size(), t.numel()
    row = _unchanged_row(name, t, shapes)
    entry: dict[str, Any] = {"kind": kind, "shape": shape, "dtype": row.dtype, "matrix_shape": [out_f, in_f], "method": "dense"}
    stored: dict[str, torch.Tensor] = {name: t}
    tt = None
    if config.mpo:
        if plan is not None and plan.decided:
            tt = plan.tt
            if tt is not None:
                tt = TTMatrix([c.detach().to(t.dtype) for c in tt.cores], tt.shape)
                row.refine["finetuned"] = True
            row.candidates, row.reason = plan.candidates, plan.reason
        else:
            res = compress_matrix(t.reshape(out_f, in_f), config, reference_svd=False)
            row.candidates = [c.to_dict() for c in res.candidates]
            row.reason = res.reason
            tt = res.tt
            if tt is not None and config.als_sweeps and len(tt.cores) > 2:
                row.refine["als_sweeps"] = config.als_sweeps
            elif tt is not None and config.als_sweeps:
                row.refine["als_skipped"] = "2 cores (a truncated SVD) are already optimal: --als has nothing to refine"
            if tt is not None and gram is not None:
                tt = _activation_refit(row, t.reshape(out_f, in_f), tt, gram)
        log.debug("%s: %s", name, row.reason or f"cores {len(tt.cores)} bonds {tt.bond_dims}" if tt is not None else row.reason)
        if tt is not None:
            row.status = "mpo"
            row.cores, row.bond_dims = len(tt.cores), tt.bond_dims
            row.out_modes, row.in_modes, row.padded_shape = list(tt.out_modes), list(tt.in_modes), list(tt.padded_shape)
            stored = {core_name(name, k): c for k, c in enumerate(tt.cores)}
            entry.update(
                method="mpo", padded_shape=row.padded_shape, out_modes=row.out_modes, in_modes=row.in_modes,
                bond_dims=row.bond_dims, cores=list(stored),
            )  # fmt: skip
    chain = config.chain
    if chain:
        encoded: dict[str, Any] = {}
        parts_out: dict[str, torch.Tensor] = {}
        coded = {sname: encode(st, chain, threshold=threshold, mask=masks.get(sname)) for sname, st in stored.items()}
        if tt is not None and config.als_sweeps:  # every codec is lossy: refit the cores while encoding
            coded = _refit_codes(row, name, tt, chain, threshold, masks, coded, config.als_sweeps)
        for sname, (parts, meta) in coded.items():
            meta["parts"] = {part: f"{sname}.{part}" for part in parts}
            encoded[sname] = meta
            parts_out.update({f"{sname}.{part}": v for part, v in parts.items()})
        if sum(_nbytes(v) for v in parts_out.values()) < sum(_nbytes(v) for v in stored.values()):
            entry["encoded"] = encoded
            row.codecs = [str(c) for c in chain]
            stored = parts_out
            if row.status == "dense":
                row.status = "codec"
        elif row.status == "dense":
            row.reason = f"the codecs ({' '.join(map(str, chain))}) would not make it smaller"
    if row.status == "dense":
        return row, {}, {name: t}
    row.bytes = sum(_nbytes(v) for v in stored.values())
    decoded = _decode_entry(entry, stored.__getitem__)
    recon = _rebuild(entry, [decoded[c] for c in entry["cores"]], name) if entry["method"] == "mpo" else decoded[name]
    row.rel_error = relative_error(reference, recon)
    row.params = sum(
        m.get("nnz", math.prod(m["shape"])) for m in entry.get("encoded", {}).values()
    ) or sum(v.numel() for v in stored.values())
    # the truncated SVD holding as many bytes as what is stored, in the weight's own dtype
    row.svd_rank = (row.bytes // itemsize) // (out_f + in_f)
    s, exact = singular_values(reference.reshape(out_f, in_f), rank_hint=row.svd_rank, seed=config.seed)
    row.svd_rel_error = svd_tail_error(s, row.svd_rank) if row.svd_rank > 0 else 1.0
    if not exact and tt is not None and len(tt.cores) == 2 and tt.bond_dims[0] <= row.svd_rank:
        # a randomized reference can miss energy: our own rank-r SVD bounds the optimum from above
        row.svd_rel_error = min(row.svd_rel_error, relative_error(reference.reshape(out_f, in_f), tt.to_matrix()))
    entry.update(params=row.params, dense_params=numel, bytes=row.bytes, rel_error=row.rel_error,
                 svd_rank=row.svd_rank, svd_rel_error=row.svd_rel_error)  # fmt: skip
    if row.refine:
        entry["refine"] = row.refine
    return row, entry, stored


def _tune(
    ckpt: Checkpoint,
    layers: list[str],
    config: MPOConfig,
    recipe: Recipe | None,
    tune: TuneConfig,
    model: Any,
    train: list[Any],
    val: list[Any] | None,
    progress: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, LayerPlan], dict[str, Any]]:
    """Load the checkpoint into ``model``, compress/prune it in memory, fine-tune it against the
    dense model, and return what to write: ``(trained tensors by name, plans by weight, summary)``."""
    import copy

    from torch import nn

    from mpocompress.codecs import pruner_mask
    from mpocompress.jobs.finetune import (
        apply_masks,
        evaluate,
        finetune,
        ipkd,
        magnitude_masks,
        split_batch,
    )
    from mpocompress.nn.surgery import compress_

    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model must give an nn.Module, got {type(model).__name__}")
    if val is None:
        if len(train) < 2:
            raise ConfigError(f"fine-tuning needs at least 2 batches (one is held out), got {len(train)}")
        n_val = max(1, round(tune.val_fraction * len(train)))
        train, val = train[:-n_val], train[-n_val:]
    dense = {n: ckpt.get(n) for n in ckpt.keys()}
    own = model.state_dict()
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
    rows = {r["name"]: r for r in compress_(student, config, recipe=recipe, names=set(layers), include=(), exclude=())}

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

    def losses(m: nn.Module) -> dict[str, float]:
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
        masks = {p: pruner_mask(params[p].detach(), codec, threshold) for p, (_, codec) in pruned.items()}
        if unit_summary:
            masks.update(umasks)
        apply_masks(student, masks)
        before = losses(student)
        res = finetune(student, teacher, train, val_batches=val, config=tune, masks=masks, progress=progress)
        result = res.to_dict()
        steps, seconds = res.steps, res.seconds
    after = losses(student)
    summary: dict[str, Any] = {
        "config": tune.to_dict(),
        "train_batches": len(train),
        "val_batches": len(val),
        "steps": steps,
        "seconds": round(seconds, 3),
        "val_kd_loss": {"compressed": before["kd"], "finetuned": after["kd"]},
        **({"val_task_loss": {"dense": evaluate(teacher, None, val, task_only), "compressed": before["task"], "finetuned": after["task"]}}
           if has_targets else {}),
        **result,
        **({"units": unit_summary} if unit_summary else {}),
    }  # fmt: skip

    sd = student.state_dict()
    tensors = {n: sd[n].detach().to(dense[n].dtype) for n in dense if n in sd}
    plans: dict[str, LayerPlan] = {}
    modules = dict(student.named_modules())
    for name in layers:
        row = rows.get(name)
        plan = LayerPlan(decided=row is not None)
        if row is not None:
            plan.candidates, plan.reason = row["candidates"], row["reason"]
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
    return tensors, plans, summary


def _activation_refit(row: LayerRow, matrix: torch.Tensor, tt: TTMatrix, gram: torch.Tensor) -> TTMatrix:
    from mpocompress.core.refine import activation_refit, output_error

    if tuple(gram.shape) != (matrix.shape[1], matrix.shape[1]):
        raise InputError(
            f"--activations: {row.name} takes {matrix.shape[1]} inputs but its recorded activations have "
            f"{gram.shape[0]} features"
        )
    before = output_error(matrix, tt.to_matrix(), gram)
    res = activation_refit(matrix, tt, gram)
    row.refine["activation_refit"] = {
        "output_error_before": before,
        "output_error_after": output_error(matrix, res.tt.to_matrix(), gram),
        "weight_error_before": relative_error(matrix, tt.to_matrix()),
    }
    return res.tt


def _refit_codes(
    row: LayerRow,
    name: str,
    tt: TTMatrix,
    chain: list[Codec],
    threshold: float | None,
    masks: dict[str, torch.Tensor],
    direct: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]],
    sweeps: int,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Quantize the cores one at a time with an ALS refit of the rest after each
    (:func:`mpocompress.core.refine.refit_quantized`); keep it when it beats quantizing them directly."""
    from mpocompress.core.refine import refit_quantized

    target = tt.to_matrix()  # the function the (possibly fine-tuned) cores compute
    coded: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def roundtrip(k: int, core: torch.Tensor) -> torch.Tensor:
        sname = core_name(name, k)
        parts, meta = encode(core, chain, threshold=threshold, mask=masks.get(sname))
        coded[sname] = (parts, meta)
        return decode(parts, meta)

    refit = refit_quantized(target, tt, roundtrip, sweeps=sweeps)
    coded = {core_name(name, k): coded[core_name(name, k)] for k in range(len(tt.cores))}
    direct_cores = [decode(*direct[core_name(name, k)]) for k in range(len(tt.cores))]
    err_direct = relative_error(target, cores_to_matrix(direct_cores, tt.shape))
    err_refit = relative_error(target, refit.to_matrix())
    row.refine["quant_refit"] = {"error_direct": err_direct, "error_refit": err_refit, "kept": err_refit < err_direct}
    return coded if err_refit < err_direct else direct


def _decode_entry(entry: dict[str, Any], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain tensors (cores, or the weight) a layer entry stores, decoding any codec parts."""
    names = entry["cores"] if entry.get("method", "mpo") == "mpo" else []
    encoded = entry.get("encoded", {})
    out = {}
    for sname in names or list(encoded):
        if sname in encoded:
            meta = encoded[sname]
            out[sname] = decode({p: get(full) for p, full in meta["parts"].items()}, meta)
        else:
            out[sname] = get(sname)
    return out


def check_gates(report: Report, gates: Gates) -> None:
    """Raise :class:`GateError` when the report misses a gate (records the outcome in ``report.gates``)."""
    failures = []
    totals = report.totals()
    if gates.max_error is not None:
        bad = [r for r in report.rows if r.rel_error > gates.max_error]
        report.gates["max_error"] = {"limit": gates.max_error, "failed_layers": [r.name for r in bad]}
        if bad:
            worst = max(bad, key=lambda r: r.rel_error)
            failures.append(
                f"{len(bad)} layer(s) above --max-error {gates.max_error:g} (worst {worst.name}: {worst.rel_error:.4g})"
            )
    if gates.min_ratio is not None:
        report.gates["min_ratio"] = {"limit": gates.min_ratio, "ratio": totals["ratio"]}
        if totals["ratio"] < gates.min_ratio:
            failures.append(f"total ratio {totals['ratio']:.3g}x below --min-ratio {gates.min_ratio:g}")
    report.gates["passed"] = not failures
    if failures:
        raise GateError("quality gate failed: " + "; ".join(failures))


def _rebuild(entry: dict[str, Any], cores: list[torch.Tensor], name: str) -> torch.Tensor:
    expected = [tuple(c.shape[1:3]) for c in cores]
    if any(c.dim() != 4 for c in cores) or expected != list(zip(entry["out_modes"], entry["in_modes"])):
        raise InputError(f"layer {name!r}: core shapes {expected} do not match the recorded modes")
    if any(a.shape[3] != b.shape[0] for a, b in zip(cores, cores[1:])) or cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise InputError(f"layer {name!r}: the bonds of its cores do not chain")
    out_f, in_f = entry["matrix_shape"]
    if math.prod(entry["out_modes"]) < out_f or math.prod(entry["in_modes"]) < in_f:
        raise InputError(f"layer {name!r}: its modes do not cover the matrix shape {[out_f, in_f]}")
    m = cores_to_matrix(cores, (out_f, in_f))
    return m.reshape(entry["shape"]).to(getattr(torch, entry["dtype"]))


def stored_tensors(ckpt: Checkpoint, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed checkpoint with codec parts decoded: MPO cores as float cores,
    codec-only weights as dense weights, all else as stored.

    Raises:
        InputError: a tensor the metadata names is missing.
    """
    keys = set(ckpt.keys())
    parts = {full for e in meta["layers"].values() for m in e.get("encoded", {}).values() for full in m["parts"].values()}
    needed = parts | {c for e in meta["layers"].values() if e.get("method", "mpo") == "mpo" for c in e["cores"]}
    missing = sorted((needed - keys) - {s for e in meta["layers"].values() for s in e.get("encoded", {})})
    if missing:
        raise InputError(f"{ckpt.path}: metadata names tensor {missing[0]!r}, which the file lacks")
    out = {n: ckpt.get(n) for n in ckpt.keys() if n not in parts}
    for name, entry in meta["layers"].items():
        if entry.get("encoded"):
            try:
                out.update(_decode_entry(entry, ckpt.get))
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
                # decoding untrusted parts: metadata that does not fit the stored tensors is bad input
                raise InputError(f"{ckpt.path}: layer {name!r}: stored codec parts do not fit the metadata ({e})") from e
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Rebuild the dense state dict from a ``convert`` output (or read a dense checkpoint as is).

    The result has the original names, shapes and dtypes, so the original model loads it with
    ``model.load_state_dict(sd, strict=True)``.

    Args:
        path: a file or sharded folder written by :func:`convert`.

    Returns:
        ``{name: tensor}``.
    """
    with open_checkpoint(path) as ckpt:
        meta = read_meta(ckpt)
        if meta is None:
            return {n: ckpt.get(n) for n in ckpt.keys()}
        out = stored_tensors(ckpt, meta)
        for name, entry in meta["layers"].items():
            if entry.get("method", "mpo") == "mpo":
                out[name] = _rebuild(entry, [out.pop(c) for c in entry["cores"]], name)
        return out


def decompress(input_path: str | Path, output_path: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the dense state dict of a compressed checkpoint (``.safetensors``, or ``.pt/.pth``).

    Returns:
        A small summary: tensors written, bytes on disk.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.suffix not in (".pt", ".pth", ".bin", ".safetensors"):
        raise ConfigError(f"{output_path}: decompress writes .safetensors or .pt/.pth/.bin files")
    check_output(output_path, input_paths(input_path), force, kind="dense")
    sd = load_state_dict(input_path)
    if output_path.suffix == ".safetensors":
        save_safetensors(sd, output_path, {"format": "pt", DECOMPRESSED_KEY: __version__})
    else:
        save_torch(sd, output_path)
    return {"input": str(input_path), "output": str(output_path), "tensors": len(sd), "output_file_bytes": path_size(output_path)}


def inspect(
    path: str | Path,
    *,
    cores: int = 3,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    svd: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Bond-dimension spectra of a dense checkpoint, or the stored report of a compressed one.

    Returns:
        ``{"compressed": False, "cores": ..., "layers": [{"name", "kind", "shape", **analysis}]}``
        for a dense checkpoint (see :func:`mpocompress.core.spectra.analyze_matrix`), or
        ``{"compressed": True, "meta": <stored metadata>}`` for a ``convert`` output.
    """
    if cores < 2:
        raise ConfigError(f"cores must be >= 2, got {cores}")
    with open_checkpoint(path) as ckpt:
        meta = read_meta(ckpt)
        if meta is not None:
            return {"path": str(path), "compressed": True, "meta": meta, "file_bytes": ckpt.nbytes_on_disk}
        layers = select_layers(ckpt, include, exclude)
        shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
        out, skipped = [], []
        for i, name in enumerate(layers):
            if progress is not None:
                progress(name, i, len(layers))
            t = ckpt.get(name)
            shape = list(t.shape)
            if not bool(torch.isfinite(t).all()):
                log.warning("%s holds NaN/Inf values: no spectrum", name)
                skipped.append({"name": name, "reason": "non-finite values (NaN/Inf)"})
                continue
            m = t.reshape(matrix_shape(shape))
            if not m.is_floating_point() or m.dtype in (torch.float16, torch.bfloat16):
                m = m.float()
            out.append({"name": name, "kind": kind_of(name, shape, shapes), "shape": shape, **analyze_matrix(m, cores, svd=svd)})
        return {"path": str(path), "compressed": False, "cores": cores, "layers": out, "skipped": skipped}


#: suffixes that say "a file", which a conversion output must not silently turn into a folder
_FILE_SUFFIXES = (".safetensors", ".safetensor", ".st", ".pt", ".pth", ".bin", ".ckpt", ".json", ".onnx", ".npz", ".h5")


def check_output_name(output: Path) -> None:
    """A conversion writes ``NAME.safetensors`` (one file) or a folder; refuse names that look like
    another kind of file (``x.safetensor``, ``x.SAFETENSORS``, ``small.pt``) instead of making a folder."""
    suffix = output.suffix
    if suffix == ".safetensors" or (output.is_dir() and not output.is_symlink()):
        return
    if suffix.lower() in _FILE_SUFFIXES:
        raise ConfigError(
            f"{output}: convert writes a .safetensors file or a folder of shards; "
            f"name the file NAME.safetensors (not {suffix}) or the folder without a file extension"
        )


def parse_size(text: str) -> int:
    """``"2GB"`` -> bytes (K/M/G/T, with or without B, powers of 1024)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for unit, m in (("K", 1024), ("M", 1024**2), ("G", 1024**3), ("T", 1024**4)):
        if s.endswith(unit):
            s, mult = s[:-1], m
            break
    try:
        value = float(s) * mult
    except ValueError:
        raise ConfigError(f"cannot read size {text!r} (expected e.g. 500MB, 2GB)") from None
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"size must be positive, got {text!r}")
    return int(value)
