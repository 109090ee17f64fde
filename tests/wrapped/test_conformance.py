"""Each of SGLang's own backends, as a hicache-ha member, driven the way SGLang drives it: zero-copy v1
into a bounce pool the member owns (or the legacy calls), built once SGLang registered its host pool, with
checksum records where the backend keeps them and a clear that removes only this model's pages."""

import os
import time

import numpy as np
import pytest
import torch

from tests.sglang.test_conformance import (  # noqa: F401 - collected here, against the fixture below
    test_a_miss_is_none_and_false, test_batches_round_trip_and_exists_counts_the_prefix, test_exists_after_set,
    test_set_get_round_trip_into_a_target)
from tests.wrapped.conftest import (KINDS, SCOPED_CLEAR, VERIFIED, build, engine_pool, fill, ha, member,
                                    member_status, pages_at, wait_healthy)


SLOW_STORE_DEADLINES = {"exists": 500, "get": 2000, "set": 2000}


@pytest.fixture(params=KINDS)
def storage(request, tmp_path):
    """SGLang's conformance round trips (legacy calls with 8 KiB bf16 pages) through HAStorage on each of
    SGLang's backends as the only member: a pool of 8 KiB pages is registered, as SGLang does."""
    # An S3 server answers one HEAD per key (moto in this process's neighbourhood: milliseconds each).
    s = build({"backends": [member(request.param, request, tmp_path)], "deadlines_ms": SLOW_STORE_DEADLINES},
              pool=engine_pool(request.param, heads=4, head_dim=64))
    wait_healthy(s)
    yield s
    s.close()


@pytest.mark.parametrize("kind", KINDS)
def test_pages_round_trip_through_the_member_as_sglang_drives_the_backend(kind, request, tmp_path):
    pool = engine_pool(kind)
    s = build(ha(member(kind, request, tmp_path)), pool=pool)
    wait_healthy(s)
    assert not [e for e in s.ha_status()["events"] if e["to"] == "standby"]  # start-up is no failover
    ps = pool.page_size
    written = torch.arange(0, 6 * ps)
    expected = fill(pool, written, seed=3)
    keys = [f"page-{i}" for i in range(6)]
    assert s.batch_set_v1(keys, written) == [True] * 6
    assert s.batch_exists(keys + ["absent"]) == 6
    assert s.batch_exists(["absent"] + keys) == 0
    target = torch.arange(6 * ps, 12 * ps)
    assert s.batch_get_v1(keys, target) == [True] * 6
    assert pages_at(pool, target) == expected
    # A miss in the middle: the pages around it load (NIXL fails a batch as a whole; past a miss, 3FS's
    # answers cannot be trusted: SGLang's own client shifts page-2 into the absent page's slot; AIBrix
    # fails a partial hit as a whole, so only the prefix is asked), and nothing is written where a page
    # did not load.
    again = torch.arange(12 * ps, 15 * ps)
    before = pool.kv_buffer.clone()
    first, last = kind != "nixl", kind not in ("nixl", "hf3fs", "aibrix")
    assert s.batch_get_v1(["page-0", "absent", "page-2"], again) == [first, False, last]
    if first:
        assert pages_at(pool, again[:ps]) == expected[:1]
    if last:
        assert pages_at(pool, again[2 * ps:]) == expected[2:3]
    assert torch.equal(pool.kv_buffer[:, 13 * ps:14 * ps], before[:, 13 * ps:14 * ps])
    if not last:
        assert torch.equal(pool.kv_buffer[:, 14 * ps:15 * ps], before[:, 14 * ps:15 * ps])
    status = s.ha_status()
    primary = next(b for b in status["backends"] if b["name"] == "primary")
    assert primary["built"] and primary["verified"] == (kind in VERIFIED)
    assert status["active"] == "primary"


@pytest.mark.parametrize("kind", ["mooncake", "hf3fs", "seaweedfs", "nixl"])
def test_zero_copy_backends_only_ever_see_the_members_own_memory(kind, request, tmp_path):
    pool = engine_pool(kind)
    s = build(ha(member(kind, request, tmp_path)), pool=pool)
    wait_healthy(s)
    backend = s.manager.members["primary"].backend
    bounce = backend._built.bounce
    registered = backend._built.storage.mem_pool_host
    assert registered is bounce.pool and registered is not pool
    engine = pool.kv_buffer.view(torch.uint8).reshape(-1).numpy()
    own = bounce.pool.kv_buffer.view(torch.uint8).reshape(-1).numpy()
    assert not np.shares_memory(engine, own)
    # Sized for every worker's full batch and a canary per health check; counted and reported.
    assert bounce.pages == 4 * 128 + 4
    described = member_status(s)
    assert described["bounce_bytes"] == bounce.nbytes == bounce.pages * bounce.page_bytes
    # Everything is given back after the calls.
    written = pool.alloc(2 * pool.page_size)
    fill(pool, written, seed=1)
    s.batch_set_v1(["a", "b"], written)
    s.batch_get_v1(["a", "b"], pool.alloc(2 * pool.page_size))
    assert bounce.free == bounce.pages


@pytest.mark.parametrize("kind", KINDS)
def test_clear_removes_this_models_pages_only_or_nothing(kind, request, tmp_path):
    """SGLang's own clear() removes every model's pages (Mooncake: remove_all; NIXL: every file); through
    hicache-ha it removes this deployment's and model's, where the backend allows it, else nothing."""
    pools = [engine_pool(kind), engine_pool(kind)]
    spec = member(kind, request, tmp_path)
    mine = build(ha(spec), pool=pools[0], model="org/mine")
    # (3FS keeps one namespace per rank on its metadata server: another deployment is another rank there.)
    other = build(ha(spec), pool=pools[1], model="org/other", tp_rank=1 if kind == "hf3fs" else 0)
    for s, pool in zip((mine, other), pools):
        wait_healthy(s)
        written = pool.alloc(2 * pool.page_size)
        fill(pool, written, seed=7)
        assert s.batch_set_v1(["x", "y"], written) == [True, True]
    if kind == "mooncake":
        import time

        time.sleep(0.3)  # objects just written or read are leased (100 ms on this master) and kept
    cleared = mine.clear()
    assert cleared is (kind in SCOPED_CLEAR)
    assert mine.batch_exists(["x", "y"]) == (0 if cleared else 2)
    assert other.batch_exists(["x", "y"]) == 2  # another model's pages are never touched


def test_a_member_built_late_starts_out_of_traffic_and_joins_when_sglang_registers_its_pool(request, tmp_path):
    s = build(ha(member("mooncake", request, tmp_path)))  # no pool yet: SGLang registers it after construction
    status = s.ha_status()
    primary = next(b for b in status["backends"] if b["name"] == "primary")
    assert primary["state"] == "circuit_broken" and "waiting for SGLang's host pool" in primary["reason"]
    assert status["active"] == "primary"  # start-up is not a failure: no failover while it waits for its pool
    pool = engine_pool("mooncake")
    s.register_mem_pool_host(pool)
    wait_healthy(s)
    written = pool.alloc(pool.page_size)
    fill(pool, written, seed=2)
    assert s.batch_set_v1(["late"], written) == [True]


def test_a_member_slower_to_build_than_start_wait_is_stood_in_for_then_takes_over(request, tmp_path, monkeypatch):
    """A Mooncake client that takes 1.5 s to build (its master slow to answer); start-up waits 50 ms for
    it, then the standby serves, and the primary takes over (whatever the failback mode) once it is built
    and proven."""
    import dataclasses

    from hicache_ha.backends.wrapped import profiles

    real = profiles.PROFILES["mooncake"]

    def slow_master(storage_config, timeout_s):
        time.sleep(1.5)
        real.preflight(storage_config, timeout_s)

    monkeypatch.setitem(profiles.PROFILES, "mooncake", dataclasses.replace(real, preflight=slow_master))
    pool = engine_pool("mooncake")
    s = build(ha(member("mooncake", request, tmp_path, start_wait_ms=50)), pool=pool)
    primary = member_status(s)
    assert not primary["built"] and "still being built after 50 ms" in primary["reason"]
    wait_healthy(s, "standby", active=True)
    written = pool.alloc(pool.page_size)
    fill(pool, written, seed=4)
    assert s.batch_set_v1(["early"], written) == [True]  # the standby keeps it
    wait_healthy(s)  # built, proven, and the rank's primary again
    moves = [(e["from"], e["to"], e["reason"]) for e in s.ha_status()["events"] if e["backend"] == "standby"
             or e["reason"] == "failback"]
    assert moves == [("primary", "standby", "failover"), ("standby", "primary", "failback")]
    later = pool.alloc(pool.page_size)
    want = fill(pool, later, seed=5)
    # A key no other test wrote: the previous test's Mooncake client may still hold its "late" page while it
    # closes (on a thread of its own), and Mooncake keeps the first page written under a key.
    assert s.batch_set_v1(["taken-over"], later) == [True]
    target = pool.alloc(pool.page_size)
    assert s.batch_get_v1(["taken-over"], target) == [True] and pages_at(pool, target) == want


@pytest.mark.parametrize("kind", sorted(VERIFIED))
def test_a_page_altered_inside_the_backend_is_a_miss_counted_corrupt(kind, request, tmp_path):
    """One byte of a stored page flipped behind hicache-ha's back (a bad disk, a bug in a store, a writer
    of another version): the read never hands it to the engine, and says so."""
    pool = engine_pool(kind)
    s = build(ha(member(kind, request, tmp_path)), pool=pool)
    wait_healthy(s)
    written = pool.alloc(2 * pool.page_size)
    want = fill(pool, written, seed=11)
    assert s.batch_set_v1(["t0", "t1"], written) == [True, True]
    _flip_a_byte(kind, s.manager.members["primary"].backend._built.storage, s.manager.storage_key("t1"))
    target = pool.alloc(2 * pool.page_size)
    before = pages_at(pool, target)
    assert s.batch_get_v1(["t0", "t1"], target) == [True, False]
    got = pages_at(pool, target)
    assert got[0] == want[0] and got[1] == before[1]  # the altered page never reached the host pool
    primary = member_status(s)
    assert primary["corrupt_pages"] == 1 and primary["ops"]["get"].get("corrupt") == 1


def _flip_a_byte(kind: str, storage, key: str) -> None:
    if kind == "mooncake":
        name = storage._tag_keys([key])[0] + f"_{storage.mha_suffix}_k"
        stored = bytearray(storage.store.get(name))
        stored[0] ^= 0xFF
        time.sleep(0.3)  # an object just written or read is leased (100 ms on this master): not removable
        assert storage.store.remove(name) == 0 and storage.store.put(name, bytes(stored)) == 0
    elif kind == "seaweedfs":
        bucket, name = storage.config.bucket, storage._object_key(key)
        stored = bytearray(storage._s3.get_object(Bucket=bucket, Key=name)["Body"].read())
        stored[0] ^= 0xFF
        storage._s3.put_object(Bucket=bucket, Key=name, Body=bytes(stored))
    else:
        path = next(e.path for e in os.scandir(storage.file_path) if e.name.startswith(key))
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))


def test_after_a_mooncake_master_restart_the_member_is_cold_its_old_pages_miss_and_nothing_fails(tmp_path):
    """A restarted master has lost its whole index (it keeps it in memory): SGLang's client reconnects by
    itself, and every page written before is gone. That is a cold cache, not a broken member: reads miss,
    the member stays healthy and serves new pages."""
    from hicache_ha.sim.storage_servers import MooncakeMaster

    with MooncakeMaster(lease_ms=100) as master:
        pool = engine_pool("mooncake")
        only = {"name": "primary", "type": "sglang", "backend": "mooncake", "extra_config": master.extra_config(),
                "start_wait_ms": 30_000}
        s = build({"backends": [only], "health": {"backoff": {"base_ms": 200, "cap_ms": 1000}}}, pool=pool)
        wait_healthy(s)
        old = pool.alloc(2 * pool.page_size)
        fill(pool, old, seed=21)
        assert s.batch_set_v1(["c0", "c1"], old) == [True, True]
        master.kill()
        master.start()
        # SGLang's client reconnects and mounts its segment again by itself within a few seconds; until
        # then writes are refused (no segment has room), and may trip the member, which probes bring back.
        probe = pool.alloc(pool.page_size)
        deadline = time.monotonic() + 30
        while s.batch_set_v1([f"after-{time.monotonic()}"], probe) != [True]:
            assert time.monotonic() < deadline, s.ha_status()["backends"][0]
            time.sleep(0.2)
        wait_healthy(s, timeout=30)
        before = s.ha_status()["backends"][0]
        target = pool.alloc(2 * pool.page_size)
        for _ in range(20):
            assert s.batch_exists(["c0", "c1"]) == 0
            assert s.batch_get_v1(["c0", "c1"], target) == [False, False]
        new = pool.alloc(pool.page_size)
        want = fill(pool, new, seed=22)
        assert s.batch_set_v1(["c2"], new) == [True]
        assert s.batch_get_v1(["c2"], target[:pool.page_size]) == [True]
        assert pages_at(pool, target[:pool.page_size]) == want
        after = s.ha_status()["backends"][0]
        assert after["state"] == "healthy" and after["transitions"] == before["transitions"]  # no trip for a miss
        assert after["ops"]["exists"].get("ok", 0) >= 20 and after["corrupt_pages"] == 0


def test_a_nixl_volume_that_comes_back_empty_is_repaired_and_serves_again(request, tmp_path):
    """NIXL's POSIX plugin keeps pages as files under bucket directories it creates only at start-up: a
    volume unmounted and mounted back empty would fail every write from then on. The member re-creates
    them after the first failure; old pages miss, new ones round trip."""
    import shutil

    pool = engine_pool("nixl")
    s = build(ha(member("nixl", request, tmp_path)), pool=pool)
    wait_healthy(s)
    old = pool.alloc(pool.page_size)
    fill(pool, old, seed=31)
    assert s.batch_set_v1(["v0"], old) == [True]
    volume = tmp_path / "nixl"
    shutil.rmtree(volume)
    volume.mkdir()
    new = pool.alloc(pool.page_size)
    want = fill(pool, new, seed=32)
    deadline = time.monotonic() + 20
    while s.batch_set_v1(["v1"], new) != [True]:  # the first write fails and repairs; probes bring it back
        assert time.monotonic() < deadline, s.ha_status()["backends"][0]
        time.sleep(0.1)
    wait_healthy(s)
    target = pool.alloc(pool.page_size)
    assert s.batch_get_v1(["v0"], target) == [False]
    assert s.batch_get_v1(["v1"], target) == [True] and pages_at(pool, target) == want
