"""A state store that restarted empty (no persistence) counts fencing tokens from 1 again and has no desired
state, while every live rank saw a newer token and epoch. Ranks say what they saw; the leader moves the
store's counter past it (only a counter created afresh, and only on its lease) and takes the state the ranks
were moved to, so the control plane is not wedged and fencing never goes backwards: a token from before the
restart is still refused. A settled counter is never moved (a newer token is then a real newer leader)."""

import signal
import time

import httpx
import pytest

from hicache_ha.control.client import AdminError
from hicache_ha.control.keys import channel_keys
from hicache_ha.control.state import DesiredState, FileStateStore, NotLeader, RedisStateStore
from tests.control.conftest import AUTH, DEADLINES, wait_for
from tests.control.outsider import ghost_commands
from tests.control.test_multiprocess import KEY, RANKS
from tests.control.test_security import ghost_of_the_old_leader
from tests.control.test_takeover import LEASE_S, MEM, Pair

# -- the store: advance, settle ------------------------------------------------------------------------


def wipe_files(path):
    for p in path.parent.iterdir():
        if p.name.startswith(path.name):
            p.unlink()


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_only_an_unsettled_counter_moves_past_a_token_and_only_on_the_lease(kind, tmp_path, request):
    if kind == "file":
        path = tmp_path / "state.json"

        def store():
            return FileStateStore(path)

        def wipe():
            wipe_files(path)
    else:
        server = request.getfixturevalue("redis_server")

        def store():
            return RedisStateStore(server.url, "default")

        def wipe():
            with server.client() as c:
                c.flushall()

    a, b = store(), store()
    assert a.acquire("a", 5) == 1 and a.unsettled()  # a counter created afresh
    assert b.acquire("b", 5) is None and b.advance("b", 1, 40, 5) is None  # not on someone else's lease
    assert a.advance("a", 1, 40, 5) == 41  # past the token ranks saw, atomically with the lease
    assert not a.renew("a", 1, 5) and a.renew("a", 41, 5)
    with pytest.raises(NotLeader):
        a.save(DesiredState(), 1)
    a.save(DesiredState(), 41)
    assert a.settle("a", 41) and not a.unsettled()
    assert a.advance("a", 41, 90, 5) == 41  # settled: a newer token is a real newer leader, never moved past
    a.release("a", 41)
    assert b.acquire("b", 5) == 42 and not b.unsettled()

    wipe()  # the store restarts empty: the old lease is gone, and the leader holding it loses it
    assert not b.renew("b", 42, 5)
    c = store()
    assert c.acquire("c", 5) == 1 and c.unsettled()
    assert not b.renew("b", 42, 5) and b.advance("b", 42, 50, 5) is None
    assert c.advance("c", 1, 42, 5) == 43


# -- in process: a controller, four ranks (threads), a file store wiped under them ---------------------


@pytest.mark.parametrize("left", ["nothing", "a provisional state"])
def test_a_leader_on_a_wiped_store_moves_past_the_ranks_token_and_keeps_their_state(cluster_factory, tmp_path, left):
    """``a provisional state``: a leader of the emptied store saved the configuration's state, then lost the
    lease before it heard from the ranks (as when it could not listen on the agent port): its successor
    still follows the ranks."""
    c = cluster_factory({"backends": MEM})
    assert c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH).status_code == 200
    for _ in range(2):  # two more leaders: ranks saw token 3
        c.controller.close()
        c.start_controller()
    wait_for(lambda: all(a.max_fence == 3 for a in c.agents), what="ranks to hear token 3")
    c.controller.close()
    wipe_files(tmp_path / "state.json")
    if left != "nothing":
        (tmp_path / "state.json").write_text(DesiredState(epoch=1, active="primary", provisional=True).to_json())
    c.start_controller()  # token 1 again, and the configuration's state (epoch 1, primary)
    wait_for(lambda: c.controller.fence == 4, what="the leader to move past token 3")
    assert (c.controller.desired.epoch, c.controller.desired.active) == (2, "standby")  # the ranks' state
    time.sleep(0.5)
    assert c.epochs() == {(2, "standby")}  # nothing moved
    r = c.client.put("/hicache/storage-backend", json={"backend": "primary"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["epoch"] == 3 and c.epochs() == {(3, "primary")}
    assert (tmp_path / "state.json.fence").read_text() == "4"
    wait_for(lambda: not (tmp_path / "state.json.fence-unsettled").exists(), what="the counter to be settled")
    assert not DesiredState.model_validate_json((tmp_path / "state.json").read_text()).provisional
    c.controller.close()
    replies = ghost_of_the_old_leader(c, 3)
    assert len(replies) == 12 and all(not r["ok"] and "fencing token 3 is older than 4" in r["error"]
                                      for r in replies.values()), list(replies.values())[:2]


def test_the_same_token_from_two_leaders_is_moved_past(cluster_factory, tmp_path):
    """The leader before the wipe had token 1, as the one after it: ranks say which controller used it."""
    c = cluster_factory({"backends": MEM})
    assert c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH).status_code == 200
    c.controller.close()
    wipe_files(tmp_path / "state.json")
    c.start_controller()
    wait_for(lambda: c.controller.fence == 2, what="the leader to move past the other leader's token 1")
    wait_for(lambda: all(a.max_fence == 2 for a in c.agents), what="ranks to hear token 2")
    c.controller.close()
    replies = ghost_of_the_old_leader(c, 1)
    assert len(replies) == 12 and all(not r["ok"] for r in replies.values())
    assert c.epochs() == {(2, "standby")}


# -- real processes: two controllers on a state Redis that restarts empty, four rank processes --------


@pytest.fixture
def pair(tmp_path, redis_server):
    ha = {"backends": MEM, "deadlines_ms": DEADLINES,
          "admin": {"lease_ms": int(LEASE_S * 1000), "state_redis_url": redis_server.url}}

    def fence():
        with redis_server.client() as c:
            return int(c.get("hicache-ha:default:fence"))

    with redis_server.client() as c:
        c.set("hicache-ha:default:fence", 41)  # a store that has seen leaders come and go: settled
    d = Pair(tmp_path, ha, fence)
    d.redis = redis_server
    try:
        yield d
    finally:
        d.close()


def leaders(d):
    out = []
    for slot in (0, 1):
        try:
            out.append(httpx.get(f"{d.url(slot)}/healthz", timeout=2).json()["leader"])
        except httpx.HTTPError:
            out.append(None)
    return out


def test_the_state_redis_restarts_empty_and_the_fleet_is_not_wedged(pair):
    d = pair
    d.start(0, leads=True)
    d.start(1, leads=False)
    d.start_ranks()
    wait_for(lambda: all(x.get("calls") for x in d.reports()), timeout=60, what="traffic on every rank")
    assert d.client_of(0).switch("standby")["epoch"] == 2
    wait_for(lambda: d.agreed(2, "standby"), timeout=10, what="every rank on (2, standby)")
    old = d.fence()
    assert old == 42

    d.redis.kill()
    d.redis.start()  # same port, empty: no lease, no desired state, the counter from 1
    t0 = time.monotonic()
    body, leader, last = None, None, None
    while body is None:
        assert time.monotonic() - t0 < 15, f"no switch went through after the restart: {last}"
        for slot in (0, 1):
            if d.ready(slot):
                try:
                    body = d.client_of(slot).switch("primary")
                    leader = slot
                    break
                except AdminError as exc:
                    last = (exc.status, exc.body)
        time.sleep(0.1)
    took = time.monotonic() - t0
    print(f"\na switch went through {took:.2f} s after the state Redis restarted empty "
          f"(leader: controller {leader}, token {d.fence()})")
    # The ranks' state was kept (2, standby) and the switch moved every rank, not forced, to epoch 3.
    assert (body["epoch"], body["active"], body["missing"]) == (3, "primary", [])
    wait_for(lambda: d.agreed(3, "primary"), timeout=10, what="every rank on (3, primary)")
    assert took < LEASE_S + 8
    assert d.fence() > old
    # One leader: the other one (the old leader, if the standby took over) stepped down.
    assert sorted(leaders(d), key=str) == [False, True], leaders(d)
    reports = d.reports()
    assert sum(x["errors"] for x in reports) == 0 and sum(x["bad_pages"] for x in reports) == 0

    # The old leader's token (and the one the restarted store handed out first) is still refused.
    outputs = []
    for p in d.procs:
        p.send_signal(signal.SIGKILL)
        outputs.append(p.communicate(timeout=10)[0])
    assert "stops leading" in outputs[0], outputs[0][-2000:]  # the leader before the restart lost its lease
    replies = ghost_commands(f"tcp://127.0.0.1:{d.agent_port}", channel_keys(KEY, "default"), RANKS, [old, 1],
                             [("detach", {"epoch": 99, "force": True})], timeout_s=20)
    assert len(replies) == 2 * RANKS
    assert all(not rep["ok"] and "is older than" in rep["error"] for rep in replies.values()), \
        list(replies.values())[:3]
    time.sleep(0.5)
    assert d.agreed(3, "primary")
