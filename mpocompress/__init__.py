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
    "convert": "mpocompress.pipeline",
    "load_state_dict": "mpocompress.pipeline",
    "decompress": "mpocompress.pipeline",
    "inspect": "mpocompress.pipeline",
    "TTMatrix": "mpocompress.tt",
    "tt_svd": "mpocompress.tt",
    "cores_to_matrix": "mpocompress.tt",
    "compress_": "mpocompress.model",
    "load_compressed_": "mpocompress.model",
    "save_compressed": "mpocompress.model",
    "compress_matrix": "mpocompress.compress",
    "analyze_matrix": "mpocompress.spectra",
    "choose_modes": "mpocompress.shapes",
    "example_checkpoint": "mpocompress.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpocompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
