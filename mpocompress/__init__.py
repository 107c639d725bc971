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
    "MPOConfig": "mpocompress.config",
    "Gates": "mpocompress.config",
    "convert": "mpocompress.jobs.convert",
    "load_state_dict": "mpocompress.jobs.convert",
    "decompress": "mpocompress.jobs.convert",
    "inspect": "mpocompress.jobs.convert",
    "TTMatrix": "mpocompress.core.tt",
    "tt_svd": "mpocompress.core.tt",
    "cores_to_matrix": "mpocompress.core.tt",
    "compress_": "mpocompress.nn.surgery",
    "load_compressed_": "mpocompress.nn.surgery",
    "save_compressed": "mpocompress.nn.surgery",
    "compress_matrix": "mpocompress.core.compress",
    "analyze_matrix": "mpocompress.core.spectra",
    "choose_modes": "mpocompress.core.modes",
    "example_checkpoint": "mpocompress.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpocompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
