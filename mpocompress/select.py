"""Which tensors of a state dict are weight matrices, and how each kind is viewed as one.

Pure Python plus tensor reshapes; decisions are made from the tensor's name and shape alone, so a
checkpoint can be compressed without the model's code.

How each kind becomes an ``(out, in)`` matrix (and back, by the inverse reshape):

* **linear** ``(out, in)``: as is.
* **embedding** ``(num_embeddings, dim)``: as is (rows are tokens). Recognised by ``embed`` in the name.
* **conv** ``(out, in/groups, k...)`` (Conv1d/2d/3d, and ConvTranspose whose first axis is ``in``):
  ``(shape[0], prod(shape[1:]))`` -- each output filter is one row, its kernel flattened in
  (channel, kernel position) order.
* **lstm / gru / rnn** ``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}[_reverse]`` and the Cell forms
  ``weight_ih``/``weight_hh``: the stacked-gate matrix ``(gates * hidden, in)`` as PyTorch stores it
  (LSTM gates i, f, g, o; GRU r, z, n), compressed as one MPO as in MPO-LSTM (Sun et al. 2020).
  The gate count is read from ``weight_hh``'s ``rows / cols`` (4 = LSTM, 3 = GRU).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

_RNN = re.compile(r"(^|\.)weight_(ih|hh)(_l\d+)?(_reverse)?$")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16"}


def is_float_dtype(dtype: str) -> bool:
    """True for floating dtypes, given as safetensors (``F32``) or torch (``float32``) names."""
    return dtype.replace("torch.", "") in _FLOAT_DTYPES


def kind_of(name: str, shape: Sequence[int], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """The layer kind of a tensor from its name and shape (see the module docstring).

    ``shapes`` (all tensor shapes of the checkpoint) lets ``weight_ih`` find its ``weight_hh``
    sibling, whose shape tells LSTM (4 gates) from GRU (3).
    """
    if len(shape) >= 3:
        return "conv"
    m = _RNN.search(name)
    if m:
        hh = shape
        if m.group(2) == "ih":
            sibling = name[: m.start(2)] + "hh" + name[m.end(2) :]
            hh = (shapes or {}).get(sibling, ())
        if len(hh) == 2 and hh[1] > 0 and hh[0] % hh[1] == 0:
            return {4: "lstm", 3: "gru"}.get(hh[0] // hh[1], "rnn")
        return "rnn"
    if "embed" in name.lower():
        return "embedding"
    return "linear"


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(out, in)`` matrix a tensor of this shape is viewed as: ``(shape[0], prod(shape[1:]))``."""
    if len(shape) < 2:
        raise ValueError(f"a weight matrix needs >= 2 dimensions, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


def match(name: str, pattern: str) -> bool:
    """Whether a tensor name matches a glob or ``re:REGEX`` pattern.

    The pattern is tried on the tensor name and on its module name (the name without the final
    ``.weight``-style component), so ``--exclude "*.query"`` and ``--exclude "*.query.weight"`` both work.
    Regexes use ``re.search``.
    """
    candidates = [name]
    if "." in name:
        candidates.append(name.rsplit(".", 1)[0])
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.search(c) for c in candidates)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def selected(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Included (by any pattern, or all when there are none) and not excluded."""
    include = list(include)
    if include and not any(match(name, p) for p in include):
        return False
    return not any(match(name, p) for p in exclude)


def layer_filter(
    include: Iterable[str] = (), exclude: Iterable[str] = (), names: set[str] | None = None
) -> Callable[[str], bool]:
    """The one way a weight is chosen, everywhere (``convert``, ``inspect``, ``compress_``): included
    by a pattern (or all when there are none), not excluded, and in ``names`` when that is given."""
    include, exclude = tuple(include), tuple(exclude)

    def chosen(name: str) -> bool:
        return selected(name, include, exclude) and (names is None or name in names)

    return chosen


def is_candidate(shape: Sequence[int], dtype: str) -> bool:
    """Floating tensors with >= 2 dimensions and no empty axis can be compressed."""
    return len(shape) >= 2 and all(s > 0 for s in shape) and is_float_dtype(dtype)
