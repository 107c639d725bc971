"""Bond-dimension spectra of a dense checkpoint (or the stored report of a compressed one)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mpocompress.core.spectra import analyze_matrix
from mpocompress.errors import ConfigError
from mpocompress.format import read_meta
from mpocompress.io import open_checkpoint
from mpocompress.jobs.plan import Progress, select_layers
from mpocompress.select import kind_of, matrix_shape

log = logging.getLogger(__name__)


def inspect_checkpoint(
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
