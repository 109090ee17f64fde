"""SGLang 0.5.23's real cache controllers, TP = 2 ranks over gloo, driving HAStorage while its redis
member is frozen (SIGSTOP) for 6 s mid-run: HiCacheController with ``interface_v1`` off and on, and
HybridCacheController with an SWA state pool and an indexer pool (the v2 calls); and an MLA model, whose
pages one rank writes and both ranks read. What SGLang's own threads see is what is checked."""

import multiprocessing as mp
import socket
import time

import pytest

from hicache_ha.sim.lag import SLACK_S
from hicache_ha.sim.servers import RedisServer

DEADLINES = {"exists": 50, "get": 300, "set": 500}
OP_DEADLINE = {"batch_exists": "exists", "batch_exists_v2": "exists", "batch_get": "get", "batch_get_v1": "get",
               "batch_get_v2": "get", "batch_set": "set", "batch_set_v1": "set", "batch_set_v2": "set"}
FREEZE_S, AFTER_S = 6.0, 6.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ha(primary_url: str, standby: str) -> dict:
    return {"admin": {"mode": "off"}, "deadlines_ms": DEADLINES,
            "backends": [{"name": "primary", "type": "redis", "url": primary_url, "socket_timeout_ms": 1000},
                         {"name": "standby", "type": "file", "path": standby}],
            "health": {"backoff": {"base_ms": 300, "cap_ms": 2000}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both ranks, every variant, in one spawn (importing SGLang costs tens of seconds per process)."""
    servers = {name: RedisServer().start() for name in ("v1-off", "v1-on", "hybrid", "mla")}
    variants = [
        {"name": "v1-off", "interface_v1": 0, "fault": True},
        {"name": "v1-on", "interface_v1": 1, "fault": True},
        {"name": "hybrid", "interface_v1": 1, "hybrid": True, "fault": True},
        {"name": "mla", "interface_v1": 1, "mla": True, "fault": False},
    ]
    for v in variants:
        v["ha"] = ha(servers[v["name"]].url, str(tmp_path_factory.mktemp(v["name"])))
    ctx = mp.get_context("spawn")
    events = {v["name"]: (ctx.Event(), ctx.Event()) for v in variants}
    results = ctx.Queue()
    from tests.sglang.controller_rank import run_rank

    port = _port()
    procs = [ctx.Process(target=run_rank, args=(r, 2, port, variants, events, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    timeline = {}
    try:
        for v in variants:
            ready, stop = events[v["name"]]
            assert ready.wait(300), "the ranks did not get going (see their output)"
            time.sleep(2.0)
            if v["fault"]:
                server = servers[v["name"]]
                timeline[v["name"]] = {"freeze": time.monotonic()}
                server.freeze()
                time.sleep(FREEZE_S)
                timeline[v["name"]]["thaw"] = time.monotonic()
                server.thaw()
                time.sleep(AFTER_S)
            stop.set()
        out = {}
        for _ in range(2 * len(variants)):
            rank, name, result = results.get(timeout=180)
            assert name != "crash", f"rank {rank} crashed:\n{result}"
            out[(rank, name)] = result
        for p in procs:
            p.join(60)
        yield out, timeline
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for s in servers.values():
            s.close()


def calls_within(result, t0, t1):
    return [c for c in result["calls"] if t0 <= c[1] <= t1]


@pytest.mark.parametrize("variant,interface", [("v1-off", "legacy"), ("v1-on", "v1"), ("hybrid", "v1")])
def test_a_frozen_redis_member_never_stalls_sglangs_controller_and_it_recovers(run, variant, interface):
    out, timeline = run
    t = timeline[variant]
    for rank in (0, 1):
        r = out[(rank, variant)]
        assert r["interface"] == interface
        # No call raises; none outlives its deadline + 20 ms (+ what the process was kept from running).
        assert [c for c in r["calls"] if c[3]] == []
        late = [(name, round(dur * 1000)) for name, _t, dur, _e in r["calls"]
                if name in OP_DEADLINE and dur > DEADLINES[OP_DEADLINE[name]] / 1000 + SLACK_S + r["lag"]]
        assert late == [], f"rank {rank}: calls over their bound (lag {r['lag'] * 1000:.0f} ms): {late}"
        assert calls_within(r, t["freeze"], t["thaw"]), "the controller stopped calling storage while it was frozen"
        # Every loaded page byte-exact, before, during and after.
        its = r["iterations"]
        assert all(it["exact"] for it in its)
        before = [it for it in its if it["t1"] < t["freeze"]]
        assert before and all(it["backed"] == it["tokens"] == it["loaded"] for it in before)
        # Within 5 s of the freeze (the failover) and of the thaw, backups and prefetches complete again.
        for since in (t["freeze"], t["thaw"]):
            again = [it for it in its if it["t0"] >= since and it["backed"] == it["tokens"] == it["loaded"]]
            assert again and again[0]["t1"] - since <= 5.0, f"rank {rank}: nothing complete within 5 s of {since}"
        assert r["active"] == "standby"  # failed over, and failback is manual by default
        assert any(e["to"] == "circuit_broken" and e["backend"] == "primary" for e in r["events"])
        if variant == "hybrid":  # SGLang's v2 calls, for the SWA state and the indexer pages
            assert {"batch_exists_v2", "batch_get_v2", "batch_set_v2"} <= {c[0] for c in r["calls"]}
            assert all(it["swa_loaded"] for it in before)


def test_mla_pages_written_by_one_rank_are_loaded_by_both_through_sglangs_controller(run):
    out, _ = run
    for rank in (0, 1):
        its = out[(rank, "mla")]["iterations"]
        assert its and all(it["exact"] for it in its)
        assert all(it["loaded"] == it["tokens"] for it in its)  # rank 1 loads what rank 0 wrote
