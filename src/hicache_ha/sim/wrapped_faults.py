"""SGLang's own Mooncake, 3FS and S3 (SeaweedFS) backends behind HAStorage under SGLang's real controller,
while their servers are frozen (SIGSTOP), killed (SIGKILL) and restarted empty, and SGLang started with the
Mooncake master down. One run of the whole matrix, shared by ``tests/wrapped/test_faults.py`` (which
asserts on it) and ``bench/wrapped.py`` (which reports it).

Each fault, on two rank processes (TP = 2, gloo), with an in-memory standby behind the wrapped
primary: the ranks serve ~2 s, the server is frozen for ``freeze_s``, then killed and restarted empty, and
the run waits for the primary to be healthy again on both ranks.
"""

from __future__ import annotations

import os
import queue
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from .lag import SLACK_S
from .sglang_engine import OP_DEADLINE, SGLangEngine, ha_spec
from .storage_servers import Hf3fsMetadataServer, MooncakeMaster, S3Server

# (freeze seconds, seconds to wait for the member's recovery after the restart)
FAULTS = {"mooncake": (40.0, 30.0), "hf3fs": (8.0, 30.0), "seaweedfs": (8.0, 30.0)}
LATE = "mooncake-late"
MOONCAKE_DOWN_S = 6.0  # the start-up case: the master comes up this long after the engine

# The engine's deadlines in these runs. An S3 store answers an exists with one HEAD request per key: it
# gets the deadlines an operator of one would give it.
DEADLINES = {"exists": 50, "get": 300, "set": 500}
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


@dataclass
class Run:
    results: dict  # (rank, spec name) -> RankResult
    timeline: dict  # spec name -> {"freeze", "freeze_wall", "restart", "restart_wall", "recovered"} or the late case's
    events: list = field(default_factory=list)  # (rank, spec name, event dict)

    def first(self, rank: int, name: str, since_wall: float, **match) -> float:
        """Seconds from ``since_wall`` to the rank's first event of ``name`` matching ``match`` (inf: none)."""
        times = [e["time"] for r, n, e in self.events if r == rank and n == name and e["time"] >= since_wall
                 and all(e.get(k) == v for k, v in match.items())]
        return min(times) - since_wall if times else float("inf")

    def both(self, name: str, since_wall: float, **match) -> float:
        """Seconds from ``since_wall`` until both ranks had such an event."""
        return max(self.first(r, name, since_wall, **match) for r in (0, 1))

    def serving(self, kind: str) -> float:
        """When (monotonic) both ranks were last served by their primary before the freeze: after its start-up
        (built, proven healthy, and taken back from the standby if that stood in meanwhile). SGLang agrees on
        hits with a MIN all-reduce, so a page is a hit only once both ranks serve it."""
        t, walls = self.timeline[kind], []
        for rank in (0, 1):
            last = max((e for r, n, e in self.events if r == rank and n == kind and e["time"] < t["freeze_wall"]),
                       key=lambda e: e["time"])
            serving = last["backend"] == "primary" and (last["to"] == "healthy" or last["reason"] == "failback")
            if not serving:
                raise AssertionError(f"{kind}: rank {rank}'s primary was not serving before the fault: {last}")
            walls.append(last["time"])
        return t["freeze"] + max(walls) - t["freeze_wall"]

    def late_calls(self, rank: int, kind: str) -> list:
        """Calls of the rank over their bound: deadline + the contract's slack + the rank's measured lag."""
        r, limits = self.results[(rank, kind)], deadlines(kind)
        return [(name, round(dur * 1000)) for name, _t, dur, _e in r.calls
                if dur > limits[OP_DEADLINE[name]] / 1000 + SLACK_S + r.lag]


def run(*, freeze_scale: float = 1.0, log=lambda _m: None) -> Run:
    """The whole matrix, one fault after another in the same two rank processes."""
    servers = {"mooncake": MooncakeMaster(lease_ms=100).start(), "hf3fs": Hf3fsMetadataServer().start(),
               "seaweedfs": S3Server().start()}
    late = MooncakeMaster(lease_ms=100)  # not started: the master is down when the engine starts
    saved = os.environ.get("SGLANG_HICACHE_HF3FS_CONFIG_PATH")
    engine = None
    with tempfile.TemporaryDirectory(prefix="hicache-ha-3fs-") as data:
        try:
            # The spawned ranks read the 3FS client settings from their environment (one data file per rank).
            os.environ["SGLANG_HICACHE_HF3FS_CONFIG_PATH"] = servers["hf3fs"].config_file(data)
            specs = [ha_spec("mooncake", ha({"backend": "mooncake", "extra_config": servers["mooncake"].extra_config()})),
                     ha_spec("hf3fs", ha({"backend": "hf3fs", "extra_config": {"use_mock_hf3fs_client": True}})),
                     ha_spec("seaweedfs", ha({"backend": "seaweedfs",
                                              "extra_config": servers["seaweedfs"].extra_config()})),
                     ha_spec(LATE, ha({"backend": "mooncake", "extra_config": late.extra_config()}, standby=False))]
            engine = SGLangEngine(specs, live=True, quiet=True).start()
            live = Live(engine)
            timeline: dict[str, dict] = {}
            for spec in specs:
                if not engine.wait_ready(spec.name):
                    raise RuntimeError(f"{spec.name}: the ranks did not get going (see their output)")
                live.pump(2.0)
                t = timeline[spec.name] = {}
                if spec.name == LATE:
                    log(f"{LATE}: the master comes up {MOONCAKE_DOWN_S:.0f} s after the engine")
                    t["up"], t["up_wall"] = time.monotonic() + MOONCAKE_DOWN_S, time.time() + MOONCAKE_DOWN_S
                    live.pump(MOONCAKE_DOWN_S)
                    late.start()
                    t["joined"] = live.wait(spec.name, t["up_wall"], 30.0, backend="primary", to="healthy")
                    live.pump(3.0)
                else:
                    freeze_s, recover_s = FAULTS[spec.name]
                    freeze_s *= freeze_scale
                    log(f"{spec.name}: server frozen {freeze_s:.0f} s, then killed and restarted empty")
                    server = servers[spec.name]
                    t["freeze"], t["freeze_wall"] = time.monotonic(), time.time()
                    server.freeze()
                    live.pump(freeze_s)
                    t["restart"], t["restart_wall"] = time.monotonic(), time.time()
                    server.kill()
                    server.start()
                    t["up_wall"] = time.time()  # 3FS's metadata server imports SGLang: seconds to start
                    t["recovered"] = live.wait(spec.name, t["restart_wall"], recover_s, backend="primary",
                                               to="healthy")
                    live.pump(2.0)
                engine.stop(spec.name)
            return Run(engine.results(), timeline, live.events)
        finally:
            if engine is not None:
                engine.close()
            for s in [*servers.values(), late]:
                s.close()
            if saved is None:
                os.environ.pop("SGLANG_HICACHE_HF3FS_CONFIG_PATH", None)
            else:
                os.environ["SGLANG_HICACHE_HF3FS_CONFIG_PATH"] = saved


def _ms(seconds: float) -> float | None:
    return None if seconds == float("inf") else round(seconds * 1000, 1)


def summary(r: Run) -> dict:
    """What an operator reads off the run, per fault (both ranks together)."""
    rows = {}
    for kind in FAULTS:
        t = r.timeline[kind]
        ranks = [r.results[(rank, kind)] for rank in (0, 1)]
        frozen = [c[2] for rr in ranks for c in rr.calls if t["freeze"] <= c[1] <= t["restart"]]
        during = [it for rr in ranks for it in rr.iterations if t["freeze"] <= it["t0"] and it["t1"] <= t["restart"]]
        rows[kind] = {
            "freeze_s": round(t["restart"] - t["freeze"], 1),
            "to_standby_ms": _ms(r.both(kind, t["freeze_wall"], to="standby", **{"from": "primary"})),
            "calls_while_frozen": len(frozen),
            "call_p99_ms": round(statistics.quantiles(frozen, n=100)[98] * 1000, 1) if len(frozen) > 1 else None,
            "call_max_ms": round(max(frozen, default=0) * 1000, 1),
            "over_bound": sum(len(r.late_calls(rank, kind)) for rank in (0, 1)),
            "exceptions": sum(1 for rr in ranks for c in rr.calls if c[3]),
            "wrong_pages": sum(1 for rr in ranks for it in rr.iterations if not it["exact"]),
            "full_hits_while_frozen": round(sum(it["loaded"] == it["tokens"] for it in during) / max(1, len(during)), 3),
            "restart_to_healthy_s": round(r.both(kind, t["restart_wall"], backend="primary", to="healthy"), 2),
            "up_to_healthy_s": round(r.both(kind, t["up_wall"], backend="primary", to="healthy"), 2),
            "lag_ms": round(max(rr.lag for rr in ranks) * 1000),
        }
    t = r.timeline[LATE]
    ranks = [r.results[(rank, LATE)] for rank in (0, 1)]
    rows[LATE] = {
        "down_s": MOONCAKE_DOWN_S,
        "iterations_while_down": sum(1 for rr in ranks for it in rr.iterations if it["t1"] < t["up"]),
        "exceptions": sum(1 for rr in ranks for c in rr.calls if c[3]),
        "over_bound": sum(len(r.late_calls(rank, LATE)) for rank in (0, 1)),
        "up_to_healthy_s": round(r.both(LATE, t["up_wall"], backend="primary", to="healthy"), 2),
        "dropped_pages": sum(rr.status["backends"][0]["dropped_pages"] for rr in ranks),
    }
    return rows
