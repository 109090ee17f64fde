"""Pages as files in a directory: local disk, NFS, or a 3FS FUSE mount.

Writes are atomic (temporary file + rename), so a reader never sees half a page. An optional capacity
is enforced per process with LRU eviction of the files that process wrote or read. OS errors become
the outcome kinds of the data plane: ENOSPC/EDQUOT rejected, a vanished mount unavailable, others error.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import xxhash
from pydantic import ByteSize, Field

from .base import Backend, BackendConfig, BackendContext, Capabilities
from .errors import BackendError, BackendRejected, BackendUnavailable

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.=-]{1,180}$")
_UNAVAILABLE = {errno.ENOENT, errno.ESTALE, errno.ENOTCONN, errno.EHOSTDOWN, errno.ENODEV, errno.ETIMEDOUT}
_REJECTED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


class FileConfig(BackendConfig):
    path: Path = Field(description="directory holding the pages (created if missing)")
    capacity_bytes: Optional[ByteSize] = Field(
        default=None, description="per-process capacity with LRU eviction, e.g. '50GiB'; none = unbounded"
    )
    fsync: bool = Field(default=False, description="fsync each page before it is renamed into place")


class FileBackend(Backend):
    Config: ClassVar[type[BackendConfig]] = FileConfig
    capabilities: ClassVar[Capabilities] = Capabilities(envelope=True)

    def __init__(self, config: FileConfig) -> None:
        super().__init__(config)
        self.root = Path(config.path)
        self._capacity = config.capacity_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # path -> size, oldest first
        self._size = 0
        self._scanned = self._capacity is None

    @classmethod
    def from_config(cls, config: FileConfig, context: BackendContext) -> "FileBackend":
        try:
            os.makedirs(config.path, exist_ok=True)
        except OSError:  # not there yet (a mount still coming up): calls fail, recovery probes create it
            pass
        return cls(config)

    # -- paths and errors -------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        name = key if _SAFE_KEY.match(key) else xxhash.xxh3_128_hexdigest(key.encode())
        shard = f"{xxhash.xxh3_64_intdigest(name.encode()) & 0xFF:02x}"
        return os.path.join(self.root, shard, name + ".page")

    def _error(self, exc: OSError, what: str) -> BackendError:
        where = f"{what} under {self.root}"
        if exc.errno in _REJECTED:
            return BackendRejected(f"{where}: {exc.strerror} (free space or raise the quota)", backend=self.name)
        if exc.errno in _DENIED:
            return BackendError(
                f"{where}: {exc.strerror}: check the directory's owner, mode and mount options", backend=self.name
            )
        if exc.errno in _UNAVAILABLE:
            return BackendUnavailable(f"{where}: {exc.strerror} (is the mount up?)", backend=self.name)
        return BackendError(f"{where}: {exc}", backend=self.name)

    # -- LRU accounting (only when a capacity is set) ---------------------------------------------
    def _scan(self) -> None:
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.endswith(".page"):
                    p = os.path.join(dirpath, f)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    found.append((st.st_mtime, p, st.st_size))
        found.sort()
        with self._lock:
            for _, p, size in found:
                if p not in self._lru:
                    self._lru[p] = size
                    self._size += size
            self._scanned = True

    def _touch(self, path: str) -> None:
        if self._capacity is not None:
            with self._lock:
                if path in self._lru:
                    self._lru.move_to_end(path)

    def _reserve(self, path: str, size: int) -> list[str]:
        """Account for a page about to be written; return the files to evict to make room."""
        if self._capacity is None:
            return []
        if not self._scanned:
            self._scan()
        if size > self._capacity:
            raise BackendRejected(f"page of {size} bytes exceeds capacity {self._capacity}", backend=self.name)
        victims = []
        with self._lock:
            self._size -= self._lru.pop(path, 0)
            while self._size + size > self._capacity and self._lru:
                victim, vsize = self._lru.popitem(last=False)
                self._size -= vsize
                victims.append(victim)
            self._lru[path] = size
            self._size += size
        return victims

    def _forget(self, path: str) -> None:
        if self._capacity is not None:
            with self._lock:
                self._size -= self._lru.pop(path, 0)

    # -- the contract -----------------------------------------------------------------------------
    def exists(self, keys: Sequence[str]) -> int:
        for i, key in enumerate(keys):
            if not self._stat(key):
                return i
        return len(keys)

    def exists_each(self, keys: Sequence[str]) -> list[bool]:
        return [self._stat(key) for key in keys]

    def _stat(self, key: str) -> bool:
        try:
            os.stat(self._path(key))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error(exc, "stat") from exc
        return True

    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list:
        out: list = []
        for key in keys:
            path = self._path(key)
            try:
                with open(path, "rb", buffering=0) as f:
                    out.append(f.read())
            except FileNotFoundError:
                out.append(None)
                continue
            except OSError as exc:
                raise self._error(exc, "read") from exc
            self._touch(path)
        return out

    def set(self, keys: Sequence[str], values: Sequence[Any]) -> None:
        for key, value in zip(keys, values):
            parts = [memoryview(p).cast("B") for p in (value if isinstance(value, tuple) else (value,))]
            self._write(self._path(key), parts)

    def _write(self, path: str, parts: list[memoryview]) -> None:
        size = sum(p.nbytes for p in parts)
        for victim in self._reserve(path, size):
            try:
                os.unlink(victim)
            except OSError:
                pass
        # Unique among concurrent writers (processes, and threads of one) without a syscall for randomness.
        tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                # Only the shard: a root that vanished (an unmounted volume) is unavailable, and pages
                # must not land on whatever filesystem is left under its mount point.
                try:
                    os.mkdir(os.path.dirname(tmp))
                except FileExistsError:
                    pass
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                pending = [p for p in parts if p.nbytes]
                while pending:
                    written = os.writev(fd, pending)
                    while pending and written >= pending[0].nbytes:
                        written -= pending[0].nbytes
                        pending.pop(0)
                    if pending and written:
                        pending[0] = pending[0][written:]
                if self.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            self._forget(path)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._error(exc, "write") from exc

    def probe(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise self._error(exc, "mkdir") from exc
        super().probe()

    def clear(self, prefix: str) -> None:
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.startswith(prefix) and f.endswith((".page", ".tmp")):
                    path = os.path.join(dirpath, f)
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                    self._forget(path)

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.root)}
