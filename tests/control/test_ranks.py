"""A rank's life as the controller sees it: a prepared switch that is never committed expires on the rank
(closing what it built), DP ranks are part of the deployment's shape, and a rank whose old connection
lingers (its host vanished without closing it) is accepted under its own identity when it comes back."""

import signal
import threading
import time

import psutil
import pytest
from sglang.srt.runtime_context import get_parallel

from hicache_ha.control.twophase import failures
from hicache_ha.sim.servers import free_port
from tests.control.conftest import DEADLINES, KEY, KEYS, MEM, wait_for
from tests.control.outsider import Outsider
from tests.control.test_multiprocess import Deployment
from tests.control.test_security import IDENT, attempts
from tests.sglang.conftest import build


def threads(word: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("hicache-ha") and word in t.name and t.is_alive())


def redis_clients(server) -> int:
    with server.client() as c:
        return len(c.client_list()) - 1  # not this one


def test_a_prepared_switch_never_committed_expires_on_every_rank_and_closes_what_it_built(cluster_factory,
                                                                                         redis_server):
    """A controller prepares an attach on every rank (each builds a Redis member: workers, connections)
    and never commits (it died). After ``admin.prepare_ttl_ms`` each rank drops it: the member is closed,
    its threads and connections are gone, and a late commit of it is refused."""
    ttl_s = 1.5
    c = cluster_factory({"backends": MEM, "admin": {"prepare_ttl_ms": int(ttl_s * 1000)}})
    spec = {"name": "fresh", "type": "redis", "url": redis_server.url, "socket_timeout_ms": 500}
    assert threads("fresh") == 0
    clients_before = redis_clients(redis_server)
    t0 = time.monotonic()
    replies = c.controller.call([0, 1, 2, 3], "prepare", {"token": "dead", "backend": "fresh", "spec": spec}, 10)
    assert not failures(replies), replies
    assert all(len(a._prepared) == 1 for a in c.agents)
    assert threads("fresh") > 0 and redis_clients(redis_server) >= clients_before + 4  # each rank probed it
    assert all("fresh" not in m.members for m in c.managers)  # prepared, not in the route

    gone = {}

    def expired():
        now = time.monotonic()
        for i, a in enumerate(c.agents):
            if not a._prepared and i not in gone:
                gone[i] = now - t0
        return len(gone) == 4

    wait_for(expired, timeout=ttl_s + 10, what="every rank to drop its prepared switch")
    # Never before its TTL (the deadline is set on the rank after t0), and not long after (the agent
    # looks at least once a second).
    assert min(gone.values()) >= ttl_s, gone
    assert max(gone.values()) <= ttl_s + 5, gone
    wait_for(lambda: threads("fresh") == 0, timeout=5, what="the prepared member's threads to stop")
    wait_for(lambda: redis_clients(redis_server) <= clients_before, timeout=5,
             what="the prepared member's connections to close")
    replies = c.controller.call([0, 1, 2, 3], "commit", {"token": "dead", "epoch": 2, "force": True}, 10)
    assert all(rep and not rep["ok"] and "expired" in rep["error"] for rep in replies.values()), replies
    assert c.epochs() == {(1, "primary")} and all("fresh" not in m.members for m in c.managers)


@pytest.mark.parametrize("dp", ["data parallel", "attention data parallel"])
def test_dp_ranks_are_expected_and_an_identity_outside_the_shape_is_refused(tmp_path, monkeypatch, dp):
    """TP 2 × DP 2, as SGLang publishes it (its storage config carries no DP size): the embedded
    controller on rank 0 expects all four ranks, DP replica 1's ranks take part in a switch, and a rank
    claiming a place outside TP 2 × DP 2 is refused."""
    monkeypatch.setenv("HICACHE_HA_ADMIN_API_KEY", KEY)
    ha = {"backends": MEM, "admin": {"mode": "embedded", "port": free_port(), "agent_port": free_port(),
                                     "state_file": str(tmp_path / "state.json"), "heartbeat_ms": 100,
                                     "rank_timeout_ms": 1000}}
    storages = []
    for dp_rank in range(2):
        for tp_rank in range(2):
            place = ({"dp_rank": dp_rank, "dp_size": 2, "attn_dp_enabled": False} if dp == "data parallel" else
                     {"attn_dp_rank": dp_rank, "attn_dp_size": 2, "attn_dp_enabled": True, "attn_tp_rank": tp_rank,
                      "attn_tp_size": 2})
            with get_parallel().override(**place):
                storages.append(build(ha, tp_rank=tp_rank, tp_size=2))
            if not dp_rank and not tp_rank:
                controller = storages[0].control.service.controller
                assert controller.expected_ranks == 4
                wait_for(lambda c=controller: 0 in c.alive(), what="rank 0 to register")
                assert controller.missing() == [1, 2, 3]  # DP replica 1's ranks are waited for
    assert [s.manager.layout.rank for s in storages] == [0, 1, 2, 3]
    wait_for(lambda: controller.missing() == [], what="all four ranks to register")
    assert {r: (i.identity["tp"], i.identity["dp"], i.identity["dp_size"]) for r, i in controller.ranks.items()} == {
        0: (0, 0, 2), 1: (1, 0, 2), 2: (0, 1, 2), 3: (1, 1, 2)}

    keys = (KEYS.agent_public, KEYS.agent_secret, KEYS.controller_public)
    endpoint = f"tcp://127.0.0.1:{ha['admin']['agent_port']}"
    tp2dp2 = {**IDENT, "tp_size": 2, "dp_size": 2}
    for rank, ident in ((4, {**tp2dp2, "tp": 0, "dp": 2}),  # a third replica of a two-replica deployment
                        (4, {**tp2dp2, "tp": 0, "dp": 2, "dp_size": 3}),  # a deployment of six ranks
                        (5, {**tp2dp2, "tp": 1, "dp": 2, "dp_size": 3}),
                        (1, {**tp2dp2, "tp": 1, "dp": 1})):  # replica 1's place under rank 1's number
        assert attempts(endpoint, keys, rank=rank, identity=ident, failover=False) is None, (rank, ident)
    wait_for(lambda: controller.missing() == [], timeout=5, what="the real ranks (their connections handed back)")
    assert sorted(controller.ranks) == [0, 1, 2, 3]
    assert (controller.ranks[1].identity["tp"], controller.ranks[1].identity["dp"]) == (1, 0)

    result = controller.switch("standby")  # not forced: every expected rank must be there and move
    assert result.status == 200, result.body
    assert sorted(result.body["ranks"]) == [0, 1, 2, 3] and result.body["missing"] == []
    assert {(s.manager.epoch, s.manager.active.name) for s in storages} == {(2, "standby")}


def test_a_rank_whose_old_connection_lingers_is_accepted_under_its_own_identity(cluster_factory):
    """Rank 3's process wedges with its connection open (ZeroMQ's I/O thread still answers the transport's
    heartbeats, so nothing closes it), then rank 3 comes back on a new connection: the controller hands
    the identity to the new connection, which registers and obeys the next switch; the old one hears
    nothing more."""
    c = cluster_factory({"backends": MEM})
    c.agents[3].close()
    zombie = Outsider(f"tcp://127.0.0.1:{c.port}", KEYS.agent_public, KEYS.agent_secret, KEYS.controller_public,
                      identity=b"rank-3")
    try:
        zombie.send({"type": "heartbeat", "rank": 3, "deployment": "default",
                     "identity": c.managers[3].layout.describe(), "status": c.managers[3].status(), "events": []})
        assert zombie.receive(5) == {"type": "ack", "fence": c.controller.fence, "deployment": "default"}
        wait_for(lambda: 3 in c.controller.missing(), timeout=5, what="rank 3 to go silent")
        time.sleep(1.0)  # the wedged connection stays up: the transport's heartbeats are answered

        c.agents[3] = c.agent(c.managers[3])  # rank 3 is back, on a new connection
        wait_for(lambda: c.controller.missing() == [], timeout=10, what="rank 3 to be accepted again")
        while zombie.receive(0.3) is not None:  # what reached the old connection before the handover
            pass
        result = c.controller.switch("standby")  # not forced: rank 3 must answer on its new connection
        assert result.status == 200, result.body
        assert c.epochs() == {(2, "standby")}
        assert zombie.receive(1.0) is None
    finally:
        zombie.close()


def agent_connection(pid: int, agent_port: int):
    """The TCP connection a rank process holds to the controller's agent port (None: none)."""
    conns = [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr and c.raddr.port == agent_port]
    return conns[0] if conns else None


@pytest.fixture
def processes(tmp_path):
    d = Deployment(tmp_path, {"backends": MEM, "deadlines_ms": DEADLINES})
    try:
        yield d
    finally:
        d.close()


def test_a_frozen_rank_process_is_dropped_by_heartbeats_and_accepted_under_its_identity_when_back(processes):
    """Real processes: rank 3 is SIGSTOPped, so its socket is never closed (its kernel still ACKs, its
    ZeroMQ answers nothing). The controller's ZeroMQ heartbeats drop that connection (the frozen side sees
    the close: CLOSE_WAIT), a forced switch moves the others, and on SIGCONT rank 3 reconnects under its
    own identity, converges, and takes part in the next switch. Rank 2 SIGKILLed and started anew is
    accepted the same way."""
    d = processes
    d.start_controller()
    d.start_ranks()
    wait_for(lambda: all(x.get("calls") for x in d.reports()), timeout=60, what="traffic on every rank")
    frozen = d.ranks[3]
    before = agent_connection(frozen.pid, d.agent_port)
    assert before is not None and before.status == psutil.CONN_ESTABLISHED

    frozen.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    wait_for(lambda: d.client.status()["missing_ranks"] == [3], timeout=10, what="rank 3 to go missing")

    def dropped():
        conn = agent_connection(frozen.pid, d.agent_port)
        return conn is None or conn.status != psutil.CONN_ESTABLISHED

    wait_for(dropped, timeout=20, what="the controller's heartbeats to drop the frozen rank's connection")
    dropped_after = time.monotonic() - t0
    assert agent_connection(frozen.pid, d.agent_port).status == psutil.CONN_CLOSE_WAIT  # closed by the controller
    body = d.client.switch("standby", force=True)
    assert (body["epoch"], body["missing"]) == (2, [3])

    frozen.send_signal(signal.SIGCONT)
    t1 = time.monotonic()
    wait_for(lambda: d.client.status()["missing_ranks"] == [], timeout=20, what="rank 3 to be accepted again")
    back_after = time.monotonic() - t1
    wait_for(lambda: d.agreed(2, "standby"), timeout=20, what="rank 3 to converge to the desired state")
    body = d.client.switch("primary")  # not forced: rank 3 answers on its new connection
    assert (body["epoch"], sorted(body["ranks"]), body["missing"]) == (3, [0, 1, 2, 3], [])
    wait_for(lambda: d.agreed(3, "primary"), what="every rank on epoch 3")

    # Rank 2's process is SIGKILLed; a new process takes its place under the same identity.
    d.ranks[2].kill()
    d.ranks[2].wait(10)
    (d.tmp / "rank2.json").unlink()
    wait_for(lambda: 2 in d.client.status()["missing_ranks"], timeout=10, what="rank 2 to go missing")
    d.ranks[2] = d.start_rank(2)
    wait_for(lambda: d.client.status()["missing_ranks"] == [], timeout=90, what="the new rank 2 to be accepted")
    wait_for(lambda: d.agreed(3, "primary"), timeout=20, what="the new rank 2 on epoch 3")
    body = d.client.switch("standby")
    assert (body["epoch"], sorted(body["ranks"])) == (4, [0, 1, 2, 3])
    wait_for(lambda: d.agreed(4, "standby"), what="every rank on epoch 4")
    print(f"\nfrozen rank's connection dropped after {dropped_after:.2f} s; accepted {back_after:.2f} s after SIGCONT")
    reports = d.reports()
    assert sum(x["errors"] for x in reports) == 0 and sum(x["bad_pages"] for x in reports) == 0
