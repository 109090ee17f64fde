"""The engines the demo drives: the simulator's ranks (threads over one BackendManager each) or SGLang's
own HiCacheController in rank processes, behind one small interface (start, poll, members, finish)."""

from __future__ import annotations

import time

from rich.console import Console

from ..dataplane import BackendManager, Layout
from ..dataplane.events import Event
from .engine import Sample, SimStats, Simulation
from .lag import LagProbe


class SimDemoEngine:
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


class SGLangDemoEngine:
    """SGLang's real HiCacheController in two rank processes (gloo), HAStorage built by its factory."""

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
        from .sglang_engine import OP_DEADLINE, drain

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
                st.samples.append(Sample(t0 + seconds - st.started, rank, OP_DEADLINE.get(name, name), seconds, 0,
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

    def finish(self, lag: LagProbe) -> tuple[list, "FixedLag"]:
        self.engine.stop("demo")
        results = self.engine.results()
        self.poll()
        return sorted(self.events, key=lambda e: e.time), FixedLag(max(r.lag for r in results.values()))

    def close(self) -> None:
        self.engine.close()


class FixedLag:
    """The ranks' own measured lag (they run in other processes)."""

    def __init__(self, worst: float) -> None:
        self.worst = worst

    def worst_between(self, t0: float, t1: float) -> float:
        return self.worst
