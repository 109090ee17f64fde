"""HAStorage: SGLang's HiCacheStorage on top of the per-rank BackendManager.

SGLang builds it through its ``dynamic`` storage backend hook::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage",
        "interface_v1": 1, "ha": {...}}'        # or "ha_config": "/path/ha.yaml"

Every entry point SGLang 0.5.23 calls is here: the legacy calls, v1 (pages straight between the host
pool and storage), v2 (hybrid models' pools), the pool registrations, ``get_stats`` and ``close``. No
call raises into the engine: failures become SGLang's own values (None, False, 0, [False]*n,
``PoolTransferResult.empty()``, {pool: [False]*n}).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage, HiCacheStorageConfig, PoolName, PoolTransfer, PoolTransferResult,
)

from ..backends.base import BackendContext, join_parts
from ..backends.errors import ConfigError
from ..backends.wrapped.hostpool import PagePool, as_bytes
from ..config import HAConfig, load, parse
from ..control.service import attach_control_plane
from ..dataplane import BackendManager, Layout
from ..dataplane.datapath import Namespace
from ..dataplane.member import RateLimitedLog
from ..observe.logs import queue_logging
from . import hits
from .compat import check_sglang_version
from .parallel import dp_place

log = logging.getLogger("hicache_ha.sglang")

CONFIG_ENV = "HICACHE_HA_CONFIG"
_failures = RateLimitedLog(log)

# Pages read from storage are immutable buffers; tensors made over them are only ever copied *from*.
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
            except Exception as exc:
                _failures.warn((method.__name__, type(exc)), "hicache-ha: %s failed (%r); the engine gets its "
                               "failure value", method.__name__, exc, exc_info=True)
                return failure(*args, **kwargs)

        return guarded

    return wrap


def _name(value) -> str:
    """A pool name or hit policy (SGLang's str enums, or plain strings) as a plain string."""
    return str(getattr(value, "value", value))


def _nkeys(keys, *_a, **_k) -> list:
    return [False] * len(keys)


def _v2_failure(transfers, *_a, **_k) -> dict:
    return {t.name: [False] * len(t.keys or []) for t in transfers}


def _fill(target: torch.Tensor, page) -> torch.Tensor:
    src = torch.frombuffer(join_parts(page), dtype=torch.uint8)
    if target.is_contiguous():
        target.view(torch.uint8).reshape(-1).copy_(src)
    else:
        target.copy_(src.view(target.dtype).reshape(target.shape))
    return target


def _layout(storage_config: HiCacheStorageConfig) -> Layout:
    """The rank's identity: SGLang's storage config, completed with the DP place from its parallel state."""
    layout = Layout.from_storage_config(storage_config)
    place = dp_place()
    if place is not None:
        dp_rank, dp_size = place
        layout = replace(layout, dp_rank=dp_rank, dp_size=dp_size)
    return layout


class HAStorage(HiCacheStorage):
    """One rank's HiCache L3 storage with deadlines, integrity, failover and switchover."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        queue_logging()  # no hicache-ha thread, engine or supervisor, ever waits on the host's log handlers
        check_sglang_version()
        self.storage_config = storage_config
        self.mem_pool_host = None
        self.registered_pools: dict = {}
        self.config = resolve_config(storage_config.extra_config)
        self.context = BackendContext(storage_config=storage_config, host=self, extra=dict(kwargs or {}))
        self.manager = BackendManager(self.config, _layout(storage_config), self.context)
        self.control = attach_control_plane(self.manager, self.config)
        self.pools: dict[str, PagePool] = {}
        self.namespaces: dict[str, Namespace] = {}
        self._metrics_on = bool(getattr(storage_config, "enable_storage_metrics", False))
        self._metrics = _StorageCounts()
        self._closed = False

    @property
    def is_storage_writer(self) -> bool:
        return self.manager.layout.is_storage_writer

    # -- pools --------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self._register(PoolName.KV, mem_pool_host)

    def register_mem_host_pool_v2(self, host_pool, host_pool_name) -> None:
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        self._register(host_pool_name, host_pool)

    def on_host_pools_registered(self) -> None:
        log.info("hicache-ha: rank %d: pools %s", self.manager.layout.rank,
                 ", ".join(f"{n} ({p.page_bytes} B/page, {p.dtype}, {'in place' if p.in_place else 'copied'})"
                           for n, p in self.pools.items()))

    def _register(self, name, pool) -> None:
        page_pool = PagePool(name, pool)
        layout = self.manager.layout.for_pool(page_pool.name, pool)
        self.pools[page_pool.name] = page_pool
        self.namespaces[page_pool.name] = self.manager.namespace(layout)
        if page_pool.name == PoolName.KV.value:
            self.manager.set_layout(layout)
            self.manager.host_ready()  # members built with the host pool are built now (bounded wait)

    def _kv_page(self) -> Optional[PagePool]:
        return self.pools.get(PoolName.KV.value)

    # -- single pages and the legacy batch API ------------------------------------------------------
    def _read(self, keys: List[str], targets: Optional[list]) -> list:
        kv = self._kv_page()
        if targets is not None and all(t is not None for t in targets):
            sizes = [t.numel() * t.element_size() for t in targets]
            done = self.manager.get_into(keys, sizes, lambda i, page: _fill(targets[i], page))
            return [t if ok else None for t, ok in zip(targets, done)]
        pages = self.manager.get(keys, kv.page_bytes if kv else None)
        dtype = kv.dtype if kv else torch.uint8
        return [None if p is None else torch.frombuffer(bytearray(p), dtype=torch.uint8).view(dtype) for p in pages]

    @_never_raises(lambda *a, **k: None)
    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self._read([key], [target_location] if target_location is not None else None)[0]

    @_never_raises(lambda keys, *a, **k: [None] * len(keys))
    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None):
        t0 = time.perf_counter()
        out = self._read(keys, list(target_locations) if target_locations is not None else None)
        self._count("prefetch", len(keys), t0)
        return out

    @_never_raises(lambda *a, **k: False)
    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        page = value if value is not None else target_location
        return self.manager.set([key], [as_bytes(page)])[0]

    @_never_raises(lambda *a, **k: False)
    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        t0 = time.perf_counter()
        pages = values if values is not None else target_locations
        ok = all(self.manager.set(keys, [as_bytes(p) for p in pages]))
        self._count("backup", len(keys), t0)
        return ok

    @_never_raises(lambda *a, **k: False)
    def exists(self, key: str) -> bool:
        return self.manager.exists([key]) == 1

    @_never_raises(lambda *a, **k: 0)
    def batch_exists(self, keys: List[str], extra_info: Optional[Any] = None) -> int:
        return self.manager.exists(keys)

    # -- v1: straight between the host pool and storage ---------------------------------------------
    @_never_raises(_nkeys)
    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> List[bool]:
        t0 = time.perf_counter()
        pool = self._kv_page()
        slots = pool.slots(host_indices, len(keys))
        if slots is None:
            return [False] * len(keys)
        # On the worker, fenced: nothing is written into the pool after this call returned.
        out = self.manager.get_into(keys, pool.page_bytes, pool.writer(host_indices, slots))
        self._count("prefetch", len(keys), t0)
        return out

    @_never_raises(_nkeys)
    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> List[bool]:
        t0 = time.perf_counter()
        pool = self._kv_page()
        slots = pool.slots(host_indices, len(keys))
        if slots is None:
            return [False] * len(keys)
        out = self.manager.set(keys, pool.pages(host_indices, slots))
        self._count("backup", len(keys), t0)
        return out

    # -- v2: hybrid models' pools (Mamba / SWA states, DSA indexer, DeepSeek V4, draft pools) ---------
    @_never_raises(lambda *a, **k: PoolTransferResult.empty())
    def batch_exists_v2(self, keys: List[str], pool_transfers: Optional[List[PoolTransfer]] = None,
                        extra_info: Optional[Any] = None) -> PoolTransferResult:
        transfers = list(pool_transfers or [])
        if not keys:
            return PoolTransferResult(0, {}, [])
        # One round trip for every page of every pool; a pool not registered has no page to restore.
        spaces = [self.manager.kv] + [self.namespaces.get(_name(t.name)) for t in transfers]
        pools = [self._kv_page()] + [self.pools.get(_name(t.name)) for t in transfers]
        asked = [(ns, pool) for ns, pool in zip(spaces, pools) if ns is not None]
        found = self.manager.path.exists_each([sk for ns, _p in asked for sk in ns.keys(keys)],
                                              [pool.page_bytes if pool else None for _ns, pool in asked for _ in keys])
        if found is None:
            return PoolTransferResult.empty()
        n = len(keys)
        present, at = [], 0
        for ns in spaces:
            present.append([False] * n if ns is None else found[at:at + n])
            at += 0 if ns is None else n
        queries = [hits.PoolQuery(t.name, _name(t.hit_policy), present[j + 1], len(t.keys) if t.keys else 1,
                                  t.block_pages, t.group_pages) for j, t in enumerate(transfers)]
        v = hits.verdict(PoolName.KV, present[0], queries)
        return PoolTransferResult(v.kv_hit_pages, v.extra_pool_hit_pages, v.restorable_prefix_pages)

    @_never_raises(_v2_failure)
    def batch_get_v2(self, transfers: List[PoolTransfer], extra_info: Optional[Any] = None) -> dict:
        t0 = time.perf_counter()
        plan = self._plan(transfers)
        skeys = [sk for _t, _p, _s, batch in plan for sk in batch]
        sizes = [pool.page_bytes for _t, pool, _s, batch in plan for _ in batch]
        sinks: list = []
        for transfer, pool, slots, batch in plan:
            write = pool.writer(transfer.host_indices, slots)
            sinks += [(write, i) for i in range(len(batch))]
        done = self.manager.path.read(skeys, sizes, lambda i, page: sinks[i][0](sinks[i][1], page)) if skeys else []
        self._count("prefetch", len(skeys), t0, sum(sizes))
        return self._per_transfer(transfers, plan, done)

    @_never_raises(_v2_failure)
    def batch_set_v2(self, transfers: List[PoolTransfer], extra_info: Optional[Any] = None) -> dict:
        t0 = time.perf_counter()
        plan = self._plan(transfers)
        skeys, values, skipped = [], [], set()
        for transfer, pool, slots, batch in plan:
            if not self.namespaces[pool.name].writer:  # shared (MLA) pages: another rank writes them
                skipped.add(id(transfer))
                continue
            skeys += batch
            values += pool.pages(transfer.host_indices, slots)
        done = iter(self.manager.path.set(skeys, values) if skeys else [])
        self._count("backup", len(skeys), t0, sum(p.page_bytes for _t, p, _s, batch in plan for _ in batch))
        stored = [ok for transfer, _p, _s, batch in plan for ok in
                  ([True] * len(batch) if id(transfer) in skipped else [next(done) for _ in batch])]
        return self._per_transfer(transfers, plan, stored)

    def _plan(self, transfers: List[PoolTransfer]) -> list:
        """(transfer, pool, page slots, storage keys) for each transfer that can move; the others
        (pool not registered, host indices that do not match the keys) are left out and fail."""
        plan = []
        for t in transfers:
            pool = self.pools.get(_name(t.name))
            keys = t.keys or []
            slots = pool.slots(t.host_indices, len(keys)) if pool is not None else None
            if slots is None:
                if keys:
                    _failures.warn(("v2", str(t.name)), "hicache-ha: %s: pool %s not registered or host indices "
                                   "do not match its %d keys; its pages fail", "v2", t.name, len(keys))
                continue
            plan.append((t, pool, slots, self.namespaces[pool.name].keys(keys)))
        return plan

    @staticmethod
    def _per_transfer(transfers: List[PoolTransfer], plan: list, flags: list) -> dict:
        out = {t.name: [False] * len(t.keys or []) for t in transfers}
        at = 0
        for transfer, _pool, _slots, batch in plan:
            out[transfer.name] = list(flags[at:at + len(batch)])
            at += len(batch)
        return out

    # -- housekeeping -------------------------------------------------------------------------------
    @_never_raises(lambda *a, **k: False)
    def clear(self) -> bool:
        """Remove this rank's pages (every pool's) from the active member, within deadlines_ms.clear."""
        prefixes = sorted({ns.prefix for ns in self.namespaces.values()} | {self.manager.kv.prefix})
        return self.manager.clear(prefixes)

    def _count(self, kind: str, pages: int, t0: float, nbytes: Optional[int] = None) -> None:
        if self._metrics_on:
            kv = self._kv_page()
            if nbytes is None:
                nbytes = pages * kv.page_bytes if kv is not None else 0
            self._metrics.add(kind, pages, nbytes, time.perf_counter() - t0)

    @_never_raises(lambda *a, **k: None)
    def get_stats(self):
        """SGLang's ``StorageMetrics`` for its ``sglang:prefetch_*`` / ``sglang:backup_*`` histograms (a
        fresh one each call, as SGLang expects), or None. hicache-ha's own status: ``ha_status()``."""
        if not self._metrics_on:
            return None
        return self._metrics.take()

    def ha_status(self) -> dict:
        """hicache-ha's view of this rank: members, states, epoch, counters, pools, recent events."""
        status = self.manager.snapshot()
        status["pools"] = {n: {"page_bytes": p.page_bytes, "dtype": str(p.dtype).removeprefix("torch."),
                               "in_place": p.in_place, "namespace": self.namespaces[n].prefix}
                           for n, p in self.pools.items()}
        return status

    @_never_raises(lambda *a, **k: None)
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.control.close()
        self.manager.close()


class _StorageCounts:
    """Pages and bandwidth per batch call, as SGLang's own backends report them; handed over (and
    forgotten) by ``take``. Appends are atomic, so the engine threads take no lock."""

    def __init__(self) -> None:
        self.lists = ([], [], [], [])

    def add(self, kind: str, pages: int, nbytes: int, seconds: float) -> None:
        pgs, bw = (self.lists[0], self.lists[2]) if kind == "prefetch" else (self.lists[1], self.lists[3])
        pgs.append(pages)
        if nbytes and seconds > 0:
            bw.append(nbytes / seconds / 1e9)

    def take(self):
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except ImportError:  # an SGLang without it: its metrics code is not there to call us either
            return None
        lists, self.lists = self.lists, ([], [], [], [])
        return StorageMetrics(prefetch_pgs=lists[0], backup_pgs=lists[1], prefetch_bandwidth=lists[2],
                              backup_bandwidth=lists[3])
