"""The admin API and the two-phase switch, in process: a controller and four ranks' data planes."""

import contextlib
import logging
import threading
import time

import pytest

from tests.control.conftest import AUTH, KEY, MEM, wait_for
from tests.helpers import GATE


def test_switch_moves_every_rank_to_one_new_epoch_and_back(cluster_factory):
    c = cluster_factory({"backends": MEM})
    r = c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["epoch"] == 2 and c.epochs() == {(2, "standby")}
    r = c.client.put("/hicache/storage-backend", json={"backend": "primary"}, headers=AUTH)
    assert r.status_code == 200 and c.epochs() == {(3, "primary")}
    wait_for(lambda: all(x["epoch"] == 3 for x in c.client.get("/hicache/storage-backend", headers=AUTH).json()["ranks"]),
             what="heartbeats to report epoch 3")
    body = c.client.get("/hicache/storage-backend", headers=AUTH).json()
    assert body["epoch"] == 3 and body["active"] == "primary"
    assert {b["name"]: b["state"] for b in body["backends"]} == {"primary": "healthy", "standby": "healthy"}
    assert [x["rank"] for x in body["ranks"]] == [0, 1, 2, 3]
    assert all(set(x) >= {"rank", "epoch", "active", "in_flight"} for x in body["ranks"])


def test_prepare_refused_on_one_rank_changes_nothing_anywhere(cluster_factory):
    c = cluster_factory({"backends": MEM + [{"name": "flaky", "type": GATE}]})
    c.managers[2].members["flaky"].backend.close_gate()  # rank 2 cannot reach it
    try:
        r = c.client.put("/hicache/storage-backend", json={"backend": "flaky"}, headers=AUTH)
        assert r.status_code == 503
        body = r.json()
        assert [f["rank"] for f in body["failed"]] == [2] and "probe" in body["failed"][0]["reason"]
        assert c.epochs() == {(1, "primary")}
        assert c.client.get("/hicache/storage-backend", headers=AUTH).json()["epoch"] == 1
    finally:
        c.managers[2].members["flaky"].backend.open_gate()


def die_at(agent, op):
    """Make a rank's process die when it receives ``op``: no reply, no heartbeat, ever again."""
    run = agent._run

    def dying(name, args):
        if name == op:
            agent.close()
            return None
        return run(name, args)

    agent._run = dying


def test_a_rank_that_dies_between_prepare_and_commit_gets_the_others_rolled_back(cluster_factory):
    c = cluster_factory({"backends": MEM})
    victim = 3
    die_at(c.agents[victim], "commit")
    r = c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    assert r.status_code == 503
    body = r.json()
    # Every rank that may have committed gets a restore; the dead one cannot confirm it.
    assert body["rolled_back"] == [0, 1, 2] and body["rollback_unconfirmed"] == [victim]
    assert [f["rank"] for f in body["failed"]] == [victim]
    assert {(m.epoch, m.active.name) for m in c.managers[:3]} == {(1, "primary")}
    # The rank had committed before it died; it comes back (a new agent on the same data plane) and converges.
    c.managers[victim].commit(c.managers[victim].prepare("standby"), epoch=2)
    c.agents[victim] = c.agent(c.managers[victim])
    wait_for(lambda: c.epochs() == {(1, "primary")}, what="the returning rank to converge")


@contextlib.contextmanager
def stuck_on_rank_1(cluster_factory):
    """A cluster whose rank 1 has a call hung on its gated primary: a drain of it cannot finish."""
    doc = {"backends": [{"name": "primary", "type": GATE}, {"name": "standby", "type": "memory"}],
           "deadlines_ms": {"get": 3000}, "health": {"consecutive_failures": None, "failure_rate": None,
                                                      "slow_calls": None, "ping": {"interval_ms": 60000}}}
    c = cluster_factory(doc)
    gate = c.managers[1].members["primary"].backend
    gate.close_gate()
    try:
        threading.Thread(target=c.managers[1].get, args=(["k"],), daemon=True).start()
        assert gate.entered.wait(2)
        yield c
    finally:
        gate.open_gate()


def test_without_force_a_hung_member_that_cannot_drain_refuses_with_409(cluster_factory):
    with stuck_on_rank_1(cluster_factory) as c:
        r = c.client.put("/hicache/storage-backend", json={"backend": "standby", "drain_timeout_s": 0.2},
                         headers=AUTH)
        assert r.status_code == 409, r.text
        assert c.epochs() == {(1, "primary")}
        t0 = time.monotonic()
        r = c.client.put("/hicache/storage-backend", json={"backend": "standby", "force": True}, headers=AUTH)
        assert r.status_code == 200 and time.monotonic() - t0 < 1.0
        assert c.epochs() == {(2, "standby")}


def test_an_attach_whose_commit_fails_leaves_its_member_on_no_rank(cluster_factory):
    with stuck_on_rank_1(cluster_factory) as c:
        r = c.client.put("/hicache/storage-backend", json={"spec": {"name": "fresh", "type": "memory"},
                                                           "drain_timeout_s": 0.2}, headers=AUTH)
        assert r.status_code == 409, r.text  # rank 1 could not drain; the others committed, then rolled back
        assert c.epochs() == {(1, "primary")}
        # Rank 1 forgot it with its failed commit; the others, which had it, are told to by convergence.
        wait_for(lambda: all("fresh" not in m.members for m in c.managers), timeout=10,
                 what="the attached member gone from every rank")
        assert "fresh" not in c.controller.known_backends()


def test_attach_a_new_member_from_a_spec_then_remove_it(cluster_factory, tmp_path):
    c = cluster_factory({"backends": MEM, "admin": {"attach_roots": [str(tmp_path / "attached")]}})
    spec = {"name": "disk", "type": "file", "path": str(tmp_path / "attached" / "disk")}
    r = c.client.put("/hicache/storage-backend", json={"spec": spec}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert c.epochs() == {(2, "disk")}
    assert c.managers[0].set(["k"], [b"v"]) == [True]
    assert any(b["name"] == "disk" for b in c.client.get("/hicache/storage-backend", headers=AUTH).json()["backends"])
    r = c.client.delete("/hicache/storage-backend/members/disk", headers=AUTH)
    assert r.status_code == 409 and "active" in r.json()["error"]  # not while it serves
    assert c.client.put("/hicache/storage-backend", json={"backend": "primary"}, headers=AUTH).status_code == 200
    r = c.client.delete("/hicache/storage-backend/members/disk", headers=AUTH)
    assert r.status_code == 200, r.text
    assert all("disk" not in m.members for m in c.managers)  # closed and forgotten on every rank
    assert "disk" not in c.controller.known_backends()
    r = c.client.delete("/hicache/storage-backend/members/primary", headers=AUTH)
    assert r.status_code == 409 and "attached over the API" in r.json()["error"]  # configured members stay


@pytest.mark.parametrize("spec, words", [
    ({"name": "evil", "type": "tests.helpers:GateBackend"}, "cannot be attached over the API"),
    ({"name": "evil", "type": "os:system"}, "cannot be attached over the API"),
    ({"name": "evil", "type": "file", "path": "/etc/evil"}, "outside the attach roots"),
    ({"name": "evil", "type": "file", "path": "ATTACH/../../escape"}, "outside the attach roots"),
    ({"name": "evil", "type": "sglang", "backend": "file", "extra_config": {"file_storage_path": "/root"}},
     "outside the attach roots"),
])
def test_attach_refuses_code_imports_and_paths_outside_the_roots(cluster_factory, tmp_path, spec, words):
    c = cluster_factory({"backends": MEM, "admin": {"attach_roots": [str(tmp_path / "attach")]}}, ranks=2)
    if "path" in spec:
        spec = {**spec, "path": spec["path"].replace("ATTACH", str(tmp_path / "attach"))}
    r = c.client.put("/hicache/storage-backend", json={"spec": spec}, headers=AUTH)
    assert r.status_code == 422 and words in r.json()["error"], r.text
    assert c.epochs() == {(1, "primary")} and not c.controller.desired.specs
    assert all("evil" not in m.members for m in c.managers)


def test_detach_runs_every_rank_without_l3(cluster_factory):
    c = cluster_factory({"backends": MEM})
    r = c.client.delete("/hicache/storage-backend?force=true", headers=AUTH)
    assert r.status_code == 200 and r.json()["active"] is None
    assert c.epochs() == {(2, None)}
    assert c.managers[0].set(["k"], [b"v"]) == [False]


def test_a_missing_rank_blocks_a_switch_unless_forced(cluster_factory):
    c = cluster_factory({"backends": MEM})
    c.agents[1].close()
    wait_for(lambda: 1 in c.controller.missing(), what="rank 1 to be missing")
    r = c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    assert r.status_code == 503 and r.json()["missing"] == [1]
    assert c.epochs() == {(1, "primary")}
    r = c.client.put("/hicache/storage-backend", json={"backend": "standby", "force": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["missing"] == [1]


@pytest.mark.parametrize("body, status, words", [
    ({"backend": "nope"}, 404, "unknown backend"),
    ({"backend": "standby", "colour": "red"}, 422, "colour"),
    ({"backend": "standby", "spec": {"name": "x", "type": "memory"}}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"backend": 5}, 422, "string"),
    ({"backend": "standby", "drain_timeout_s": -1}, 422, "greater than or equal"),
    ({"spec": {"name": "x", "type": "mongo"}}, 422, "attachable types: file, memory, redis, sglang"),
    ({"spec": {"name": "x", "type": "file"}}, 422, "path"),
])
def test_bad_input_is_a_4xx_with_a_message_and_changes_nothing(cluster_factory, body, status, words):
    c = cluster_factory({"backends": MEM}, ranks=2)
    r = c.client.put("/hicache/storage-backend", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert words in r.text
    assert c.epochs() == {(1, "primary")}


def test_malformed_json_is_a_422(cluster_factory):
    c = cluster_factory({"backends": MEM}, ranks=1)
    r = c.client.put("/hicache/storage-backend", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422


def test_auth_missing_or_wrong_key_is_401_and_no_key_configured_is_400(cluster_factory, caplog):
    from fastapi.testclient import TestClient

    from hicache_ha.control.api import create_app

    c = cluster_factory({"backends": MEM}, ranks=1)
    caplog.set_level(logging.DEBUG)
    for method, path in (("get", "/hicache/storage-backend"), ("put", "/hicache/storage-backend"),
                         ("delete", "/hicache/storage-backend"), ("get", "/hicache/storage-backend/events")):
        assert getattr(c.client, method)(path).status_code == 401
        assert getattr(c.client, method)(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert getattr(c.client, method)(path, headers={"Authorization": KEY}).status_code == 401
    assert c.client.get("/healthz").status_code == 200
    keyless = TestClient(create_app(c.controller, None))
    for method, path in (("get", "/hicache/storage-backend"), ("put", "/hicache/storage-backend"),
                         ("delete", "/hicache/storage-backend"), ("get", "/hicache/storage-backend/events")):
        r = getattr(keyless, method)(path, headers=AUTH)
        assert r.status_code == 400 and "admin key" in r.json()["error"]
    c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    assert KEY not in caplog.text


def test_events_list_transitions(cluster_factory):
    c = cluster_factory({"backends": MEM}, ranks=2)
    c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    wait_for(lambda: any(e["rank"] == 1 and e["to"] == "standby" for e in
                         c.client.get("/hicache/storage-backend/events", headers=AUTH).json()),
             what="rank events to reach the controller")
    events = c.client.get("/hicache/storage-backend/events", headers=AUTH).json()
    assert all(set(e) >= {"time", "rank", "backend", "from", "to", "reason"} for e in events)


def test_a_restarted_controller_resumes_a_switch_it_died_in_on_one_fresh_epoch(cluster_factory):
    c = cluster_factory({"backends": MEM})
    c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    c.controller.close()
    # What the disk holds, and where the ranks are, when a controller is killed mid-commit of a switch
    # back to "primary": two ranks committed epoch 3, two did not.
    from hicache_ha.control.state import DesiredState, InFlight

    state = DesiredState(epoch=2, active="standby", switch_in_flight=InFlight(
        token="dead", target="primary", base_epoch=2, base_active="standby"))
    (c.tmp_path / "state.json").write_text(state.to_json())
    for m in c.managers[:2]:
        m.commit(m.prepare("primary"), epoch=3)
    assert c.managers[0].set(["k"], [b"v"]) == [True]  # ranks keep serving without a controller
    c.start_controller()
    assert c.store.load().switch_in_flight is None
    assert (c.controller.desired.epoch, c.controller.desired.active) == (4, "standby")
    wait_for(lambda: c.epochs() == {(4, "standby")}, timeout=15, what="every rank on one fresh epoch")
    r = c.client.put("/hicache/storage-backend", json={"backend": "primary"}, headers=AUTH)
    assert r.status_code == 200 and c.epochs() == {(5, "primary")}


NO_TRIP_BUT_CONSECUTIVE = {"failure_rate": None, "slow_calls": None, "consecutive_failures": 3,
                           "ping": {"interval_ms": 20, "timeout_ms": 50}}


def test_a_trip_on_one_rank_moves_the_whole_group_together(cluster_factory):
    doc = {"backends": [{"name": "primary", "type": GATE}, {"name": "standby", "type": "memory"}],
           "health": NO_TRIP_BUT_CONSECUTIVE}
    c = cluster_factory(doc)
    gate = c.managers[2].members["primary"].backend  # only rank 2 sees its primary hang
    gate.close_gate()
    try:
        # The ranks commit a moment (~1 ms, measured) before the controller hears their answers and records
        # the move: wait for both.
        wait_for(lambda: c.epochs() == {(2, "standby")} and c.controller.desired.active == "standby",
                 timeout=5, what="the group to fail over together")
        assert c.controller.desired.epoch == 2
        # The controller moved them all (one epoch), not each rank alone:
        for m in c.managers:
            assert m.failovers == 1, [e.to_dict() for e in m.events.recent()]
            assert [e.reason for e in m.events.recent() if e.detail.get("role") == "active"] == [
                "failover (asked by rank 2)"], [e.to_dict() for e in m.events.recent()]
    finally:
        gate.open_gate()


def test_without_a_controller_each_rank_fails_over_alone_and_reconciles_later(cluster_factory):
    doc = {"backends": [{"name": "primary", "type": GATE}, {"name": "standby", "type": "memory"}],
           "health": NO_TRIP_BUT_CONSECUTIVE, "admin": {"group_failover_timeout_ms": 300}}
    c = cluster_factory(doc, ranks=2)
    c.controller.close()
    time.sleep(1.2)  # the agents notice the controller is gone
    gates = [m.members["primary"].backend for m in c.managers]
    for g in gates:
        g.close_gate()
    try:
        wait_for(lambda: all(m.active.name == "standby" for m in c.managers), timeout=5, what="local failover")
        assert all(m.failovers == 1 for m in c.managers)
        c.start_controller()  # back: desired is still (1, primary), which is broken on the ranks
        wait_for(lambda: c.controller.desired.active == "standby", timeout=10,
                 what="the controller to adopt the failover")
        wait_for(lambda: len(c.epochs()) == 1, timeout=10, what="the ranks to agree on one epoch")
        assert c.epochs() == {(c.controller.desired.epoch, "standby")}
    finally:
        for g in gates:
            g.open_gate()
