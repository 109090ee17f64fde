"""SGLang 0.5.23's real cache controllers, TP = 2 ranks over gloo, driving HAStorage while its redis
member is frozen (SIGSTOP) for 6 s mid-run: HiCacheController with ``interface_v1`` off and on, and
HybridCacheController with an SWA state pool and an indexer pool (the v2 calls); and an MLA model, whose
pages one rank writes and both ranks read. What SGLang's own threads see is what is checked."""

import time

import pytest

from hicache_ha.sim.lag import SLACK_S
from hicache_ha.sim.servers import RedisServer
from hicache_ha.sim.sglang_engine import OP_DEADLINE, SGLangEngine, ha_spec

DEADLINES = {"exists": 50, "get": 300, "set": 500}
FREEZE_S, AFTER_S = 6.0, 6.0


def ha(primary_url: str, standby: str) -> dict:
    return {"admin": {"mode": "off"}, "deadlines_ms": DEADLINES,
            "backends": [{"name": "primary", "type": "redis", "url": primary_url, "socket_timeout_ms": 1000},
                         {"name": "standby", "type": "file", "path": standby}],
            "health": {"backoff": {"base_ms": 300, "cap_ms": 2000}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both ranks, every variant, in one spawn (importing SGLang costs tens of seconds per process)."""
    servers = {name: RedisServer().start() for name in ("v1-off", "v1-on", "hybrid", "mla")}
    standby = {name: str(tmp_path_factory.mktemp(name)) for name in servers}
    specs = [ha_spec("v1-off", ha(servers["v1-off"].url, standby["v1-off"]), interface_v1=0),
             ha_spec("v1-on", ha(servers["v1-on"].url, standby["v1-on"])),
             ha_spec("hybrid", ha(servers["hybrid"].url, standby["hybrid"]), hybrid=True),
             ha_spec("mla", ha(servers["mla"].url, standby["mla"]), mla=True)]
    engine = SGLangEngine(specs).start()
    timeline = {}
    try:
        for spec in specs:
            assert engine.wait_ready(spec.name), "the ranks did not get going (see their output)"
            time.sleep(2.0)
            if spec.name != "mla":
                timeline[spec.name] = {"freeze": time.monotonic()}
                servers[spec.name].freeze()
                time.sleep(FREEZE_S)
                timeline[spec.name]["thaw"] = time.monotonic()
                servers[spec.name].thaw()
                time.sleep(AFTER_S)
            engine.stop(spec.name)
        yield engine.results(), timeline
    finally:
        engine.close()
        for s in servers.values():
            s.close()


@pytest.mark.parametrize("variant,interface", [("v1-off", "legacy"), ("v1-on", "v1"), ("hybrid", "v1")])
def test_a_frozen_redis_member_never_stalls_sglangs_controller_and_it_recovers(run, variant, interface):
    out, timeline = run
    t = timeline[variant]
    for rank in (0, 1):
        r = out[(rank, variant)]
        assert r.interface == interface
        # No call raises; none outlives its deadline + 20 ms (+ what the process was kept from running).
        assert [c for c in r.calls if c[3]] == []
        late = [(name, round(dur * 1000)) for name, _t, dur, _e in r.calls
                if dur > DEADLINES[OP_DEADLINE[name]] / 1000 + SLACK_S + r.lag]
        assert late == [], f"rank {rank}: calls over their bound (lag {r.lag * 1000:.0f} ms): {late}"
        assert [c for c in r.calls if t["freeze"] <= c[1] <= t["thaw"]], "the controller stopped calling storage"
        # Every loaded page byte-exact, before, during and after.
        its = r.iterations
        assert all(it["exact"] for it in its)
        before = [it for it in its if it["t1"] < t["freeze"]]
        assert before and all(it["backed"] == it["tokens"] == it["loaded"] for it in before)
        # Within 5 s of the freeze (the failover) and of the thaw, backups and prefetches complete again.
        for since in (t["freeze"], t["thaw"]):
            again = [it for it in its if it["t0"] >= since and it["backed"] == it["tokens"] == it["loaded"]]
            assert again and again[0]["t1"] - since <= 5.0, f"rank {rank}: nothing complete within 5 s of {since}"
        assert r.status["active"] == "standby"  # failed over, and failback is manual by default
        assert any(e["to"] == "circuit_broken" and e["backend"] == "primary" for e in r.status["events"])
        if variant == "hybrid":  # SGLang's v2 calls, for the SWA state and the indexer pages
            assert {"batch_exists_v2", "batch_get_v2", "batch_set_v2"} <= {c[0] for c in r.calls}
            assert all(it["swa_loaded"] for it in before)


def test_mla_pages_written_by_one_rank_are_loaded_by_both_through_sglangs_controller(run):
    out, _ = run
    for rank in (0, 1):
        its = out[(rank, "mla")].iterations
        assert its and all(it["exact"] for it in its)
        assert all(it["loaded"] == it["tokens"] for it in its)  # rank 1 loads what rank 0 wrote
