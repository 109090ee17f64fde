"""The background half of a rank's data plane: health pings, recovery probes, failover, failback.

One daemon thread per rank. It never runs on an engine thread and never blocks on a backend: each
check is submitted to its member's bulkhead and collected on a later step, so a hung backend costs it
nothing but a worker. Failover is make-before-break: the target's canary probe must pass first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..health.breaker import CIRCUIT_BROKEN, HEALTHY, RECOVERING
from .bulkhead import Call

if TYPE_CHECKING:
    from .manager import BackendManager
    from .member import Member

log = logging.getLogger("hicache_ha.dataplane")

# While the active member is broken and traffic has not moved yet (no target, or a control plane is
# moving the whole group), look for a target again at this pace.
FAILOVER_RETRY_S = 0.05
# Health pings that may wait for an answer at once, per member.
MAX_PINGS_OUT = 4


@dataclass
class Check:
    member: "Member"
    kind: str  # ping | probe | reconnect | failover | failback
    call: Optional[Call]  # None: the bulkhead refused it, which is a failure in itself
    started: float
    timeout: float


class Supervisor:
    def __init__(self, manager: "BackendManager", clock: Callable[[], float] = time.monotonic,
                 max_sleep_s: float = 0.25) -> None:
        self.manager = manager
        self.cfg = manager.config
        self.clock = clock
        self.max_sleep_s = max_sleep_s
        self.pending: dict[tuple[str, str], Check] = {}
        self.next_ping: dict[str, float] = {}
        self.next_probe: dict[str, float] = {}
        self.broken_since: Optional[float] = None  # when the active member last stopped being healthy
        self.next_failover_try = 0.0  # a failover that did not happen (yet) is retried at this pace
        self.ping_seq = 0
        self.ping_rtts: dict[str, deque] = {}  # recent durations of good pings, per member
        self.no_target_reported = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Supervisor":
        self._thread = threading.Thread(target=self._loop, name=f"hicache-ha-supervisor-{self.manager.layout.rank}",
                                        daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)

    def _loop(self) -> None:
        # Event-driven: it sleeps until the next thing falls due (a ping, a probe, a backoff's end, a
        # check's timeout) or until something wakes it (a transition, a finished check).
        while not self._stop.is_set():
            sleep = self.max_sleep_s
            try:
                sleep = self.step()
            except Exception:  # the supervisor must outlive any bug in one step
                log.exception("hicache-ha: supervisor step failed")
            self._wake.wait(min(self.max_sleep_s, max(0.001, sleep)))
            self._wake.clear()

    # -- one step -----------------------------------------------------------------------------------
    def step(self) -> float:
        """Do what is due; return the seconds until something else will be."""
        now = self.clock()
        self._collect(now)
        members = list(self.manager.members.values())
        for m in members:
            m.apply(lambda b, t: b.tick(t))
        self._schedule(members, now)
        if self.cfg.failover.enabled:
            self._failover(now)
            if self.cfg.failover.failback == "auto":
                self._failback(now)
        return self._next_due(members) - self.clock()

    def _next_due(self, members: list["Member"]) -> float:
        due = [c.started + c.timeout for c in self.pending.values()]
        for m in members:
            b = m.breaker
            if m.state == HEALTHY and self._pings_out(m) < MAX_PINGS_OUT:
                due.append(self.next_ping.get(m.name, 0.0))
            elif m.state == RECOVERING:
                due.append(b.recovering_since + b.time_limit)
                if (m.name, "probe") not in self.pending:
                    due.append(self.next_probe.get(m.name, 0.0))
            elif m.state == CIRCUIT_BROKEN and b.retry_at is not None:
                due.append(b.retry_at)
        active = self.manager.active
        if active is not None and active.state != HEALTHY and self.broken_since is not None:
            due.append(max(self.next_failover_try, self.clock() + 0.001))  # failover pending: look again
        return min(due, default=self.clock() + self.max_sleep_s)

    def _submit(self, member: "Member", kind: str, timeout: float, fn: Callable, *args, key: object = None,
                on_done: Optional[Callable[[], None]] = None) -> None:
        call = member.bulkhead.try_submit(fn, *args, on_done=on_done or self.wake)
        self.pending[(member.name, kind) if key is None else (member.name, kind, key)] = Check(
            member, kind, call, self.clock(), timeout)

    def _rtt_recorder(self, member: "Member") -> Callable[[], None]:
        """Record how long the ping took when it finishes, even after its timeout: a late answer
        teaches the next timeout how slow this member gets when busy."""
        started = self.clock()
        rtts = self.ping_rtts.setdefault(member.name, deque(maxlen=20))

        def done() -> None:
            rtts.append(self.clock() - started)
            self.wake()

        return done

    def _ping_timeout(self, member: "Member") -> float:
        """The configured timeout, stretched to twice the slowest of the member's recent good pings: a
        PING queued behind a big transfer on a single-threaded server waits 100+ ms (measured: ~120 ms
        behind a 128 MiB MGET), which is slowness, not failure. A frozen server answers no ping, so its
        timeout stops growing."""
        base = self.cfg.health.ping.timeout_ms / 1000
        rtts = self.ping_rtts.get(member.name)
        return max(base, 2 * max(rtts)) if rtts else base

    def _pings_out(self, member: "Member") -> int:
        return sum(1 for c in self.pending.values() if c.member is member and c.kind == "ping")

    def _collect(self, now: float) -> None:
        for key, check in list(self.pending.items()):
            call = check.call
            if call is not None and not call.finished and now - check.started < check.timeout:
                continue
            del self.pending[key]
            ok = call is not None and call.finished and call.error is None
            detail = repr(call.error) if call is not None and call.error is not None else (
                "no free worker" if call is None else "" if ok else f"no answer in {check.timeout * 1000:.0f} ms")
            self._handle(check, ok, call.result if ok else None, detail)

    def _handle(self, check: Check, ok: bool, result, detail: str) -> None:
        m = check.member
        if check.kind == "ping":
            if not ok and m.last_ok > check.started:
                return  # busy, not broken: engine calls succeeded while the ping waited its turn
            m.feed("ping", ok, detail)
        elif check.kind == "probe":
            m.feed("probe", ok, detail)
        elif check.kind == "reconnect":
            if ok and result:
                self.manager.events.emit(m.name, m.state, m.state, "reconnected within its cluster", to=result)
                m.apply(lambda b, t: b.retry_now(t))
        elif check.kind in ("failover", "failback"):
            self.next_failover_try = self.clock() + FAILOVER_RETRY_S
            if ok:
                self.manager.failover_to(m, check.kind)
            else:
                m.feed("ping", False, detail)  # a standby that fails its probe is news about it

    def _schedule(self, members: list["Member"], now: float) -> None:
        health = self.cfg.health
        active = self.manager.active
        for m in members:
            # Pings overlap (a new one every interval even while older ones wait), so a frozen backend
            # yields a failure every interval after the first timeout, not one per timeout.
            if m.state == HEALTHY and self._pings_out(m) < MAX_PINGS_OUT:
                period = (health.ping.interval_ms if m is active else health.ping.standby_interval_ms) / 1000
                if now - m.last_ok < period:
                    # Engine calls just succeeded: that is the health signal, and a ping would only
                    # compete with them (for the GIL, and on a single-threaded server).
                    self.next_ping[m.name] = m.last_ok + period
                elif now >= self.next_ping.get(m.name, 0.0):
                    self.next_ping[m.name] = now + period
                    self.ping_seq += 1
                    self._submit(m, "ping", self._ping_timeout(m), m.backend.ping, key=self.ping_seq,
                                 on_done=self._rtt_recorder(m))
            elif m.state == RECOVERING and (m.name, "probe") not in self.pending:
                if now >= self.next_probe.get(m.name, 0.0):
                    self.next_probe[m.name] = now + health.recovery.probe_interval_ms / 1000
                    self._submit(m, "probe", health.recovery.probe_timeout_ms / 1000, m.backend.probe)

    def _failover(self, now: float) -> None:
        active = self.manager.active
        if active is None or active.state == HEALTHY:
            self.broken_since = None
            self.no_target_reported = False
            return
        if self.broken_since is None:
            self.broken_since = now
        patience = self.cfg.failover.cluster_patience_ms / 1000
        if active.backend.capabilities.cluster and now - self.broken_since < patience:
            # Same cluster first: another instance (a promoted replica) keeps the pages.
            if active.state == CIRCUIT_BROKEN and (active.name, "reconnect") not in self.pending:
                self._submit(active, "reconnect", self.cfg.health.recovery.probe_timeout_ms / 1000,
                             active.backend.reconnect)
            return
        if any(c.kind == "failover" for c in self.pending.values()) or now < self.next_failover_try:
            return
        target = next((m for m in self.manager.members.values() if m is not active and m.state == HEALTHY), None)
        if target is None:
            if not self.no_target_reported:
                self.no_target_reported = True
                self.manager.events.emit(active.name, active.state, active.state, "no healthy member to fail over to")
                log.error("hicache-ha: %r is %s and no other member is healthy: reads miss, writes are dropped",
                          active.name, active.state)
            return
        self._submit(target, "failover", self.cfg.health.recovery.probe_timeout_ms / 1000, target.backend.probe)

    def _failback(self, now: float) -> None:
        active = self.manager.active
        primary = self.manager.members.get(self.cfg.backends[0].name)
        if primary is None or active is None or active is primary or primary.state != HEALTHY:
            return
        since = primary.breaker.healthy_since
        if since is None or now - since < self.cfg.failover.failback_after_ms / 1000:
            return
        if (primary.name, "failback") not in self.pending:
            self._submit(primary, "failback", self.cfg.health.recovery.probe_timeout_ms / 1000, primary.backend.probe)
