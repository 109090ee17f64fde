"""The agent channel only the operator controls: without the admin key nothing reached through the agent
port changes state, registers a rank or tells anything; a forged controller cannot move a rank; a rank
identity that does not fit the deployment is refused; a controller that lost its lease is obeyed no more."""

import socket
import threading
import time

import pytest
import zmq

from hicache_ha.control.keys import channel_keys
from tests.control.conftest import AUTH, KEY, KEYS, MEM, wait_for
from tests.control.outsider import ForgedController, Outsider, ghost_commands

IDENT = {"tp": 3, "pp": 0, "dp": 0, "cp": 0, "tp_size": 4, "pp_size": 1, "dp_size": 1, "cp_size": 1}


def attempts(endpoint, keys_or_none, rank=7, identity=None, failover=True):
    """An outsider's whole repertoire: register a phantom rank, heartbeat, ask for a failover."""
    if keys_or_none is None:
        o = Outsider(endpoint, identity=f"rank-{rank}".encode())
    else:
        public, secret, server = keys_or_none
        o = Outsider(endpoint, public, secret, server, identity=f"rank-{rank}".encode())
    ident = identity or {**IDENT, "tp": rank % 4}
    for kind in ("register", "heartbeat"):
        o.send({"type": kind, "rank": rank, "deployment": "default", "identity": ident,
                "status": {"seq": 10 ** 6, "epoch": 1, "active": "primary", "backends": []}, "events": []})
    if failover:
        o.send({"type": "failover_request", "rank": rank, "deployment": "default", "target": "standby",
                "from": "primary"})
    answer = o.receive(1.5)
    o.close()
    return answer


@pytest.fixture
def cluster(cluster_factory):
    return cluster_factory({"backends": MEM})


def endpoint(c):
    return f"tcp://127.0.0.1:{c.port}"


def assert_untouched(c):
    assert sorted(c.controller.ranks) == [0, 1, 2, 3]
    assert (c.controller.desired.epoch, c.controller.desired.active) == (1, "primary")
    assert c.epochs() == {(1, "primary")}


def test_a_peer_without_any_key_gets_no_answer_and_changes_nothing(cluster):
    assert attempts(endpoint(cluster), None) is None
    time.sleep(0.5)
    assert_untouched(cluster)


@pytest.mark.parametrize("who", ["wrong secret", "other deployment", "knows the controller key only"])
def test_a_peer_with_the_wrong_keys_gets_no_answer_and_changes_nothing(cluster, who):
    if who == "wrong secret":
        k = channel_keys("not-the-admin-key", "default")
        keys = (k.agent_public, k.agent_secret, k.controller_public)
    elif who == "other deployment":
        k = channel_keys(KEY, "another-deployment")
        keys = (k.agent_public, k.agent_secret, k.controller_public)
    else:  # the controller's public key leaked, but not the agents' secret
        public, secret = zmq.curve_keypair()
        keys = (public, secret, KEYS.controller_public)
    assert attempts(endpoint(cluster), keys) is None
    time.sleep(0.5)
    assert_untouched(cluster)


def test_an_identity_that_does_not_fit_the_deployment_is_refused(cluster):
    """With the agent key (every rank holds the admin key, so a rank is trusted), a misconfigured or
    foreign rank still cannot register outside the deployment's shape, nor change a rank's place."""
    keys = (KEYS.agent_public, KEYS.agent_secret, KEYS.controller_public)
    assert attempts(endpoint(cluster), keys, rank=7, failover=False) is None  # a phantom rank 7 of 4
    attempts(endpoint(cluster), keys, rank=2, identity={**IDENT, "tp": 1}, failover=False)  # rank 2, rank 1's place
    attempts(endpoint(cluster), keys, rank=1, identity={**IDENT, "tp": 1, "tp_size": 8}, failover=False)  # 8 ranks
    wait_for(lambda: cluster.controller.missing() == [], timeout=5, what="the real ranks (their connections handed back)")
    assert 7 not in cluster.controller.ranks
    assert cluster.controller.ranks[2].identity["tp"] == 2 and cluster.controller.ranks[1].identity["tp_size"] == 4
    assert_untouched(cluster)


def test_a_replayed_recording_of_a_real_agent_changes_nothing(cluster):
    """Record what a real rank sends on the wire (through a relay), silence that rank, replay it."""
    c = cluster
    relay = socket.socket()
    relay.bind(("127.0.0.1", 0))
    relay.listen(1)
    recorded = bytearray()
    done = threading.Event()

    def pump():
        conn, _ = relay.accept()
        upstream = socket.create_connection(("127.0.0.1", c.port))
        conn.settimeout(0.1)
        upstream.settimeout(0.1)
        while not done.is_set():
            for src, dst, keep in ((conn, upstream, True), (upstream, conn, False)):
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if data:
                    if keep:
                        recorded.extend(data)
                    dst.sendall(data)
        conn.close()
        upstream.close()

    threading.Thread(target=pump, daemon=True).start()
    c.agents[3].close()
    from hicache_ha.control.agent import Agent

    admin = c.config.admin
    spy = Agent(c.managers[3], f"tcp://127.0.0.1:{relay.getsockname()[1]}", keys=KEYS, heartbeat_s=0.1)
    time.sleep(1.0)  # heartbeats recorded
    spy.close()
    done.set()
    wait_for(lambda: 3 in c.controller.missing(), timeout=5, what="rank 3 to go silent")
    assert len(recorded) > 500
    replay = socket.create_connection(("127.0.0.1", c.port))
    replay.sendall(bytes(recorded))
    time.sleep(1.5)
    replay.close()
    assert 3 in c.controller.missing()  # the recording revived nothing
    assert (c.controller.desired.epoch, c.controller.desired.active) == (1, "primary")
    assert admin.heartbeat_ms == 100


def test_a_forged_controller_cannot_move_a_rank(cluster):
    c = cluster
    c.controller.close()  # the real one is gone; an impostor takes its port
    forged_keys = channel_keys("stolen-guess", "default")
    for keys in (None, forged_keys):
        forged = ForgedController(endpoint(c), *(None, None) if keys is None else (keys.controller_public,
                                                                                      keys.controller_secret))
        try:
            assert forged.receive(1.5) is None  # not even a heartbeat reaches it
            for r in range(4):
                for op, args in (("prepare", {"token": "t", "backend": "standby"}),
                                 ("commit", {"token": "t", "epoch": 99, "force": True}),
                                 ("detach", {"epoch": 99, "force": True})):
                    forged.send(f"rank-{r}".encode(), {"type": "command", "id": "x", "op": op, "args": args,
                                                       "fence": 10 ** 9, "deployment": "default"})
            time.sleep(0.5)
        finally:
            forged.close()
    assert c.epochs() == {(1, "primary")}
    assert all(a.max_fence < 10 ** 9 for a in c.agents)


def test_ranks_refuse_a_controller_whose_lease_was_taken_over(cluster):
    """A leader that lost its lease (a pause, a partition) may still send; ranks that saw a newer
    fencing token refuse it."""
    c = cluster
    old_fence = c.controller.fence
    agent = c.agents[0]
    agent.max_fence = old_fence + 1  # a newer leader already spoke to this rank
    r = c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    assert r.status_code == 503 and [f["rank"] for f in r.json()["failed"]] == [0]
    assert "older than" in r.json()["failed"][0]["reason"]
    assert c.epochs() == {(1, "primary")}


def ghost_of_the_old_leader(c, fence):
    """The old leader back with its old fencing token: prepare, commit and detach on each of 4 ranks."""
    return ghost_commands(endpoint(c), KEYS, 4, [fence])


def test_once_ranks_heard_a_new_leader_the_old_one_is_refused_even_before_the_new_one_commands(cluster):
    """The leader is replaced (its lease taken over); its successor has not sent a single command yet,
    only acknowledged the ranks' heartbeats. The old leader comes back on the agent port with the real
    keys and its old token: every command it sends is refused and no rank moves."""
    c = cluster
    old = c.controller.fence
    c.controller.close()
    c.start_controller()
    new = c.controller.fence
    assert new > old
    wait_for(lambda: all(a.max_fence == new for a in c.agents), timeout=10,
             what="every rank to hear the new leader's token in its heartbeats' acks")
    c.controller.close()
    replies = ghost_of_the_old_leader(c, old)
    assert len(replies) == 12, sorted(replies)
    assert all(not rep["ok"] and rep["status"] == 409 and f"fencing token {old} is older than {new}" in rep["error"]
               for rep in replies.values()), list(replies.values())
    assert c.epochs() == {(1, "primary")}
    assert all(not a._prepared for a in c.agents)


def test_ranks_refuse_a_commit_or_detach_to_an_epoch_older_than_one_they_were_moved_to(cluster):
    """Even from the leader (its token is current): a commit or detach to an epoch older than the one a
    controller moved the rank to is refused, so a stale desired state cannot pull ranks back."""
    c = cluster
    r = c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    assert r.status_code == 200 and c.epochs() == {(2, "standby")}
    ranks = [0, 1, 2, 3]
    assert all(rep and rep["ok"] for rep in c.controller.call(ranks, "prepare", {"token": "old", "backend": "primary"},
                                                              5).values())
    for op, args in (("commit", {"token": "old", "epoch": 1, "force": True}), ("detach", {"epoch": 1, "force": True})):
        replies = c.controller.call(ranks, op, args, 5)
        assert all(rep and not rep["ok"] and rep["status"] == 409 and "epoch 1 is older than 2" in rep["error"]
                   for rep in replies.values()), (op, replies)
        assert c.epochs() == {(2, "standby")}
    c.controller.call(ranks, "abort", {"token": "old"}, 5)
    # The same leader moving them forward is obeyed.
    r = c.client.put("/hicache/storage-backend", json={"backend": "primary"}, headers=AUTH)
    assert r.status_code == 200 and c.epochs() == {(3, "primary")}
