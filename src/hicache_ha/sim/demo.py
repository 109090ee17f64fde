"""`make demo`: two engine ranks through the data plane while the primary fails.

Runs on an embedded default that needs nothing external: it starts its own redis-server as the primary
and freezes it (SIGSTOP / SIGCONT); without redis-server, the primary is a directory that vanishes (as
an unmounted volume would) and comes back. The standby is a file directory in a temp dir. Everything it
started is cleaned up. On a busy machine it says how far any call went over its bound and why. The
engine is the simulator (``sim``) or SGLang's own HiCacheController in two processes (``sglang``;
both in ``demo_engines``); what it shows and prints is in ``demo_report``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

from rich.console import Console
from rich.live import Live

from .demo_engines import SGLangDemoEngine, SimDemoEngine
from .demo_report import DemoResult, Phase, event_printer, print_summary, status_line
from .lag import SLACK_S, LagProbe
from .servers import RedisServer, redis_server_path

__all__ = ["DEMO_DEADLINES", "SUMMARY_ENV", "DemoResult", "Fault", "FreezeRedis", "Phase", "VanishDirectory",
           "demo_config", "run_demo"]

DEMO_DEADLINES = {"exists": 25, "get": 150, "set": 250}
# Where the demo also writes its summary as JSON (``HICACHE_HA_DEMO_JSON=out.json make demo``): what a
# script or a test checks, rather than the printed prose.
SUMMARY_ENV = "HICACHE_HA_DEMO_JSON"


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


def demo_config(primary: dict, standby_dir: str) -> dict:
    return {
        "backends": [primary, {"name": "standby", "type": "file", "path": standby_dir}],
        "deadlines_ms": DEMO_DEADLINES,
        "health": {"backoff": {"base_ms": 500, "cap_ms": 4000}},
        "failover": {"failback": "auto", "failback_after_ms": 3000},
        "admin": {"mode": "off"},
    }


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
        runner = (SGLangDemoEngine if engine == "sglang" else SimDemoEngine)(config, ranks, page_kib * 1024, console)
        bound_ms = max(DEMO_DEADLINES.values()) + SLACK_S * 1000
        fault_at, heal_at = duration / 3, 2 * duration / 3
        phases = [Phase("steady", 0, fault_at), Phase(fault.name, fault_at, heal_at),
                  Phase(fault.healed_name, heal_at, duration)]
        runner.start(lambda started_wall: event_printer(console, started_wall))
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
                status = status_line(stats, runner.members(), phase.name, bound_ms, phase is phases[1])
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
        summary = result.summary()
        print_summary(console, result, summary)
        if os.environ.get(SUMMARY_ENV):
            with open(os.environ[SUMMARY_ENV], "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        return result
    finally:
        lag.stop()
        if runner is not None:
            runner.close()
        if server:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)
