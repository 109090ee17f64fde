"""`make demo`: two engine ranks through the data plane while the primary fails.

Runs on an embedded default that needs nothing external: it starts its own redis-server as the primary
and freezes it (SIGSTOP / SIGCONT); without redis-server, the primary is a directory that vanishes (as
an unmounted volume would) and comes back. The standby is a file directory in a temp dir. Everything it
started is cleaned up. On a busy machine it says how far any call went over its bound and why. The
engine is the simulator (``sim``) or SGLang's own HiCacheController in two processes (``sglang``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..dataplane import BackendManager, Layout
from ..dataplane.events import Event
from .engine import Sample, SimStats, Simulation, percentile
from .lag import SLACK_S, LagProbe
from .servers import RedisServer, redis_server_path

DEMO_DEADLINES = {"exists": 25, "get": 150, "set": 250}
# Where the demo also writes its summary as JSON (``HICACHE_HA_DEMO_JSON=out.json make demo``): what a
# script or a test checks, rather than the printed prose.
SUMMARY_ENV = "HICACHE_HA_DEMO_JSON"


@dataclass
class Phase:
    name: str
    start: float
    end: float


class Fault:
    """A failure the demo can really make on its primary, and undo."""

    name = "fault"
    healed_name = "healed"

    def inject(self) -> str: ...

    def heal(self) -> str: ...


class FreezeRedis(Fault):
    name, healed_name = "primary frozen", "primary resumed"

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    def inject(self) -> str:
        self.server.freeze()
        return f"SIGSTOP primary redis-server (pid {self.server.proc.pid})"

    def heal(self) -> str:
        self.server.thaw()
        return "SIGCONT primary redis-server"


class VanishDirectory(Fault):
    """The primary's directory disappears and a plain file takes its place, as when a volume is
    unmounted under a running process: every call fails (ENOTDIR) until it comes back."""

    name, healed_name = "primary directory gone", "primary directory back"

    def __init__(self, path: str) -> None:
        self.path = path
        self.aside = path + ".aside"

    def inject(self) -> str:
        os.rename(self.path, self.aside)
        with open(self.path, "w"):
            pass
        return f"primary directory {self.path} replaced by a file (an unmounted volume)"

    def heal(self) -> str:
        os.unlink(self.path)
        os.rename(self.aside, self.path)
        return f"primary directory {self.path} back"


@dataclass
class DemoResult:
    stats: SimStats
    phases: list[Phase]
    bound_ms: float
    fault_name: str
    lag: Any  # LagProbe, or the ranks' own measured lag when they run in other processes
    started: float  # time.monotonic() when the engine started
    snapshots: list[dict] = field(default_factory=list)
    fault_wall: Optional[float] = None  # when the fault was made (time.time())
    heal_wall: Optional[float] = None  # when it was undone
    events: list = field(default_factory=list)
    ranks: int = 0
    engine: str = "sim"

    def per_rank_ms(self, since: Optional[float], **match) -> dict[int, float]:
        """Per rank: ms from ``since`` (a time.time()) to its first event matching ``match`` after it."""
        if since is None:
            return {}
        firsts: dict[int, float] = {}
        for e in self.events:
            d = e.to_dict()
            if e.time >= since and all(d.get(k, e.detail.get(k)) == v for k, v in match.items()):
                firsts.setdefault(e.rank, (e.time - since) * 1000)
        return dict(sorted(firsts.items()))

    def after_fault_ms(self, **match) -> list[float]:
        """Per rank: ms from the fault to the first event matching ``match`` (after the fault)."""
        return list(self.per_rank_ms(self.fault_wall, **match).values())

    def healthy_members_tripped(self) -> list[str]:
        """Members other than the failed primary that went circuit_broken: there should be none."""
        return sorted({f"rank {e.rank} {e.backend}" for e in self.events
                       if e.to_state == "circuit_broken" and e.backend not in (None, "primary")})

    def over_bound(self) -> list:
        return [s for s in self.stats.samples if s.seconds * 1000 > self.bound_ms]

    def worst_lag_ms(self, samples: list) -> float:
        """The longest this process was kept from running while any of ``samples`` ran."""
        start = self.started
        return max((self.lag.worst_between(start + s.t - s.seconds, start + s.t) for s in samples),
                   default=0.0) * 1000

    def summary(self) -> dict:
        """What the demo showed, as data (written as JSON where ``HICACHE_HA_DEMO_JSON`` says). Per-rank
        times are ms from the fault (or from its healing), keyed by rank; a rank missing from one did not
        get there."""
        st = self.stats
        over = self.over_bound()
        return {
            "engine": self.engine,
            "ranks": self.ranks,
            "fault": self.fault_name,
            "fault_at_s": self.phases[1].start,
            "healed_at_s": self.phases[1].end,
            "clean": self.clean,
            "errors": st.errors_surfaced,
            "bad_pages": st.verify_failures,
            "healthy_members_tripped": self.healthy_members_tripped(),
            "primary_circuit_broken_ms": self.per_rank_ms(self.fault_wall, backend="primary", to="circuit_broken"),
            "standby_serving_ms": self.per_rank_ms(self.fault_wall, role="active", to="standby"),
            "primary_healthy_again_ms": self.per_rank_ms(self.heal_wall, backend="primary", to="healthy"),
            "calls": len(st.samples),
            "bound_ms": self.bound_ms,
            "over_bound": len(over),
            "slowest_ms": max((s.seconds * 1000 for s in st.samples), default=0.0),
            "lag_while_over_bound_ms": self.worst_lag_ms(over),
            "requests": st.requests,
            "pages_requested": st.pages_requested,
            "pages_hit": st.pages_hit,
            "pages_written": st.pages_written,
            "phases": self.phase_rows(),
        }

    @property
    def clean(self) -> bool:
        """What makes the demo fail: an error or a wrong page reaching the engine."""
        return self.stats.errors_surfaced == 0 and self.stats.verify_failures == 0

    def phase_rows(self) -> list[dict]:
        rows = []
        for ph in self.phases:
            samples = [s for s in self.stats.samples if ph.start <= s.t < ph.end]
            lat = [s.seconds * 1000 for s in samples]
            asked = sum(a for t, a, _ in self.stats.hits if ph.start <= t < ph.end)
            hit = sum(h for t, _, h in self.stats.hits if ph.start <= t < ph.end)
            rows.append({
                "phase": ph.name,
                "calls": len(samples),
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "p999_ms": percentile(lat, 99.9),
                "max_ms": max(lat, default=0.0),
                "get_ok": sum(1 for s in samples if s.op == "get" and s.ok),
                "hit_rate": hit / asked if asked else 0.0,
            })
        return rows


def demo_config(primary: dict, standby_dir: str) -> dict:
    return {
        "backends": [primary, {"name": "standby", "type": "file", "path": standby_dir}],
        "deadlines_ms": DEMO_DEADLINES,
        "health": {"backoff": {"base_ms": 500, "cap_ms": 4000}},
        "failover": {"failback": "auto", "failback_after_ms": 3000},
        "admin": {"mode": "off"},
    }


def _event_printer(console: Console, started_wall: float):
    def show(event) -> None:
        what = f"{event.from_state} → {event.to_state}"
        if event.detail.get("role") == "active":
            what = f"active: {event.from_state} → {event.to_state}"
            style = "bold cyan"
        else:
            style = {"circuit_broken": "bold red", "recovering": "yellow", "healthy": "bold green"}.get(
                event.to_state, "white")
        who = f" {event.backend}" if event.backend and event.detail.get("role") != "active" else ""
        console.print(f"[{style}]t={event.time - started_wall:5.2f}s  rank {event.rank}{who}: {what}  ({event.reason})[/]")

    return show


def _status(st: SimStats, members: str, phase: str, bound_ms: float, faulty: bool) -> Text:
    recent = st.window(2.0)
    lat = [s.seconds * 1000 for s in recent]
    text = Text()
    text.append(f"t={st.now():5.1f}s  ", style="bold")
    text.append(f"[{phase}]  ", style="yellow" if faulty else "green")
    text.append(f"{len(recent) / 2.0:6.0f} calls/s  hit {st.hit_rate(2.0):5.1%} (last 2 s)  "
                f"p99 {percentile(lat, 99):6.1f} ms  max {max(lat, default=0):6.1f} ms (bound {bound_ms:.0f})  ")
    text.append(f"rank0: {members}  ")
    text.append(f"errors {st.errors_surfaced}  bad pages {st.verify_failures}",
                style="red" if st.errors_surfaced or st.verify_failures else "green")
    return text


def _primary(workdir: str, console: Console) -> tuple[dict, Fault, Optional[RedisServer]]:
    """The primary member and the fault the demo makes on it."""
    if redis_server_path():
        server = RedisServer().start()
        console.print(f"primary: redis-server pid {server.proc.pid} on 127.0.0.1:{server.port}; "
                      f"standby: file {workdir}/standby")
        return ({"name": "primary", "type": "redis", "url": server.url, "socket_timeout_ms": 1000},
                FreezeRedis(server), server)
    os.makedirs(f"{workdir}/primary")
    console.print(f"[yellow]redis-server not found: the primary is the directory {workdir}/primary, "
                  "and the fault is that directory vanishing[/]")
    return {"name": "primary", "type": "file", "path": f"{workdir}/primary"}, VanishDirectory(f"{workdir}/primary"), None


class _SimEngine:
    """The simulator's ranks (threads) over one BackendManager each."""

    def __init__(self, config: dict, ranks: int, page: int, console: Console) -> None:
        self.managers = [BackendManager(config, Layout(model="demo", tp_rank=r, tp_size=ranks, page_bytes=page))
                         for r in range(ranks)]
        self.sim = Simulation(self.managers, page_size=page)
        self.stats = self.sim.stats
        self.console = console

    def start(self, printer_for) -> None:
        self.sim.start()
        printer = printer_for(time.time() - self.stats.now())
        for m in self.managers:
            m.events.subscribe(printer)

    def poll(self) -> None:
        pass

    def members(self) -> str:
        snap = self.managers[0].snapshot()
        return "  ".join(f"{b['name']}={b['state']}{'*' if b['active'] else ''}" for b in snap["backends"])

    def finish(self, lag: LagProbe) -> tuple[list, LagProbe]:
        self.sim.finish()
        events = sorted((e for m in self.managers for e in m.events.recent(1000)), key=lambda e: e.time)
        return events, lag

    def close(self) -> None:
        for m in self.managers:
            m.close()


class _SGLangEngine:
    """SGLang's real HiCacheController in two rank processes (gloo), HAStorage built by its factory."""

    OPS = {"batch_exists": "exists", "batch_get_v1": "get", "batch_set_v1": "set", "batch_get": "get",
           "batch_set": "set"}

    def __init__(self, config: dict, ranks: int, page: int, console: Console) -> None:
        from .sglang_engine import SGLangEngine, ha_spec

        self.engine = SGLangEngine([ha_spec("demo", config)], ranks, live=True, quiet=True)
        self.stats = SimStats()
        self.states: dict[str, str] = {}
        self.active = "primary"
        self.events: list[Event] = []
        self.console = console
        self.printer = None

    def start(self, printer_for) -> None:
        self.console.print("starting SGLang's HiCacheController on two rank processes (importing SGLang takes "
                           "a while)...")
        self.engine.start()
        if not self.engine.wait_ready("demo"):
            raise RuntimeError("SGLang's ranks did not start: is the sglang wheel installed (make install-sglang)?")
        self.stats.started = time.monotonic()
        self.printer = printer_for(time.time())

    def poll(self) -> None:
        from .sglang_engine import drain

        st = self.stats
        for kind, rank, _name, data in drain(self.engine.live):
            if kind == "event":
                event = Event(data["time"], data["rank"], data["backend"], data["from"], data["to"], data["reason"],
                              data.get("detail", {}))
                self.events.append(event)
                if event.detail.get("role") == "active":
                    self.active = event.to_state
                elif rank == 0:
                    self.states[event.backend] = event.to_state
                self.printer(event)
                continue
            for name, t0, seconds, error in data["calls"]:
                st.samples.append(Sample(t0 + seconds - st.started, rank, self.OPS.get(name, name), seconds, 0,
                                         error is None))
                st.errors_surfaced += error is not None
            st.hits.append((data["t1"] - st.started, data["tokens"], data["loaded"]))
            st.pages_requested += data["tokens"]
            st.pages_hit += data["loaded"]
            st.pages_written += data["backed"]
            st.verify_failures += not data["exact"]
            st.requests += rank == 0

    def members(self) -> str:
        return "  ".join(f"{n}={self.states.get(n, 'healthy')}{'*' if n == self.active else ''}"
                         for n in ("primary", "standby"))

    def finish(self, lag: LagProbe) -> tuple[list, "_FixedLag"]:
        self.engine.stop("demo")
        results = self.engine.results()
        self.poll()
        return sorted(self.events, key=lambda e: e.time), _FixedLag(max(r.lag for r in results.values()))

    def close(self) -> None:
        self.engine.close()


class _FixedLag:
    """The ranks' own measured lag (they run in other processes)."""

    def __init__(self, worst: float) -> None:
        self.worst = worst

    def worst_between(self, t0: float, t1: float) -> float:
        return self.worst


def run_demo(*, duration: float = 30.0, ranks: int = 2, page_kib: int = 64, engine: str = "sim",
             console: Optional[Console] = None) -> DemoResult:
    """``engine``: ``sim`` (the simulator's ranks) or ``sglang`` (SGLang's own HiCacheController)."""
    console = console or Console(soft_wrap=True)
    # Each abandoned call is logged at WARNING; the status line already shows them here.
    logging.getLogger("hicache_ha").setLevel(logging.ERROR)
    workdir = tempfile.mkdtemp(prefix="hicache-ha-demo-")
    server: Optional[RedisServer] = None
    runner = None
    lag = LagProbe().start()
    try:
        primary, fault, server = _primary(workdir, console)
        config = demo_config(primary, f"{workdir}/standby")
        runner = (_SGLangEngine if engine == "sglang" else _SimEngine)(config, ranks, page_kib * 1024, console)
        bound_ms = max(DEMO_DEADLINES.values()) + SLACK_S * 1000
        fault_at, heal_at = duration / 3, 2 * duration / 3
        phases = [Phase("steady", 0, fault_at), Phase(fault.name, fault_at, heal_at),
                  Phase(fault.healed_name, heal_at, duration)]
        runner.start(lambda started_wall: _event_printer(console, started_wall))
        stats = runner.stats
        result = DemoResult(stats, phases, bound_ms, fault.name, lag, stats.started, ranks=ranks, engine=engine)
        injected = healed = False
        live = Live(console=console, refresh_per_second=4, transient=False) if console.is_terminal else None
        last_print = 0.0
        if live:
            live.start()
        try:
            while (now := stats.now()) < duration:
                runner.poll()
                if not injected and now >= fault_at:
                    what = fault.inject()
                    result.fault_wall = time.time()
                    injected = True
                    console.print(f"[bold yellow]t={now:.1f}s  {what}[/]")
                if injected and not healed and now >= heal_at:
                    healed = True
                    result.heal_wall = time.time()
                    console.print(f"[bold green]t={now:.1f}s  {fault.heal()}[/]")
                phase = next((p for p in phases if p.start <= now < p.end), phases[-1])
                status = _status(stats, runner.members(), phase.name, bound_ms, phase is phases[1])
                if live:
                    live.update(status)
                elif now - last_print >= 2.0:
                    console.print(status)
                    last_print = now
                time.sleep(0.25)
        finally:
            if live:
                live.stop()
            if injected and not healed:
                fault.heal()
            result.events, result.lag = runner.finish(lag)
        _summary(console, result)
        if os.environ.get(SUMMARY_ENV):
            with open(os.environ[SUMMARY_ENV], "w", encoding="utf-8") as f:
                json.dump(result.summary(), f, indent=2)
        return result
    finally:
        lag.stop()
        if runner is not None:
            runner.close()
        if server:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(console: Console, result: DemoResult) -> None:
    table = Table(title="What the engine saw (every storage call, both ranks)")
    for col in ("phase", "calls", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "gets served", "hit rate"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for row in result.phase_rows():
        table.add_row(row["phase"], str(row["calls"]), f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}",
                      f"{row['p999_ms']:.1f}", f"{row['max_ms']:.1f}", str(row["get_ok"]), f"{row['hit_rate']:.1%}")
    console.print(table)
    st = result.stats
    console.print(
        f"requests {st.requests}, pages hit {st.pages_hit}/{st.pages_requested}, written {st.pages_written}; "
        f"errors surfaced to the engine: {st.errors_surfaced}; pages that failed verification: {st.verify_failures}"
    )
    detect = result.after_fault_ms(backend="primary", to="circuit_broken")
    serve = result.after_fault_ms(role="active", to="standby")
    if detect:
        console.print(f"fault ({result.fault_name}) → primary circuit_broken: "
                      + ", ".join(f"{ms:.0f} ms" for ms in detect)
                      + "; → standby serving: " + (", ".join(f"{ms:.0f} ms" for ms in serve) or "never")
                      + " (per rank)")
    if result.heal_wall is not None:
        healthy = result.per_rank_ms(result.heal_wall, backend="primary", to="healthy").values()
        console.print(f"{result.phases[-1].name} → primary healthy again: "
                      + (", ".join(f"{ms:.0f} ms" for ms in healthy) or "not yet") + " (per rank)")
    tripped = result.healthy_members_tripped()
    console.print(f"healthy members tripped: {len(tripped)}" + (f" ({', '.join(tripped)})" if tripped else ""),
                  style="red" if tripped else None)
    over = result.over_bound()
    if over:
        worst = max(over, key=lambda s: s.seconds)
        lag_ms = result.worst_lag_ms(over)
        console.print(
            f"[yellow]{len(over)} of {len(st.samples)} calls took longer than the bound ({result.bound_ms:.0f} ms = "
            f"deadline + 20 ms); the slowest {worst.seconds * 1000:.1f} ms, {worst.seconds * 1000 - result.bound_ms:.1f} ms "
            f"over. While they ran, this process was kept from running for up to {lag_ms:.0f} ms at a time "
            f"(measured by a thread that sleeps 2 ms): the machine's CPUs were busy, and a call cannot return "
            f"before the operating system runs it again.[/]")
    else:
        worst_ms = max((s.seconds * 1000 for s in st.samples), default=0.0)
        console.print(f"every call within its bound: slowest {worst_ms:.1f} ms (bound {result.bound_ms:.0f} ms)")
    console.print("[bold green]the engine saw no error and no wrong page[/]" if result.clean
                  else "[bold red]contract violated: the engine saw an error or a wrong page[/]")
