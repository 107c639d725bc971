"""Codecs that make stored tensors really smaller: pruning and quantization, packed.

Numerical core (no I/O). One registry (:mod:`mpocompress.codecs.base`): each codec is a small frozen
dataclass in its family's module, with its parameter, validation, parts and encode/decode together:

* :mod:`~mpocompress.codecs.pruning` -- ``Magnitude(sparsity)``, ``Channel(theta)`` (PP of PP+PQ),
  ``Units(fraction)``; positions as bitmask, indices or kept rows/columns;
* :mod:`~mpocompress.codecs.kmeans` -- ``KMeans(k)`` (PQ of PP+PQ), ``RowKMeans(k)`` (a codebook per row);
* :mod:`~mpocompress.codecs.seofp` -- ``SEOFP(exp_bits)`` (sign-exponent-only floats);
* :mod:`~mpocompress.codecs.int8` -- ``Int8()``; :mod:`~mpocompress.codecs.casts` -- ``FP16()``, ``BF16()``;
* :mod:`~mpocompress.codecs.chain` -- a pruner then a quantizer on one tensor; :mod:`~mpocompress.codecs.packing`
  -- bit packing.

Strings (``"kmeans:16"``) are parsed at the edges with :func:`parse_codec`. Papers and our choices:
docs/methods.md.
"""

from mpocompress.codecs.base import CODECS, Codec, codec_names, parse_codec, register
from mpocompress.codecs.casts import BF16, FP16, narrowed
from mpocompress.codecs.chain import decode, encode, nbytes, split_chain
from mpocompress.codecs.int8 import Int8
from mpocompress.codecs.kmeans import (
    KMEANS_DP_POINTS,
    KMeans,
    KMeansProblem,
    RowKMeans,
    kmeans_1d,
    kmeans_1d_many,
    kmeans_1d_solve,
)
from mpocompress.codecs.packing import pack_bits, unpack_bits
from mpocompress.codecs.pruning import (
    LINEAR_BLOCK,
    POSITION_PARTS,
    Channel,
    Magnitude,
    Units,
    channel_mask,
    channel_scores,
    magnitude_mask,
    magnitude_threshold,
)
from mpocompress.codecs.seofp import SEOFP, seofp_codes, seofp_decode


def part_names() -> tuple[str, ...]:
    """Every part name a codec chain may write (``values`` and each registered codec's parts)."""
    names = {"values"}
    for cls in CODECS.values():
        names.update(cls.parts)
    return tuple(sorted(names))


__all__ = [
    "BF16", "CODECS", "FP16", "KMEANS_DP_POINTS", "LINEAR_BLOCK", "POSITION_PARTS", "SEOFP", "Channel", "Codec", "Int8",
    "KMeans", "Magnitude", "Units", "channel_mask", "channel_scores", "codec_names", "decode", "encode", "kmeans_1d_many",
    "kmeans_1d_solve", "KMeansProblem", "RowKMeans",
    "kmeans_1d", "magnitude_mask", "magnitude_threshold", "narrowed", "nbytes", "pack_bits", "parse_codec", "part_names",
    "register", "seofp_codes", "seofp_decode", "split_chain", "unpack_bits",
]  # fmt: skip
