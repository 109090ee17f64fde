"""HAStorage: SGLang's HiCacheStorage on top of the per-rank BackendManager.

SGLang builds it through its ``dynamic`` storage backend hook::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage",
        "interface_v1": 1, "ha": {...}}'        # or "ha_config": "/path/ha.yaml"

No call raises into the engine: failures become SGLang's own values (None, False, 0, [False]*n).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any, Callable, List, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from ..backends.base import BackendContext
from ..backends.errors import ConfigError
from ..config import HAConfig, load, parse
from ..control.service import attach_control_plane
from ..observe.logs import queue_logging
from ..dataplane import BackendManager, Layout

log = logging.getLogger("hicache_ha.sglang")

CONFIG_ENV = "HICACHE_HA_CONFIG"

# Pages read from storage are immutable buffers; we only ever copy *from* the tensors made over them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def resolve_config(extra_config: Optional[dict]) -> HAConfig:
    """The HA document from SGLang's extra_config: inline ``ha``, a file in ``ha_config``, or $HICACHE_HA_CONFIG."""
    extra = extra_config or {}
    if "ha" in extra:
        return parse(extra["ha"])
    path = extra.get("ha_config") or os.environ.get(CONFIG_ENV)
    if path:
        return load(path)
    raise ConfigError(
        "hicache-ha has no config: put it inline as extra_config['ha'], give a file as "
        f"extra_config['ha_config'], or set ${CONFIG_ENV}"
    )


def _never_raises(failure: Callable[..., Any]):
    """Turn any exception into SGLang's failure value for that method (``failure(*args)``)."""

    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception:
                log.exception("hicache-ha: %s failed; the engine gets its failure value", method.__name__)
                return failure(*args, **kwargs)

        return guarded

    return wrap


def _nkeys(keys=(), *_a, **_k) -> int:
    return len(keys) if keys is not None else 0


def as_buffer(tensor: torch.Tensor) -> np.ndarray:
    """A flat byte view of a CPU tensor (a copy only when the tensor is not contiguous)."""
    return tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()


def _fill(target: torch.Tensor, page) -> torch.Tensor:
    src = torch.frombuffer(page, dtype=torch.uint8)
    flat = target.view(torch.uint8).reshape(-1) if target.is_contiguous() else None
    if flat is not None:
        flat.copy_(src)
    else:
        target.copy_(src.view(target.dtype).reshape(target.shape))
    return target


class HAStorage(HiCacheStorage):
    """One rank's HiCache L3 storage with deadlines, integrity, failover and switchover."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        queue_logging()  # no hicache-ha thread, engine or supervisor, ever waits on the host's log handlers
        self.storage_config = storage_config
        self.mem_pool_host = None
        self.config = resolve_config(storage_config.extra_config)
        self.context = BackendContext(storage_config=storage_config, host=self, extra=dict(kwargs or {}))
        self.manager = BackendManager(self.config, Layout.from_storage_config(storage_config), self.context)
        self.control = attach_control_plane(self.manager, self.config)
        self._page_bytes: Optional[int] = None
        self._dtype: Optional[torch.dtype] = None

    @property
    def is_storage_writer(self) -> bool:
        return self.manager.layout.is_storage_writer

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        layout = self.manager.layout.with_host_pool(mem_pool_host)
        self.manager.set_layout(layout)
        self._page_bytes = layout.page_bytes
        self._dtype = getattr(mem_pool_host, "dtype", None)

    # -- single pages and the legacy batch API ------------------------------------------------------
    def _read(self, keys: List[str], targets: Optional[list]) -> list:
        if targets is not None and all(t is not None for t in targets):
            sizes = {t.numel() * t.element_size() for t in targets}
            nbytes = sizes.pop() if len(sizes) == 1 else self._page_bytes
            done = self.manager.get_into(keys, nbytes, lambda i, page: _fill(targets[i], page))
            return [t if ok else None for t, ok in zip(targets, done)]
        pages = self.manager.get(keys, self._page_bytes)
        out = []
        for page in pages:
            if page is None:
                out.append(None)
                continue
            t = torch.frombuffer(bytearray(page), dtype=torch.uint8)
            out.append(t.view(self._dtype) if self._dtype is not None and self._dtype != torch.uint8 else t)
        return out

    @_never_raises(lambda *a, **k: None)
    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self._read([key], [target_location] if target_location is not None else None)[0]

    @_never_raises(lambda keys, *a, **k: [None] * len(keys))
    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self._read(keys, list(target_locations) if target_locations is not None else None)

    @_never_raises(lambda *a, **k: False)
    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        page = value if value is not None else target_location
        return self.manager.set([key], [as_buffer(page)])[0]

    @_never_raises(lambda *a, **k: False)
    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        pages = values if values is not None else target_locations
        return all(self.manager.set(keys, [as_buffer(p) for p in pages]))

    @_never_raises(lambda *a, **k: False)
    def exists(self, key: str) -> bool:
        return self.manager.exists([key]) == 1

    @_never_raises(lambda *a, **k: 0)
    def batch_exists(self, keys: List[str], extra_info: Optional[Any] = None) -> int:
        return self.manager.exists(keys)

    # -- the v1 API: straight from/into the host pool, fenced ---------------------------------------
    @_never_raises(lambda keys, *a, **k: [False] * len(keys))
    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> List[bool]:
        pool = self.mem_pool_host
        page_size = pool.page_size

        def into_pool(i: int, page) -> None:  # on the worker, fenced: never after this call returned
            pool.set_from_flat_data_page(host_indices[i * page_size], torch.frombuffer(page, dtype=torch.uint8))

        return self.manager.get_into(keys, self._page_bytes, into_pool)

    @_never_raises(lambda keys, *a, **k: [False] * len(keys))
    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> List[bool]:
        pool = self.mem_pool_host
        page_size = pool.page_size
        values = [as_buffer(pool.get_data_page(host_indices[i * page_size], flat=True)) for i in range(len(keys))]
        return self.manager.set(keys, values)

    # -- housekeeping -------------------------------------------------------------------------------
    @_never_raises(lambda *a, **k: None)
    def clear(self) -> None:
        self.manager.clear()

    @_never_raises(lambda *a, **k: None)
    def get_stats(self):
        return self.manager.snapshot()

    @_never_raises(lambda *a, **k: None)
    def close(self) -> None:
        self.control.close()
        self.manager.close()
