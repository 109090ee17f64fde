"""SGLang's own Mooncake, 3FS and S3 (SeaweedFS) backends behind HAStorage, driven by SGLang 0.5.23's real
HiCacheController in two rank processes (TP = 2, gloo), while their servers are frozen (SIGSTOP), killed
(SIGKILL) and restarted empty. What SGLang's threads see is what is checked: every storage call returns
within its deadline + 20 ms, none raises, every loaded page is byte-exact, the ranks serve from the
standby within 1 s of the freeze, and the wrapped member is healthy again after the restart. Unprotected,
the same backends block SGLang's threads for 30 s (Mooncake), as long as the freeze lasts (3FS) or 200 s
(S3), and 3FS and S3 never recover from the restart by themselves."""

from __future__ import annotations

import os
import queue
import time

import pytest

from hicache_ha.sim.lag import SLACK_S
from hicache_ha.sim.sglang_engine import SGLangEngine, ha_spec
from hicache_ha.sim.storage_servers import Hf3fsMetadataServer, MooncakeMaster, S3Server
from tests.sglang.test_controller import DEADLINES, OP_DEADLINE

# (freeze seconds, seconds to wait for the member's recovery after the restart)
FAULTS = {"mooncake": (40.0, 30.0), "hf3fs": (8.0, 30.0), "seaweedfs": (8.0, 30.0)}
MOONCAKE_DOWN_S = 6.0  # the start-up case: the master comes up this long after the engine


# An S3 store answers an exists with one HEAD request per key: it gets the deadlines an operator of one
# would give it.
S3_DEADLINES = {"exists": 500, "get": 1000, "set": 1000}


def deadlines(kind: str) -> dict:
    return S3_DEADLINES if kind == "seaweedfs" else DEADLINES


def ha(primary: dict, *, standby: bool = True) -> dict:
    backends = [{"name": "primary", "type": "sglang", **primary}]
    if standby:
        backends.append({"name": "standby", "type": "memory"})
    return {"admin": {"mode": "off"}, "deadlines_ms": deadlines(primary["backend"]), "backends": backends,
            "health": {"backoff": {"base_ms": 300, "cap_ms": 2000}}}


class Live:
    """The ranks' events as they happen (the live queue must be read, or a full pipe blocks the ranks)."""

    def __init__(self, engine: SGLangEngine) -> None:
        self.engine = engine
        self.events: list[tuple[int, str, dict]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                kind, rank, name, data = self.engine.live.get(timeout=min(0.2, left))
            except queue.Empty:
                continue
            if kind == "event":
                self.events.append((rank, name, data))

    def wait(self, name: str, since_wall: float, timeout: float, **match) -> bool:
        """Until both ranks had an event of spec ``name`` after ``since_wall`` matching ``match``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ranks = {r for r, n, e in self.events if n == name and e["time"] >= since_wall
                     and all(e.get(k) == v for k, v in match.items())}
            if ranks >= {0, 1}:
                return True
            self.pump(0.2)
        return False


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    servers = {"mooncake": MooncakeMaster(lease_ms=100).start(), "hf3fs": Hf3fsMetadataServer().start(),
               "seaweedfs": S3Server().start()}
    late = MooncakeMaster(lease_ms=100)  # not started: the master is down when the engine starts
    nixl_dir = tmp_path_factory.mktemp("nixl")
    saved = {k: os.environ.get(k) for k in ("SGLANG_HICACHE_HF3FS_CONFIG_PATH",)}
    # The spawned ranks read the 3FS client settings from their environment (one data file per rank).
    os.environ["SGLANG_HICACHE_HF3FS_CONFIG_PATH"] = servers["hf3fs"].config_file(str(nixl_dir))
    specs = [ha_spec("mooncake", ha({"backend": "mooncake", "extra_config": servers["mooncake"].extra_config()})),
             ha_spec("hf3fs", ha({"backend": "hf3fs", "extra_config": {"use_mock_hf3fs_client": True}})),
             ha_spec("seaweedfs", ha({"backend": "seaweedfs", "extra_config": servers["seaweedfs"].extra_config()})),
             ha_spec("mooncake-late", ha({"backend": "mooncake", "extra_config": late.extra_config()}, standby=False))]
    engine = SGLangEngine(specs, live=True, quiet=True).start()
    live = Live(engine)
    timeline: dict[str, dict] = {}
    try:
        for spec in specs:
            assert engine.wait_ready(spec.name), "the ranks did not get going (see their output)"
            live.pump(2.0)
            t = timeline[spec.name] = {}
            if spec.name == "mooncake-late":
                t["up"], t["up_wall"] = time.monotonic() + MOONCAKE_DOWN_S, time.time() + MOONCAKE_DOWN_S
                live.pump(MOONCAKE_DOWN_S)
                late.start()
                t["joined"] = live.wait(spec.name, t["up_wall"], 30.0, backend="primary", to="healthy")
                live.pump(3.0)
            else:
                freeze_s, recover_s = FAULTS[spec.name]
                server = servers[spec.name]
                t["freeze"], t["freeze_wall"] = time.monotonic(), time.time()
                server.freeze()
                live.pump(freeze_s)
                t["restart"], t["restart_wall"] = time.monotonic(), time.time()
                server.kill()
                server.start()
                t["recovered"] = live.wait(spec.name, t["restart_wall"], recover_s, backend="primary", to="healthy")
                live.pump(2.0)
            engine.stop(spec.name)
        results = engine.results()
        yield results, timeline, live.events
    finally:
        engine.close()
        for s in [*servers.values(), late]:
            s.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _late(r, kind: str = "mooncake") -> list:
    limits = deadlines(kind)
    return [(name, round(dur * 1000)) for name, _t, dur, _e in r.calls
            if dur > limits[OP_DEADLINE[name]] / 1000 + SLACK_S + r.lag]


def _first(events, rank, name, since_wall, **match) -> float:
    times = [e["time"] for r, n, e in events if r == rank and n == name and e["time"] >= since_wall
             and all(e.get(k) == v for k, v in match.items())]
    return min(times) - since_wall if times else float("inf")


def _serving(events, t: dict, kind: str) -> float:
    """When (monotonic) the later of the two ranks first had its primary healthy at start-up. SGLang agrees
    on hits with a MIN all-reduce, so a page is a hit only once both ranks serve it."""
    walls = [min(e["time"] for r, n, e in events if r == rank and n == kind and e["backend"] == "primary"
                 and e["to"] == "healthy") for rank in (0, 1)]
    return t["freeze"] + max(walls) - t["freeze_wall"]


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_frozen_then_killed_and_restarted_server_never_stalls_sglang_and_the_member_comes_back(run, kind):
    out, timeline, events = run
    t = timeline[kind]
    assert t["recovered"], f"{kind}: the member was not healthy on both ranks within {FAULTS[kind][1]} s of the restart"
    for rank in (0, 1):
        r = out[(rank, kind)]
        assert r.interface == "v1"
        assert [c for c in r.calls if c[3]] == [], "an exception reached SGLang's controller"
        assert _late(r, kind) == [], f"rank {rank}: calls over their bound (lag {r.lag * 1000:.0f} ms)"
        its = r.iterations
        assert its and all(it["exact"] for it in its), "a loaded page was not what was written"
        # Start-up: the member is out of traffic until it is built and proven (reads miss, writes are
        # dropped); from the moment both ranks have it healthy, every page goes to it and comes back.
        before = [it for it in its if _serving(events, t, kind) < it["t0"] and it["t1"] < t["freeze"]]
        assert before and all(it["backed"] == it["tokens"] == it["loaded"] for it in before)
        # On the standby within 1 s of the freeze; SGLang's threads complete backups and prefetches again.
        assert _first(events, rank, kind, t["freeze_wall"], to="standby", **{"from": "primary"}) <= 1.0
        during = [it for it in its if t["freeze"] <= it["t0"] and it["t1"] <= t["restart"]]
        assert during and all(it["backed"] == it["tokens"] == it["loaded"] for it in during[1:])
        assert [c for c in r.calls if t["freeze"] <= c[1] <= t["restart"]], "the controller stopped calling storage"
        primary = next(b for b in r.status["backends"] if b["name"] == "primary")
        assert primary["state"] == "healthy" and primary["built"]
        assert r.status["active"] == "standby"  # failback is manual by default


def test_sglang_starts_and_serves_with_the_mooncake_master_down_and_the_member_joins_when_it_comes_up(run):
    out, timeline, events = run
    t = timeline["mooncake-late"]
    assert t["joined"], "the Mooncake member did not become healthy within 30 s of its master coming up"
    for rank in (0, 1):
        r = out[(rank, "mooncake-late")]
        assert [c for c in r.calls if c[3]] == [] and _late(r) == []
        its = r.iterations
        down = [it for it in its if it["t1"] < t["up"]]
        assert len(down) >= 2 and all(it["loaded"] == 0 for it in down)  # it served: reads missed
        joined_at = t["up"] + max(_first(events, r, "mooncake-late", t["up_wall"], backend="primary", to="healthy")
                                  for r in (0, 1))  # a hit needs both ranks (MIN all-reduce)
        after = [it for it in its if it["t0"] > joined_at]
        assert after and all(it["backed"] == it["tokens"] == it["loaded"] and it["exact"] for it in after)
        primary = r.status["backends"][0]
        assert primary["state"] == "healthy" and r.status["active"] == "primary"
        assert primary["dropped_pages"] > 0  # writes while the master was down: dropped and counted
