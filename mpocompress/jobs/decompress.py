"""Back to dense: :func:`load_state_dict` (a compressed checkpoint as the original state dict) and
:func:`decompress` (written to a file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mpocompress import __version__
from mpocompress.format import DECOMPRESSED_KEY, read_meta, rebuild, stored_tensors, untie
from mpocompress.io import (
    check_output,
    input_paths,
    open_checkpoint,
    path_size,
    save_model_folder,
    save_safetensors,
    save_torch,
    side_files,
)


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
                out[name] = rebuild(entry, [out.pop(c) for c in entry["cores"]], name)
        return untie(meta, out)


def decompress(input_path: str | Path, output_path: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the dense state dict of a compressed checkpoint: a ``.safetensors`` or ``.pt/.pth/.bin``
    file, or (any other name) a model folder: ``model.safetensors`` beside the input folder's config,
    tokenizer and other files, which ``transformers``' ``from_pretrained`` loads.

    Returns:
        A small summary: tensors written, bytes on disk.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    check_output(output_path, input_paths(input_path), force, kind="dense")
    sd = load_state_dict(input_path)
    if output_path.suffix not in (".pt", ".pth", ".bin", ".safetensors"):
        save_model_folder(sd, output_path, {"format": "pt", DECOMPRESSED_KEY: __version__}, side_files(input_path))
    elif output_path.suffix == ".safetensors":
        save_safetensors(sd, output_path, {"format": "pt", DECOMPRESSED_KEY: __version__})
    else:
        save_torch(sd, output_path)
    return {"input": str(input_path), "output": str(output_path), "tensors": len(sd), "output_file_bytes": path_size(output_path)}
