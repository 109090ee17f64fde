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
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    from hicache_ha.sim.lag import LagProbe
    from tests.sglang.realpools import mha_pool, mla_pool

    mla = v.get("mla", False)
    host = (mla_pool if mla else mha_pool)(v.get("layout", "page_first"), torch.bfloat16, tokens=256)
    dev_for_alloc = _device_pool(mla, torch)
    alloc = TokenToKVPoolAllocator(size=256, dtype=torch.bfloat16, device="cpu", kvcache=dev_for_alloc, need_sort=False)
    extra = {"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage",
             "interface_v1": v["interface_v1"], "ha": v["ha"]}
    cc = HiCacheController(alloc, host, PAGE, dist.group.WORLD, load_cache_event=threading.Event(),
                           io_backend="direct", storage_backend="dynamic", prefetch_threshold=PAGE,
                           model_name="org/model", storage_backend_extra_config=extra)
    storage = cc.storage_backend
    calls: list = []
    _timed(storage, calls)
    page_bytes = host.get_dummy_flat_data_page().numel() * host.get_dummy_flat_data_page().element_size()
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
            iterations.append(_request(rank, i, v, cc, host, page_bytes, mla, torch, get_storage_hash_str,
                                       sync=dist.barrier))
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


def _request(rank, i, v, cc, host, page_bytes, mla, torch, get_storage_hash_str, sync) -> dict:
    n = PAGES_PER_REQUEST * PAGE
    tokens = list(range(10_000 + i * n, 10_000 + (i + 1) * n))
    t0 = time.monotonic()
    idx = host.alloc(n)
    dtype = host.get_dummy_flat_data_page().dtype
    for p in range(PAGES_PER_REQUEST):
        raw = bytearray(_content(rank, tokens[p * PAGE], page_bytes, mla))
        host.set_from_flat_data_page(int(idx[p * PAGE]), torch.frombuffer(raw, dtype=torch.uint8).view(dtype))
    hashes = get_storage_hash_str(tokens, None, page_size=PAGE)
    cc.write_storage(idx, tokens, hash_value=hashes)
    backed = cc.ack_backup_queue.get(timeout=60).completed_tokens
    host.free(idx)
    sync()  # a prefix is looked up after every rank stored it (MLA: after the one writer did)
    cc.prefetch(f"req-{i}", tokens, None)
    hit = cc.prefetch_hit_queue.get(timeout=60)
    loaded, exact = 0, True
    if hit.storage_hit_count >= PAGE:  # the scheduler's part: host memory for what every rank can load
        hit.host_indices = host.alloc(hit.storage_hit_count)
        cc.prefetch_buffer.put(hit)
        while True:
            ack = cc.ack_prefetch_queue.get(timeout=60)
            if ack.completed_tokens is not None:
                loaded = ack.completed_tokens
            if ack.completed_req:
                break
        for p in range(loaded // PAGE):
            got = bytes(host.get_data_page(int(hit.host_indices[p * PAGE]), flat=True).contiguous()
                        .view(torch.uint8).numpy())
            exact &= got == _content(rank, tokens[p * PAGE], page_bytes, mla)
        host.free(hit.host_indices)
    return {"t0": t0, "t1": time.monotonic(), "tokens": n, "backed": backed, "hit": hit.storage_hit_count,
            "loaded": loaded, "exact": exact}
