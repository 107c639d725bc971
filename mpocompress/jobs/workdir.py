"""The work folder of a conversion (``.OUTPUT.partial``): its lock and its resumable groups.

One safetensors file per group of input tensors, each verified by SHA-256 and the job's fingerprint
before it is reused, packed into the output at the end; an exclusive ``flock`` on ``lock`` keeps a
second conversion of the same output out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import OutputError
from mpocompress.io import (
    INDEX_NAME,
    LOCK_NAME,
    SIDE_FILES_KEY,
    copy_side_files,
    deferred_interrupts,
    file_sha256,
    pack_safetensors,
    partial_path,
    read_safetensors_header,
    replace_into,
    save_safetensors,
    write_text,
    writing,
)

log = logging.getLogger(__name__)


class OutputLock:
    """An exclusive lock on a conversion's output: ``lock`` in its work folder, holding the owner's pid
    and host, locked with ``flock`` so the kernel frees it when the owner dies (a lock file left by
    a dead process is stale and taken over). A second conversion to the same output fails fast.
    ``torchrun`` ranks of one job share rank 0's lock.
    """

    def __init__(self, output: Path):
        self.output = output
        self.folder = partial_path(output)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputError` naming the owner."""
        import fcntl
        import socket
        import time

        for _ in range(5):
            with writing(self.folder):
                self.folder.mkdir(exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                owner = self.owner()
                who = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner else ""
                raise OutputError(f"another conversion is writing {self.output}{who}") from None
            try:  # the file may have been removed by its previous owner between open and flock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise OutputError(f"{self.path}: could not take the lock")
        previous = os.read(fd, 4096)
        if previous.strip():
            log.info("%s: taking over a stale lock (%s)", self.path, previous.decode(errors="replace").strip())
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd

    def owner(self) -> dict[str, Any] | None:
        """The pid and host recorded by the lock's holder (None when unreadable)."""
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Free the lock; a work folder holding nothing else is removed with it."""
        if self._fd is None:
            return
        try:
            if self.folder.is_dir() and {f.name for f in self.folder.iterdir()} == {LOCK_NAME}:
                self.path.unlink()
                self.folder.rmdir()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


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
        """The safetensors file of group ``i``."""
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
            if any(f.name != LOCK_NAME for f in self.path.iterdir()):
                log.warning("%s: left by a different or unreadable job; starting again", self.path)
            for f in self.path.iterdir():
                if f.name != LOCK_NAME:
                    shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
        with writing(self.path):
            self.path.mkdir(exist_ok=True)
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
        """Write group ``i``'s tensors, then its manifest (hash, fingerprint, record), each atomically."""
        data = self.group_file(i)
        save_safetensors(tensors, data, {"format": "pt"})
        manifest = {"fingerprint": self.fingerprint, "sha256": file_sha256(data), "record": record}
        write_text(self._manifest(i), json.dumps(manifest, sort_keys=True) + "\n")

    def group_bytes(self, i: int) -> int:
        """Data bytes of group ``i``'s file."""
        header, start = read_safetensors_header(self.group_file(i))
        return self.group_file(i).stat().st_size - start

    def finish(self, metadata: dict[str, str], max_shard_bytes: int, side: list[Path] | None = None) -> None:
        """Pack the groups into ``output`` (one file if it ends in ``.safetensors``, else a sharded
        folder with ``model.safetensors.index.json`` and copies of the ``side`` files: config,
        tokenizer...), atomically, then remove the work folder."""
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
            with writing(self.output):
                tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.", suffix=".tmp", dir=self.output.parent))
            try:
                weight_map, total = {}, 0
                with writing(self.output):
                    copied = copy_side_files(side or [], tmp)
                for k, members in enumerate(shards):
                    final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                    names, nbytes = pack_safetensors([groups[i] for i in members], tmp / final, {"format": "pt"})
                    weight_map.update(dict.fromkeys(names, final))
                    total += nbytes
                index = {"metadata": {"total_size": total, **metadata, SIDE_FILES_KEY: json.dumps(copied)}, "weight_map": weight_map}
                with writing(self.output):
                    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
                    replace_into(tmp, self.output)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        with deferred_interrupts() as received:
            self.discard()
        if received:
            raise KeyboardInterrupt

    def discard(self) -> None:
        """Remove the work folder: renamed aside first (one atomic step), then deleted."""
        if not self.path.exists():
            return
        trash = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
        try:
            os.replace(self.path, trash)
        except OSError:
            trash = self.path
        shutil.rmtree(trash, ignore_errors=True)
