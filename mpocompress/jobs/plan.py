"""Planning a conversion and compressing one tensor of it.

Which tensors are compressed, how they are grouped into units of work, the global pruning threshold,
and :func:`compress_tensor`: MPO (or a fine-tuned plan), then the codec chain, measured against the
same-size truncated SVD, giving the report row, the metadata entry and the tensors to store.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpocompress.codecs import Codec, decode, encode, magnitude_threshold
from mpocompress.config import MPOConfig
from mpocompress.core.compress import compress_matrix, singular_values
from mpocompress.core.tt import TTMatrix, cores_to_matrix, relative_error, svd_tail_error
from mpocompress.errors import ConfigError, InputError
from mpocompress.format import core_name, decode_entry, layer_entry, rebuild, set_encoded, set_mpo
from mpocompress.io import Checkpoint, dtype_name
from mpocompress.report import LayerRow
from mpocompress.select import is_candidate, kind_of, matrix_shape, selected

log = logging.getLogger(__name__)


DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


#: called before each layer with (tensor name, index, number of layers)
Progress = Callable[[str, int, int], None]


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


def global_threshold(ckpt: Checkpoint, layers: list[str], sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of all selected weights lie (global magnitude pruning).

    Streams over the checkpoint (three passes of one tensor at a time), so memory stays bounded.
    """
    return magnitude_threshold(lambda: (ckpt.get(n) for n in layers), sparsity)


def nbytes_of(t: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
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
    #: how the cores were fitted to recorded inputs before training (None: they were not)
    fit: dict[str, Any] | None = None
    #: how the cores were quantized on those inputs (:func:`codes_outcome`; None: not compensated)
    codes: dict[str, Any] | None = None


def unchanged_row(name: str, t: torch.Tensor, shapes: dict[str, tuple[int, ...]], reason: str | None = None) -> LayerRow:
    """The report row of a selected weight stored as it is."""
    shape = list(t.shape)
    out_f, in_f = matrix_shape(shape)
    numel, nbytes = t.numel(), nbytes_of(t)
    return LayerRow(
        name=name, kind=kind_of(name, shape, shapes), shape=shape, dtype=dtype_name(t.dtype), status="dense",
        dense_params=numel, params=numel, dense_bytes=nbytes, bytes=nbytes, rel_error=0.0,
        svd_rank=min(out_f, in_f), svd_rel_error=0.0, reason=reason,
    )  # fmt: skip


def compress_tensor(
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
    row = unchanged_row(name, t, shapes)
    entry = layer_entry(kind, shape, row.dtype, (out_f, in_f))
    stored: dict[str, torch.Tensor] = {name: t}
    tt = None
    if config.mpo:
        if plan is not None and plan.decided:
            tt = plan.tt
            if tt is not None:
                tt = TTMatrix([c.detach().to(t.dtype) for c in tt.cores], tt.shape)
                row.refine["finetuned"] = True
                if plan.fit is not None:
                    row.refine["calibrated"] = plan.fit
            row.candidates, row.reason = plan.candidates, plan.reason
        else:
            _check_gram(name, gram, in_f)
            res = compress_matrix(t.reshape(out_f, in_f), config, reference_svd=False, gram=gram)
            row.candidates = [c.to_dict() for c in res.candidates]
            row.reason = res.reason
            tt = res.tt
            if tt is not None and config.als_sweeps and len(tt.cores) > 2:
                row.refine["als_sweeps"] = config.als_sweeps
            elif tt is not None and config.als_sweeps:
                row.refine["als_skipped"] = "2 cores (a truncated SVD) are already optimal: --als has nothing to refine"
            if tt is not None and res.fit is not None:
                row.refine["calibrated"] = res.fit
        log.debug("%s: %s", name, row.reason or f"cores {len(tt.cores)} bonds {tt.bond_dims}" if tt is not None else row.reason)
        if tt is not None:
            row.status = "mpo"
            row.cores, row.bond_dims = len(tt.cores), tt.bond_dims
            row.out_modes, row.in_modes, row.padded_shape = list(tt.out_modes), list(tt.in_modes), list(tt.padded_shape)
            stored = set_mpo(entry, name, tt)
    chain = config.chain
    if chain:
        coded = {sname: encode(st, chain, threshold=threshold, mask=masks.get(sname)) for sname, st in stored.items()}
        if gram is not None and tt is None and _gptq_applies(chain, masks.get(name)):
            _check_gram(name, gram, in_f)
            coded[name] = _gptq_encode(row, t, chain, gram, coded[name])
        elif gram is not None and plan is None and tt is not None and not masks and _gptq_applies(chain, None) and compensates(chain[0], len(tt.cores)):
            # (with a plan the cores were quantized in memory, compensated the same way: jobs/tune.py)
            coded = _calibrated_core_codes(row, t.reshape(out_f, in_f), tt, chain, gram, coded)
        if plan is not None and plan.codes is not None:
            row.refine["calibrated_codes"] = plan.codes
        if tt is not None and config.als_sweeps and "calibrated_codes" not in row.refine:  # every codec is lossy: refit the cores while encoding
            coded = _refit_codes(row, name, tt, chain, threshold, masks, coded, config.als_sweeps)
        trial = dict(entry)
        parts_out = set_encoded(trial, coded)
        if sum(nbytes_of(v) for v in parts_out.values()) < sum(nbytes_of(v) for v in stored.values()):
            entry["encoded"] = trial["encoded"]
            row.codecs = [str(c) for c in chain]
            stored = parts_out
            if row.status == "dense":
                row.status = "codec"
        elif row.status == "dense":
            row.reason = f"the codecs ({' '.join(map(str, chain))}) would not make it smaller"
    if row.status == "dense":
        return row, {}, {name: t}
    row.bytes = sum(nbytes_of(v) for v in stored.values())
    decoded = decode_entry(entry, stored.__getitem__)
    recon = rebuild(entry, [decoded[c] for c in entry["cores"]], name) if entry["method"] == "mpo" else decoded[name]
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


def _check_gram(name: str, gram: torch.Tensor | None, in_f: int) -> None:
    if gram is not None and tuple(gram.shape) != (in_f, in_f):
        raise InputError(f"recorded inputs: {name} takes {in_f} inputs but its recorded activations have {gram.shape[0]} features")


def _gptq_applies(chain: list[Codec], mask: torch.Tensor | None) -> bool:
    """Error-compensated quantization applies to one grid quantizer on a plain (unpruned) weight."""
    return len(chain) == 1 and chain[0].has_grid and mask is None


def gptq_codec(matrix: torch.Tensor, gram: torch.Tensor, quant: Codec) -> tuple[torch.Tensor, Any]:
    """``matrix`` (rows as the codec stores them) quantized by GPTQ on recorded inputs with Gram
    ``gram``, on the codec's grid made with each value weighted by its input's energy (``diag C``).
    Returns ``(quantized matrix, grid)``."""
    from mpocompress.core.gptq import gptq

    grid = quant.grid(matrix, torch.diagonal(gram).to(matrix.dtype)[None, :].expand_as(matrix))
    return gptq(matrix, gram, lambda col: quant.snap(grid, col)), grid


def _gptq_encode(
    row: LayerRow, t: torch.Tensor, chain: list[Codec], gram: torch.Tensor, direct: tuple[dict[str, torch.Tensor], dict[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weight quantized by GPTQ on the recorded inputs (k-means centroids weighted by each input's
    energy), or the plain encoding ``direct`` where that has the lower output error on them."""
    from mpocompress.core.refine import output_error

    m = t.reshape(t.shape[0], -1)
    q, grid = gptq_codec(m, gram, chain[0])
    coded = encode(q.reshape(t.shape), chain, grid=grid)
    before = output_error(m, decode(*direct).reshape(m.shape), gram)
    after = output_error(m, decode(*coded).reshape(m.shape), gram)
    row.refine["calibrated"] = {"method": "gptq", "output_error_before": before, "output_error_after": min(before, after)}
    return coded if after < before else direct


def gptq_factor_codes(
    matrix: torch.Tensor, tt: TTMatrix, quant: Codec, gram: torch.Tensor, grids_out: dict[int, Any] | None = None
) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """The two cores of a 2-core MPO (a truncated SVD) encoded by ``quant`` with error compensation on
    recorded inputs (:func:`mpocompress.core.gptq.gptq_factors`), each on a grid made for it as the
    codec stores it (rows = the core's first dimension); ``grids_out`` receives those grids."""
    from mpocompress.core.gptq import gptq_factors

    out_f, in_f = matrix.shape
    r = tt.bond_dims[0]
    shapes = [tuple(c.shape) for c in tt.cores]
    grids: dict[int, Any] = {}

    def snapper(factor: torch.Tensor, k: int):
        grids[k] = quant.grid(factor.reshape(shapes[k][0], -1))
        return lambda col, g=grids[k]: quant.snap(g, col)

    left, right = gptq_factors(matrix, tt.cores[0].reshape(out_f, r), tt.cores[1].reshape(r, in_f), gram, snapper)
    if grids_out is not None:
        grids_out.update(grids)
    return [encode(f.reshape(shapes[k]).to(tt.cores[k].dtype), [quant], grid=grids[k]) for k, f in enumerate((left, right))]


def compensates(quant: Codec, cores: int) -> bool:
    """Whether MPO cores stored by ``quant`` are quantized with error compensation on recorded inputs
    (:func:`compensated_cores`): every grid codec on 3+ cores; on 2 cores (SVD factors) k-means, not
    int8, whose rounding is nearly lossless -- there GPTQ on the factors fitted the calibration
    inputs and lost on held-out ones on 12 of 12 real layers (``python benchmarks/calibrated.py --core-codes``)."""
    return quant.has_grid and (cores > 2 or quant.name != "int8")


def compensated_cores(
    matrix: torch.Tensor, tt: TTMatrix, quant: Codec, gram: torch.Tensor, grids: dict[int, Any]
) -> tuple[list[torch.Tensor], str]:
    """MPO cores quantized by the grid codec ``quant`` with error compensation on recorded inputs
    (Gram ``gram``), aiming at ``matrix``: 2 cores by GPTQ on each factor
    (:func:`mpocompress.core.gptq.gptq_factors`), 3+ cores one at a time, largest first, each on a
    grid made for it as it is then, followed by a refit of the cores still free to the outputs
    (:func:`mpocompress.core.refine.refit_quantized` with the ridged Gram): GPTQ/OBQ's compensation at
    the granularity of cores. ``grids`` receives each core's grid (rows = the core's first
    dimension); every returned core lies on its grid. Returns ``(cores, method)``."""
    from mpocompress.core.refine import refit_quantized
    from mpocompress.core.whiten import ridged

    if len(tt.cores) == 2:
        return [decode(p, m) for p, m in gptq_factor_codes(matrix, tt, quant, gram, grids)], "gptq_factors"

    def roundtrip(k: int, core: torch.Tensor) -> torch.Tensor:
        grids[k] = quant.grid(core.reshape(core.shape[0], -1))
        return decode(*encode(core, [quant], grid=grids[k]))

    return list(refit_quantized(matrix, tt, roundtrip, sweeps=1, gram=ridged(gram)).cores), "refit_quantized"


def _calibrated_core_codes(
    row: LayerRow, matrix: torch.Tensor, tt: TTMatrix, chain: list[Codec], gram: torch.Tensor,
    direct: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]],
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:  # fmt: skip
    """The cores quantized with error compensation (:func:`compensated_cores`), kept where their
    output error on the recorded inputs beats quantizing the cores directly (``direct``)."""
    names = list(direct)
    grids: dict[int, Any] = {}
    cores, method = compensated_cores(matrix, tt, chain[0], gram, grids)
    coded = {n: encode(c.to(tt.cores[k].dtype), chain, grid=grids[k]) for k, (n, c) in enumerate(zip(names, cores))}
    row.refine["calibrated_codes"] = codes_outcome(matrix, [decode(*direct[n]) for n in names], cores, gram, method)
    return coded if row.refine["calibrated_codes"]["kept"] else direct


def codes_outcome(matrix: torch.Tensor, rounded: list[torch.Tensor], compensated: list[torch.Tensor], gram: torch.Tensor,
                  method: str) -> dict[str, Any]:  # fmt: skip
    """The report's record of a compensated core quantization: the output errors on the recorded
    inputs of the rounded and the compensated cores, and whether the compensated ones are kept
    (only when better)."""
    from mpocompress.core.refine import output_error

    shape = (matrix.shape[0], matrix.shape[1])
    before = output_error(matrix, cores_to_matrix(rounded, shape), gram)
    after = output_error(matrix, cores_to_matrix(compensated, shape), gram)
    return {"method": method, "output_error_before": before, "output_error_after": min(before, after), "kept": after < before}


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
