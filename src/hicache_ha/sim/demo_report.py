"""What the demo shows: its phases, the result (per-rank times from the fault, latency per phase, members
tripped, calls over the bound and the machine's lag meanwhile), as data (``DemoResult.summary``) and as
what it prints (the transitions, the status line, the closing table)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .engine import SimStats, percentile


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
    fault_name: str
    lag: Any  # LagProbe, or the ranks' own measured lag when they run in other processes
    started: float  # time.monotonic() when the engine started
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


def event_printer(console: Console, started_wall: float):
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


def status_line(st: SimStats, members: str, phase: str, bound_ms: float, faulty: bool) -> Text:
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


def print_summary(console: Console, result: DemoResult, s: dict) -> None:
    """``result`` for a person, from its ``summary()`` ``s``."""
    table = Table(title="What the engine saw (every storage call, both ranks)")
    for col in ("phase", "calls", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "gets served", "hit rate"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for row in s["phases"]:
        table.add_row(row["phase"], str(row["calls"]), f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}",
                      f"{row['p999_ms']:.1f}", f"{row['max_ms']:.1f}", str(row["get_ok"]), f"{row['hit_rate']:.1%}")
    console.print(table)
    console.print(
        f"requests {s['requests']}, pages hit {s['pages_hit']}/{s['pages_requested']}, written {s['pages_written']}; "
        f"errors surfaced to the engine: {s['errors']}; pages that failed verification: {s['bad_pages']}"
    )
    detect, serve = s["primary_circuit_broken_ms"].values(), s["standby_serving_ms"].values()
    if detect:
        console.print(f"fault ({s['fault']}) → primary circuit_broken: "
                      + ", ".join(f"{ms:.0f} ms" for ms in detect)
                      + "; → standby serving: " + (", ".join(f"{ms:.0f} ms" for ms in serve) or "never")
                      + " (per rank)")
    if result.heal_wall is not None:
        healthy = s["primary_healthy_again_ms"].values()
        console.print(f"{s['phases'][-1]['phase']} → primary healthy again: "
                      + (", ".join(f"{ms:.0f} ms" for ms in healthy) or "not yet") + " (per rank)")
    tripped = s["healthy_members_tripped"]
    console.print(f"healthy members tripped: {len(tripped)}" + (f" ({', '.join(tripped)})" if tripped else ""),
                  style="red" if tripped else None)
    bound, slowest = s["bound_ms"], s["slowest_ms"]
    if s["over_bound"]:
        console.print(
            f"[yellow]{s['over_bound']} of {s['calls']} calls took longer than the bound ({bound:.0f} ms = "
            f"deadline + 20 ms); the slowest {slowest:.1f} ms, {slowest - bound:.1f} ms "
            f"over. While they ran, this process was kept from running for up to {s['lag_while_over_bound_ms']:.0f} "
            f"ms at a time (measured by a thread that sleeps 2 ms): the machine's CPUs were busy, and a call cannot "
            f"return before the operating system runs it again.[/]")
    else:
        console.print(f"every call within its bound: slowest {slowest:.1f} ms (bound {bound:.0f} ms)")
    console.print("[bold green]the engine saw no error and no wrong page[/]" if s["clean"]
                  else "[bold red]contract violated: the engine saw an error or a wrong page[/]")
