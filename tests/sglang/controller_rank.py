"""One rank of a TP = 2 engine: SGLang 0.5.23's real HiCacheController (its prefetch, prefetch-IO, sync and
backup threads, the MIN all-reduces of hit counts over gloo) and its real host pool, on CPU, with
HAStorage built by SGLang's factory through the ``dynamic`` hook. Spawned twice by the tests.

For each variant the rank builds a controller, then loops: fill fresh pages → ``write_storage`` (backup)
→ ``prefetch`` the same tokens → load what every rank agrees storage has → check every loaded page byte
for byte. It does the scheduler's part by hand (allocating host memory for the hits), as SGLang's own
recipe for a CPU controller does. Every storage call the controller makes is timed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import traceback
import warnings

PAGE = 4
PAGES_PER_REQUEST = 6


def _content(rank: int, token: int, nbytes: int, shared: bool) -> bytes:
    seed = hashlib.blake2b(f"{0 if shared else rank}:{token}".encode(), digest_size=64).digest()
    return (seed * (nbytes // 64 + 1))[:nbytes]


def _timed(storage, calls: list) -> None:
    """Record (method, start, seconds, error) of every call the controller makes on the backend."""
    for name in ("batch_exists", "batch_get", "batch_set", "batch_get_v1", "batch_set_v1",
                 "batch_exists_v2", "batch_get_v2", "batch_set_v2"):
        method = getattr(storage, name)

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


def run_rank(rank: int, world: int, port: int, variants: list, events: dict, results) -> None:
    warnings.simplefilter("ignore")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        from sglang.srt.runtime_context import get_parallel

        get_parallel().override_permanently(tp_rank=rank, tp_size=world, pp_rank=0, pp_size=1,
                                            attn_dcp_size=1, attn_dcp_rank=0)
        for variant in variants:
            results.put((rank, variant["name"], _run_variant(rank, variant, events, torch, dist)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "crash", traceback.format_exc()))


def _run_variant(rank: int, v: dict, events: dict, torch, dist) -> dict:
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

    from hicache_ha.sim.lag import LagProbe
    from tests.sglang.realpools import mha_pool, mla_pool

    mla = v.get("mla", False)
    host = (mla_pool if mla else mha_pool)(v.get("layout", "page_first"), torch.bfloat16, tokens=256)
    alloc = TokenToKVPoolAllocator(size=256, dtype=torch.bfloat16, device="cpu", kvcache=_device_pool(mla, torch),
                                   need_sort=False)
    extra = {"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage",
             "interface_v1": v["interface_v1"], "ha": v["ha"]}
    common = dict(io_backend="direct", storage_backend="dynamic", prefetch_threshold=PAGE, model_name="org/model",
                  storage_backend_extra_config=extra, load_cache_event=threading.Event())
    if v.get("hybrid"):
        group, sidecars = _hybrid_pools(host, alloc.get_kvcache(), torch)
        from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController

        cc = HybridCacheController(alloc, group, PAGE, dist.group.WORLD, transfer_layer_id_max=2, **common)
        request = _hybrid_request(group, sidecars)
    else:
        cc = HiCacheController(alloc, host, PAGE, dist.group.WORLD, **common)
        request = _request
    storage = cc.storage_backend
    calls: list = []
    _timed(storage, calls)
    iterations = []
    lag = LagProbe().start()
    i = 0
    ready, stop = events[v["name"]]
    try:
        while True:
            flag = torch.tensor([0 if stop.is_set() else 1])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank runs the same requests, or none
            if not flag.item():
                break
            iterations.append(request(rank, i, cc, host, mla, torch, sync=dist.barrier))
            i += 1
            if i == 2:
                ready.set()
    finally:
        lag.stop()
        status = storage.ha_status()
        cc._stop_storage_threads()
        storage.close()
    return {"calls": calls, "iterations": iterations, "lag": lag.worst, "active": status["active"],
            "events": status["events"], "interface": "v1" if cc.page_get_func.__name__ == "_page_get_zero_copy" else "legacy"}


def _device_pool(mla: bool, torch):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    if mla:
        return MLATokenToKVPool(size=256, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8,
                                layer_num=2, device="cpu", enable_memory_saver=False)
    return MHATokenToKVPool(size=256, page_size=PAGE, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=2,
                            device="cpu", enable_memory_saver=False)


def _fill_page(pool, slot: int, content: bytes, torch) -> None:
    dtype = pool.get_dummy_flat_data_page().dtype
    pool.set_from_flat_data_page(slot, torch.frombuffer(bytearray(content), dtype=torch.uint8).view(dtype))


def _page(pool, slot: int, torch) -> bytes:
    return bytes(pool.get_data_page(slot, flat=True).contiguous().view(torch.uint8).numpy())


def _nbytes(pool) -> int:
    dummy = pool.get_dummy_flat_data_page()
    return dummy.numel() * dummy.element_size()


def _tokens(i: int) -> list[int]:
    n = PAGES_PER_REQUEST * PAGE
    return list(range(10_000 + i * n, 10_000 + (i + 1) * n))


def _load(cc, hit, host, check) -> tuple[int, dict]:
    """Hand a hit to the IO thread, as the scheduler does, and collect what was loaded."""
    cc.prefetch_buffer.put(hit)
    loaded, pool_hits = 0, {}
    while True:
        ack = cc.ack_prefetch_queue.get(timeout=60)
        if ack.completed_tokens is not None:
            loaded = ack.completed_tokens
        if ack.pool_hits:
            pool_hits.update(ack.pool_hits)
        if ack.completed_req:
            return loaded, pool_hits


def _request(rank, i, cc, host, mla, torch, sync) -> dict:
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    tokens = _tokens(i)
    n, nbytes = len(tokens), _nbytes(host)
    t0 = time.monotonic()
    idx = host.alloc(n)
    for p in range(PAGES_PER_REQUEST):
        _fill_page(host, int(idx[p * PAGE]), _content(rank, tokens[p * PAGE], nbytes, mla), torch)
    cc.write_storage(idx, tokens, hash_value=get_storage_hash_str(tokens, None, page_size=PAGE))
    backed = cc.ack_backup_queue.get(timeout=60).completed_tokens
    host.free(idx)
    sync()  # a prefix is looked up after every rank stored it (MLA: after the one writer did)
    cc.prefetch(f"req-{i}", tokens, None)
    hit = cc.prefetch_hit_queue.get(timeout=60)
    loaded, exact = 0, True
    if hit.storage_hit_count >= PAGE:  # the scheduler's part: host memory for what every rank can load
        hit.host_indices = host.alloc(hit.storage_hit_count)
        loaded, _ = _load(cc, hit, host, None)
        for p in range(loaded // PAGE):
            exact &= _page(host, int(hit.host_indices[p * PAGE]), torch) == _content(rank, tokens[p * PAGE], nbytes, mla)
        host.free(hit.host_indices)
    return {"t0": t0, "t1": time.monotonic(), "tokens": n, "backed": backed, "hit": hit.storage_hit_count,
            "loaded": loaded, "exact": exact}


def _hybrid_pools(host, device, torch):
    """The KV pool, an SWA state pool (its own slots, trailing pages) and an indexer pool (on the KV
    slots), grouped as SGLang's hybrid pool assembler groups them."""
    from sglang.srt.mem_cache.hicache_storage import PoolName
    from sglang.srt.mem_cache.pool_host import HostPoolGroup, PoolEntry

    from tests.sglang.realpools import mha_pools

    swa_dev, swa = mha_pools("page_first", torch.bfloat16, tokens=256, layers=1)
    idx_dev, indexer = mha_pools("layer_first", torch.bfloat16, tokens=256, layers=1)
    ident = lambda layer: layer  # noqa: E731
    group = HostPoolGroup([
        PoolEntry(name=PoolName.KV, host_pool=host, device_pool=device, layer_mapper=ident, is_primary_index_anchor=True),
        PoolEntry(name=PoolName.SWA, host_pool=swa, device_pool=swa_dev, layer_mapper=ident),
        PoolEntry(name=PoolName.INDEXER, host_pool=indexer, device_pool=idx_dev, layer_mapper=ident),
    ])
    return group, {PoolName.SWA: swa, PoolName.INDEXER: indexer}


def _hybrid_request(group, sidecars):
    """A request of a hybrid model: KV pages, indexer pages on the same slots, and the SWA state of the
    last page; backed up and prefetched through the v2 calls of SGLang's HybridCacheController."""
    from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
    from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    swa, indexer = sidecars[PoolName.SWA], sidecars[PoolName.INDEXER]

    def request(rank, i, cc, host, mla, torch, sync) -> dict:
        tokens = _tokens(i)
        n = len(tokens)
        hashes = get_storage_hash_str(tokens, None, page_size=PAGE)
        t0 = time.monotonic()
        idx = group.alloc(n)
        swa_idx = group.alloc(PAGE, pool=PoolName.SWA)
        for p in range(PAGES_PER_REQUEST):
            slot = int(idx[p * PAGE])
            _fill_page(host, slot, _content(rank, tokens[p * PAGE], _nbytes(host), False), torch)
            _fill_page(indexer, slot, _content(rank, -tokens[p * PAGE], _nbytes(indexer), False), torch)
        _fill_page(swa, int(swa_idx[0]), _content(rank, 7 * tokens[-1], _nbytes(swa), False), torch)
        cc.write_storage(idx, tokens, hash_value=hashes, extra_pools=[
            PoolTransfer(name=PoolName.SWA, host_indices=swa_idx, keys=[hashes[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES),
            PoolTransfer(name=PoolName.INDEXER, indices_from_pool=PoolName.KV)])
        backed = cc.ack_backup_queue.get(timeout=60).completed_tokens
        group.free(idx)
        group.free(swa_idx, pool=PoolName.SWA)
        sync()
        cc.prefetch(CacheRequestHandle(rid=f"req-{i}", attempt_id=0), tokens, None, extra_pools=[
            PoolTransfer(name=PoolName.SWA, keys=[hashes[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES),
            PoolTransfer(name=PoolName.INDEXER, indices_from_pool=PoolName.KV)])
        hit = cc.prefetch_hit_queue.get(timeout=60)
        loaded, exact, swa_loaded = 0, True, False
        if hit.storage_hit_count >= PAGE:
            hit.hash_value = hit.hash_value[: hit.storage_hit_count // PAGE]
            hit.host_indices = group.alloc(hit.storage_hit_count)
            own = [t for t in hit.pool_transfers if t.name == PoolName.SWA]
            for t in own:
                t.host_indices = group.alloc(PAGE, pool=PoolName.SWA)
            loaded, pool_hits = _load(cc, hit, host, None)
            for p in range(loaded // PAGE):
                slot = int(hit.host_indices[p * PAGE])
                exact &= _page(host, slot, torch) == _content(rank, tokens[p * PAGE], _nbytes(host), False)
                exact &= _page(indexer, slot, torch) == _content(rank, -tokens[p * PAGE], _nbytes(indexer), False)
            for t in own:
                swa_loaded = pool_hits.get(PoolName.SWA.value, pool_hits.get(PoolName.SWA, 0)) >= 1
                if swa_loaded:
                    exact &= _page(swa, int(t.host_indices[0]), torch) == _content(rank, 7 * tokens[-1], _nbytes(swa), False)
                group.free(t.host_indices, pool=PoolName.SWA)
            group.free(hit.host_indices)
        return {"t0": t0, "t1": time.monotonic(), "tokens": n, "backed": backed, "hit": hit.storage_hit_count,
                "loaded": loaded, "exact": exact, "swa_loaded": swa_loaded}

    return request
