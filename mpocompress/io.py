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

import json
import logging
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

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
#: keys under which training scripts nest the state dict, tried in this order
NESTING_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network", "weights")
META_KEY = "mpocompress"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


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

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        """Torch dtype name (``"float32"``)."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """String metadata (safetensors ``__metadata__`` or the index's ``metadata``)."""
        return {}

    @property
    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:  # noqa: B027 - optional hook
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
        self._index_metadata = None if index is None else dict(index.get("metadata") or {})
        for f in files:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own SafetensorError, or OSError
                self.close()
                raise InputError(f"{f}: not a valid safetensors file ({e})") from e
        self._where: dict[str, Path] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[k] = f
        if index is not None:
            lacking = [k for k, f in index["weight_map"].items() if self._where.get(k) != path / f]
            if lacking:
                raise InputError(
                    f"{path}: the index names {len(lacking)} tensors its shards lack, e.g. {lacking[0]!r}"
                )

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
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
            return buf.view(dtype).reshape(info["shape"])
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{path}: cannot read tensor {name!r} ({e})") from e

    def metadata(self) -> dict[str, str]:
        if self._index_metadata is not None:
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self._index_metadata.items()}
        first = self._handles[self.files[0]] if self.files else None
        return dict(first.metadata() or {}) if first is not None else {}

    def close(self) -> None:
        # safe_open handles free their mmap when dropped
        self._handles = {}


class StateDictCheckpoint(Checkpoint):
    """A torch-pickle checkpoint loaded (memory-mapped where possible) into a flat state dict."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor]):
        super().__init__(path, [path])
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> str:
        return dtype_name(self._state[name].dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint and flatten it to ``{name: tensor}``.

    Nested dicts of tensors are flattened with dots (``{"enc": {"w": t}}`` -> ``"enc.w"``); non-tensor
    leaves (step counters, hyper-parameters) are dropped with a warning.
    """
    if not isinstance(obj, Mapping):
        raise InputError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    if obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in NESTING_KEYS:
            if isinstance(obj.get(key), Mapping):
                return unwrap_state_dict(obj[key], where)
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


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
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
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable torch checkpoint ({msg[:200]})") from e
    return unwrap_state_dict(obj, str(path))


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
            if len(others) != 1:
                raise InputError(f"{p}: folder has no {INDEX_NAME} (a sharded checkpoint needs its index)")
            index = others[0]
        try:
            data = json.loads(index.read_text())
            files = sorted({p / v for v in data["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({e})") from e
        for f in files:
            if not f.is_file():
                raise InputError(f"{index}: names shard {f.name}, which is missing")
        return SafetensorsCheckpoint(p, files, data)
    if p.suffix == ".safetensors" or (p.suffix not in TORCH_SUFFIXES and _looks_like_safetensors(p)):
        return SafetensorsCheckpoint(p, [p])
    if p.suffix in TORCH_SUFFIXES or zipfile.is_zipfile(p):
        return StateDictCheckpoint(p, _load_torch(p))
    raise InputError(f"{p}: unsupported checkpoint format (expected .safetensors, a sharded folder, or .pt/.pth/.bin/.ckpt)")


# ---------------------------------------------------------------------------------------------
# writing


def check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse outputs that would lose data.

    Raises:
        OutputError: the output is an input file or a folder holding one, it exists and ``force`` is
            not set, or its folder does not exist.
    """
    out = output.resolve()
    for i in inputs:
        ir = i.resolve()
        if out == ir:
            raise OutputError(f"{output}: refusing to overwrite the input")
        if out in ir.parents:
            raise OutputError(f"{output}: refusing to replace the folder holding the input")
    if not out.parent.is_dir():
        raise OutputError(f"{output}: folder {output.parent} does not exist")
    if out.exists() and not force:
        raise OutputError(f"{output}: already exists (use --force to replace it)")


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


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an existing folder at ``final`` is removed only after that.

    ``mkstemp``/``mkdtemp`` create private (0600/0700) entries: give the result the usual mode.
    """
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically (temporary file in the same folder, fsync, rename)."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_storage_safe(tensors), tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _replace(Path(tmp), path)
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
    """Write a plain state dict with ``torch.save`` atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(dict(tensors), tmp)
        _replace(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def partial_path(output: Path) -> Path:
    """The work folder of a conversion into ``output``: ``.NAME.partial`` beside it."""
    return output.parent / f".{output.name}.partial"


class GroupStore:
    """The work folder of a resumable conversion: one safetensors file per group of input tensors.

    Each group file is written atomically, then a small manifest holding its SHA-256, the job's
    fingerprint and the group's report record. On a rerun a group counts as done only when its
    manifest matches the job and the file's hash matches the manifest (verified, not trusted);
    anything else is redone. :meth:`finish` packs the groups into the final file or shards and
    removes the work folder. Several processes may write different groups at once.
    """

    def __init__(self, output: Path, fingerprint: str, n_groups: int):
        self.output = output
        self.path = partial_path(output)
        self.fingerprint = fingerprint
        self.n_groups = n_groups

    def group_file(self, i: int) -> Path:
        return self.path / f"group-{i:05d}.safetensors"

    def _manifest(self, i: int) -> Path:
        return self.path / f"group-{i:05d}.json"

    def prepare(self) -> bool:
        """Create the work folder, or keep one left by the same job. Returns True when kept."""
        job = self.path / "job.json"
        if self.path.is_dir():
            try:
                same = json.loads(job.read_text()).get("fingerprint") == self.fingerprint
            except (OSError, ValueError):
                same = False
            if same:
                return True
            log.warning("%s: left by a different or unreadable job; starting again", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir()
        write_text(job, json.dumps({"fingerprint": self.fingerprint, "groups": self.n_groups}) + "\n")
        return False

    def verified(self, i: int) -> dict[str, Any] | None:
        """The record of group ``i`` if its file is complete and intact, else None (and it is removed)."""
        manifest, data = self._manifest(i), self.group_file(i)
        try:
            m = json.loads(manifest.read_text())
            ok = m.get("fingerprint") == self.fingerprint and m.get("sha256") == file_sha256(data)
        except (OSError, ValueError):
            ok = False
        if ok:
            return m["record"]
        if manifest.exists() or data.exists():
            log.warning("%s: group %d is incomplete or corrupt; redoing it", self.path, i)
        manifest.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        return None

    def write(self, i: int, tensors: Mapping[str, torch.Tensor], record: dict[str, Any]) -> None:
        data = self.group_file(i)
        save_safetensors(tensors, data, {"format": "pt"})
        manifest = {"fingerprint": self.fingerprint, "sha256": file_sha256(data), "record": record}
        write_text(self._manifest(i), json.dumps(manifest, sort_keys=True) + "\n")

    def group_bytes(self, i: int) -> int:
        header, start = read_safetensors_header(self.group_file(i))
        return self.group_file(i).stat().st_size - start

    def finish(self, metadata: dict[str, str], max_shard_bytes: int) -> None:
        """Pack the groups into ``output`` (one file if it ends in ``.safetensors``, else a sharded
        folder with ``model.safetensors.index.json``), atomically, then remove the work folder."""
        groups = [self.group_file(i) for i in range(self.n_groups)]
        if self.output.suffix == ".safetensors":
            pack_safetensors(groups, self.output, metadata)
        else:
            shards: list[list[int]] = []
            size = 0
            for i in range(self.n_groups):
                b = self.group_bytes(i)
                if not shards or (size + b > max_shard_bytes and shards[-1]):
                    shards.append([])
                    size = 0
                shards[-1].append(i)
                size += b
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.", suffix=".tmp", dir=self.output.parent))
            try:
                weight_map, total = {}, 0
                for k, members in enumerate(shards):
                    final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                    names, nbytes = pack_safetensors([groups[i] for i in members], tmp / final, {"format": "pt"})
                    weight_map.update(dict.fromkeys(names, final))
                    total += nbytes
                index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
                if self.output.exists() and not self.output.is_dir():
                    self.output.unlink()
                _replace(tmp, self.output)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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
    """Bytes on disk of a file, or of every file in a folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def read_meta(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The mpocompress metadata of a compressed checkpoint, or None for a dense one."""
    raw = ckpt.metadata().get(META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{ckpt.path}: corrupt mpocompress metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != "mpocompress":
        raise InputError(f"{ckpt.path}: metadata key {META_KEY!r} is not mpocompress metadata")
    return meta


# ---------------------------------------------------------------------------------------------
# fine-tuning inputs: user code (--model, --data factories), batch files, recorded activations


def import_object(spec: str, what: str = "--model") -> Any:
    """The object ``spec`` names: ``pkg.module:attr`` (importable, the working directory first on the
    path) or ``path/to/file.py:attr``. This runs the user's code, by their explicit request; it
    never unpickles anything.

    Raises:
        ConfigError: a malformed spec, a module that does not import, or a missing attribute.
    """
    import importlib
    import importlib.util
    import sys

    from mpocompress.errors import ConfigError

    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"{what} {spec!r}: expected 'package.module:factory' or 'file.py:factory'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"{what} {spec!r}: no such file {mod_name}")
            unique = f"_mpocompress_user_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say why, in one line
        raise ConfigError(f"{what} {spec!r}: cannot import {mod_name}: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _batches_from_file(path: Path, batch_size: int) -> list[Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from e
    if "inputs" in tensors:
        x, y = tensors["inputs"], tensors.get("targets")
        if y is not None and y.shape[0] != x.shape[0]:
            raise InputError(f"{path}: 'inputs' has {x.shape[0]} rows but 'targets' has {y.shape[0]}")
        out: list[Any] = []
        for i in range(0, x.shape[0], batch_size):
            out.append(x[i : i + batch_size] if y is None else (x[i : i + batch_size], y[i : i + batch_size]))
        return out
    keys = sorted((k for k in tensors if re.fullmatch(r"inputs\.\d+", k)), key=lambda k: int(k.split(".")[1]))
    if not keys:
        raise InputError(f"{path}: expected a tensor 'inputs' (and 'targets'), or 'inputs.0', 'inputs.1', ... (and 'targets.K')")
    return [
        tensors[k] if f"targets.{k.split('.')[1]}" not in tensors else (tensors[k], tensors[f"targets.{k.split('.')[1]}"])
        for k in keys
    ]


def read_batches(spec: str, batch_size: int = 16, max_batches: int = 100_000) -> list[Any]:
    """Fine-tuning batches from ``spec``.

    * a ``.safetensors`` file holding ``inputs`` (split along dim 0 into ``batch_size`` rows) and
      optionally ``targets``; or one batch per ``inputs.K`` (and ``targets.K``);
    * a folder of such files (sorted by name, batches concatenated);
    * ``pkg.module:factory`` / ``file.py:factory``: a callable returning an iterable of batches
      (tensors, or ``(inputs, targets)`` pairs); at most ``max_batches`` are taken.
    """
    from mpocompress.errors import ConfigError

    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InputError(f"{path}: folder holds no .safetensors batch files")
        return [b for f in files for b in _batches_from_file(f, batch_size)]
    if path.is_file() or spec.endswith(".safetensors"):
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return _batches_from_file(path, batch_size)
    factory = import_object(spec, "--data")
    if not callable(factory):
        raise ConfigError(f"--data {spec!r}: not callable")
    try:
        data = factory()
        import itertools

        batches = list(itertools.islice(iter(data), max_batches))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--data {spec!r}: the factory failed: {type(e).__name__}: {e}") from e
    return batches


def read_activations(path: Path) -> dict[str, torch.Tensor]:
    """Recorded layer inputs for ``convert --activations``: a safetensors file whose tensors are named
    by weight (``fc.weight``) and hold either input rows ``(n, in)`` (any leading dims, flattened)
    or, named ``fc.weight.gram``, their Gram matrix ``(in, in)``. Returns Gram matrices by weight name.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from e
    grams: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".gram"):
            if t.dim() != 2 or t.shape[0] != t.shape[1]:
                raise InputError(f"{path}: {name} must be a square Gram matrix, got shape {list(t.shape)}")
            grams[name.removesuffix(".gram")] = t.double()
        else:
            x = t.reshape(-1, t.shape[-1]).double()
            grams[name] = x.T @ x
    return grams


# ---------------------------------------------------------------------------------------------
# audio (the speech workbench): 16-bit PCM wav through the standard library


def read_wav(path: Path) -> tuple[Any, int]:
    """A mono 16-bit PCM wav file as float32 samples in [-1, 1] (numpy) and its sample rate.

    Raises:
        InputError: not a readable mono 16-bit PCM wav file.
    """
    import wave

    import numpy as np

    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise InputError(
                    f"{path}: need mono 16-bit PCM wav, got {w.getnchannels()} channel(s) of "
                    f"{8 * w.getsampwidth()} bits (convert with: sox IN -c 1 -b 16 OUT)"
                )
            raw = w.readframes(w.getnframes())
            rate = w.getframerate()
    except (OSError, EOFError, wave.Error) as e:
        raise InputError(f"{path}: not a readable wav file ({e})") from e
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0, rate


def write_wav(path: Path, samples: Any, rate: int) -> None:
    """Write mono float samples as 16-bit PCM wav, atomically (clipped to [-1, 1])."""
    import wave

    import numpy as np

    data = (np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0 - 1 / 32768) * 32768).round().astype("<i2")
    with atomic_path(path) as tmp:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(data.tobytes())


def paired_wavs(root: Path) -> list[tuple[Path, Path]]:
    """``(noisy, clean)`` wav pairs of a speech-enhancement set: ``root/noisy/*.wav`` and the clean
    file of the same name in ``root/clean/``, sorted by name.

    Raises:
        InputError: the folders are missing, empty, or a noisy file has no clean partner.
    """
    root = Path(root)
    noisy_dir, clean_dir = root / "noisy", root / "clean"
    if not noisy_dir.is_dir() or not clean_dir.is_dir():
        raise InputError(f"{root}: a speech-enhancement set needs folders noisy/ and clean/ (wav files, same names)")
    noisy = sorted(noisy_dir.glob("*.wav"))
    if not noisy:
        raise InputError(f"{noisy_dir}: no .wav files")
    lacking = [p.name for p in noisy if not (clean_dir / p.name).is_file()]
    if lacking:
        raise InputError(f"{clean_dir}: lacks the clean partner of {len(lacking)} noisy file(s), e.g. {lacking[0]!r}")
    return [(p, clean_dir / p.name) for p in noisy]
