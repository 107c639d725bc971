"""The unit of work of a conversion: a group of tensors, converted in this process, in spawned
worker processes (``--workers``) or on ``torchrun`` ranks; the job's fingerprint decides whether a
group left by an earlier run can be reused.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpocompress import __version__
from mpocompress.codecs import narrowed
from mpocompress.config import MPOConfig, Recipe
from mpocompress.errors import ConfigError, InputError
from mpocompress.format import FORMAT_VERSION
from mpocompress.io import Checkpoint, dtype_name, open_checkpoint
from mpocompress.jobs.plan import LayerPlan, Progress, compress_tensor, nbytes_of, unchanged_row
from mpocompress.jobs.workdir import GroupStore

log = logging.getLogger(__name__)


@dataclass
class Job:
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
    #: store the tensors passed through (not selected) as this float dtype where it keeps them
    #: (:func:`mpocompress.codecs.narrowed`); None: as they are
    narrow: str | None = None


def _hash_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{dtype_name(t.dtype)}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def job_fingerprint(ckpt: Checkpoint, job: Job) -> str:
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
        "narrow": job.narrow,
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


def convert_group(
    job: Job, ckpt: Checkpoint, i: int, progress: Progress | None = None, done: int = 0, total: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert group ``i``: returns the tensors to write and the group's record (report rows,
    metadata entries, pass-through counts ``[tensors, params, bytes stored, bytes before]``, the
    pass-through tensors stored narrower with their own dtype)."""
    out: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    entries: dict[str, Any] = {}
    passthrough = [0, 0, 0, 0]
    narrowed_dtypes: dict[str, str] = {}
    for name in job.groups[i]:
        reference = ckpt.get(name)
        t = job.tuned.get(name, reference)
        cfg = None
        if name in job.layers:
            if progress is not None:
                progress(name, done + len(rows), total)
            cfg = job.config if job.recipe is None else job.recipe.config_for(name, job.config)
        if cfg is None:  # not selected, or the recipe skips it
            narrow = narrowed(t, job.narrow) if job.narrow is not None and name not in job.layers else None
            if narrow is not None:
                narrowed_dtypes[name] = dtype_name(t.dtype)
            out[name] = t if narrow is None else narrow
            passthrough = [passthrough[0] + 1, passthrough[1] + t.numel(), passthrough[2] + nbytes_of(out[name]),
                           passthrough[3] + nbytes_of(t)]  # fmt: skip
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
            rows.append(unchanged_row(name, t, job.shapes, "non-finite values (NaN/Inf): stored unchanged").to_dict())
            continue
        row, entry, stored = compress_tensor(
            name, t, cfg, job.shapes, job.threshold if cfg.prune == job.config.prune else None,
            plan=job.plans.get(name), reference=reference, gram=job.activations.get(name),
        )  # fmt: skip
        if entry and cfg != job.config:
            entry["config"] = cfg.to_dict()
        rows.append(row.to_dict())
        if entry:
            entries[name] = entry
        out.update(stored)
    return out, {"rows": rows, "entries": entries, "passthrough": passthrough, "narrowed": narrowed_dtypes}


@contextmanager
def one_thread():
    """Each tensor is compressed on one thread, so results are bitwise the same for any ``workers``
    (parallelism is across tensors)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_WORKER: dict[str, Any] = {}


def worker_init(job: Job) -> None:
    """Set up a spawned worker process: one thread, the job, the input and the work folder."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    torch.set_num_threads(1)
    _WORKER["job"] = job
    _WORKER["ckpt"] = open_checkpoint(job.input_path)
    _WORKER["store"] = GroupStore(job.output_path, job.fingerprint, len(job.groups))


def worker_run(i: int) -> tuple[int, dict[str, Any]]:
    """Convert group ``i`` in a worker and write it to the work folder."""
    job, ckpt, store = _WORKER["job"], _WORKER["ckpt"], _WORKER["store"]
    tensors, record = convert_group(job, ckpt, i)
    store.write(i, tensors, record)
    return i, record
