"""One configured backend inside a rank's data plane: its bulkhead, its counters, its breaker."""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
import time
from typing import Any, Callable, Optional, Sequence

from ..backends.base import Backend, BackendConfig
from ..backends.envelope import open_page, seal
from ..backends.errors import CorruptPage
from ..config import HealthConfig
from ..health.backoff import Backoff
from ..health.breaker import CIRCUIT_BROKEN, DETACHED, Breaker, Transition
from ..health.detectors import AnyOf, ConsecutiveFailures, FailureRate, SlowCallRate
from ..health.outcomes import Outcome, classify
from .bulkhead import Bulkhead

log = logging.getLogger("hicache_ha.dataplane")


Observer = Callable[["Member", str, Outcome, float], None]


# Latency histogram bounds (seconds): 100 µs to 10 s, as Prometheus buckets.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class OpStats:
    """Counters per (op, outcome), a latency histogram per op, transitions per target state.
    Not locked: its Member serialises access. Recording is a dict update and a bisect."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, Outcome], int] = {}
        self.latency: dict[str, list] = {}  # op -> [count per bucket..., +Inf count, sum]
        self.transitions: dict[str, int] = {}
        self.abandoned = 0
        self.corrupt_pages = 0

    def record(self, op: str, outcome: Outcome, seconds: float) -> None:
        key = (op, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        hist = self.latency.get(op)
        if hist is None:
            hist = self.latency[op] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        hist[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist[-1] += seconds

    def snapshot(self) -> dict:
        ops: dict[str, dict[str, int]] = {}
        for (op, outcome), n in self.counts.items():
            ops.setdefault(op, {})[outcome.value] = n
        return {"ops": ops, "abandoned": self.abandoned, "corrupt_pages": self.corrupt_pages,
                "latency": {op: list(h) for op, h in self.latency.items()}, "transitions": dict(self.transitions)}


class _RateLimitedLog:
    """Log the first failure of each kind per member, then at most one line every ``every`` seconds."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._last: dict[tuple, float] = {}
        self._every = every
        self._clock = clock

    def warn(self, key: tuple, msg: str, *args: Any) -> None:
        now = self._clock()
        if now - self._last.get(key, -1e18) >= self._every:
            self._last[key] = now
            log.warning(msg, *args)


def breaker_from_config(cfg: HealthConfig, now: float) -> Breaker:
    """The detectors and breaker a member gets from the ``health`` section."""
    detectors: list = []
    if cfg.consecutive_failures:
        detectors.append(ConsecutiveFailures(cfg.consecutive_failures))
    if cfg.failure_rate:
        r = cfg.failure_rate
        detectors.append(FailureRate(r.threshold, r.window_ms / 1000, r.min_calls))
    if cfg.slow_calls:
        r = cfg.slow_calls
        detectors.append(SlowCallRate(r.threshold, r.window_ms / 1000, r.min_calls))
    b, rec = cfg.backoff, cfg.recovery
    return Breaker(
        AnyOf(*detectors), Backoff(b.base_ms / 1000, b.cap_ms / 1000, b.jitter),
        probes_required=rec.probes, trial_calls=rec.trial_calls, time_limit=rec.time_limit_ms / 1000, now=now,
    )


TransitionListener = Callable[["Member", Transition], None]


class Member:
    """A backend plus what the data plane keeps about it. One lock guards its counters and its breaker."""

    def __init__(self, spec: BackendConfig, backend: Backend, workers: int, queue: int, health: HealthConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = spec.name
        self.spec = spec
        self.backend = backend
        self.envelope = backend.capabilities.envelope
        self.bulkhead = Bulkhead(spec.name, workers, queue)
        self.stats = OpStats()
        self.breaker = breaker_from_config(health, clock())
        self.failure_outcomes = frozenset(Outcome(o) for o in health.failure_outcomes)
        self.slow_fraction = health.slow_calls.fraction_of_deadline if health.slow_calls else 1.0
        self.last_ok = float("-inf")  # when an engine call last succeeded (clock time)
        self.last_probe_ok: Optional[float] = None  # when a ping or probe last succeeded
        self.engine_waiting = 0  # engine calls admitted and not answered yet
        self.listeners: list[TransitionListener] = []
        self.observers: list[Observer] = []
        self._lock = threading.Lock()
        self._clock = clock
        self._log = _RateLimitedLog(clock=clock)

    @property
    def state(self) -> str:
        return self.breaker.state

    @property
    def in_flight(self) -> int:
        return self.bulkhead.in_flight

    # -- the engine path ----------------------------------------------------------------------------
    def call(self, op: str, deadline_s: float, fn: Callable[..., Any], *args: Any,
             with_call: bool = False) -> tuple[Outcome, Any]:
        """An engine call: admitted by the breaker, run on a worker, waited for at most ``deadline_s``.
        Never raises. After a timeout the call is abandoned: its result, whenever it comes, is never
        looked at, so nothing it read can reach engine memory."""
        with self._lock:
            allowed = self.breaker.allow()
            self.engine_waiting += allowed
        start = self._clock()
        if not allowed:
            return self._finish(op, Outcome.SHORT_CIRCUITED, start, None, None)
        outcome, result = self._run(op, deadline_s, fn, args, with_call)
        return self._finish(op, outcome, start, result, deadline_s)

    def run(self, op: str, timeout_s: float, fn: Callable[..., Any], *args: Any) -> tuple[Outcome, Any]:
        """A control-plane call (switch probe, clear): bypasses the breaker and does not feed it."""
        start = self._clock()
        outcome, result = self._run(op, timeout_s, fn, args)
        self.record(op, outcome, self._clock() - start)
        return outcome, result

    def record(self, op: str, outcome: Outcome, seconds: float) -> None:
        with self._lock:
            self.stats.record(op, outcome, seconds)

    def count(self, field: str, n: int = 1) -> None:
        """Add to a plain counter of the stats (``abandoned``, ``corrupt_pages``)."""
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + n)

    def snapshot(self) -> dict:
        with self._lock:
            age = None if self.last_probe_ok is None else round(self._clock() - self.last_probe_ok, 3)
            return {"state": self.breaker.state, "probe_ok_age_s": age, **self.stats.snapshot()}

    def _run(self, op: str, deadline_s: float, fn: Callable[..., Any], args: tuple,
             with_call: bool = False) -> tuple[Outcome, Any]:
        call = self.bulkhead.try_submit(fn, *args, with_call=with_call)
        if call is None:
            return Outcome.SHORT_CIRCUITED, None
        if not call.wait(deadline_s):
            call.fence()  # from here on the worker writes nothing into the caller's memory
            self.count("abandoned")
            self._log.warn((op, "timeout"), "hicache-ha: %s on %r exceeded its %.0f ms deadline; abandoned",
                           op, self.name, deadline_s * 1000)
            return Outcome.TIMEOUT, None
        if call.fenced and not call.finished:
            self.count("abandoned")
            return Outcome.SHORT_CIRCUITED, None  # cut short: the member tripped or traffic left it
        if call.error is not None:
            outcome = classify(call.error)
            self._log.warn((op, outcome), "hicache-ha: %s on %r failed (%s): %s", op, self.name, outcome, call.error)
            return outcome, None
        return Outcome.OK, call.result

    def _finish(self, op: str, outcome: Outcome, start: float, result: Any,
                deadline_s: Optional[float]) -> tuple[Outcome, Any]:
        now = self._clock()
        elapsed = now - start
        transition = None
        with self._lock:
            self.stats.record(op, outcome, elapsed)
            if outcome is Outcome.OK:
                self.last_ok = now
            if deadline_s is not None:  # admitted: its result is news about the backend
                self.engine_waiting -= 1
                transition = self.breaker.on_result(now, outcome in self.failure_outcomes,
                                                    elapsed > self.slow_fraction * deadline_s)
        for observer in self.observers:
            observer(self, op, outcome, elapsed)
        if transition:
            self._emit(transition)
        return outcome, result

    # -- the background path (the supervisor) -------------------------------------------------------
    def feed(self, what: str, ok: bool, detail: str = "") -> None:
        """Hand the breaker the result of a health ping (``ping``) or a recovery probe (``probe``)."""
        now = self._clock()
        with self._lock:
            if ok:
                self.last_probe_ok = now
            if what == "ping":
                transition = self.breaker.on_result(now, not ok)
            else:
                transition = self.breaker.on_probe(now, ok, detail)
        if transition:
            self._emit(transition)

    def apply(self, step: Callable[[Breaker, float], Optional[Transition]]) -> Optional[Transition]:
        """Run one breaker step (tick, trip, detach, attach, retry_now) under the member's lock."""
        with self._lock:
            transition = step(self.breaker, self._clock())
        if transition:
            self._emit(transition)
        return transition

    def _emit(self, transition: Transition) -> None:
        with self._lock:
            t = self.stats.transitions
            t[transition.to_state] = t.get(transition.to_state, 0) + 1
        if transition.to_state in (CIRCUIT_BROKEN, DETACHED):
            self.bulkhead.fence_all()  # nobody waits out a deadline on a member known to be bad
        for listener in self.listeners:
            listener(self, transition)

    # -- what runs on the worker threads ----------------------------------------------------------
    def read_pages(self, keys: Sequence[str], nbytes: Optional[int]) -> tuple[list, int]:
        """Fetch and check pages; a page failing its envelope or size is a miss. Returns (pages, corrupt)."""
        blobs = self.backend.get(keys, nbytes)
        if not self.envelope and nbytes is None:
            return blobs, 0
        pages: list = []
        corrupt = 0
        for key, blob in zip(keys, blobs):
            if blob is None:
                pages.append(None)
                continue
            try:
                page = open_page(key, blob) if self.envelope else memoryview(blob)
                if nbytes is not None and page.nbytes != nbytes:
                    raise CorruptPage(f"page {key!r}: {page.nbytes} bytes, this layout expects {nbytes}")
            except CorruptPage as exc:
                corrupt += 1
                self._log.warn(("get", "corrupt"), "hicache-ha: %s on %r: %s", "get", self.name, exc)
                pages.append(None)
                continue
            pages.append(page)
        return pages, corrupt

    def read_into(self, call, keys: Sequence[str], nbytes: Optional[int], sink) -> tuple[list[bool], int]:
        """Fetch, check, and hand each good page to ``sink(i, page)``, which writes it into the caller's
        memory, on this worker: the copy stays on the thread (and core, and malloc arena) that read
        the page. Each write is claimed on the call, so once the caller has given up (fenced), no
        further write happens."""
        pages, corrupt = self.read_pages(keys, nbytes)
        done = [False] * len(pages)
        for i, page in enumerate(pages):
            if page is None:
                continue
            if not call.claim():
                break
            try:
                sink(i, page)
                done[i] = True
            finally:
                call.unclaim()
        return done, corrupt

    def prepare_values(self, keys: Sequence[str], values: Sequence[Any]) -> list:
        """Runs on the engine thread, before the call is queued. With an envelope, the header (checksum)
        is computed now from engine memory; the worker reads the payload later, and if the engine has
        reused that memory by then, the stored page fails its checksum and reads as a miss. Without an
        envelope the page is copied now, so a late worker never reads reused memory."""
        if self.envelope:
            return [(seal(k, v), v) for k, v in zip(keys, values)]
        return [bytearray(v) for v in values]

    def close(self) -> None:
        self.bulkhead.close()
        try:
            self.backend.close()
        except Exception:
            pass
