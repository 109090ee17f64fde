"""The data plane contract, seen from SGLang's side, against real faults."""

import os
import statistics
import time

import torch

from hicache_ha.sim.lag import LagProbe
from tests.helpers import GATE
from tests.sglang.conftest import build
from tests.sglang.realpools import fill, mha_pool

SLACK_S = 0.020


def page(seed, n=4096):
    return torch.full((n,), float(seed), dtype=torch.bfloat16)


def test_a_read_that_finishes_after_its_deadline_never_touches_engine_memory(fast_deadlines):
    s = build({"backends": [{"name": "g", "type": GATE}], "deadlines_ms": fast_deadlines})
    s.set("k", page(7))
    gate = s.manager.members["g"].backend
    target = torch.zeros(4096, dtype=torch.bfloat16)
    gate.close_gate()
    assert s.get("k", target) is None
    gate.open_gate()  # the abandoned read now completes on its worker
    assert s.manager.members["g"].bulkhead.wait_idle(5)
    time.sleep(0.05)
    assert torch.count_nonzero(target) == 0
    assert s.get("k", target) is not None and torch.equal(target, page(7))


def test_a_page_of_tp_rank_0_is_never_served_to_another_layout(tmp_path):
    shared = {"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}
    r0 = build(shared, tp_rank=0, tp_size=2)
    r0.set("k", page(1))
    for other in (build(shared, tp_rank=1, tp_size=2), build(shared, tp_rank=0, tp_size=4),
                  build(shared, tp_rank=0, tp_size=2, model="other/model")):
        assert other.get("k", torch.zeros(4096, dtype=torch.bfloat16)) is None
        assert other.batch_exists(["k"]) == 0
    # Same bytes per page, another dtype, on SGLang's real pools (more in test_host_pools.py).
    pool_a, pool_b = mha_pool(dtype=torch.bfloat16), mha_pool(dtype=torch.float16)
    a, b = build(shared, pool=pool_a), build(shared, pool=pool_b)
    fill(pool_a, slots := pool_a.alloc(pool_a.page_size), seed=1)
    assert a.batch_set_v1(["p"], slots) == [True]
    assert b.batch_get_v1(["p"], pool_b.alloc(pool_b.page_size)) == [False]


def test_mla_pages_are_shared_across_tp_ranks_and_written_by_the_writer_only(tmp_path):
    shared = {"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}
    r0, r1 = build(shared, tp_rank=0, mla=True), build(shared, tp_rank=1, mla=True)
    assert r1.set("from-r1", page(2)) is True and r0.exists("from-r1") is False
    r0.set("k", page(3))
    target = torch.zeros(4096, dtype=torch.bfloat16)
    assert r1.get("k", target) is not None and torch.equal(target, page(3))


def test_a_page_altered_on_disk_is_a_miss_and_counted_corrupt(tmp_path):
    s = build({"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]})
    s.set("k", page(5))
    [path] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".page")]
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    assert s.get("k", torch.zeros(4096, dtype=torch.bfloat16)) is None
    snap = s.ha_status()["backends"][0]
    assert snap["corrupt_pages"] == 1 and snap["ops"]["get"]["corrupt"] == 1


def _every_call_fails_fast(s, deadlines):
    """Drive each HAStorage entry point; each must return its failure value within deadline + 20 ms, plus
    whatever time this process was kept from running meanwhile (measured: on a loaded machine no call
    returns while the operating system does not run it). Most calls keep the bare contract."""
    target = torch.zeros(4096, dtype=torch.bfloat16)
    calls = [
        (lambda: s.get("k0", target), None, deadlines["get"]),
        (lambda: s.batch_get([f"k{i}" for i in range(4)], [torch.zeros(4096, dtype=torch.bfloat16)] * 4),
         [None] * 4, deadlines["get"]),
        (lambda: s.set("new", page(1)), False, deadlines["set"]),
        (lambda: s.batch_set(["n1", "n2"], [page(1), page(2)]), False, deadlines["set"]),
        (lambda: s.exists("k0"), False, deadlines["exists"]),
        (lambda: s.batch_exists([f"k{i}" for i in range(4)]), 0, deadlines["exists"]),
    ]
    over = []  # seconds past each call's deadline
    with LagProbe() as lag:
        for _ in range(3):
            for call, failure, deadline_ms in calls:
                t0 = time.perf_counter()
                out = call()
                took = time.perf_counter() - t0
                assert out == failure
                over.append(took - deadline_ms / 1000)
    shown = [round(o * 1000, 1) for o in over]
    assert max(over) <= SLACK_S + lag.worst, f"ms past the deadline: {shown}, lag {lag.worst * 1000:.1f} ms"
    assert statistics.median(over) <= SLACK_S, f"ms past the deadline: {shown}"
    return max(over)


def test_a_frozen_then_killed_redis_never_holds_the_engine_past_its_deadline(redis_server, fast_deadlines):
    ha = {"backends": [{"name": "r", "type": "redis", "url": redis_server.url, "socket_timeout_ms": 300}],
          "deadlines_ms": fast_deadlines}
    s = build(ha)
    keys = [f"k{i}" for i in range(4)]
    assert s.batch_set(keys, [page(i) for i in range(4)]) is True

    redis_server.freeze()
    try:
        _every_call_fails_fast(s, fast_deadlines)
    finally:
        redis_server.thaw()
    # After SIGCONT, traffic is served again (once the workers that sat on the frozen socket come back).
    deadline = time.monotonic() + 5
    while s.batch_exists(keys) != 4:
        assert time.monotonic() < deadline, "not served again after SIGCONT"
        time.sleep(0.05)
    target = torch.zeros(4096, dtype=torch.bfloat16)
    assert s.get("k2", target) is not None and torch.equal(target, page(2))

    redis_server.kill()
    _every_call_fails_fast(s, fast_deadlines)
    s.close()
