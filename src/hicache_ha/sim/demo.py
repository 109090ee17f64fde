"""`make demo`: two engine ranks through the data plane while the primary redis-server is frozen.

Runs on an embedded default that needs nothing external: it starts its own redis-server (or uses a
file primary when none can be had), a file standby in a temp dir, and cleans up everything it started.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..dataplane import BackendManager, Layout
from .engine import SimStats, Simulation, percentile
from .servers import RedisServer, redis_server_path

DEMO_DEADLINES = {"exists": 25, "get": 150, "set": 250}


@dataclass
class Phase:
    name: str
    start: float
    end: float


@dataclass
class DemoResult:
    stats: SimStats
    phases: list[Phase]
    bound_ms: float
    snapshots: list[dict] = field(default_factory=list)
    fault_wall: Optional[float] = None  # when the primary was frozen (time.time())
    events: list = field(default_factory=list)

    def after_fault_ms(self, **match) -> list[float]:
        """Per rank: ms from the fault to the first event matching ``match`` (after the fault)."""
        if self.fault_wall is None:
            return []
        firsts: dict[int, float] = {}
        for e in self.events:
            d = e.to_dict()
            if e.time >= self.fault_wall and all(d.get(k, e.detail.get(k)) == v for k, v in match.items()):
                firsts.setdefault(e.rank, (e.time - self.fault_wall) * 1000)
        return [firsts[r] for r in sorted(firsts)]

    def phase_rows(self) -> list[dict]:
        rows = []
        for ph in self.phases:
            samples = [s for s in self.stats.samples if ph.start <= s.t < ph.end]
            lat = [s.seconds * 1000 for s in samples]
            gets = [s for s in samples if s.op == "get"]
            rows.append({
                "phase": ph.name,
                "calls": len(samples),
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "max_ms": max(lat, default=0.0),
                "get_ok": sum(1 for s in gets if s.ok),
            })
        return rows


def demo_config(primary: dict, standby_dir: str) -> dict:
    return {
        "backends": [primary, {"name": "standby", "type": "file", "path": standby_dir}],
        "deadlines_ms": DEMO_DEADLINES,
        "health": {"backoff": {"base_ms": 500, "cap_ms": 4000}},
        "failover": {"failback": "auto", "failback_after_ms": 3000},
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


def _status(sim: Simulation, managers: list[BackendManager], phase: str, bound_ms: float) -> Text:
    st = sim.stats
    recent = st.window(2.0)
    lat = [s.seconds * 1000 for s in recent]
    hit = st.pages_hit / st.pages_requested if st.pages_requested else 0.0
    snap = managers[0].snapshot()
    members = "  ".join(
        f"{b['name']}={b['state']}{'*' if b['active'] else ''}" for b in snap["backends"]
    )
    p99 = percentile(lat, 99)
    text = Text()
    text.append(f"t={st.now():5.1f}s  ", style="bold")
    text.append(f"[{phase}]  ", style="yellow" if "frozen" in phase else "green")
    text.append(f"{len(recent) / 2.0:6.0f} calls/s  hit {hit:5.1%}  p99 {p99:6.1f} ms  max {max(lat, default=0):6.1f} ms"
                f" (bound {bound_ms:.0f})  ")
    text.append(f"rank0: {members}  epoch {snap['epoch']}  ")
    text.append(f"errors {st.errors_surfaced}  bad pages {st.verify_failures}",
                style="red" if st.errors_surfaced or st.verify_failures else "green")
    return text


def run_demo(*, duration: float = 30.0, ranks: int = 2, page_kib: int = 64,
             console: Optional[Console] = None) -> DemoResult:
    console = console or Console(soft_wrap=True)
    # Each abandoned call is logged at WARNING; the status line already shows them here.
    logging.getLogger("hicache_ha.dataplane").setLevel(logging.ERROR)
    workdir = tempfile.mkdtemp(prefix="hicache-ha-demo-")
    server: Optional[RedisServer] = None
    managers: list[BackendManager] = []
    try:
        if redis_server_path():
            server = RedisServer().start()
            primary = {"name": "primary", "type": "redis", "url": server.url, "socket_timeout_ms": 1000}
            console.print(f"primary: redis-server pid {server.proc.pid} on 127.0.0.1:{server.port}; "
                          f"standby: file {workdir}/standby")
        else:
            primary = {"name": "primary", "type": "file", "path": f"{workdir}/primary"}
            console.print("[yellow]redis-server not found: primary is a file directory, no freeze fault[/]")
        config = demo_config(primary, f"{workdir}/standby")
        page = page_kib * 1024
        managers = [
            BackendManager(config, Layout(model="demo", tp_rank=r, tp_size=ranks, page_bytes=page))
            for r in range(ranks)
        ]
        bound_ms = max(DEMO_DEADLINES.values()) + 20
        freeze_at, thaw_at = duration / 3, 2 * duration / 3
        phases = [Phase("steady", 0, freeze_at), Phase("primary frozen", freeze_at, thaw_at),
                  Phase("primary resumed", thaw_at, duration)]
        sim = Simulation(managers, page_size=page).start()
        started_wall = time.time() - sim.stats.now()
        for m in managers:
            m.events.subscribe(_event_printer(console, started_wall))
        result = DemoResult(sim.stats, phases, bound_ms)
        frozen = thawed = False
        live = Live(console=console, refresh_per_second=4, transient=False) if console.is_terminal else None
        last_print = 0.0
        if live:
            live.start()
        try:
            while (now := sim.stats.now()) < duration:
                if server and not frozen and now >= freeze_at:
                    server.freeze()
                    result.fault_wall = time.time()
                    frozen = True
                    console.print(f"[bold yellow]t={now:.1f}s  SIGSTOP primary redis-server (pid {server.proc.pid})[/]")
                if server and frozen and not thawed and now >= thaw_at:
                    server.thaw()
                    thawed = True
                    console.print(f"[bold green]t={now:.1f}s  SIGCONT primary redis-server[/]")
                phase = next((p.name for p in phases if p.start <= now < p.end), "done")
                status = _status(sim, managers, phase, bound_ms)
                if live:
                    live.update(status)
                elif now - last_print >= 2.0:
                    console.print(status)
                    last_print = now
                time.sleep(0.25)
        finally:
            if live:
                live.stop()
            if server and frozen and not thawed:
                server.thaw()
            sim.finish()
        result.snapshots = [m.snapshot() for m in managers]
        result.events = sorted((e for m in managers for e in m.events.recent(1000)), key=lambda e: e.time)
        _summary(console, result)
        return result
    finally:
        for m in managers:
            m.close()
        if server:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(console: Console, result: DemoResult) -> None:
    table = Table(title="What the engine saw (every storage call, both ranks)")
    for col in ("phase", "calls", "p50 ms", "p99 ms", "max ms", "gets served"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for row in result.phase_rows():
        table.add_row(row["phase"], str(row["calls"]), f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}",
                      f"{row['max_ms']:.1f}", str(row["get_ok"]))
    console.print(table)
    st = result.stats
    worst = max((s.seconds * 1000 for s in st.samples), default=0.0)
    ok = worst <= result.bound_ms and st.errors_surfaced == 0 and st.verify_failures == 0
    console.print(
        f"requests {st.requests}, pages hit {st.pages_hit}/{st.pages_requested}, written {st.pages_written}; "
        f"errors surfaced to the engine: {st.errors_surfaced}; pages that failed verification: {st.verify_failures}; "
        f"slowest call {worst:.1f} ms (bound {result.bound_ms:.0f} ms)"
    )
    detect = result.after_fault_ms(backend="primary", to="circuit_broken")
    serve = result.after_fault_ms(role="active", to="standby")
    if detect:
        console.print("fault → primary circuit_broken: " + ", ".join(f"{ms:.0f} ms" for ms in detect)
                      + "; fault → standby serving: " + ", ".join(f"{ms:.0f} ms" for ms in serve) + " (per rank)")
    console.print("[bold green]the engine never stalled[/]" if ok else "[bold red]contract violated[/]")
