"""The v2 interface on SGLang's real hybrid host pools: a KV pool (MHA or MLA), an SWA state pool
(trailing pages), a DSA-style indexer pool (all pages, on the KV slots) and a Mamba state pool (bytes,
per TP rank even in an MLA model). Round trips byte for byte (one backend call for every pool), each hit
policy, misses, failure values, and the data-plane promises (deadline, fencing, integrity, failover,
switchover) for every pool."""

import os
import shutil
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


ALL_POOLS = (PoolName.KV, PoolName.SWA, PoolName.INDEXER, PoolName.MAMBA)


@pytest.fixture
def file_ha(tmp_path):
    return {"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}


def record_calls(backend, monkeypatch) -> dict:
    """Wrap a member's backend so that each call the data plane makes into it is recorded (its keys), per
    method. Health pings and recovery probes (keys ``__hicache_ha_*``) are left out: not engine traffic."""
    calls: dict = {"exists_each": [], "fetch": [], "get": [], "set": []}
    for method in calls:
        real = getattr(backend, method)

        def counted(keys, *args, _real=real, _method=method, **kwargs):
            if not all(str(k).startswith("__hicache_ha") for k in keys):
                calls[_method].append(list(keys))
            return _real(keys, *args, **kwargs)

        monkeypatch.setattr(backend, method, counted)
    return calls


def storage_keys(s, names, keys) -> list:
    """The storage keys of ``keys`` in each pool's namespace, pools in ``names`` order."""
    return [sk for n in names for sk in s.namespaces[n.value].keys(keys)]


def test_every_pool_round_trips_byte_for_byte_in_one_call(file_ha, monkeypatch):
    s, pools = hybrid(file_ha)
    calls = record_calls(s.manager.members["f"].backend, monkeypatch)
    keys = ["h0", "h1", "h2"]
    out, expected = [], {}
    for name in ALL_POOLS:
        t = transfer(name, pools[name], keys)
        expected[name] = fill(pools[name], t.host_indices, seed=hash(name.value) % 1000)
        out.append(t)
    assert s.batch_set_v2(out) == {t.name: [True] * 3 for t in out}
    everything = sorted(storage_keys(s, ALL_POOLS, keys))
    # One backend call stored the pages of all four pools.
    assert [sorted(c) for c in calls["set"]] == [everything]
    back = [transfer(t.name, pools[t.name], keys) for t in out]
    assert s.batch_get_v2(back) == {t.name: [True] * 3 for t in back}
    for t in back:
        assert pages_at(pools[t.name], t.host_indices) == expected[t.name], t.name
    # One round trip read them all: one fetch (the file backend's fetch is one get).
    assert [sorted(c) for c in calls["fetch"]] == [everything] and len(calls["get"]) == 1
    r = s.batch_exists_v2(keys, [PoolTransfer(name=n, hit_policy=PoolHitPolicy.ALL_PAGES) for n in ALL_POOLS[1:]])
    assert r.kv_hit_pages == 3 and r.extra_pool_hit_pages == {n: 3 for n in ALL_POOLS}
    assert [sorted(c) for c in calls["exists_each"]] == [everything]  # and one call asked about every page


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


@pytest.mark.parametrize("name", [PoolName.SWA, PoolName.INDEXER, PoolName.MAMBA], ids=lambda n: n.value)
def test_a_tampered_page_of_any_pool_reads_as_a_miss_and_counts_corrupt(file_ha, name):
    """Every pool's pages carry the integrity envelope: a page altered on the storage, or another page's
    file put under its key, is a miss (nothing written into the pool) and a ``corrupt`` outcome."""
    s, pools = hybrid(file_ha)
    pool, keys = pools[name], ["t0", "t1", "t2"]
    t = transfer(name, pool, keys)
    expected = fill(pool, t.host_indices, seed=11)
    assert s.batch_set_v2([t]) == {name: [True] * 3}
    backend = s.manager.members["f"].backend
    files = [backend._path(sk) for sk in storage_keys(s, [name], keys)]
    with open(files[1], "r+b") as f:  # one payload byte flipped
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    shutil.copyfile(files[0], files[2])  # a good page, filed under another key
    back = transfer(name, pool, keys)
    fill(pool, back.host_indices, seed=12)  # what the slots hold before the read
    before = pages_at(pool, back.host_indices)
    assert s.batch_get_v2([back]) == {name: [True, False, False]}
    assert pages_at(pool, back.host_indices) == [expected[0], before[1], before[2]]
    member = s.ha_status()["backends"][0]
    assert member["corrupt_pages"] == 2 and member["ops"]["get"] == {"corrupt": 1}  # one call, two bad pages


def test_after_a_switch_every_pools_traffic_goes_to_the_new_member(tmp_path, monkeypatch):
    ha = {"backends": [{"name": "a", "type": "file", "path": str(tmp_path / "a")},
                       {"name": "b", "type": "file", "path": str(tmp_path / "b")}]}
    s, pools = hybrid(ha)
    old = [transfer(n, pools[n], ["o0", "o1"]) for n in ALL_POOLS]
    for t in old:
        fill(pools[t.name], t.host_indices, seed=5)
    assert s.batch_set_v2(old) == {n: [True, True] for n in ALL_POOLS}  # on "a"
    epoch = s.manager.epoch
    s.manager.commit(s.manager.prepare("b"))
    assert (s.manager.active.name, s.manager.epoch > epoch) == ("b", True)
    on_a = record_calls(s.manager.members["a"].backend, monkeypatch)
    on_b = record_calls(s.manager.members["b"].backend, monkeypatch)

    # What "a" holds is not on "b": every pool misses, asked of "b".
    r = s.batch_exists_v2(["o0", "o1"], [PoolTransfer(name=n, hit_policy=PoolHitPolicy.ALL_PAGES)
                                         for n in ALL_POOLS[1:]])
    assert r.kv_hit_pages == 0
    missed = s.batch_get_v2([transfer(n, pools[n], ["o0", "o1"]) for n in ALL_POOLS])
    assert missed == {n: [False, False] for n in ALL_POOLS}
    # New pages of every pool are written to "b" and read back from it, byte for byte.
    new = [transfer(n, pools[n], ["n0", "n1"]) for n in ALL_POOLS]
    expected = {t.name: fill(pools[t.name], t.host_indices, seed=6) for t in new}
    assert s.batch_set_v2(new) == {n: [True, True] for n in ALL_POOLS}
    back = [transfer(n, pools[n], ["n0", "n1"]) for n in ALL_POOLS]
    assert s.batch_get_v2(back) == {n: [True, True] for n in ALL_POOLS}
    assert all(pages_at(pools[t.name], t.host_indices) == expected[t.name] for t in back)

    assert on_a == {"exists_each": [], "fetch": [], "get": [], "set": []}
    olds, news = sorted(storage_keys(s, ALL_POOLS, ["o0", "o1"])), sorted(storage_keys(s, ALL_POOLS, ["n0", "n1"]))
    assert [sorted(c) for c in on_b["exists_each"]] == [olds]
    assert [sorted(c) for c in on_b["fetch"]] == [olds, news] and [sorted(c) for c in on_b["set"]] == [news]
    a, b = s.manager.members["a"].backend, s.manager.members["b"].backend
    assert all(os.path.exists(b._path(k)) and not os.path.exists(a._path(k)) for k in news)


def test_a_plugin_with_the_one_argument_exists_each_serves_hybrid_models():
    """Backends written before the data plane learned page sizes (``exists_each(keys)``) keep working:
    nothing they do not take is passed to them, so nothing counts against them."""
    s, pools = hybrid({"backends": [{"name": "g", "type": GATE}]})
    keys = ["p0", "p1"]
    out = [transfer(n, pools[n], keys) for n in (PoolName.KV, PoolName.SWA)]
    for t in out:
        fill(pools[t.name], t.host_indices, seed=4)
    assert s.batch_set_v2(out) == {t.name: [True, True] for t in out}
    for _ in range(5):
        r = s.batch_exists_v2(keys, [PoolTransfer(name=PoolName.SWA, keys=[keys[-1]],
                                                  hit_policy=PoolHitPolicy.TRAILING_PAGES)])
        assert (r.kv_hit_pages, r.restorable_prefix_pages) == (2, [1, 2])
    g = s.ha_status()["backends"][0]
    assert g["state"] == "healthy" and set(g["ops"]["exists"]) == {"ok"}
