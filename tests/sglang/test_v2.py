"""The v2 interface on SGLang's real hybrid host pools: a KV pool (MHA or MLA), an SWA state pool
(trailing pages), a DSA-style indexer pool (all pages, on the KV slots) and a Mamba state pool (bytes,
per TP rank even in an MLA model). Round trips byte for byte, each hit policy, misses, failure values,
and the data-plane promises (deadline, fencing, failover) for every pool."""

import time

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer, PoolTransferResult

from tests.helpers import GATE
from tests.sglang.conftest import build
from tests.sglang.realpools import fill, mamba_pool, mha_pool, mla_pool, pages_at


def hybrid(ha, *, mla=False, tp_rank=0, tp_size=2):
    """HAStorage registered as SGLang's HybridCacheController registers it."""
    kv = (mla_pool if mla else mha_pool)("page_first", torch.bfloat16)
    pools = {PoolName.KV: kv, PoolName.SWA: mha_pool("page_first", torch.bfloat16, layers=1),
             PoolName.INDEXER: mha_pool("layer_first", torch.bfloat16, layers=1), PoolName.MAMBA: mamba_pool()}
    s = build(ha, pool=kv, mla=mla, tp_rank=tp_rank, tp_size=tp_size)
    for name, pool in pools.items():
        s.register_mem_host_pool_v2(pool, name)
    s.on_host_pools_registered()
    return s, pools


def transfer(name, pool, keys, policy=PoolHitPolicy.ALL_PAGES, indices=None):
    return PoolTransfer(name=name, keys=keys, hit_policy=policy,
                        host_indices=indices if indices is not None else pool.alloc(len(keys) * pool.page_size))


@pytest.fixture
def file_ha(tmp_path):
    return {"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}


def test_every_pool_round_trips_byte_for_byte_in_one_call(file_ha):
    s, pools = hybrid(file_ha)
    keys = ["h0", "h1", "h2"]
    out, expected = [], {}
    for name in (PoolName.KV, PoolName.SWA, PoolName.INDEXER, PoolName.MAMBA):
        t = transfer(name, pools[name], keys)
        expected[name] = fill(pools[name], t.host_indices, seed=hash(name.value) % 1000)
        out.append(t)
    assert s.batch_set_v2(out) == {t.name: [True] * 3 for t in out}
    back = [transfer(t.name, pools[t.name], keys) for t in out]
    assert s.batch_get_v2(back) == {t.name: [True] * 3 for t in back}
    for t in back:
        assert pages_at(pools[t.name], t.host_indices) == expected[t.name], t.name
    assert len(s.ha_status()["backends"][0]["ops"]["get"]) == 1  # four pools, one round trip


def test_hit_policies_as_sglang_defines_them(file_ha):
    s, pools = hybrid(file_ha)
    keys = [f"p{i}" for i in range(5)]
    kv = pools[PoolName.KV]
    s.batch_set_v1(keys, fill_at(kv, 5))
    s.batch_set_v2([transfer(PoolName.INDEXER, pools[PoolName.INDEXER], keys[:3])])  # pages 1-3
    s.batch_set_v2([transfer(PoolName.SWA, pools[PoolName.SWA], [keys[1], keys[4]])])  # pages 2 and 5
    r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.SWA, keys=[keys[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES)])
    assert (r.kv_hit_pages, r.restorable_prefix_pages) == (5, [2, 5])
    assert r.extra_pool_hit_pages == {PoolName.KV: 5, PoolName.SWA: 5}
    r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.INDEXER, hit_policy=PoolHitPolicy.ALL_PAGES,
                                              indices_from_pool=PoolName.KV),
                                 PoolTransfer(name=PoolName.SWA, keys=[keys[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES)])
    assert (r.kv_hit_pages, r.restorable_prefix_pages) == (2, [2])  # the intersection
    assert r.extra_pool_hit_pages == {PoolName.KV: 5, PoolName.INDEXER: 3, PoolName.SWA: 5}
    # block_groups: blocks of 2 KV pages, the first page of each block is the group's key; never gates KV.
    s.batch_set_v2([transfer(PoolName.MAMBA, pools[PoolName.MAMBA], [keys[0], keys[2]])])
    r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.MAMBA, hit_policy=PoolHitPolicy.BLOCK_GROUPS,
                                              block_pages=2, group_pages=1)])
    assert (r.kv_hit_pages, r.extra_pool_hit_pages[PoolName.MAMBA]) == (5, 4)


def fill_at(pool, pages):
    slots = pool.alloc(pages * pool.page_size)
    fill(pool, slots, seed=pages)
    return slots


def test_misses_are_false_and_unregistered_pools_fail_without_raising(file_ha):
    s, pools = hybrid(file_ha)
    r = s.batch_get_v2([transfer(PoolName.SWA, pools[PoolName.SWA], ["never", "written"]),
                        PoolTransfer(name=PoolName.DRAFT, keys=["x"], host_indices=torch.arange(4))])
    assert r == {PoolName.SWA: [False, False], PoolName.DRAFT: [False]}
    r = s.batch_exists_v2(["never"], [PoolTransfer(name=PoolName.DRAFT, hit_policy=PoolHitPolicy.ALL_PAGES)])
    assert r.kv_hit_pages == 0 and r.restorable_prefix_pages == []


def test_a_hung_member_gives_sglangs_failure_values_within_the_deadline(fast_deadlines):
    s, pools = hybrid({"backends": [{"name": "g", "type": GATE}], "deadlines_ms": fast_deadlines})
    keys = ["a", "b"]
    t = transfer(PoolName.SWA, pools[PoolName.SWA], keys)
    fill(pools[PoolName.SWA], t.host_indices, seed=1)
    assert s.batch_set_v2([t]) == {PoolName.SWA: [True, True]}
    before = {n: p.kv_buffer.clone() for n, p in pools.items() if n != PoolName.MAMBA}
    gate = s.manager.members["g"].backend
    gate.close_gate()
    try:
        t0 = time.perf_counter()
        r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.SWA, keys=["b"], hit_policy=PoolHitPolicy.TRAILING_PAGES)])
        assert (r.kv_hit_pages, r.extra_pool_hit_pages, r.restorable_prefix_pages) == (0, {}, None)  # .empty()
        back = [transfer(PoolName.SWA, pools[PoolName.SWA], keys), transfer(PoolName.KV, pools[PoolName.KV], keys)]
        assert s.batch_get_v2(back) == {PoolName.SWA: [False, False], PoolName.KV: [False, False]}
        assert s.batch_set_v2([t]) == {PoolName.SWA: [False, False]}
        assert time.perf_counter() - t0 < (40 + 80 + 120 + 3 * 20) / 1000 + 0.5
    finally:
        gate.open_gate()
    assert s.manager.members["g"].bulkhead.wait_idle(5)
    time.sleep(0.05)
    for name, buffer in before.items():  # the abandoned reads wrote nothing into any pool
        assert torch.equal(pools[name].kv_buffer, buffer), name


def test_failover_serves_every_pool_from_the_standby(tmp_path):
    ha = {"backends": [{"name": "g", "type": GATE}, {"name": "f", "type": "file", "path": str(tmp_path)}],
          "deadlines_ms": {"exists": 40, "get": 80, "set": 120}}
    s, pools = hybrid(ha)
    s.manager.members["g"].backend.close_gate()
    try:
        deadline = time.monotonic() + 5
        while s.manager.active.name != "f":  # pings go unanswered: the member trips, the rank fails over
            assert time.monotonic() < deadline
            time.sleep(0.02)
        keys = ["a", "b"]
        out = [transfer(n, pools[n], keys) for n in (PoolName.SWA, PoolName.MAMBA)]
        expected = {t.name: fill(pools[t.name], t.host_indices, seed=3) for t in out}
        assert s.batch_set_v2(out) == {t.name: [True, True] for t in out}
        back = [transfer(t.name, pools[t.name], keys) for t in out]
        assert s.batch_get_v2(back) == {t.name: [True, True] for t in back}
        assert all(pages_at(pools[t.name], t.host_indices) == expected[t.name] for t in back)
    finally:
        s.manager.members["g"].backend.open_gate()


def test_mla_models_share_kv_and_sidecars_but_mamba_state_stays_per_rank(tmp_path):
    shared = {"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}
    (s0, p0), (s1, p1) = hybrid(shared, mla=True, tp_rank=0), hybrid(shared, mla=True, tp_rank=1)
    keys = ["a"]
    w = [transfer(n, p0[n], keys) for n in (PoolName.SWA, PoolName.MAMBA)]
    for t in w:
        fill(p0[t.name], t.host_indices, seed=7)
    assert s0.batch_set_v2(w) == {PoolName.SWA: [True], PoolName.MAMBA: [True]}
    # Rank 1 reads the shared SWA page rank 0 wrote, but not rank 0's Mamba state (TP-sharded).
    r = s1.batch_get_v2([transfer(n, p1[n], keys) for n in (PoolName.SWA, PoolName.MAMBA)])
    assert r == {PoolName.SWA: [True], PoolName.MAMBA: [False]}
    # Rank 1 is not the writer of shared pages: it reports them stored without writing; its Mamba state it writes.
    w1 = [transfer(n, p1[n], ["b"]) for n in (PoolName.SWA, PoolName.MAMBA)]
    assert s1.batch_set_v2(w1) == {PoolName.SWA: [True], PoolName.MAMBA: [True]}
    assert s0.batch_exists_v2(["b"], [PoolTransfer(name=PoolName.SWA, keys=["b"],
                                                   hit_policy=PoolHitPolicy.TRAILING_PAGES)]).kv_hit_pages == 0
    assert isinstance(s0.batch_exists_v2([]), PoolTransferResult)
