"""One build of an SGLang backend for a member: SGLang's backend object, the bounce pool it was given, where
its checksum records live; and the pages of one write, staged for it on the engine thread."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import struct
import threading
from typing import Any, Optional, Sequence

from ..base import BackendContext
from ..envelope import checksum
from .config import SGLangConfig
from .profiles import Profile, SumStore, kept_signals

log = logging.getLogger("hicache_ha.backends")

RECORD = struct.Struct("<QQ")  # length, xxh3-64 seeded by the key


@dataclasses.dataclass
class Built:
    storage: Any  # SGLang's backend object
    bounce: Any  # BouncePool for v1 backends, else None
    sums: Optional[SumStore]
    park: bool = False  # never torn down in this process (see close)
    seconds: float = 0.0

    def records(self, keys: list, pages: Sequence[Any]) -> tuple[list, list]:
        """(keys, checksum records) of pages."""
        return keys, [RECORD.pack(*checksum(k, p)) for k, p in zip(keys, pages)]

    def close(self) -> None:
        """Close SGLang's backend on a daemon thread of its own, so that the thread closing a member (an
        agent's command, SGLang's shutdown) never waits on it. Its teardown may still hold the GIL
        (Mooncake's does for ~2 s, measured), which stops every thread meanwhile. With ``park``, never tear
        it down in this process: Mooncake's client in HA mode holds the GIL ~30 s. The operating system
        takes its memory back at exit, and the master forgets the client after its TTL."""
        if self.park:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self))  # not even the interpreter's exit frees it
            _PARKED.append(self)
            log.info("hicache-ha: SGLang's backend %s kept until the process exits (%d kept): tearing it down "
                     "would stop every thread for seconds", type(self.storage).__name__, len(_PARKED))
            return
        threading.Thread(target=_release, args=(self.storage, self.sums, self.bounce), daemon=True,
                         name="hicache-ha-close").start()


_PARKED: list[Built] = []


def _release(storage: Any, sums: Any, bounce: Any) -> None:
    """Close SGLang's backend; its checksum store and bounce pool, held by this call, outlive the close,
    which may still use them."""
    close = getattr(storage, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.debug("hicache-ha: closing SGLang's backend failed", exc_info=True)


def construct(cfg: SGLangConfig, profile: Profile, context: BackendContext) -> Built:
    """Build SGLang's backend as its factory does, with a bounce pool (v1) or a one-page twin of the host
    pool (legacy backends that read its geometry) in place of the engine's pool."""
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    storage_config = dataclasses.replace(context.storage_config, extra_config=dict(cfg.extra_config))
    if profile.preflight is not None:
        profile.preflight(storage_config, cfg.preflight_timeout_ms / 1000)
    engine_pool = context.mem_pool_host
    bounce = None
    pool = None
    if engine_pool is not None:
        from .bounce import BouncePool, default_pages
        from .hostpool import clone_pool

        if profile.v1:
            workers = cfg.max_concurrent or context.default_workers
            bounce = BouncePool(engine_pool, default_pages(workers, cfg.batch_pages, cfg.bounce_pages),
                                f"{cfg.name}-bounce")
            pool = bounce.pool
        elif profile.needs_pool:  # built with a pool for its geometry only: legacy calls reach no pool
            pool = clone_pool(engine_pool, 1)
    with kept_signals(profile.signal_modules):
        storage = StorageBackendFactory.create_backend(cfg.backend, storage_config, pool)
    if pool is not None:
        storage.register_mem_pool_host(pool)
    if profile.tune is not None:
        profile.tune(storage)
    sums = profile.sums(storage) if cfg.verify and profile.sums is not None else None
    return Built(storage, bounce, sums, park=profile.park_on_close(cfg.extra_config))


class Staged:
    """Pages of one set, copied out of engine memory on the engine thread: KV pages into bounce slots (v1),
    pages of other pools (v1) and every page (legacy) into buffers of their own."""

    __slots__ = ("built", "foreign_keys", "foreign_pages", "keys", "pages", "slots", "stored")

    def __init__(self, built: Built, slots: Any, keys: list, pages: Optional[list], foreign_keys: list,
                 foreign_pages: list, stored: Optional[list[bool]]):
        self.built = built
        self.slots = slots  # bounce slots holding the KV pages, in key order
        self.keys = keys  # the KV pages' keys (v1), or the keys of every page it takes (legacy)
        self.pages = pages  # legacy: the pages it takes
        self.foreign_keys = foreign_keys  # v1: the keys of the pages of other pools
        self.foreign_pages = foreign_pages  # v1: their bytes
        self.stored = stored  # None: it takes every page; else per key, False for a page it does not take

    def release(self) -> None:
        if self.slots is not None:
            self.slots.release()
