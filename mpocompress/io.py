"""The one module that touches files: reading checkpoints, writing outputs atomically.

Reading is lazy where the format allows: a ``.safetensors`` file (or a sharded folder with a
``model.safetensors.index.json``) is opened with ``safe_open`` and tensors are read one at a time, so a
checkpoint larger than memory can be converted. ``.pt/.pth/.bin/.ckpt`` files are read with
``torch.load(weights_only=True, mmap=True)`` -- never unpickling code -- and the usual nesting
(``state_dict``, ``model``, ``model_state``, Lightning checkpoints) is unwrapped.

Outputs are written to a temporary name beside the target and renamed into place, so a crash never
leaves a half-written file; the input is never overwritten.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import InputError, OutputError
from mpocompress.format import DECOMPRESSED_KEY, META_KEY

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
#: index/file metadata key listing the files copied beside the weights (config, tokenizer...)
SIDE_FILES_KEY = "mpocompress.side_files"
#: suffixes of weight files a model folder may hold in other formats: never copied as side files
_WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".tflite", ".npz")
#: keys under which training scripts nest the state dict, tried in this order
NESTING_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network", "weights")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype, torch.uint8)).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


class Checkpoint:
    """A read-only view of a checkpoint's tensors: names, shapes and dtypes without reading data.

    Use :func:`open_checkpoint`. Tensors are read one at a time with :meth:`get`.
    """

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self.files = files
        #: every path the checkpoint is read from (files, index, folder): never written over
        self.inputs: list[Path] = [path, *files]
        #: top-level entries of a training checkpoint that are not model weights (optimizer, EMA...)
        self.dropped: list[str] = []
        #: names of tensors that are the same tensor as another one (tied weights): ``{alias: name}``
        self.tied: dict[str, str] = {}

    def keys(self) -> list[str]:
        """Names of the tensors, in file order."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        """Torch dtype name (``"float32"``)."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """String metadata (safetensors ``__metadata__`` or the index's ``metadata``)."""
        return {}

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor's data, from its shape and dtype (without reading it)."""
        return math.prod(self.shape(name)) * _itemsize(self.dtype(name))

    @property
    def nbytes_on_disk(self) -> int:
        """Bytes of the input as the report compares them: the files, or for a training checkpoint
        that also holds an optimizer, EMA weights or the like, the model's tensors only."""
        if self.dropped:
            return sum(self.nbytes(n) for n in self.keys())
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the open files."""
        pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsCheckpoint(Checkpoint):
    """One ``.safetensors`` file or a sharded folder, read lazily."""

    def __init__(self, path: Path, files: list[Path], index: dict[str, Any] | None = None):
        from safetensors import safe_open

        super().__init__(path, files)
        self._handles = {}
        self._layout: dict[Path, tuple[dict[str, Any], int]] = {}
        meta = None if index is None else index.get("metadata")
        self._index_metadata = None if index is None else (dict(meta) if isinstance(meta, dict) else {})
        from safetensors import SafetensorError

        for f in files:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                self.close()
                raise InputError(f"{f}: not a valid safetensors file ({_first_line(e)})") from e
        self._where: dict[str, Path] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[k] = f
        if index is not None:
            self.inputs.append(index["__index_path__"])
            weight_map = {k: path / v for k, v in index["weight_map"].items()}
            lacking = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if lacking:
                raise InputError(
                    f"{path}: the index names {len(lacking)} tensors its shards lack, e.g. {lacking[0]!r}"
                )
            unlisted = [k for k in self._where if k not in weight_map]
            if unlisted:
                raise InputError(
                    f"{path}: shard {self._where[unlisted[0]].name} holds {len(unlisted)} tensors the index's "
                    f"weight_map does not list, e.g. {unlisted[0]!r} (a stale or edited index?)"
                )

    def keys(self) -> list[str]:
        """Names of the tensors of every shard."""
        return list(self._where)

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, from the header."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """Torch dtype name of one tensor, from the header."""
        st = self._slice(name).get_dtype()
        return dtype_name(_ST_DTYPES[st]) if st in _ST_DTYPES else st.lower()

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with a plain positioned read into fresh memory.

        Not through the memory map: pages touched through it would stay resident (and count in
        the process's RSS) for as long as the file is open, so memory would grow with the
        checkpoint instead of staying at one tensor.
        """
        path = self._where[name]
        try:
            if path not in self._layout:
                self._layout[path] = read_safetensors_header(path)
            header, start = self._layout[path]
            info = header[name]
            if info["dtype"] not in _ST_DTYPES:  # float8 and other rare types: safetensors reads them
                return self._handles[path].get_tensor(name)
            begin, end = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            with open(path, "rb") as f:
                f.seek(start + begin)
                if f.readinto(memoryview(buf.numpy())) != end - begin:
                    raise InputError(f"{path}: file ends inside tensor {name!r}")
            if end - begin != math.prod(info["shape"]) * buf.new_empty(0, dtype=dtype).element_size():
                raise InputError(f"{path}: tensor {name!r} has {end - begin} bytes, not what its shape and dtype need")
            return buf.view(dtype).reshape(info["shape"])
        except OSError as e:
            raise InputError(f"{path}: cannot read tensor {name!r} ({e.strerror or e})") from e

    def metadata(self) -> dict[str, str]:
        """The string metadata of the index (sharded) or of the file."""
        if self._index_metadata is not None:
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self._index_metadata.items()}
        first = self._handles[self.files[0]] if self.files else None
        return dict(first.metadata() or {}) if first is not None else {}

    def close(self) -> None:
        # safe_open handles free their mmap when dropped
        """Drop the safetensors handles (their memory maps go with them)."""
        self._handles = {}


class StateDictCheckpoint(Checkpoint):
    """A torch-pickle checkpoint loaded (memory-mapped where possible) into a flat state dict."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor]):
        super().__init__(path, [path])
        self.tied = tied_aliases(state)
        self._state = {k: v for k, v in state.items() if k not in self.tied}

    def keys(self) -> list[str]:
        """Names of the tensors (a tied tensor once: its other names are in :attr:`tied`)."""
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor."""
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> str:
        """Torch dtype name of one tensor."""
        return dtype_name(self._state[name].dtype)

    def get(self, name: str) -> torch.Tensor:
        """One tensor (memory-mapped where the file allowed it)."""
        return self._state[name]


def tied_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for every tensor that is the very same tensor as an earlier one (the
    same storage, offset, shape and strides: a tied ``lm_head``/embedding saved by ``torch.save``)."""
    first: dict[tuple[Any, ...], str] = {}
    out = {}
    for name, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def fill_tied(own: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add to ``tensors`` the names a model ties to one of them (``own``: the model's state dict; a
    Hugging Face folder stores a tied ``lm_head.weight`` only as the embedding), in place."""
    for alias, source in tied_aliases(own).items():
        if alias not in tensors and source in tensors:
            tensors[alias] = tensors[source]
        elif source not in tensors and alias in tensors:
            tensors[source] = tensors[alias]
    return tensors


def side_files(folder: Path) -> list[Path]:
    """The files of a model folder that are not weights (``config.json``, tokenizer and generation
    files, README...): copied beside a folder output so it stays a loadable model folder."""
    if not folder.is_dir():
        return []
    return sorted(
        f for f in folder.iterdir()
        if f.is_file() and not f.is_symlink() and not f.name.startswith(".")
        and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json")
    )  # fmt: skip


def copy_side_files(files: list[Path], folder: Path) -> list[str]:
    """Copy ``files`` into ``folder`` (a temporary output folder); their names."""
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return [f.name for f in files]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def unwrap_state_dict(
    obj: Any, where: str = "checkpoint", dropped: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint and flatten it to ``{name: tensor}``.

    Nested dicts of tensors are flattened with dots (``{"enc": {"w": t}}`` -> ``"enc.w"``); non-tensor
    leaves (step counters, hyper-parameters) are dropped with a warning. In a training checkpoint
    (``{"model": ..., "optimizer": ..., "epoch": 3}``) the model's weights are taken and the other
    top-level entries are named on stderr and appended to ``dropped``.
    """
    if not isinstance(obj, Mapping):
        raise InputError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    if obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in NESTING_KEYS:
            if isinstance(obj.get(key), Mapping):
                others = [str(k) for k in obj if k != key]
                if others:
                    log.warning(
                        "%s: a training checkpoint: using its %r weights and dropping %s (ratios are against "
                        "the model weights only)", where, key, ", ".join(others[:8]) + (" ..." if len(others) > 8 else ""),
                    )  # fmt: skip
                    if dropped is not None:
                        dropped.extend(others)
                return unwrap_state_dict(obj[key], where, dropped)
    flat: dict[str, torch.Tensor] = {}
    dropped: list[str] = []

    def walk(prefix: str, m: Mapping) -> None:
        for k, v in m.items():
            name = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                flat[name] = v
            elif isinstance(v, Mapping):
                walk(name + ".", v)
            else:
                dropped.append(name)

    walk("", obj)
    if dropped:
        log.warning("%s: ignoring %d non-tensor entries (%s)", where, len(dropped), ", ".join(dropped[:5]))
    if not flat:
        raise InputError(f"{where}: holds no tensors")
    return flat


def _load_torch(path: Path, dropped: list[str] | None = None) -> dict[str, torch.Tensor]:
    import pickle

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=zipfile.is_zipfile(path))
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = load(mmap=False)
    except pickle.UnpicklingError as e:
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if m is None:
            detail = re.search(r"WeightsUnpickler error: (.+)", str(e).replace("\n\n", " "))
            raise InputError(
                f"{path}: not a readable torch checkpoint ({detail.group(1).strip()[:120] if detail else 'corrupt pickle'})"
            ) from e
        raise InputError(
            f"{path}: refused to unpickle code ({m.group(1)}): mpocompress loads with weights_only=True; "
            "re-save the checkpoint as a plain state dict"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        # what torch's unpickler raises on bytes that are not a checkpoint
        raise InputError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from e
    return unwrap_state_dict(obj, str(path), dropped)


def input_paths(path: str | os.PathLike) -> list[Path]:
    """The paths a checkpoint is read from (the file; or the folder, its index and shards), found
    without reading tensors, so the outputs can be checked against them before any work."""
    p = Path(path)
    out = [p]
    if p.is_dir():
        for index in [p / INDEX_NAME, *sorted(p.glob("*.safetensors.index.json"))]:
            if index.is_file():
                out.append(index)
                try:
                    weight_map = json.loads(index.read_text()).get("weight_map") or {}
                    out.extend(p / v for v in set(weight_map.values()) if isinstance(v, str))
                except (OSError, ValueError, AttributeError, TypeError):
                    pass
        out.extend(p.glob("*.safetensors"))
    return out


def _read_index(folder: Path, index: Path) -> tuple[list[Path], dict[str, Any]]:
    """The shard files an index names (each inside ``folder``) and the parsed index."""
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise InputError(f"{index}: not a valid safetensors index ({_first_line(e)})") from e
    root = folder.resolve()
    for v in sorted(set(weight_map.values())):
        f = (folder / v).resolve()
        if Path(v).is_absolute() or ".." in Path(v).parts or f.parent != root:
            raise InputError(f"{index}: names shard {v!r}, outside its folder (refused)")
        if not (folder / v).is_file():
            raise InputError(f"{index}: names shard {v}, which is missing")
    named = {folder / v for v in weight_map.values()}
    orphans = [f.name for f in folder.glob("*-of-*.safetensors") if f not in named]
    if orphans:
        raise InputError(f"{index}: shard {orphans[0]} is in the folder but the index's weight_map names none of its tensors")
    data["__index_path__"] = index
    return sorted(named), data


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint for reading.

    Args:
        path: a ``.safetensors`` file, a folder with ``model.safetensors.index.json`` (or another
            ``*.safetensors.index.json``), or a ``.pt/.pth/.bin/.ckpt`` torch checkpoint.

    Raises:
        InputError: missing path, folder without an index, corrupt or unsupported file, pickled code.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        index = p / INDEX_NAME
        if not index.exists():
            others = sorted(p.glob("*.safetensors.index.json"))
            if not others and (p / "model.safetensors").is_file():  # the usual Hugging Face layout
                return SafetensorsCheckpoint(p, [p / "model.safetensors"])
            if len(others) != 1:
                raise InputError(
                    f"{p}: folder has no {INDEX_NAME} (a sharded checkpoint needs its index) and no model.safetensors"
                )
            index = others[0]
        return SafetensorsCheckpoint(p, *_read_index(p, index))
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    if p.suffix == ".safetensors" or (p.suffix not in TORCH_SUFFIXES and _looks_like_safetensors(p)):
        return SafetensorsCheckpoint(p, [p])
    if p.suffix in TORCH_SUFFIXES or zipfile.is_zipfile(p):
        dropped: list[str] = []
        ckpt = StateDictCheckpoint(p, _load_torch(p, dropped))
        ckpt.dropped = dropped
        return ckpt
    raise InputError(f"{p}: unsupported checkpoint format (expected .safetensors, a sharded folder, or .pt/.pth/.bin/.ckpt)")


# ---------------------------------------------------------------------------------------------
# writing


def partial_path(output: Path) -> Path:
    """The work folder of a conversion into ``output``: ``.NAME.partial`` beside it."""
    return output.parent / f".{output.name}.partial"


LOCK_NAME = "lock"


#: what an output is, for the --force rule: only something recognisably written by mpocompress is replaced
OUTPUT_KINDS = ("checkpoint", "dense", "report", "plot")
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_ours(path: Path, kind: str) -> bool:
    """Whether ``path`` is recognisably an earlier output of this tool of the given kind."""
    try:
        if path.is_symlink():
            return False
        if kind == "checkpoint" and path.is_dir():
            entries = list(path.iterdir())
            if not any(e.name == INDEX_NAME for e in entries):
                return False
            meta = json.loads((path / INDEX_NAME).read_text()).get("metadata") or {}
            copied = set(json.loads(meta.get(SIDE_FILES_KEY, "[]")))
            if any(not e.is_file() or not (e.name == INDEX_NAME or _SHARD_NAME.fullmatch(e.name) or e.name in copied)
                   for e in entries):  # fmt: skip
                return False
            return META_KEY in meta
        if kind == "dense" and path.is_dir():
            weights = path / "model.safetensors"
            if not weights.is_file() or weights.is_symlink():
                return False
            meta = read_safetensors_header(weights)[0].get("__metadata__") or {}
            copied = set(json.loads(meta.get(SIDE_FILES_KEY, "[]")))
            if any(not e.is_file() or e.is_symlink() or e.name not in copied | {"model.safetensors"} for e in path.iterdir()):
                return False
            return DECOMPRESSED_KEY in meta
        if not path.is_file():
            return False
        if kind in ("checkpoint", "dense") and path.suffix == ".safetensors":
            header, _ = read_safetensors_header(path)
            meta = header.get("__metadata__") or {}
            return META_KEY in meta or (kind == "dense" and DECOMPRESSED_KEY in meta)
        if kind == "dense":  # torch.save writes a zip archive holding data.pkl
            return zipfile.is_zipfile(path) and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())
        if kind == "report":
            data = json.loads(path.read_text())
            return isinstance(data, dict) and "report_version" in data and "totals" in data
        if kind == "plot":
            with open(path, "rb") as f:
                head = f.read(65536)
            return head.startswith(b"\x89PNG") and b"mpocompress" in head
    except (OSError, ValueError, InputError, zipfile.BadZipFile, UnicodeDecodeError):
        return False
    return False


def guard_outputs(outputs: list[tuple[Path, str]], inputs: list[Path], force: bool) -> None:
    """The one check every path the tool writes goes through, before any work starts.

    Refuses (:class:`OutputError`, exit 4) an output that is an input (a file, a shard, an index, or
    a folder holding one; through symlinks, hard links and ``..``), two outputs at one path, an
    output whose folder is missing, an existing output without ``force``, and with ``force`` anything
    that is not recognisably an earlier output of this tool of that kind (see :data:`OUTPUT_KINDS`).
    A conversion's work folder (``.NAME.partial``) must be ours too (or empty).
    """
    seen: dict[Path, Path] = {}
    resolved_inputs = [i.resolve() for i in inputs]
    for output, kind in outputs:
        out = output.resolve()
        if out in seen:
            raise OutputError(f"{output}: written twice by this command (also {seen[out]})")
        seen[out] = output
        for i, ir in zip(inputs, resolved_inputs, strict=True):
            if out == ir or _same_file(output, i):
                raise OutputError(f"{output}: refusing to overwrite the input ({i})")
            if out in ir.parents:
                raise OutputError(f"{output}: refusing to replace the folder holding the input {i}")
        if not out.parent.is_dir():
            raise OutputError(f"{output}: folder {output.parent} does not exist")
        if output.exists() or output.is_symlink():
            if not force:
                raise OutputError(f"{output}: already exists (use --force to replace it)")
            if not _is_ours(output, kind):
                what = "a folder" if output.is_dir() else "a file"
                raise OutputError(
                    f"{output}: {what} that is not an earlier mpocompress {kind} output; --force replaces only "
                    "those (remove it yourself if you mean it)"
                )
            if output.is_dir():
                for f in output.iterdir():
                    if any(_same_file(f, i) for i in inputs):
                        raise OutputError(f"{output}: holds {f.name}, a hard link to an input")
        if kind == "checkpoint":
            work = partial_path(output)
            # an empty folder is taken too: it holds nothing to lose, and it is what another torchrun rank
            # sees for a moment while rank 0 takes the lock (mkdir, then the lock file)
            if (work.exists() or work.is_symlink()) and not (
                work.is_dir()
                and not work.is_symlink()
                and ((work / "job.json").is_file() or (work / LOCK_NAME).is_file() or _empty_folder(work))
            ):
                raise OutputError(f"{work}: exists and is not an mpocompress work folder; move it away first")


def _empty_folder(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def check_output(output: Path, inputs: list[Path], force: bool, kind: str = "checkpoint") -> None:
    """:func:`guard_outputs` for one output."""
    guard_outputs([(output, kind)], inputs, force)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn the operating system's refusals while writing ``path`` (read-only folder, disk full,
    permissions) into :class:`OutputError` (exit 4)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or e.errno in (
            errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG,
        ):  # fmt: skip
            raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e
        raise


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _storage_safe(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared or strided ones)."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: outputs this process has put in place (so an interrupt's message can say what is on disk)
IN_PLACE: set[Path] = set()


def replace_into(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an existing folder at ``final`` is removed only after that.

    ``mkstemp``/``mkdtemp`` create private (0600/0700) entries: give the result the usual mode.
    Interrupts are held back during the renames and re-raised once ``final`` is in place.
    """
    with deferred_interrupts() as received:
        _replace_now(tmp, final)
        IN_PLACE.add(final.resolve())
    if received:
        raise KeyboardInterrupt


def _replace_now(tmp: Path, final: Path) -> None:
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
    if tmp.is_dir():
        for f in tmp.iterdir():
            _fsync_file(f)
        fsync_dir(tmp)
    if final.is_dir() and not final.is_symlink():
        # a folder cannot be renamed over a folder: move the old one aside, the new one in, then
        # remove the old one (the old output is never deleted before the new one is in place)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if final.exists() and not final.is_symlink() and tmp.is_dir():
            raise OutputError(f"{final}: is a file; refusing to replace it with a folder")
        os.replace(tmp, final)
        fsync_dir(final.parent)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically (temporary file in the same folder, fsync, rename)."""
    from safetensors.torch import save_file

    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(_storage_safe(tensors), tmp, metadata=metadata)
            _fsync_file(Path(tmp))
            replace_into(Path(tmp), path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_model_folder(tensors: Mapping[str, torch.Tensor], folder: Path, metadata: dict[str, str], side: list[Path]) -> None:
    """Write a model folder atomically: ``model.safetensors`` plus copies of ``side`` files (config,
    tokenizer...), built in a temporary folder beside ``folder`` and renamed into place."""
    from safetensors.torch import save_file

    with writing(folder):
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        with writing(folder):
            names = copy_side_files(side, tmp)
            save_file(_storage_safe(tensors), tmp / "model.safetensors", metadata={**metadata, SIDE_FILES_KEY: json.dumps(names)})
            replace_into(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; fsync it and rename it onto ``path`` if the block
    succeeds (the temporary file is removed otherwise)."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            _fsync_file(Path(tmp))
            replace_into(Path(tmp), path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (a report, a JSON dump)."""
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a plain state dict with ``torch.save`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(dict(tensors), tmp)


#: bytes per element of safetensors dtypes (for packing shards)
_ST_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_COPY_CHUNK = 64 * 1024**2


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(raw, "little")
        if n > 100_000_000:
            raise InputError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise InputError(f"{path}: corrupt safetensors header ({e})") from e
    return header, 8 + n


def pack_safetensors(sources: list[Path], path: Path, metadata: dict[str, str] | None = None) -> tuple[list[str], int]:
    """Write the tensors of several safetensors files into one, streaming (bounded memory), atomically.

    Tensors are laid out as ``safetensors`` itself does (by alignment, then name), so every tensor
    stays aligned; the data are copied in chunks and never held whole. Returns the tensor names
    written and the data bytes.
    """
    entries = []  # (itemsize, name, info, source, absolute offset)
    for src in sources:
        header, start = read_safetensors_header(src)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries.append((_ST_ITEMSIZE.get(info["dtype"], 1), name, info, src, start + info["data_offsets"][0]))
    entries.sort(key=lambda e: (-e[0], e[1]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for _, name, info, _, _ in entries:
        size = info["data_offsets"][1] - info["data_offsets"][0]
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        handles: dict[Path, Any] = {}
        try:
            for _, _, info, src, start in entries:
                f = handles.get(src) or handles.setdefault(src, open(src, "rb"))
                f.seek(start)
                left = info["data_offsets"][1] - info["data_offsets"][0]
                while left:
                    chunk = f.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OutputError(f"{src}: shorter than its header says")
                    out.write(chunk)
                    left -= len(chunk)
        finally:
            for f in handles.values():
                f.close()
        out.flush()
        os.fsync(out.fileno())
    return [e[1] for e in entries], offset








@contextmanager
def deferred_interrupts() -> Iterator[list[int]]:
    """Hold back SIGINT/SIGTERM while an output is put in place (rename, then the work folder's
    removal), so an interrupt cannot leave it half done. Yields the list of signals received; the
    caller decides what to say. A no-op outside the main thread."""
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    old = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)




def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file (a recipe)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from e


def path_size(path: Path) -> int:
    """Bytes on disk of a file, or of a folder's weights (its ``.safetensors`` files and index; the
    config and tokenizer files copied beside them are not counted)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith((".safetensors", INDEX_NAME)))
    return path.stat().st_size








# ---------------------------------------------------------------------------------------------
# fine-tuning inputs: user code (--model, --data factories), batch files, recorded activations










# ---------------------------------------------------------------------------------------------
# audio (the speech workbench): 16-bit PCM wav through the standard library






