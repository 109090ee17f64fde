import time

from hicache_ha import BackendManager, Layout
from hicache_ha.sim.engine import MinReducer, Simulation
from hicache_ha.sim.workload import Workload, page_bytes
from hicache_ha.sim.engine import percentile
from hicache_ha.sim.lag import SLACK_S, LagProbe


def test_page_bytes_derive_from_rank_and_key():
    assert page_bytes(0, "k", 10000) == page_bytes(0, "k", 10000)
    assert page_bytes(0, "k", 10000) != page_bytes(1, "k", 10000)
    assert len(page_bytes(0, "k", 65536)) == 65536


def test_turns_of_a_conversation_share_their_prefix():
    w = Workload(conversations=1, seed=1)
    first, second = w.next_request().keys, w.next_request().keys
    assert second[: len(first)] == first and len(second) > len(first)


def test_min_reducer_agrees_on_the_smallest_value():
    import threading

    r = MinReducer(3)
    out = [None] * 3
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, r(i, [5, 2, 9][i]))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert out == [2, 2, 2]


def test_two_ranks_through_the_data_plane_hit_their_own_pages_and_verify_every_read(redis_server):
    doc = {"backends": [{"name": "r", "type": "redis", "url": redis_server.url}]}
    managers = [BackendManager(doc, Layout(model="sim", tp_rank=r, tp_size=2)) for r in range(2)]
    stats = Simulation(managers, page_size=16 * 1024, workload=Workload(conversations=8, seed=3)).run_for(3)
    assert stats.requests > 5
    assert stats.pages_hit > 0 and stats.pages_written > 0
    assert stats.verify_failures == 0 and stats.errors_surfaced == 0
    for m in managers:
        m.close()


def test_a_frozen_primary_costs_bounded_latency_and_no_errors(redis_server):
    doc = {"backends": [{"name": "r", "type": "redis", "url": redis_server.url, "socket_timeout_ms": 500}],
           "deadlines_ms": {"exists": 20, "get": 60, "set": 80}}
    managers = [BackendManager(doc, Layout(model="sim", tp_rank=r, tp_size=2)) for r in range(2)]
    try:
        with LagProbe() as lag:
            sim = Simulation(managers, page_size=16 * 1024, workload=Workload(conversations=8, seed=4)).start()
            time.sleep(1.0)
            redis_server.freeze()
            time.sleep(1.5)
            redis_server.thaw()
            time.sleep(1.0)
            stats = sim.finish()
    finally:
        for m in managers:
            m.close()
    frozen = [s for s in stats.samples if 1.1 < s.t < 2.4]
    assert frozen, "the engine kept issuing calls while storage was frozen"
    latencies = [s.seconds for s in stats.samples]
    assert percentile(latencies, 99) <= 0.080 + SLACK_S
    assert max(latencies) <= lag.bound(0.080), f"worst {max(latencies) * 1000:.0f} ms, lag {lag.worst * 1000:.0f} ms"
    assert stats.errors_surfaced == 0 and stats.verify_failures == 0
