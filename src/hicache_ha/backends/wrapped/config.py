"""The ``sglang`` member's config section. Importing it needs neither SGLang nor torch (config checks run
anywhere, e.g. ``hicache-ha check-config`` on a laptop)."""

from __future__ import annotations

import sys
from typing import Optional

from pydantic import Field, ValidationInfo, field_validator

from ..base import BackendConfig

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
    batch_pages: int = Field(default=128, ge=1, le=4096,
                             description="the most pages one backend call moves (SGLang moves up to 128); larger "
                                         "calls are split")
    bounce_pages: Optional[int] = Field(
        default=None, ge=1,
        description="host pages this member owns for zero-copy backends (default: workers × batch_pages + 4)")
    start_wait_ms: int = Field(
        default=3000, ge=0, le=600_000,
        description="how long start-up waits for the backend to be built; after that the engine goes on without "
                    "it (circuit_broken, built in the background, retried with backoff)")
    preflight_timeout_ms: int = Field(
        default=10_000, ge=100, le=600_000,
        description="for backends whose constructor can freeze the process (Mooncake), the time a check in a "
                    "child process gets to reach the servers before the member is built")
    verify: bool = Field(default=True, description="check every page read against a checksum record stored "
                                                   "beside it, where the backend can store one")

    @field_validator("backend")
    @classmethod
    def _known(cls, value: str) -> str:
        if value == "dynamic":
            raise ValueError("'dynamic' would wrap hicache-ha in itself")
        known = sglang_backends()
        if value not in known:
            raise ValueError(f"SGLang has no storage backend {value!r}; it has: {', '.join(known)}")
        return value

    @field_validator("extra_config")
    @classmethod
    def _extra_config(cls, value: dict, info: ValidationInfo) -> dict:
        from .profiles import profile_for

        backend = info.data.get("backend")
        if backend is None:  # the backend name was refused already
            return value
        problem = profile_for(backend).check_extra(value)
        if problem:
            raise ValueError(f"for {backend}: {problem}")
        return value
