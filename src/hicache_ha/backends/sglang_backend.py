"""Any backend SGLang's own StorageBackendFactory builds (file, mooncake, hf3fs, nixl, …), with HA on top.

The backend is constructed through SGLang, with the rank's storage config, so users keep the backend
they run today. Reads go into buffers this member owns (never into engine memory), so an abandoned
call cannot write into the engine after it returned. SGLang backends store raw pages, so no envelope:
their own ``None``/``False`` become misses and errors.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar, Optional, Sequence

from pydantic import Field, field_validator

from .base import Backend, BackendConfig, BackendContext, Capabilities
from .errors import BackendError, ConfigError

_INSTALL_HINT = "type 'sglang' needs the sglang package: pip install sglang (with its storage backend's client)"


# The backends SGLang 0.5.23's StorageBackendFactory registers (with SGLang loaded, its own registry says).
SGLANG_BACKENDS = ("aibrix", "eic", "file", "hf3fs", "mooncake", "mori", "nixl", "npu_memcache", "seaweedfs", "shm",
                   "sim", "simm", "tensorcast")


def sglang_backends() -> list[str]:
    factory = sys.modules.get("sglang.srt.mem_cache.storage.backend_factory")
    registry = getattr(getattr(factory, "StorageBackendFactory", None), "_registry", None)
    return sorted(registry) if registry else list(SGLANG_BACKENDS)


class SGLangConfig(BackendConfig):
    backend: str = Field(description="a name SGLang's StorageBackendFactory knows: file, mooncake, hf3fs, nixl, …")
    extra_config: dict = Field(default_factory=dict, description="SGLang's --hicache-storage-backend-extra-config for it")

    @field_validator("backend")
    @classmethod
    def _known(cls, value: str) -> str:
        if value == "dynamic":
            raise ValueError("'dynamic' would wrap hicache-ha in itself")
        known = sglang_backends()
        if value not in known:
            raise ValueError(f"SGLang has no storage backend {value!r}; it has: {', '.join(known)}")
        return value


class SGLangBackend(Backend):
    Config: ClassVar[type[BackendConfig]] = SGLangConfig
    capabilities: ClassVar[Capabilities] = Capabilities(envelope=False)

    def __init__(self, config: SGLangConfig, storage: Any, context: BackendContext) -> None:
        super().__init__(config)
        self.storage = storage
        self._context = context
        import torch

        self._torch = torch

    @classmethod
    def from_config(cls, config: SGLangConfig, context: BackendContext) -> "SGLangBackend":
        try:
            from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
        except ImportError as exc:
            raise ConfigError(f"{_INSTALL_HINT} ({exc})") from exc
        if context.storage_config is None:
            raise ConfigError(
                f"backend {config.name!r}: type 'sglang' runs inside SGLang (HAStorage), where the rank's "
                "storage config is known"
            )
        storage_config = dataclasses.replace(context.storage_config, extra_config=dict(config.extra_config))
        try:
            storage = StorageBackendFactory.create_backend(config.backend, storage_config, context.mem_pool_host)
        except (ValueError, ImportError, AttributeError, TypeError) as exc:
            raise ConfigError(f"backend {config.name!r}: SGLang cannot build {config.backend!r}: {exc}") from exc
        if context.mem_pool_host is not None:
            storage.register_mem_pool_host(context.mem_pool_host)
        return cls(config, storage, context)

    def _page_sizes(self, nbytes, n: int) -> list[int]:
        if isinstance(nbytes, (list, tuple)):
            return list(nbytes)
        if nbytes is not None:
            return [nbytes] * n
        pool = self._context.mem_pool_host
        if pool is not None:
            page = pool.get_dummy_flat_data_page()
            return [page.numel() * page.element_size()] * n
        raise BackendError(f"backend {self.name!r}: page size unknown (no host pool registered)", backend=self.name)

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except BackendError:
            raise
        except Exception as exc:  # SGLang backends raise anything; map at our edge
            raise BackendError(f"{self.config.backend} {what}: {type(exc).__name__}: {exc}", backend=self.name) from exc

    def exists(self, keys: Sequence[str]) -> int:
        return int(self._call("batch_exists", self.storage.batch_exists, list(keys)))

    def get(self, keys: Sequence[str], nbytes=None) -> list:
        torch = self._torch
        targets = [torch.empty(size, dtype=torch.uint8) for size in self._page_sizes(nbytes, len(keys))]
        got = self._call("batch_get", self.storage.batch_get, list(keys), targets)
        if not isinstance(got, list):
            return [None] * len(keys)
        return [None if t is None else t.contiguous().view(torch.uint8).reshape(-1).numpy() for t in got]

    def set(self, keys: Sequence[str], values: Sequence[Any]) -> None:
        torch = self._torch
        tensors = [torch.frombuffer(v, dtype=torch.uint8) for v in values]
        ok = self._call("batch_set", self.storage.batch_set, list(keys), tensors)
        if not ok:
            raise BackendError(f"{self.config.backend} batch_set returned False", backend=self.name)

    def probe(self) -> None:
        payload = bytearray(b"hicache-ha probe".ljust(4096, b"."))
        key = f"__hicache_ha_probe__-{self.name}"
        self.set([key], [payload])
        got = self.get([key], len(payload))[0]
        if got is None or bytes(got) != bytes(payload):
            raise BackendError(f"probe of {self.name!r}: canary read back wrong", backend=self.name)

    def clear(self, prefix: str) -> None:
        self._call("clear", self.storage.clear)

    def close(self) -> None:
        close = getattr(self.storage, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.config.backend}
