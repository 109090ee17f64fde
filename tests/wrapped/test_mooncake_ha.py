"""Mooncake masters in HA mode (a leader elected through etcd) behind HAStorage, with no standby: the leader
is SIGKILLed under traffic, the engine never waits and never sees an error, and the same member comes
back through the new leader (a same-cluster reconnect: Mooncake's client finds the leader in etcd)."""

from __future__ import annotations

import time

from hicache_ha.sim.lag import LagProbe
from hicache_ha.sim.storage_servers import Etcd, MooncakeMaster
from tests.wrapped.conftest import Load, build, engine_pool, fill, pages_at, wait_healthy

DEADLINES = {"exists": 50, "get": 300, "set": 500}


def _leader(masters: list, timeout: float = 30.0) -> MooncakeMaster:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        serving = [m for m in masters if m.state == "serving"]
        if serving:
            return serving[0]
        time.sleep(0.1)
    raise AssertionError(f"no Mooncake master leads after {timeout} s: {[m.state for m in masters]}")


def test_a_killed_leader_master_is_replaced_and_the_member_comes_back_without_a_standby():
    with Etcd() as etcd, MooncakeMaster(lease_ms=100, etcd=etcd) as a, MooncakeMaster(lease_ms=100, etcd=etcd) as b:
        leader = _leader([a, b])
        pool = engine_pool("mooncake", tokens=512)
        pool.alloc(2 * 2 * 4 * pool.page_size)  # the slots Load's two threads fill and load (its fixed range)
        only = {"name": "primary", "type": "sglang", "backend": "mooncake", "start_wait_ms": 30_000,
                "extra_config": {**a.extra_config(), "master_server_address": a.address}}
        s = build({"backends": [only], "deadlines_ms": DEADLINES,
                   "health": {"backoff": {"base_ms": 300, "cap_ms": 2000}}}, pool=pool)
        wait_healthy(s)
        with Load(s, pool) as load:
            time.sleep(2)
            killed = time.monotonic()
            leader.kill()
            other = _leader([m for m in (a, b) if m is not leader])
            elected = time.monotonic() - killed
            probe = pool.alloc(pool.page_size)
            want = fill(pool, probe, seed=41)
            target = pool.alloc(pool.page_size)
            deadline = time.monotonic() + 60
            while not (s.batch_set_v1(["after"], probe) == [True]
                       and s.batch_get_v1(["after"], target) == [True]):
                assert time.monotonic() < deadline, s.ha_status()["backends"][0]
                time.sleep(0.1)
            back = time.monotonic() - killed
            assert pages_at(pool, target) == want
            wait_healthy(s, timeout=30)
            served = time.monotonic()
            time.sleep(2)
        print(f"\nleader {leader.port} killed: {other.port} elected after {elected:.1f} s, "
              f"pages served through it after {back:.1f} s")
        assert load.errors == [] and load.wrong == 0
        assert load.late(DEADLINES, 0.020) == [], f"lag {load.lag.worst * 1000:.0f} ms"
        after = [c for c in load.since(served) if c[0] == "get"]
        assert after and load.loaded > 0  # the traffic is served again, by the same member
        status = s.ha_status()
        assert status["active"] == "primary" and status["backends"][0]["state"] == "healthy"
        # Closing a member never waits on its client, nor lets it stop the process: the teardown of
        # Mooncake's client in HA mode holds the GIL ~30 s, so the client is kept until the process exits.
        probe = LagProbe().start()
        t0 = time.monotonic()
        s.close()
        closed = time.monotonic() - t0
        time.sleep(1.0)
        probe.stop()
        assert closed < 1.0 and probe.worst < 0.5, (closed, probe.worst)
