"""In-process pages, for tests and the demo. Members with the same ``namespace`` share one store."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, ClassVar, Optional, Sequence

from pydantic import ByteSize, Field

from .base import Backend, BackendConfig, BackendContext, Capabilities, join_parts
from .errors import BackendRejected


class MemoryConfig(BackendConfig):
    capacity_bytes: Optional[ByteSize] = Field(default=None, description="LRU capacity, e.g. '1GiB'; none = unbounded")
    namespace: Optional[str] = Field(default=None, description="members naming the same namespace share pages")


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pages: OrderedDict[str, bytes] = OrderedDict()
        self.size = 0


_NAMESPACES: dict[str, _Store] = {}
_NAMESPACES_LOCK = threading.Lock()


class MemoryBackend(Backend):
    Config: ClassVar[type[BackendConfig]] = MemoryConfig
    capabilities: ClassVar[Capabilities] = Capabilities(envelope=True)

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__(config)
        if config.namespace is None:
            self._store = _Store()
        else:
            with _NAMESPACES_LOCK:
                self._store = _NAMESPACES.setdefault(config.namespace, _Store())
        self._capacity = config.capacity_bytes

    @classmethod
    def from_config(cls, config: MemoryConfig, context: BackendContext) -> "MemoryBackend":
        return cls(config)

    def exists(self, keys: Sequence[str]) -> int:
        pages = self._store.pages
        for i, key in enumerate(keys):
            if key not in pages:
                return i
        return len(keys)

    def exists_each(self, keys: Sequence[str]) -> list[bool]:
        pages = self._store.pages
        return [key in pages for key in keys]

    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list:
        store = self._store
        out = []
        with store.lock:
            for key in keys:
                page = store.pages.get(key)
                if page is not None:
                    store.pages.move_to_end(key)
                out.append(page)
        return out

    def set(self, keys: Sequence[str], values: Sequence[Any]) -> None:
        blobs = [bytes(join_parts(v)) for v in values]  # own the bytes: the caller's memory may be reused
        store = self._store
        with store.lock:
            for key, blob in zip(keys, blobs):
                old = store.pages.pop(key, None)
                if old is not None:
                    store.size -= len(old)
                if self._capacity is not None:
                    if len(blob) > self._capacity:
                        raise BackendRejected(f"page of {len(blob)} bytes exceeds capacity", backend=self.name)
                    while store.size + len(blob) > self._capacity and store.pages:
                        _, evicted = store.pages.popitem(last=False)
                        store.size -= len(evicted)
                store.pages[key] = blob
                store.size += len(blob)

    def clear(self, prefix: str) -> None:
        store = self._store
        with store.lock:
            for key in [k for k in store.pages if k.startswith(prefix)]:
                store.size -= len(store.pages.pop(key))
