"""One request through SGLang's cache controller, as its scheduler drives it: fill pages, back them up,
prefetch them, load the hit, and check every loaded page byte for byte (KV only, or a hybrid model's KV,
indexer and SWA state through the v2 calls)."""

from __future__ import annotations

import hashlib
import time

from .sglang_pools import PAGE

PAGES_PER_REQUEST = 6


def content(rank: int, token: int, nbytes: int, shared: bool) -> bytes:
    """A page's bytes: derived from its first token (and its rank, unless the page is shared)."""
    seed = hashlib.blake2b(f"{0 if shared else rank}:{token}".encode(), digest_size=64).digest()
    return (seed * (nbytes // 64 + 1))[:nbytes]


def _nbytes(pool) -> int:
    dummy = pool.get_dummy_flat_data_page()
    return dummy.numel() * dummy.element_size()


def _fill_page(pool, slot: int, data: bytes, torch) -> None:
    dtype = pool.get_dummy_flat_data_page().dtype
    pool.set_from_flat_data_page(slot, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype))


def _page(pool, slot: int, torch) -> bytes:
    return bytes(pool.get_data_page(slot, flat=True).contiguous().view(torch.uint8).numpy())


def _tokens(i: int) -> list[int]:
    n = PAGES_PER_REQUEST * PAGE
    return list(range(10_000 + i * n, 10_000 + (i + 1) * n))


def _load(cc, hit) -> tuple[int, dict]:
    """Hand a hit to the IO thread, as the scheduler does; collect what was loaded."""
    cc.prefetch_buffer.put(hit)
    loaded, pool_hits = 0, {}
    while True:
        ack = cc.ack_prefetch_queue.get(timeout=120)
        if ack.completed_tokens is not None:
            loaded = ack.completed_tokens
        if ack.pool_hits:
            pool_hits.update({str(getattr(k, "value", k)): v for k, v in ack.pool_hits.items()})
        if ack.completed_req:
            return loaded, pool_hits


def kv_request(rank, i, cc, host, mla, torch, sync) -> dict:
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    tokens = _tokens(i)
    n, nbytes = len(tokens), _nbytes(host)
    t0 = time.monotonic()
    idx = host.alloc(n)
    for p in range(PAGES_PER_REQUEST):
        _fill_page(host, int(idx[p * PAGE]), content(rank, tokens[p * PAGE], nbytes, mla), torch)
    cc.write_storage(idx, tokens, hash_value=get_storage_hash_str(tokens, None, page_size=PAGE))
    backed = cc.ack_backup_queue.get(timeout=120).completed_tokens
    host.free(idx)
    sync()  # a prefix is looked up after every rank stored it (MLA: after the one writer did)
    cc.prefetch(f"req-{i}", tokens, None)
    hit = cc.prefetch_hit_queue.get(timeout=120)
    loaded, bad = 0, 0
    if hit.storage_hit_count >= PAGE:  # the scheduler's part: host memory for what every rank can load
        hit.host_indices = host.alloc(hit.storage_hit_count)
        loaded, _ = _load(cc, hit)
        for p in range(loaded // PAGE):
            bad += _page(host, int(hit.host_indices[p * PAGE]), torch) != content(rank, tokens[p * PAGE], nbytes, mla)
        host.free(hit.host_indices)
    return {"t0": t0, "t1": time.monotonic(), "tokens": n, "backed": backed, "hit": hit.storage_hit_count,
            "loaded": loaded, "exact": bad == 0, "bad_pages": bad}


class HybridRequest:
    """A request of a hybrid model: KV pages, indexer pages on the same slots, and the SWA state of the
    last page; backed up and prefetched through the v2 calls of SGLang's HybridCacheController."""

    def __init__(self, group, sidecars) -> None:
        from sglang.srt.mem_cache.hicache_storage import PoolName

        self.group = group
        self.swa, self.indexer = sidecars[PoolName.SWA], sidecars[PoolName.INDEXER]

    def __call__(self, rank, i, cc, host, mla, torch, sync) -> dict:
        from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
        from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer
        from sglang.srt.mem_cache.utils import get_storage_hash_str

        group, swa, indexer = self.group, self.swa, self.indexer
        tokens = _tokens(i)
        n = len(tokens)
        hashes = get_storage_hash_str(tokens, None, page_size=PAGE)
        kv_page = lambda p: content(rank, tokens[p * PAGE], _nbytes(host), False)  # noqa: E731
        idx_page = lambda p: content(rank, -tokens[p * PAGE], _nbytes(indexer), False)  # noqa: E731
        swa_page = content(rank, 7 * tokens[-1], _nbytes(swa), False)
        t0 = time.monotonic()
        idx = group.alloc(n)
        swa_idx = group.alloc(PAGE, pool=PoolName.SWA)
        for p in range(PAGES_PER_REQUEST):
            _fill_page(host, int(idx[p * PAGE]), kv_page(p), torch)
            _fill_page(indexer, int(idx[p * PAGE]), idx_page(p), torch)
        _fill_page(swa, int(swa_idx[0]), swa_page, torch)
        cc.write_storage(idx, tokens, hash_value=hashes, extra_pools=[
            PoolTransfer(name=PoolName.SWA, host_indices=swa_idx, keys=[hashes[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES),
            PoolTransfer(name=PoolName.INDEXER, indices_from_pool=PoolName.KV)])
        backed = cc.ack_backup_queue.get(timeout=120).completed_tokens
        group.free(idx)
        group.free(swa_idx, pool=PoolName.SWA)
        sync()
        cc.prefetch(CacheRequestHandle(rid=f"req-{i}", attempt_id=0), tokens, None, extra_pools=[
            PoolTransfer(name=PoolName.SWA, keys=[hashes[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES),
            PoolTransfer(name=PoolName.INDEXER, indices_from_pool=PoolName.KV)])
        hit = cc.prefetch_hit_queue.get(timeout=120)
        loaded, bad, swa_loaded = 0, 0, False
        if hit.storage_hit_count >= PAGE:
            hit.hash_value = hit.hash_value[: hit.storage_hit_count // PAGE]
            hit.host_indices = group.alloc(hit.storage_hit_count)
            own = [t for t in hit.pool_transfers if t.name == PoolName.SWA]
            for t in own:
                t.host_indices = group.alloc(PAGE, pool=PoolName.SWA)
            loaded, pool_hits = _load(cc, hit)
            for p in range(loaded // PAGE):
                slot = int(hit.host_indices[p * PAGE])
                bad += _page(host, slot, torch) != kv_page(p) or _page(indexer, slot, torch) != idx_page(p)
            for t in own:
                swa_loaded = pool_hits.get(PoolName.SWA.value, 0) >= 1
                if swa_loaded:
                    bad += _page(swa, int(t.host_indices[0]), torch) != swa_page
                group.free(t.host_indices, pool=PoolName.SWA)
            group.free(hit.host_indices)
        return {"t0": t0, "t1": time.monotonic(), "tokens": n, "backed": backed, "hit": hit.storage_hit_count,
                "loaded": loaded, "exact": bad == 0, "bad_pages": bad, "swa_loaded": swa_loaded}
