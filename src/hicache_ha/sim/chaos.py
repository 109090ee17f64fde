"""Chaos: the engine against real faults on real processes, with the CPUs busy.

Each scenario starts its own servers, runs two engine ranks through the data plane (a primary and a
standby member each), makes one fault, heals it, and reports what the engine saw: time to detect, time
until every rank is served again (by the standby, or by another instance of the primary's cluster),
healthy members tripped (must be none), engine-visible latency percentiles, errors and wrong pages
(must be none), writes dropped. ``stress-ng`` loads every core meanwhile, as an inference host is
always busy.

The engine is the simulator (``run_scenario``: every fault) or SGLang's own HiCacheController in two
rank processes (``run_sglang``: TP = 2 over gloo, HAStorage built by SGLang's factory; the faults in
``SGLANG_SCENARIOS``), whose every storage call is timed on the rank.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from ..dataplane import BackendManager, Layout
from .engine import Simulation, percentile
from .lag import SLACK_S, LagProbe
from .netns import NetnsHost
from .proxy import FaultProxy
from .servers import RedisServer, SentinelCluster
from .workload import Workload

DEADLINES = {"exists": 50, "get": 300, "set": 500}
PAGE = 16 * 1024


@dataclass
class Profile:
    steady_s: float
    fault_s: float
    after_s: float


SHORT = Profile(steady_s=1.5, fault_s=3.0, after_s=2.0)
LONG = Profile(steady_s=5.0, fault_s=20.0, after_s=10.0)


@dataclass
class Row:
    """What one scenario did to the engine. Times in ms from the fault; None: it did not happen."""

    fault: str
    expect: str
    detect_ms: Optional[float]
    served_ms: Optional[float]
    healthy_tripped: list[str]
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    bound_ms: float
    lag_ms: float  # the longest this process was kept from running while the scenario ran
    over_own_deadline: int  # calls over their own op's deadline + slack + the measured lag
    errors: int
    bad_pages: int
    dropped_writes: int
    calls: int
    stress: bool
    served_within_s: float = 2.0
    engine: str = "sim"  # sim: the simulator's ranks; sglang: SGLang's own HiCacheController
    calls_during_fault: Optional[int] = None  # storage calls the engine made while the fault lasted

    def problems(self) -> list[str]:
        """What breaks the promises: errors, wrong pages, healthy members tripped, a rank not served
        again in time, calls slower than the bound beyond what the machine's own lag explains."""
        served_within_s = self.served_within_s
        out = []
        if self.errors:
            out.append(f"{self.errors} errors reached the engine")
        if self.bad_pages:
            out.append(f"{self.bad_pages} pages failed verification")
        if self.healthy_tripped:
            out.append(f"healthy members tripped: {self.healthy_tripped}")
        if self.expect in ("failover", "cluster") and (self.served_ms is None or self.served_ms > served_within_s * 1000):
            out.append(f"not served again within {served_within_s} s (served_ms={self.served_ms})")
        if self.p99_ms > self.bound_ms:
            out.append(f"p99 {self.p99_ms:.1f} ms over the bound {self.bound_ms:.0f} ms")
        if self.over_own_deadline:
            out.append(f"{self.over_own_deadline} calls over their own deadline + {SLACK_S * 1000:.0f} ms + the "
                       f"measured lag ({self.lag_ms:.0f} ms)")
        if self.max_ms > self.bound_ms + self.lag_ms:
            out.append(f"max {self.max_ms:.1f} ms over the bound plus the measured lag ({self.lag_ms:.0f} ms)")
        return out


class Scenario:
    """One fault on the primary. ``expect``: ``failover`` (the standby serves), ``cluster`` (another
    instance of the primary's cluster serves), or ``any`` (a partial fault, after which staying or
    moving are both right; only the engine's view is judged)."""

    name = "scenario"
    expect = "failover"
    faulty = "primary"  # the member the fault is made on; any other member tripping is a false trip
    served_within_s = 2.0  # every rank served again (by the standby, or its cluster) this soon

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def members(self) -> list[dict]:
        """Start what the scenario needs; return the backend sections (primary first)."""
        raise NotImplementedError

    def config(self) -> dict:
        return {}

    def inject(self) -> None:
        raise NotImplementedError

    def heal(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def file_standby(self) -> dict:
        return {"name": "standby", "type": "file", "path": os.path.join(self.workdir, "standby")}


class _RedisPrimary(Scenario):
    def members(self) -> list[dict]:
        self.server = RedisServer().start()
        return [{"name": "primary", "type": "redis", "url": self.server.url, "socket_timeout_ms": 1000},
                self.file_standby()]

    def close(self) -> None:
        self.server.close()


class SigKill(_RedisPrimary):
    name = "SIGKILL"

    def inject(self) -> None:
        self.server.kill()

    def heal(self) -> None:
        self.server.start()


class SigStop(_RedisPrimary):
    name = "SIGSTOP"

    def inject(self) -> None:
        self.server.freeze()

    def heal(self) -> None:
        self.server.thaw()


class ErrorBurst(_RedisPrimary):
    """Every command refused (the server starts asking for a password it was never given)."""

    name = "error burst (NOAUTH)"

    def inject(self) -> None:
        with self.server.client() as c:
            c.config_set("requirepass", "chaos")
            c.client_kill_filter(_type="normal", skipme=True)  # open connections would stay authenticated

    def heal(self) -> None:
        with self.server.client(password="chaos") as c:
            c.config_set("requirepass", "")


class Flapping(_RedisPrimary):
    """The primary goes down and comes back every ``period`` seconds while the fault lasts."""

    name = "flapping (down/up every 1 s)"
    period = 1.0

    def inject(self) -> None:
        self._stop = threading.Event()

        def flap() -> None:
            while not self._stop.is_set():
                self.server.kill()
                if self._stop.wait(self.period):
                    break
                self.server.start()
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=flap, name="chaos-flap", daemon=True)
        self._thread.start()

    def heal(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.server.proc is None or self.server.proc.poll() is not None:
            self.server.start()


class _ProxiedPrimary(Scenario):
    def members(self) -> list[dict]:
        self.server = RedisServer().start()
        self.proxy = FaultProxy("127.0.0.1", self.server.port).start()
        return [{"name": "primary", "type": "redis", "url": f"redis://{self.proxy.address}/0",
                 "socket_timeout_ms": 1000}, self.file_standby()]

    def heal(self) -> None:
        self.proxy.set("pass")

    def close(self) -> None:
        self.proxy.close()
        self.server.close()


class SlowLink(_ProxiedPrimary):
    name = "slow link (+300 ms each way)"

    def inject(self) -> None:
        self.proxy.set("latency", delay=0.3)


class LossyLink(_ProxiedPrimary):
    """Packet loss as TCP shows it: 20 % of the chunks stall for a 400 ms retransmission timeout."""

    name = "lossy link (20 % stalls of 400 ms)"
    expect = "any"

    def inject(self) -> None:
        self.proxy.set("lossy", loss=0.2, stall=0.4)


class ConnectionResets(_ProxiedPrimary):
    name = "connection resets"

    def inject(self) -> None:
        self.proxy.set("reset")


class Blackhole(Scenario):
    """The primary on another (virtual) host; a firewall there drops every packet to it."""

    name = "network blackhole (iptables DROP)"

    def members(self) -> list[dict]:
        self.host = NetnsHost().start()
        self.server = RedisServer(host=self.host.host, launcher=self.host.launcher).start()
        return [{"name": "primary", "type": "redis", "url": self.server.url, "socket_timeout_ms": 1000,
                 "connect_timeout_ms": 200}, self.file_standby()]

    def inject(self) -> None:
        self.host.blackhole(self.server.port)

    def heal(self) -> None:
        self.host.restore(self.server.port)

    def close(self) -> None:
        self.server.close()
        self.host.close()


class _TmpfsPrimary(Scenario):
    """A file primary on a small tmpfs of its own (its capacity set below the disk's size, as an operator
    would); the standby is a redis-server. Whether the primary trips depends on how much of the traffic
    fails: reads are still served, so either way is right, as long as nothing reaches the engine."""

    expect = "any"
    size = 64 << 20

    def members(self) -> list[dict]:
        self.mount = os.path.join(self.workdir, "disk")
        os.makedirs(self.mount)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", self.mount], check=True,
                       capture_output=True)
        self.server = RedisServer().start()
        return [{"name": "primary", "type": "file", "path": os.path.join(self.mount, "pages"),
                 "capacity_bytes": self.size * 3 // 4},
                {"name": "standby", "type": "redis", "url": self.server.url}]

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.mount], capture_output=True)
        self.server.close()


class DiskFull(_TmpfsPrimary):
    """Every byte of the disk taken: writes fail (ENOSPC), pages already there are still read."""

    name = "disk full (ENOSPC)"

    def inject(self) -> None:
        self.filler = os.path.join(self.mount, "filler")
        with open(self.filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass

    def heal(self) -> None:
        os.unlink(self.filler)


class DiskReadOnly(_TmpfsPrimary):
    name = "disk turns read-only (EROFS)"

    def inject(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", self.mount], check=True, capture_output=True)

    def heal(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", self.mount], check=True, capture_output=True)


class SentinelPromotion(Scenario):
    """The master dies; the Sentinels promote its replica; the rank stays in its cluster."""

    name = "Sentinel promotion"
    expect = "cluster"
    served_within_s = 6.0  # Sentinel's own down-after (500 ms here) and election come first

    def members(self) -> list[dict]:
        self.cluster = SentinelCluster(down_after_ms=500, failover_timeout_ms=3000).start()
        return [{"name": "primary", "type": "redis", "sentinel": {"master": self.cluster.master_name,
                                                                  "addresses": self.cluster.addresses}},
                self.file_standby()]

    def config(self) -> dict:
        return {"failover": {"cluster_patience_ms": 10_000}}

    def inject(self) -> None:
        self.cluster.master.kill()

    def heal(self) -> None:
        pass  # the old master stays dead; the cluster carries on with the promoted replica

    def close(self) -> None:
        self.cluster.close()


SCENARIOS: list[type[Scenario]] = [SigKill, SigStop, Blackhole, SlowLink, LossyLink, ConnectionResets, ErrorBurst,
                                   DiskFull, DiskReadOnly, SentinelPromotion, Flapping]


class Stress:
    """``stress-ng --cpu N`` in the background for as long as the context lasts (a no-op without it)."""

    def __init__(self, cpus: int = 0) -> None:
        self.cpus = cpus or os.cpu_count() or 2
        self.proc: Optional[subprocess.Popen] = None

    @property
    def available(self) -> bool:
        return shutil.which("stress-ng") is not None

    def __enter__(self) -> "Stress":
        if self.available:
            self.proc = subprocess.Popen(["stress-ng", "--cpu", str(self.cpus), "--quiet"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def run_scenario(cls: type[Scenario], profile: Profile = SHORT, *, stress: bool = True, ranks: int = 2,
                 log: Callable[[str], None] = lambda _m: None) -> Row:
    workdir = tempfile.mkdtemp(prefix="hicache-ha-chaos-")
    scenario = cls(workdir)
    managers: list[BackendManager] = []
    quiet = logging.getLogger("hicache_ha")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # every abandoned call is a WARNING: the row says it all
    try:
        doc = {"backends": scenario.members(), "deadlines_ms": DEADLINES,
               "health": {"backoff": {"base_ms": 300, "cap_ms": 3000}}, "admin": {"mode": "off"},
               **scenario.config()}
        managers = [BackendManager(doc, Layout(model="chaos", tp_rank=r, tp_size=ranks)) for r in range(ranks)]
        with Stress() as load, LagProbe() as lag:
            sim = Simulation(managers, page_size=PAGE, workload=Workload(conversations=16, seed=11)).start()
            time.sleep(profile.steady_s)
            t_fault = time.time()
            log(f"{scenario.name}: fault")
            scenario.inject()
            time.sleep(profile.fault_s)
            scenario.heal()
            log(f"{scenario.name}: healed")
            # Watch at least as long as the scenario is given to be served again (a Sentinel election can
            # outlast the short profile's fault).
            time.sleep(max(profile.after_s, scenario.served_within_s + 0.5 - profile.fault_s))
            stats = sim.finish()
        events = [e for m in managers for e in m.events.recent(1000) if e.time >= t_fault]
        return _row(scenario, events, t_fault, stats, managers, lag, load.proc is not None)
    finally:
        for m in managers:
            m.close()
        scenario.close()
        shutil.rmtree(workdir, ignore_errors=True)
        quiet.setLevel(level)


def _row(scenario: Scenario, events: list, t_fault: float, stats, managers: list[BackendManager], lag: LagProbe,
         stressed: bool) -> Row:
    def first(pred) -> Optional[float]:
        times = [e.time for e in events if pred(e)]
        return (min(times) - t_fault) * 1000 if times else None

    def every_rank(pred) -> Optional[float]:
        per_rank = {}
        for e in events:
            if pred(e):
                per_rank.setdefault(e.rank, (e.time - t_fault) * 1000)
        return max(per_rank.values()) if len(per_rank) == len(managers) else None

    detect = first(lambda e: e.backend == scenario.faulty and e.to_state == "circuit_broken")
    if scenario.expect == "cluster":
        served = every_rank(lambda e: e.reason == "reconnected within its cluster")
    else:
        served = every_rank(lambda e: e.detail.get("role") == "active" and e.to_state == "standby")
    tripped = sorted({f"rank {e.rank} {e.backend}" for e in events
                      if e.to_state == "circuit_broken" and e.backend not in (None, scenario.faulty)})
    lat = [s.seconds * 1000 for s in stats.samples]
    return Row(
        fault=scenario.name, expect=scenario.expect, detect_ms=detect, served_ms=served, healthy_tripped=tripped,
        p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), p999_ms=percentile(lat, 99.9),
        max_ms=max(lat, default=0.0), bound_ms=max(DEADLINES.values()) + SLACK_S * 1000, lag_ms=lag.worst * 1000,
        over_own_deadline=sum(1 for s in stats.samples if s.seconds > DEADLINES[s.op] / 1000 + SLACK_S + lag.worst),
        errors=stats.errors_surfaced, bad_pages=stats.verify_failures,
        dropped_writes=sum(m.dropped_writes for m in managers), calls=len(lat), stress=stressed,
        served_within_s=scenario.served_within_s,
    )


# The faults run against SGLang's real controller (importing SGLang costs its rank processes tens of
# seconds, so every scenario runs in the same two processes, one after the other).
SGLANG_SCENARIOS: list[type[Scenario]] = [SigKill, SigStop]


def run_sglang(scenarios: list[type[Scenario]] = SGLANG_SCENARIOS, profile: Profile = SHORT, *, stress: bool = True,
               ranks: int = 2, log: Callable[[str], None] = lambda _m: None) -> list[Row]:
    """Each scenario against SGLang's own HiCacheController (``sglang_engine``): one row each. The ranks
    are started (SGLang imported) before stress-ng, which then loads every core from the steady phase of
    each scenario to its end."""
    from .sglang_engine import SGLangEngine, ha_spec

    workdirs, instances, specs = [], [], []
    engine: Optional[SGLangEngine] = None
    done = threading.Event()
    events: list[tuple[int, str, dict]] = []  # (rank, spec name, event dict), as the ranks send them
    try:
        for i, cls in enumerate(scenarios):
            workdirs.append(tempfile.mkdtemp(prefix="hicache-ha-chaos-sglang-"))
            instances.append(cls(workdirs[-1]))
            doc = {"backends": instances[-1].members(), "deadlines_ms": DEADLINES,
                   "health": {"backoff": {"base_ms": 300, "cap_ms": 3000}}, "admin": {"mode": "off"},
                   **instances[-1].config()}
            specs.append(ha_spec(f"{i}: {cls.name}", doc))
        engine = SGLangEngine(specs, ranks, live=True, quiet=True).start()

        def pump() -> None:  # the live queue must be read, or a full pipe blocks the ranks
            while not done.is_set():
                try:
                    kind, rank, name, data = engine.live.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "event":
                    events.append((rank, name, data))

        pumper = threading.Thread(target=pump, name="chaos-sglang-live", daemon=True)
        pumper.start()
        runs = []
        for scenario, spec in zip(instances, specs):
            if not engine.wait_ready(spec.name):
                raise RuntimeError(f"SGLang's ranks did not start {spec.name} (is the sglang wheel installed?)")
            with Stress() as load:
                time.sleep(profile.steady_s)
                t_fault, fault_start = time.time(), time.monotonic()
                log(f"{scenario.name} (SGLang's controller): fault")
                scenario.inject()
                time.sleep(profile.fault_s)
                fault_end = time.monotonic()
                scenario.heal()
                log(f"{scenario.name} (SGLang's controller): healed")
                time.sleep(max(profile.after_s, scenario.served_within_s + 0.5 - profile.fault_s))
                engine.stop(spec.name)
            runs.append((t_fault, (fault_start, fault_end), load.proc is not None))
        results = engine.results()
        done.set()
        pumper.join(5)
        return [_sglang_row(scenario, spec.name, t_fault, window, stressed, results, events, ranks)
                for scenario, spec, (t_fault, window, stressed) in zip(instances, specs, runs)]
    finally:
        done.set()
        if engine is not None:
            engine.close()
        for scenario in instances:
            scenario.close()
        for w in workdirs:
            shutil.rmtree(w, ignore_errors=True)


def _sglang_row(scenario: Scenario, name: str, t_fault: float, window: tuple[float, float], stressed: bool,
                results: dict, events: list, ranks: int) -> Row:
    from .sglang_engine import OP_DEADLINE

    evs = [e for rank, n, e in events if n == name and e["time"] >= t_fault]

    def per_rank(pred) -> dict[int, float]:
        firsts: dict[int, float] = {}
        for e in sorted(evs, key=lambda e: e["time"]):
            if pred(e):
                firsts.setdefault(e["rank"], (e["time"] - t_fault) * 1000)
        return firsts

    detect = per_rank(lambda e: e["backend"] == scenario.faulty and e["to"] == "circuit_broken")
    served = per_rank(lambda e: e.get("detail", {}).get("role") == "active" and e["to"] == "standby")
    tripped = sorted({f"rank {e['rank']} {e['backend']}" for e in evs
                      if e["to"] == "circuit_broken" and e["backend"] not in (None, scenario.faulty)})
    rank_results = [results[(r, name)] for r in range(ranks)]
    # (ms, seconds over its own op's deadline + the contract's slack + its rank's measured lag)
    calls = [(seconds * 1000, seconds - DEADLINES[OP_DEADLINE[method]] / 1000 - SLACK_S - rr.lag, error)
             for rr in rank_results for method, _t0, seconds, error in rr.calls]
    lat = [ms for ms, _over, _e in calls]
    return Row(
        fault=scenario.name, expect=scenario.expect, detect_ms=min(detect.values(), default=None),
        served_ms=max(served.values()) if len(served) == ranks else None, healthy_tripped=tripped,
        p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), p999_ms=percentile(lat, 99.9),
        max_ms=max(lat, default=0.0), bound_ms=max(DEADLINES.values()) + SLACK_S * 1000,
        lag_ms=max(rr.lag for rr in rank_results) * 1000,
        over_own_deadline=sum(1 for _ms, over, _e in calls if over > 0),
        errors=sum(1 for _ms, _over, e in calls if e is not None),
        bad_pages=sum(it.get("bad_pages", not it["exact"]) for rr in rank_results for it in rr.iterations),
        dropped_writes=sum((rr.status or {}).get("dropped_writes", 0) for rr in rank_results), calls=len(lat),
        stress=stressed, served_within_s=scenario.served_within_s, engine="sglang",
        calls_during_fault=sum(1 for rr in rank_results for _m, t0, _s, _e in rr.calls if window[0] <= t0 <= window[1]),
    )


def markdown(rows: list[Row]) -> str:
    def ms(v: Optional[float]) -> str:
        return "—" if v is None else f"{v:.0f}"

    lines = ["| fault | expected | detect ms | served again ms | healthy tripped | p50 / p99 / p99.9 / max ms "
             "| errors | bad pages | writes dropped |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        fault = r.fault + (" (SGLang's HiCacheController)" if r.engine == "sglang" else "")
        lines.append(f"| {fault} | {r.expect} | {ms(r.detect_ms)} | {ms(r.served_ms)} | {len(r.healthy_tripped)} | "
                     f"{r.p50_ms:.1f} / {r.p99_ms:.1f} / {r.p999_ms:.1f} / {r.max_ms:.1f} | {r.errors} | "
                     f"{r.bad_pages} | {r.dropped_writes} |")
    return "\n".join(lines)


def to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
