"""The background half of a rank's data plane: it judges what engine calls reported, pings, probes,
fails over and fails back.

One daemon thread per rank, the only place where a member's breaker learns from engine calls and acts
(Envoy's model: workers report, one thread decides). It never runs on an engine thread and never blocks
on a backend: each check is submitted to its member's bulkhead and collected on a later step, so a hung
backend costs it nothing but a worker. Failover is make-before-break: the target's canary probe must
pass first. It sees its rank only through ``SupervisedRank``, so it is tested with an injected clock and
a few members, no whole BackendManager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from ..config import FailoverConfig, HealthConfig
from ..health.breaker import CIRCUIT_BROKEN, HEALTHY, RECOVERING
from .bulkhead import Call
from .member import Member

log = logging.getLogger("hicache_ha.dataplane")

# While the active member is broken and traffic has not moved yet (no target, or a control plane is
# moving the whole group), look for a target again at this pace.
FAILOVER_RETRY_S = 0.05
# Health pings that may wait for an answer at once, per member (each holds a check worker while it waits).
MAX_PINGS_OUT = 3
# How long a ping's round trip is remembered for stretching later ping timeouts: a slow spell (a start-up,
# a burst of big transfers) must not keep timeouts long, and so detection slow, once it is over.
RTT_MEMORY_S = 10.0
BUSY_RECHECK_S = 0.01  # a ping waiting behind a running engine call is looked at again this often
# How long the supervisor's own late wake-ups are remembered: the measure of how long this process was
# kept from running (a host whose cores are all busy), which a check's timeout is not held against.
LATENESS_MEMORY_S = 30.0
MAX_STARVED_CREDIT_S = 1.0  # the most a check's timeout grows for it


def lateness(began: float, wait: float, asked: Optional[float], woke: float) -> float:
    """How much later than it should have the supervisor ran again: at the end of its wait, or when a
    wake-up was asked for during it. That much, this process was kept from running (busy cores, a GIL held
    elsewhere). A wake-up asked for before the wait began was already pending: the wait ended at once."""
    due = began + wait if asked is None else min(began + wait, max(began, asked))
    return max(0.0, woke - due)


class SupervisedRank(Protocol):
    """What the supervisor needs of its rank, and nothing more."""

    def all_members(self) -> list[Member]: ...

    def active_member(self) -> Optional[Member]: ...

    def failover_to(self, target: Member, reason: str) -> None:
        """Move traffic to ``target`` (``failover`` or ``failback``); must not block."""

    def note(self, member: Member, reason: str, **detail) -> None:
        """Record an event about ``member`` that is not a state change."""


@dataclass
class Check:
    member: Member
    kind: str  # ping | probe | reconnect | failover | failback
    call: Optional[Call]  # None: no worker was free (the check did not run; not news about the backend)
    started: float
    timeout: float
    generation: int = 0  # the breaker generation a ping was sent in
    credited: float = 0.0  # time this process was kept from running while the check waited, added to its timeout


class Supervisor:
    def __init__(self, rank: SupervisedRank, health: HealthConfig, failover: FailoverConfig, primary: str,
                 clock: Callable[[], float] = time.monotonic, max_sleep_s: float = 0.25) -> None:
        self.rank = rank
        self.health = health
        self.failover = failover
        self.primary = primary
        self.clock = clock
        self.max_sleep_s = max_sleep_s
        self.pending: dict[tuple, Check] = {}
        self.next_ping: dict[str, float] = {}
        self.next_probe: dict[str, float] = {}
        self.broken_since: Optional[float] = None  # when the active member last stopped being healthy
        self.next_failover_try = 0.0  # a failover that did not happen (yet) is retried at this pace
        self.ping_seq = 0
        self.ping_rtts: dict[str, deque] = {}  # (when, duration) of recent good pings, per member
        self.no_target_reported = False
        self.lateness: deque[tuple[float, float]] = deque(maxlen=1024)  # (when, seconds late) of its wake-ups
        self._asked_at: Optional[float] = None  # when a wake-up was first asked for since the last one
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self, name: str = "hicache-ha-supervisor") -> "Supervisor":
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        if self._asked_at is None:
            self._asked_at = self.clock()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)

    def _loop(self) -> None:
        # Event-driven: it sleeps until the next thing falls due (a ping, a probe, a backoff's end, a
        # check's timeout) or until something wakes it (a failed call, a finished check, a move).
        while not self._stop.is_set():
            sleep = self.max_sleep_s
            try:
                sleep = self.step()
            except Exception:  # the supervisor must outlive any bug in one step
                log.exception("hicache-ha: supervisor step failed")
            wait = min(self.max_sleep_s, max(0.001, sleep))
            began = self.clock()
            self._wake.wait(wait)
            woke = self.clock()
            self._wake.clear()  # before reading the ask: a wake-up asked for after this read wakes the next wait
            asked, self._asked_at = self._asked_at, None
            self.note_lateness(woke, lateness(began, wait, asked, woke))

    def note_lateness(self, at: float, late: float) -> None:
        if late > 0.0005:
            self.lateness.append((at, late))

    def starved_since(self, t: float) -> float:
        """How long this process was kept from running since ``t``, as the supervisor's own late
        wake-ups measure it."""
        horizon = self.clock() - LATENESS_MEMORY_S
        return sum(late for at, late in self.lateness if at > t and at >= horizon)

    # -- one step -----------------------------------------------------------------------------------
    def step(self) -> float:
        """Do what is due; return the seconds until something else will be."""
        members = self.rank.all_members()
        now = self.clock()
        for m in members:
            if m.drain() and m.state == HEALTHY:  # what engine calls reported since the last step
                self.next_ping[m.name] = now  # a failed or timed-out call: confirm with a ping at once
        self._collect(now)
        for m in members:
            if not m.backend.pending:  # a first build under way ends with its own wake-up (on_ready)
                m.apply(lambda b, t: b.tick(t))
        self._schedule(members, now)
        if self.failover.enabled:
            self._failover(now)
            self._failback(now)
        return self._next_due(members) - self.clock()

    def _next_due(self, members: list[Member]) -> float:
        due = [c.started + c.timeout for c in self.pending.values()]
        for m in members:
            b = m.breaker
            if m.state == HEALTHY:
                if self._pings_out(m) < MAX_PINGS_OUT:
                    due.append(self.next_ping.get(m.name, 0.0))
                if b.next_decay is not None:
                    due.append(b.next_decay)
            elif m.state == RECOVERING:
                due.append(b.recovering_since + b.time_limit)
                if (m.name, "probe") not in self.pending:
                    due.append(self.next_probe.get(m.name, 0.0))
            elif m.state == CIRCUIT_BROKEN and b.retry_at is not None:
                due.append(b.retry_at)
        active = self.rank.active_member()
        if active is not None and active.state != HEALTHY and self.broken_since is not None:
            due.append(max(self.next_failover_try, self.clock() + 0.001))  # failover pending: look again
        return min(due, default=self.clock() + self.max_sleep_s)

    def _submit(self, member: Member, kind: str, timeout: float, fn: Callable, *, key: object = None,
                on_done: Optional[Callable[[Call], None]] = None) -> None:
        generation = member.breaker.generation
        call = member.check(fn, on_done=on_done or (lambda _c: self.wake()))
        self.pending[(member.name, kind) if key is None else (member.name, kind, key)] = Check(
            member, kind, call, self.clock(), timeout, generation)

    def _rtt_recorder(self, member: Member) -> Callable[[Call], None]:
        """Record how long the ping took when it finishes, even after its timeout: a late answer
        teaches the next timeout how slow this member gets when busy."""
        rtts = self.ping_rtts.setdefault(member.name, deque(maxlen=20))
        sent = self.clock()

        def done(call: Call) -> None:
            if call.finished and call.error is None:
                rtts.append((call.ended, call.ended - sent))  # with the waits for a worker and the GIL
            self.wake()

        return done

    def _ping_timeout(self, member: Member) -> float:
        """The configured timeout, stretched to twice the slowest of the member's good pings of the last
        RTT_MEMORY_S seconds: a
        PING queued behind a big transfer on a single-threaded server waits 100+ ms (measured: ~120 ms
        behind a 128 MiB MGET), which is slowness, not failure. A frozen server answers no ping, so its
        timeout stops growing."""
        base = self.health.ping.timeout_ms / 1000
        since = self.clock() - RTT_MEMORY_S
        recent = [rtt for at, rtt in self.ping_rtts.get(member.name, ()) if at >= since]
        return max(base, 2 * max(recent)) if recent else base

    def _pings_out(self, member: Member) -> int:
        return sum(1 for c in self.pending.values() if c.member is member and c.kind == "ping")

    def _collect(self, now: float) -> None:
        for key, check in list(self.pending.items()):
            call = check.call
            if call is not None and not call.finished and now - check.started < check.timeout:
                continue
            if call is not None and not call.finished:
                # A check gets its whole timeout of running time: while this process was kept from running,
                # its worker (and the answer's reader) most likely was too, so that time is added to it.
                # At most MAX_STARVED_CREDIT in all: a hung backend is still found on a host that stays starved.
                starved = min(self.starved_since(check.started), MAX_STARVED_CREDIT_S)
                if starved > check.credited:
                    check.timeout += starved - check.credited
                    check.credited = starved
                    if now - check.started < check.timeout:
                        continue
            if (check.kind == "ping" and call is not None and not call.finished
                    and check.member.busy_before(check.started, now, RTT_MEMORY_S)):
                # Likely queued behind a big engine call: judged once that call answers (busy, not
                # broken: see _handle) or runs longer than such calls take here (then the silence counts).
                check.timeout = now - check.started + BUSY_RECHECK_S
                continue
            del self.pending[key]
            # A check that found no free check worker, or never left the queue, did not reach the backend:
            # not news about it (the checks already holding the workers will tell).
            if call is None:
                ran, ok, detail = False, False, "no free check worker"
            elif call.finished:
                ran, ok, detail = True, call.error is None, "" if call.error is None else repr(call.error)
            else:
                ran, ok, detail = call.fence(), False, f"no answer in {check.timeout * 1000:.0f} ms"
            self._handle(check, ran, ok, call.result if ok else None, detail)

    def _handle(self, check: Check, ran: bool, ok: bool, result, detail: str) -> None:
        m = check.member
        if check.kind in ("failover", "failback"):
            self.next_failover_try = self.clock() + FAILOVER_RETRY_S
            if ok:
                self.rank.failover_to(m, check.kind)
            elif ran:
                m.feed_ping(m.breaker.generation, False)  # a standby that fails its probe is news about it
            return
        if not ran:
            return  # our own queue was full: says nothing about the backend; the check is retried
        if check.kind == "ping":
            if not ok and m.last_ok > check.started:
                return  # busy, not broken: engine calls succeeded while the ping waited its turn
            m.feed_ping(check.generation, ok)
        elif check.kind == "probe":
            m.feed_probe(ok, detail)
        elif check.kind == "reconnect" and ok and result:
            self.rank.note(m, "reconnected within its cluster", to=result)
            m.apply(lambda b, t: b.retry_now(t))

    def _schedule(self, members: list[Member], now: float) -> None:
        active = self.rank.active_member()
        for m in members:
            # Pings overlap (a new one every interval even while older ones wait), so a frozen backend
            # yields a failure every interval after the first timeout, not one per timeout.
            if m.state == HEALTHY and self._pings_out(m) < MAX_PINGS_OUT:
                period = (self.health.ping.interval_ms if m is active else self.health.ping.standby_interval_ms) / 1000
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
                    self.next_probe[m.name] = now + self.health.recovery.probe_interval_ms / 1000
                    self._submit(m, "probe", self.health.recovery.probe_timeout_ms / 1000, m.backend.probe)

    def _failover(self, now: float) -> None:
        active = self.rank.active_member()
        if (active is None or active.state == HEALTHY or active.backend.pending
                or (active.startup_failback and active.state == RECOVERING)):
            # A backend still being built for the first time, or proving itself once built, is start-up,
            # not a failure: wait for it.
            self.broken_since = None
            self.no_target_reported = False
            return
        if self.broken_since is None:
            self.broken_since = now
        probe_timeout = self.health.recovery.probe_timeout_ms / 1000
        patience = self.failover.cluster_patience_ms / 1000
        if active.backend.capabilities.cluster and now - self.broken_since < patience:
            # Same cluster first: another instance (a promoted replica) keeps the pages.
            if active.state == CIRCUIT_BROKEN and (active.name, "reconnect") not in self.pending:
                self._submit(active, "reconnect", probe_timeout, active.backend.reconnect)
            return
        if any(c.kind == "failover" for c in self.pending.values()) or now < self.next_failover_try:
            return
        target = next((m for m in self.rank.all_members() if m is not active and m.state == HEALTHY), None)
        if target is None:
            if not self.no_target_reported:
                self.no_target_reported = True
                self.rank.note(active, "no healthy member to fail over to")
                log.error("hicache-ha: %r is %s and no other member is healthy: reads miss, writes are dropped",
                          active.name, active.state)
            return
        self._submit(target, "failover", probe_timeout, target.backend.probe)

    def _failback(self, now: float) -> None:
        """Back to the primary once it stayed healthy ``failback_after_ms`` (``failback: auto``), or at
        once the first time a primary built late is healthy (start-up, whatever the mode)."""
        active = self.rank.active_member()
        primary = next((m for m in self.rank.all_members() if m.name == self.primary), None)
        if primary is None or active is None:
            return
        if active is primary:
            if primary.state == HEALTHY:
                primary.startup_failback = False
            return
        startup = primary.startup_failback
        if primary.state != HEALTHY or not (startup or self.failover.failback == "auto"):
            return
        since = primary.breaker.healthy_since
        if since is None or (not startup and now - since < self.failover.failback_after_ms / 1000):
            return
        if (primary.name, "failback") not in self.pending:
            self._submit(primary, "failback", self.health.recovery.probe_timeout_ms / 1000, primary.backend.probe)
