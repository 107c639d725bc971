"""mpocompress: make trained PyTorch checkpoints small with MPO (tensor-train matrix) cores.

Importing the package is cheap: torch is imported only when one of the names below is first used.

>>> import mpocompress
>>> sd = mpocompress.load_state_dict("model.mpo.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # configs (frozen dataclasses, stored in every output)
    "MPOConfig": "mpocompress.config",
    "TuneConfig": "mpocompress.config",
    "Gates": "mpocompress.config",
    "Recipe": "mpocompress.config",
    # checkpoint-level jobs
    "convert": "mpocompress.jobs.convert",
    "load_state_dict": "mpocompress.jobs.decompress",
    "decompress": "mpocompress.jobs.decompress",
    "inspect_checkpoint": "mpocompress.jobs.inspect",
    "Report": "mpocompress.report",
    "LayerRow": "mpocompress.report",
    # the numerical core
    "TTMatrix": "mpocompress.core.tt",
    "tt_svd": "mpocompress.core.tt",
    "cores_to_matrix": "mpocompress.core.tt",
    "compress_matrix": "mpocompress.core.compress",
    "analyze_matrix": "mpocompress.core.spectra",
    "choose_modes": "mpocompress.core.modes",
    # layers and model surgery
    "MPOLinear": "mpocompress.nn.layers",
    "MPOConv": "mpocompress.nn.layers",
    "MPOEmbedding": "mpocompress.nn.layers",
    "MPOMultiheadAttention": "mpocompress.nn.layers",
    "MPOConv1D": "mpocompress.nn.layers",
    "MPOLSTM": "mpocompress.nn.layers",
    "MPOGRU": "mpocompress.nn.layers",
    "MPOLSTMCell": "mpocompress.nn.layers",
    "MPOGRUCell": "mpocompress.nn.layers",
    "compress_": "mpocompress.nn.surgery",
    "load_compressed_": "mpocompress.nn.surgery",
    "save_compressed": "mpocompress.nn.surgery",
    # errors
    "MPOCompressError": "mpocompress.errors",
    "ConfigError": "mpocompress.errors",
    "InputError": "mpocompress.errors",
    "OutputError": "mpocompress.errors",
    "GateError": "mpocompress.errors",
    "Interrupted": "mpocompress.errors",
    "example_checkpoint": "mpocompress.data",
}
#: a name that was exported before and now lives elsewhere: old name -> new name
_RENAMED = {"inspect": "inspect_checkpoint"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _RENAMED:
        raise AttributeError(
            f"mpocompress.{name} was renamed mpocompress.{_RENAMED[name]} (it shadowed the standard library's {name})"
        )
    raise AttributeError(f"module 'mpocompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
