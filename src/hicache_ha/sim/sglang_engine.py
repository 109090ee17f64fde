"""SGLang's own cache controller as the engine: the reference for fidelity and for SLA figures.

R rank processes (spawned; gloo between them), each with SGLang 0.5.23's real ``HiCacheController`` (or
``HybridCacheController``: an SWA state pool and an indexer pool beside the KV pool, moved by the v2
calls) and its real host pools on CPU, the storage backend built by SGLang's factory through the
``dynamic`` hook, exactly as a server builds it. Each rank loops over fresh requests: fill pages →
``write_storage`` (SGLang's backup thread) → ``prefetch`` (its prefetch thread: exists, MIN all-reduce of
hits, its IO thread: get) → check every loaded page byte for byte. The scheduler's part (host memory
for the agreed hits) is done by hand, as SGLang's own CPU recipe does. Every storage call the
controller makes is timed. Needs the sglang wheel and its CPU dependencies (``make test`` installs them).

What the simulator (``sim.engine``) still stands in for: many ranks and long workloads at low cost, a
multi-turn prefix-sharing workload, and runs without SGLang installed. This engine stands in for nothing
below the scheduler: the threads, queues and collectives are SGLang's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Optional

from .sglang_pools import PAGE, hybrid_pools, mha_pools, mla_pools
from .sglang_requests import HybridRequest, kv_request

# The pools (``sglang_pools``) are importable from here too.
__all__ = ["DYNAMIC_HA", "OP_DEADLINE", "PAGE", "EngineSpec", "RankResult", "SGLangEngine", "drain", "ha_spec",
           "mha_pools", "mla_pools"]

DYNAMIC_HA = {"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage"}
# The storage calls timed on each rank, and the deadline each is held to.
OP_DEADLINE = {"batch_exists": "exists", "batch_exists_v2": "exists", "batch_get": "get", "batch_get_v1": "get",
               "batch_get_v2": "get", "batch_set": "set", "batch_set_v1": "set", "batch_set_v2": "set"}


@dataclass
class EngineSpec:
    """One run of the engine. ``extra_config`` is what a server gets as --hicache-storage-backend-extra-config
    (the ``dynamic`` fields, ``interface_v1``, and for hicache-ha its ``ha`` document)."""

    name: str
    extra_config: dict
    hybrid: bool = False  # HybridCacheController with SWA and indexer pools (v2)
    mla: bool = False
    layout: str = "page_first"


@dataclass
class RankResult:
    rank: int
    name: str
    calls: list = field(default_factory=list)  # (method, time.monotonic() at start, seconds, error or None)
    iterations: list = field(default_factory=list)
    lag: float = 0.0  # the longest the rank's process was kept from running
    interface: str = ""
    status: Optional[dict] = None  # HAStorage.ha_status() at the end (None for another backend)
    crash: Optional[str] = None


def ha_spec(name: str, ha: dict, *, interface_v1: int = 1, **kw) -> EngineSpec:
    return EngineSpec(name, {**DYNAMIC_HA, "interface_v1": interface_v1, "ha": ha}, **kw)


class SGLangEngine:
    """Run ``specs`` one after the other in ``ranks`` processes (importing SGLang costs tens of seconds
    per process, so they are spawned once). With ``live``, records arrive on ``live`` as they happen:
    (kind, rank, spec name, data), kind ``iteration`` or ``event``."""

    def __init__(self, specs: list[EngineSpec], ranks: int = 2, *, live: bool = False, quiet: bool = False) -> None:
        self.specs = specs
        self.ranks = ranks
        self.quiet = quiet  # the ranks log errors only (the demo shows transitions itself)
        ctx = mp.get_context("spawn")
        self._gates = {s.name: (ctx.Event(), ctx.Event()) for s in specs}  # (ready, stop)
        self._results = ctx.Queue()
        self.live = ctx.Queue() if live else None  # only when someone reads it: a full pipe blocks exit
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self._procs = [ctx.Process(target=_run_rank, args=(r, ranks, port, specs, self._gates, self._results,
                                                           self.live, quiet), daemon=True) for r in range(ranks)]

    def start(self) -> "SGLangEngine":
        for p in self._procs:
            p.start()
        return self

    def wait_ready(self, name: str, timeout: float = 300.0) -> bool:
        """Until the ranks have served their first requests of ``name`` (or one died)."""
        deadline = time.monotonic() + timeout
        ready = self._gates[name][0]
        while not ready.wait(0.5):
            if time.monotonic() > deadline or not all(p.is_alive() for p in self._procs):
                return False
        return True

    def stop(self, name: str) -> None:
        self._gates[name][1].set()

    def results(self, timeout: float = 180.0) -> dict[tuple[int, str], RankResult]:
        """Every rank's result of every spec (stop them all first)."""
        out = {}
        for _ in range(self.ranks * len(self.specs)):
            r: RankResult = self._results.get(timeout=timeout)
            if r.crash:
                raise RuntimeError(f"rank {r.rank} crashed:\n{r.crash}")
            out[(r.rank, r.name)] = r
        return out

    def close(self) -> None:
        for name in self._gates:
            self.stop(name)
        for p in self._procs:
            p.join(30)
            if p.is_alive():
                p.kill()


# -- the rank processes ------------------------------------------------------------------------------
def _run_rank(rank: int, world: int, port: int, specs: list, gates: dict, results, live, quiet: bool) -> None:
    warnings.simplefilter("ignore")
    if quiet:
        import logging

        for name in ("hicache_ha", "sglang"):
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        from sglang.srt.runtime_context import get_parallel

        get_parallel().override_permanently(tp_rank=rank, tp_size=world, pp_rank=0, pp_size=1,
                                            attn_dcp_size=1, attn_dcp_rank=0)
        for spec in specs:
            results.put(_run_spec(rank, spec, gates[spec.name], live, dist))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put(RankResult(rank, "crash", crash=traceback.format_exc()))


def _run_spec(rank: int, spec: EngineSpec, gate, live, dist) -> RankResult:
    import torch
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

    from .lag import LagProbe

    ready, stop = gate
    device, host = (mla_pools if spec.mla else mha_pools)(spec.layout, torch.bfloat16, tokens=256)
    alloc = TokenToKVPoolAllocator(size=256, dtype=torch.bfloat16, device="cpu", kvcache=device, need_sort=False)
    common = dict(io_backend="direct", storage_backend="dynamic", prefetch_threshold=PAGE, model_name="org/model",
                  storage_backend_extra_config=dict(spec.extra_config), load_cache_event=threading.Event())
    if spec.hybrid:
        from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController

        group, sidecars = hybrid_pools(host, device)
        cc = HybridCacheController(alloc, group, PAGE, dist.group.WORLD, transfer_layer_id_max=2, **common)
        request = HybridRequest(group, sidecars)
    else:
        cc = HiCacheController(alloc, host, PAGE, dist.group.WORLD, **common)
        request = kv_request
    storage = cc.storage_backend
    result = RankResult(rank, spec.name, interface="v1" if cc.page_get_func.__name__ == "_page_get_zero_copy"
                        else "legacy")
    _time_calls(storage, result.calls)
    status = getattr(storage, "ha_status", None)
    if status is not None and live is not None:
        # From now on, and what happened while SGLang built the controller (analyses go by event time; an
        # event emitted just as this subscribes may arrive twice).
        def put(e):
            live.put(("event", rank, spec.name, e.to_dict()))

        storage.manager.events.subscribe(put)
        for e in storage.manager.events.recent():
            put(e)
    lag = LagProbe().start()
    i = 0
    try:
        while True:
            flag = torch.tensor([0 if stop.is_set() else 1])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank runs the same requests, or none
            if not flag.item():
                break
            seen = len(result.calls)
            it = request(rank, i, cc, host, spec.mla, torch, dist.barrier)
            result.iterations.append(it)
            if live is not None:
                live.put(("iteration", rank, spec.name, {**it, "calls": result.calls[seen:]}))
            i += 1
            if i == 2:
                ready.set()
    finally:
        lag.stop()
        result.lag = lag.worst
        result.status = status() if status is not None else None
        cc._stop_storage_threads()
        getattr(storage, "close", lambda: None)()
    return result


def _time_calls(storage, calls: list) -> None:
    """Record every call the controller makes on the backend: (method, start, seconds, error)."""
    for name in OP_DEADLINE:
        method = getattr(storage, name, None)
        if method is None:
            continue

        def timed(*args, _m=method, _n=name, **kwargs):
            t0, error = time.monotonic(), None
            try:
                return _m(*args, **kwargs)
            except BaseException as exc:  # the contract says never; record it if it happens
                error = repr(exc)
                raise
            finally:
                calls.append((_n, t0, time.monotonic() - t0, error))

        setattr(storage, name, timed)


def drain(q, timeout: float = 0.0) -> list:
    """Everything waiting on a live queue now."""
    out = []
    try:
        while True:
            out.append(q.get(timeout=timeout) if timeout else q.get_nowait())
    except queue.Empty:
        return out
