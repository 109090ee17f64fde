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

import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..dataplane import BackendManager, Layout
from .chaos_faults import (SCENARIOS, Blackhole, ConnectionResets, DiskFull, DiskReadOnly, ErrorBurst, Flapping,
                           LossyLink, Scenario, SentinelPromotion, SigKill, SigStop, SlowLink)
from .chaos_report import Row, markdown, to_json
from .engine import Simulation, percentile
from .lag import SLACK_S, LagProbe
from .workload import Workload

# The scenarios (``chaos_faults``) and the report (``chaos_report``) are importable from here too.
__all__ = ["DEADLINES", "LONG", "PAGE", "SCENARIOS", "SGLANG_SCENARIOS", "SHORT", "Blackhole", "ConnectionResets",
           "DiskFull", "DiskReadOnly", "ErrorBurst", "Flapping", "LossyLink", "Profile", "Row", "Scenario",
           "SentinelPromotion", "SigKill", "SigStop", "SlowLink", "Stress", "markdown", "run_scenario", "run_sglang",
           "to_json"]

DEADLINES = {"exists": 50, "get": 300, "set": 500}
PAGE = 16 * 1024


@dataclass
class Profile:
    steady_s: float
    fault_s: float
    after_s: float


SHORT = Profile(steady_s=1.5, fault_s=3.0, after_s=2.0)
LONG = Profile(steady_s=5.0, fault_s=20.0, after_s=10.0)


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


def run_scenario(cls: type[Scenario], profile: Profile = SHORT, *, ranks: int = 2,
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


def run_sglang(scenarios: list[type[Scenario]] = SGLANG_SCENARIOS, profile: Profile = SHORT, *,
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
        bad_pages=sum(it["bad_pages"] for rr in rank_results for it in rr.iterations),
        dropped_writes=sum((rr.status or {}).get("dropped_writes", 0) for rr in rank_results), calls=len(lat),
        stress=stressed, served_within_s=scenario.served_within_s, engine="sglang",
        calls_during_fault=sum(1 for rr in rank_results for _m, t0, _s, _e in rr.calls if window[0] <= t0 <= window[1]),
    )
