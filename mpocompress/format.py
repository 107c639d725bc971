"""The on-disk format, in one place: the only writer and reader of mpocompress metadata.

A compressed checkpoint is a safetensors file (or a sharded folder) whose header metadata holds one
JSON document under :data:`META_KEY` (docs/format.md; stored compressed when long: :func:`encode_meta`):
the format version, the config, and one entry per compressed layer (its kind, shape, dtype, method,
MPO modes and cores, codec parts). Everything that writes or reads that document goes through here:
:func:`layer_entry` and :func:`file_metadata` build it, :func:`read_meta` checks the version and
validates every entry, :func:`stored_tensors` and :func:`rebuild` turn stored tensors back into cores
or dense weights. No files are opened here: a checkpoint object (:class:`mpocompress.io.Checkpoint`)
is passed in.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from mpocompress import __version__
from mpocompress.codecs import decode, parse_codec, part_names
from mpocompress.core.tt import TTMatrix, cores_to_matrix
from mpocompress.errors import InputError

log = logging.getLogger(__name__)


META_KEY = "mpocompress"


#: version of the on-disk format written here (docs/format.md); readers refuse newer versions.
#: 2: the metadata document may be stored compressed (:func:`encode_meta`); 3: tensors passed through
#: may be stored in a narrower float dtype (``"narrowed"``: name -> their own dtype, restored on
#: reading by :func:`stored_tensors`). Older versions are read as before
FORMAT_VERSION = 3
#: a metadata document longer than this (characters of JSON) is stored zlib-compressed, base64-encoded,
#: after :data:`ZLIB_PREFIX` -- per-layer entries are ~1 KB each, 22 % of a 148-layer Conv-TasNet file
#: at 6.25 % of its size, and compress ~10x (docs/format.md)
COMPRESS_META_ABOVE = 4096
ZLIB_PREFIX = "zlib:"
#: a compressed metadata document may expand to at most this many bytes (beyond: bad input, not a
#: memory blow-up)
MAX_META_BYTES = 256 << 20


#: metadata key marking a ``decompress`` output (so ``--force`` recognises it)
DECOMPRESSED_KEY = "mpocompress_decompressed"
#: layer kinds an entry may have (how the weight was viewed as a matrix: :mod:`mpocompress.select`)
KINDS = ("linear", "embedding", "conv", "lstm", "gru", "rnn")
#: how a layer's weight is stored: MPO cores, or the weight itself (through codecs when ``encoded``)
METHODS = ("mpo", "dense")
#: floating dtypes a layer entry may name
DTYPES = ("float64", "float32", "float16", "bfloat16")


class StoredCheckpoint(Protocol):
    """What the readers here need of an open checkpoint (:class:`mpocompress.io.Checkpoint`)."""

    path: Any

    def keys(self) -> list[str]:
        """Names of the stored tensors."""

    def get(self, name: str) -> torch.Tensor:
        """One stored tensor."""

    def metadata(self) -> dict[str, str]:
        """The file's string metadata."""


def layer_entry(kind: str, shape: list[int], dtype: str, matrix_shape: tuple[int, int]) -> dict[str, Any]:
    """A new layer entry for a weight stored as it is (``method: dense``); :func:`set_mpo` and the
    codecs fill in the rest.

    Raises:
        ValueError: a kind or dtype outside the documented lists.
    """
    if kind not in KINDS or dtype not in DTYPES:
        raise ValueError(f"layer entry: kind {kind!r} must be one of {KINDS}, dtype {dtype!r} one of {DTYPES}")
    return {"kind": kind, "shape": list(shape), "dtype": dtype, "matrix_shape": list(matrix_shape), "method": "dense"}


def set_mpo(entry: dict[str, Any], name: str, tt: TTMatrix) -> dict[str, torch.Tensor]:
    """Record that weight ``name`` is stored as the cores of ``tt``; returns the tensors to store."""
    stored = {core_name(name, k): c for k, c in enumerate(tt.cores)}
    entry.update(
        method="mpo", padded_shape=list(tt.padded_shape), out_modes=list(tt.out_modes), in_modes=list(tt.in_modes),
        bond_dims=tt.bond_dims, cores=list(stored),
    )  # fmt: skip
    return stored


def set_encoded(
    entry: dict[str, Any], coded: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]
) -> dict[str, torch.Tensor]:
    """Record that each stored tensor (``STORED`` -> ``(parts, codec meta)``, from
    :func:`mpocompress.codecs.encode`) is written as its parts ``STORED.part``; returns those tensors."""
    encoded: dict[str, Any] = {}
    out: dict[str, torch.Tensor] = {}
    for sname, (parts, meta) in coded.items():
        meta["parts"] = {part: f"{sname}.{part}" for part in parts}
        encoded[sname] = meta
        out.update({f"{sname}.{part}": v for part, v in parts.items()})
    entry["encoded"] = encoded
    return out


def file_metadata(
    config: dict[str, Any],
    layers: dict[str, dict[str, Any]],
    *,
    recipe: list[dict[str, Any]] | None = None,
    totals: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    source: str = "convert",
    tied: dict[str, str] | None = None,
    narrowed: dict[str, str] | None = None,
) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a compressed checkpoint: ``{"format": "pt", META_KEY: json}``.
    ``narrowed``: tensors passed through that are stored narrower, by name, with their own dtype.

    Raises:
        ValueError: a layer entry that :func:`read_meta` would refuse (so nothing unreadable is written).
    """
    for name, entry in layers.items():
        problem = _entry_problem(entry)
        if problem or entry.get("kind") not in KINDS:
            raise ValueError(f"layer entry for {name!r}: {problem or 'kind ' + repr(entry.get('kind'))}")
    meta: dict[str, Any] = {
        "format": "mpocompress",
        "format_version": FORMAT_VERSION,
        "mpocompress_version": __version__,
        "source": source,
        "config": config,
        "recipe": recipe or [],
        "layers": layers,
        "totals": totals or {},
    }
    if finetune is not None:
        meta["finetune"] = finetune
    if tied:  # names that were the very same tensor as another (tied weights): stored once
        meta["tied"] = dict(tied)
    if narrowed:
        meta["narrowed"] = dict(sorted(narrowed.items()))
    return {"format": "pt", META_KEY: encode_meta(meta)}


def encode_meta(meta: dict[str, Any]) -> str:
    """The metadata document as stored: JSON, or, when longer than :data:`COMPRESS_META_ABOVE` and
    smaller so, ``"zlib:" + base64(zlib(JSON))``."""
    text = json.dumps(meta, sort_keys=True)
    if len(text) <= COMPRESS_META_ABOVE:
        return text
    packed = ZLIB_PREFIX + base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")
    return packed if len(packed) < len(text) else text


def decode_meta(raw: str) -> Any:
    """The JSON value of a stored metadata document (plain or compressed by :func:`encode_meta`).

    Raises:
        ValueError: not base64, not zlib, larger than :data:`MAX_META_BYTES` unpacked, or not JSON.
    """
    if raw.startswith(ZLIB_PREFIX):
        try:
            data = base64.b64decode(raw[len(ZLIB_PREFIX) :], validate=True)
            unpack = zlib.decompressobj()
            text = unpack.decompress(data, MAX_META_BYTES)
        except (binascii.Error, zlib.error) as e:
            raise ValueError(f"compressed metadata does not decode: {e}") from e
        if unpack.unconsumed_tail:
            raise ValueError(f"compressed metadata unpacks to over {MAX_META_BYTES} bytes")
        raw = text.decode("utf-8")
    return json.loads(raw)


def read_meta(ckpt: StoredCheckpoint) -> dict[str, Any] | None:
    """The mpocompress metadata of a compressed checkpoint, or None for a dense one.

    Every reader goes through here: the format version is checked (a newer one is refused) and the
    layer entries are validated, so tampered metadata is bad input (exit 3), never a crash.
    """
    raw = ckpt.metadata().get(META_KEY)
    if raw is None:
        return None
    try:
        meta = decode_meta(raw)
    except ValueError as e:
        raise InputError(f"{ckpt.path}: corrupt mpocompress metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != "mpocompress":
        raise InputError(f"{ckpt.path}: metadata key {META_KEY!r} is not mpocompress metadata")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InputError(f"{ckpt.path}: corrupt mpocompress metadata (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{ckpt.path}: format version {version} is newer than this mpocompress reads ({FORMAT_VERSION}); "
            "upgrade mpocompress"
        )
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise InputError(f"{ckpt.path}: corrupt mpocompress metadata ('layers' is not a mapping)")
    for name, entry in layers.items():
        problem = _entry_problem(entry)
        if problem:
            raise InputError(f"{ckpt.path}: corrupt mpocompress metadata for {name!r}: {problem}")
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise InputError(f"{ckpt.path}: corrupt mpocompress metadata ('tied' is not a mapping of names)")
    narrowed = meta.get("narrowed", {})
    if not isinstance(narrowed, dict) or not all(isinstance(k, str) and v in DTYPES for k, v in narrowed.items()):
        raise InputError(f"{ckpt.path}: corrupt mpocompress metadata ('narrowed' is not a mapping of names to float dtypes)")
    return meta


def untie(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every tied name (stored once, see :func:`file_metadata`) its tensor again, in place."""
    for alias, source in meta.get("tied", {}).items():
        if source in tensors and alias not in tensors:
            tensors[alias] = tensors[source]
    return tensors


def _ints(v: Any, n: int | None = None) -> bool:
    return (
        isinstance(v, list)
        and (n is None or len(v) == n)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    )


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one layer entry of the metadata, or None."""
    if not isinstance(entry, dict):
        return "not a mapping"
    if not _ints(entry.get("shape")) or len(entry["shape"]) < 2:
        return f"shape {entry.get('shape')!r}"
    if entry.get("dtype") not in DTYPES:
        return f"dtype {entry.get('dtype')!r}"
    method = entry.get("method", "mpo")
    if method not in METHODS:
        return f"method {method!r}"
    if method == "mpo":
        if not _ints(entry.get("matrix_shape"), 2) or math.prod(entry["matrix_shape"]) != math.prod(entry["shape"]):
            return f"matrix_shape {entry.get('matrix_shape')!r} does not fit shape {entry['shape']}"
        cores = entry.get("cores")
        if not isinstance(cores, list) or len(cores) < 2 or not all(isinstance(c, str) for c in cores):
            return "cores must name 2 or more tensors"
        if not (_ints(entry.get("out_modes"), len(cores)) and _ints(entry.get("in_modes"), len(cores))):
            return "out_modes/in_modes must list one mode per core"
    encoded = entry.get("encoded", {})
    if not isinstance(encoded, dict):
        return "encoded must be a mapping"
    for sname, m in encoded.items():
        problem = _codec_problem(m)
        if problem:
            return f"encoded {sname!r}: {problem}"
    return None


def _codec_problem(m: Any) -> str | None:
    """What is wrong with the codec metadata of one stored tensor, or None."""
    if not isinstance(m, dict) or not isinstance(m.get("parts"), dict) or not all(isinstance(v, str) for v in m["parts"].values()):
        return "parts must map names to tensors"
    if m.get("dtype") not in DTYPES or not _ints(m.get("shape")):
        return f"dtype {m.get('dtype')!r} / shape {m.get('shape')!r}"
    chain = m.get("chain")
    if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
        return "chain must list codec names"
    try:
        for c in chain:
            parse_codec(c)
    except ValueError as e:
        return str(e)
    return None


def core_name(name: str, k: int) -> str:
    """Name of core ``k`` of tensor ``name`` in the output file."""
    return f"{name}_cores.{k}"


def part_suffixes() -> tuple[str, ...]:
    """Suffixes of codec parts (``fc.weight.codes``...), from the codec registry; an input tensor
    with such a name would clash with what mpocompress writes."""
    return tuple(f".{p}" for p in part_names())


def decode_entry(entry: dict[str, Any], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
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


def rebuild(entry: dict[str, Any], cores: list[torch.Tensor], name: str) -> torch.Tensor:
    """The dense weight (original shape and dtype) of an MPO layer entry from its decoded cores."""
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


def stored_tensors(ckpt: StoredCheckpoint, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed checkpoint with codec parts decoded: MPO cores as float cores,
    codec-only weights as dense weights, tensors stored narrower in their own dtype again, all else
    as stored.

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
    for name, dtype in meta.get("narrowed", {}).items():
        if name not in out:
            raise InputError(f"{ckpt.path}: metadata names tensor {name!r}, which the file lacks")
        if not out[name].is_floating_point():
            raise InputError(f"{ckpt.path}: tensor {name!r} is stored as {out[name].dtype}, not as a float to widen")
        out[name] = out[name].to(getattr(torch, dtype))
    for name, entry in meta["layers"].items():
        if entry.get("encoded"):
            try:
                out.update(decode_entry(entry, ckpt.get))
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
                # decoding untrusted parts: metadata that does not fit the stored tensors is bad input
                raise InputError(f"{ckpt.path}: layer {name!r}: stored codec parts do not fit the metadata ({e})") from e
    return out
