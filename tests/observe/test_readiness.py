"""Readiness: the controller's `/readyz` (ready while it leads, so ranks can reach it through a Service
that routes on readiness) and its rollout gate `/readyz?ranks=all` (ready only when every expected rank
heartbeats too); and each process's own `/readyz` without a controller (ready while every rank of the
process has a healthy active member). Real controllers and agents over their authenticated channel, real
HTTP servers for the process endpoints."""

import httpx
from fastapi.testclient import TestClient

from hicache_ha.control.api import create_app
from hicache_ha.control.controller import Controller
from hicache_ha.control.state import FileStateStore
from hicache_ha.sim.servers import free_port
from tests.control.conftest import KEY, KEYS, MEM, wait_for
from tests.helpers import GATE
from tests.observe.conftest import solo_process


def test_the_rollout_gate_is_ready_only_while_every_expected_rank_heartbeats(cluster_factory):
    c = cluster_factory({"backends": MEM}, ranks=2)
    plain, gate = c.client.get("/readyz"), c.client.get("/readyz?ranks=all")  # no key: probes carry none
    assert plain.status_code == 200 and plain.json()["requires"] == ["leader"]
    assert gate.status_code == 200
    assert gate.json() == {"ready": True, "leader": True, "missing_ranks": [], "expected_ranks": 2,
                           "requires": ["leader", "ranks"]}

    c.agents[1].close()  # rank 1 stops heartbeating
    wait_for(lambda: c.client.get("/readyz?ranks=all").status_code == 503, timeout=10,
             what="the gate to notice rank 1 is gone")
    gate = c.client.get("/readyz?ranks=all")
    assert gate.json() == {"ready": False, "leader": True, "missing_ranks": [1], "expected_ranks": 2,
                           "requires": ["leader", "ranks"]}
    assert KEY not in gate.text
    # The leader itself stays ready: ranks reach it through what routes on readiness.
    plain = c.client.get("/readyz")
    assert plain.status_code == 200 and plain.json()["missing_ranks"] == [1]

    c.agents[1] = c.agent(c.managers[1])  # rank 1 comes back
    wait_for(lambda: c.client.get("/readyz?ranks=all").status_code == 200, timeout=10,
             what="the gate to open again")
    assert c.client.get("/readyz?ranks=some").status_code == 422  # only "all" is a gate


def test_a_follower_is_ready_neither_way_even_with_every_rank_up(cluster_factory, tmp_path):
    c = cluster_factory({"backends": MEM}, ranks=2)
    follower = Controller(c.config, store=FileStateStore(tmp_path / "state.json"), expected_ranks=2,
                          bind=f"tcp://127.0.0.1:{free_port()}", keys=KEYS)
    try:
        assert c.controller.is_leader and not follower.is_leader
        assert c.client.get("/readyz?ranks=all").status_code == 200  # every rank heartbeats the leader
        client = TestClient(create_app(follower, KEY))
        for path in ("/readyz", "/readyz?ranks=all"):
            r = client.get(path)
            assert r.status_code == 503 and r.json()["leader"] is False, path
    finally:
        follower.close()


def test_a_process_is_not_ready_while_its_only_member_is_tripped_and_ready_once_it_recovered():
    """Without a controller: the active member trips and there is no standby to fail over to → 503 naming
    the member's state (circuit_broken, or recovering: not healthy either); it recovers → 200 again."""
    health = {"failure_rate": None, "slow_calls": None, "ping": {"interval_ms": 20, "timeout_ms": 50},
              "backoff": {"base_ms": 50, "cap_ms": 200, "jitter": 0}, "recovery": {"probes": 1, "trial_calls": 0}}
    with solo_process([{"name": "only", "type": GATE}], health) as (m, base):
        gate = m.members["only"].backend
        url = f"{base}/readyz"
        try:
            assert httpx.get(url, timeout=5).status_code == 200
            gate.close_gate()  # unanswered pings trip it
            wait_for(lambda: httpx.get(url, timeout=5).status_code == 503, timeout=10, what="the trip to show")
            body = httpx.get(url, timeout=5).json()
            assert body["ready"] is False and body["deployment"] == "solo"
            [rank] = body["ranks"]
            # circuit_broken, or recovering while its probes hang on the closed gate: either way not healthy
            assert (rank["rank"], rank["ready"], rank["active"]) == (0, False, "only")
            assert rank["state"] in ("circuit_broken", "recovering")
            gate.open_gate()
            wait_for(lambda: httpx.get(url, timeout=5).status_code == 200, timeout=10, what="recovery")
            assert m.status()["backends"][0]["state"] == "healthy"
        finally:
            gate.open_gate()
