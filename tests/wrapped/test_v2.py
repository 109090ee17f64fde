"""Hybrid models (SGLang's v2 calls) on SGLang's own backends behind HAStorage: every pool's pages round trip
byte for byte, the hit policies see them, and a page of another size than the KV page (stored as slot-sized
units through the bounce pool of a zero-copy backend) is served whole or not at all."""

from __future__ import annotations

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer

from hicache_ha.sim.wrapped_faults import S3_DEADLINES
from tests.sglang.realpools import mamba_pool, mha_pool
from tests.sglang.test_v2 import transfer
from tests.wrapped.conftest import (KINDS, VERIFIED, build, engine_pool, fill, ha, member, member_status, pages_at,
                                    wait_healthy)

# AIBrix stores only whole cache blocks shaped like the KV pool's pages: other pools' pages are refused.
KV_ONLY = {"aibrix"}


def hybrid(kind: str, request, tmp_path):
    """HAStorage over one of SGLang's backends, registered as SGLang's HybridCacheController registers it:
    a KV pool of 256-byte pages, an SWA pool of 768-byte pages (3 units), an indexer pool of KV-sized pages
    and a Mamba state pool of 448-byte pages (2 units, the last one padded)."""
    kv = engine_pool(kind, layers=1)
    pools = {PoolName.KV: kv, PoolName.SWA: mha_pool("page_first", torch.bfloat16, layers=3),
             PoolName.INDEXER: mha_pool("layer_first", torch.bfloat16, layers=1), PoolName.MAMBA: mamba_pool()}
    # An S3 store answers an exists with one request per page (here per checksum record): it gets the
    # deadlines an operator of one would give it (as in the fault matrix).
    deadlines = {"deadlines_ms": S3_DEADLINES} if kind == "seaweedfs" else {}
    s = build(ha(member(kind, request, tmp_path), **deadlines), pool=kv)
    for name, pool in pools.items():
        s.register_mem_host_pool_v2(pool, name)
    s.on_host_pools_registered()
    wait_healthy(s)
    return s, pools


def primary_ops(s) -> dict:
    return member_status(s)["ops"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_pool_of_a_hybrid_model_round_trips_through_the_backend(kind, request, tmp_path):
    s, pools = hybrid(kind, request, tmp_path)
    keys = [f"{kind}-h{i}" for i in range(3)]
    out = [transfer(name, pool, keys) for name, pool in pools.items()]
    expected = {t.name: fill(pools[t.name], t.host_indices, seed=i + 1) for i, t in enumerate(out)}
    stored = s.batch_set_v2(out)
    if kind in KV_ONLY:  # its KV pages are stored; the others it does not take, and says so
        assert stored == {t.name: [True] * 3 if t.name in (PoolName.KV, PoolName.INDEXER) else [False] * 3
                          for t in out}  # (the indexer's pages here are the KV page's size and shape)
        for _ in range(5):  # not a failure of the backend: nothing counts against it
            assert s.batch_set_v2(out)[PoolName.MAMBA] == [False] * 3
        r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.MAMBA, keys=[keys[-1]],
                                                  hit_policy=PoolHitPolicy.TRAILING_PAGES)])
        assert (r.kv_hit_pages, r.restorable_prefix_pages) == (0, [])  # no Mamba state: nothing restorable
        primary = member_status(s)
        assert primary["state"] == "healthy" and primary["transitions"] == {"circuit_broken": 1, "recovering": 1,
                                                                             "healthy": 1}  # start-up only
        assert primary["dropped_pages"] == 6 * 6  # SWA and Mamba pages, six writes
        return
    assert stored == {t.name: [True] * 3 for t in out}
    r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.SWA, keys=[keys[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES),
                                 PoolTransfer(name=PoolName.INDEXER, hit_policy=PoolHitPolicy.ALL_PAGES),
                                 PoolTransfer(name=PoolName.MAMBA, keys=[keys[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES)])
    assert (r.kv_hit_pages, r.restorable_prefix_pages) == (3, [1, 2, 3])
    back = [transfer(t.name, pools[t.name], keys) for t in out]
    assert s.batch_get_v2(back) == {t.name: [True] * 3 for t in back}
    for t in back:
        assert pages_at(pools[t.name], t.host_indices) == expected[t.name], t.name
    status = s.ha_status()
    assert status["active"] == "primary" and primary_ops(s)["get"].get("ok", 0) >= 1  # served by the backend


@pytest.mark.parametrize("unit", [0, 1])
@pytest.mark.parametrize("kind", ["mooncake", "hf3fs", "seaweedfs", "nixl"])
def test_a_page_with_a_unit_missing_is_a_miss_never_a_partial_page(kind, unit, request, tmp_path):
    """Only the Mamba page of key b loses one of its two units (removed behind our back, as an eviction
    would): b's state is a miss, a's is served whole. Existence is judged by the checksum record, or (no
    records) by the last unit: only then does a missing last unit show before the read."""
    s, pools = hybrid(kind, request, tmp_path)
    keys = [f"{kind}-a", f"{kind}-b"]
    t = transfer(PoolName.MAMBA, pools[PoolName.MAMBA], keys)
    want = fill(pools[PoolName.MAMBA], t.host_indices, seed=5)
    kv = transfer(PoolName.KV, pools[PoolName.KV], keys)
    fill(pools[PoolName.KV], kv.host_indices, seed=6)
    assert s.batch_set_v2([kv, t]) == {PoolName.KV: [True, True], PoolName.MAMBA: [True, True]}
    storage = s.manager.members["primary"].backend._built.storage
    lost = s.namespaces[PoolName.MAMBA.value].keys([keys[1]])[0] + f"@u{unit}"
    _remove(kind, storage, lost)
    r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.MAMBA, hit_policy=PoolHitPolicy.ALL_PAGES)])
    assert r.kv_hit_pages == (1 if kind not in VERIFIED and unit == 1 else 2)
    back = transfer(PoolName.MAMBA, pools[PoolName.MAMBA], keys)
    if kind == "nixl":  # a read NIXL cannot complete fails its whole batch (its known signature): both miss
        assert s.batch_get_v2([back]) == {PoolName.MAMBA: [False, False]}
        return
    assert s.batch_get_v2([back]) == {PoolName.MAMBA: [True, False]}
    assert pages_at(pools[PoolName.MAMBA], back.host_indices[:1]) == want[:1]


def _remove(kind: str, storage, key: str) -> None:
    if kind == "mooncake":
        suffixes = [f"_{storage.mha_suffix}_k", f"_{storage.mha_suffix}_v"]
        assert all(storage.store.remove(storage._tag_keys([key])[0] + sfx) == 0 for sfx in suffixes)
    elif kind == "hf3fs":
        storage.metadata_client.delete_keys(storage.rank, storage._get_mha_zero_copy_keys([key]))
    elif kind == "seaweedfs":
        storage._s3.delete_object(Bucket=storage.config.bucket, Key=storage._object_key(key))
    else:
        import glob
        import os

        paths = [p for base in storage.file_manager.base_dirs for p in glob.glob(os.path.join(base, "*", key + "*"))]
        assert paths
        for path in paths:
            os.unlink(path)
