"""One configured backend inside a rank's data plane: its bulkhead, its breaker, its counters.

The engine's thread only makes the call: one critical section admits it (breaker and bulkhead under
one lock), a worker runs it, and the engine waits at most its deadline. What the call taught about the
backend is appended to ``results`` (no lock) and judged later by ``drain``, on the rank's supervisor
(or whoever reads the status), which also carries out any transition: fencing, listeners, logs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

from ..backends.base import Backend, BackendConfig, join_parts, page_nbytes
from ..backends.envelope import open_page, seal
from ..backends.errors import CorruptPage
from ..config import HealthConfig
from ..health.backoff import Backoff
from ..health.breaker import CIRCUIT_BROKEN, DETACHED, HEALTHY, REFUSED, Breaker, Transition, Verdict
from ..health.detectors import AnyOf, ConsecutiveFailures, FailureRate, SlowCallRate
from ..health.outcomes import Outcome, classify, verdicts
from .bulkhead import Bulkhead, Call
from .stats import OpStats

log = logging.getLogger("hicache_ha.dataplane")

Sink = Callable[[int, Any], None]  # writes page i into the caller's memory
CHECK_WORKERS = 4  # health pings outstanding at once on a hung backend: enough to trip it
TransitionListener = Callable[["Member", Transition], None]


class Result(NamedTuple):
    """What one engine call taught about the backend, waiting to be judged by ``Member.drain``."""

    op: str
    pages: int
    outcome: Outcome
    at: float  # clock time it ended
    seconds: float  # engine-visible duration
    generation: int
    slow: bool
    abandoned: bool  # the engine stopped waiting while a worker ran it
    corrupt_pages: int
    error: Optional[BaseException]


class RateLimitedLog:
    """Log the first failure of each kind, then at most one line per kind every ``every`` seconds."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._last: dict[tuple, float] = {}
        self._every = every
        self._clock = clock

    def warn(self, key: tuple, msg: str, *args: Any, **kwargs: Any) -> None:
        now = self._clock()
        if now - self._last.get(key, -1e18) >= self._every:
            self._last[key] = now
            self._logger.warning(msg, *args, **kwargs)


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
        probes_required=rec.probes, trial_calls=rec.trial_calls, trial_failure_threshold=rec.trial_failure_threshold,
        time_limit=rec.time_limit_ms / 1000, decay=b.decay_ms / 1000, now=now,
    )


class Member:
    """A backend plus what the data plane keeps about it. One lock guards its breaker, bulkhead and stats."""

    def __init__(self, spec: BackendConfig, backend: Backend, workers: int, queue: int, health: HealthConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = spec.name
        self.spec = spec
        self.backend = backend
        self.envelope = backend.capabilities.envelope
        self._lock = threading.Lock()
        self._clock = clock
        self.bulkhead = Bulkhead(spec.name, workers, queue, self._lock, clock)
        # Health checks (pings, probes) and control-plane calls have workers of their own: they never wait
        # behind engine calls (a busy member is judged on time) and never take an engine call's worker.
        self.checks = Bulkhead(f"{spec.name}-checks", CHECK_WORKERS, CHECK_WORKERS, clock=clock)
        self.breaker = breaker_from_config(health, clock())
        # Its backend is built late (after SGLang's host pool): the first time it is healthy, traffic
        # comes back to it even with manual failback (that was start-up, not a failure).
        self.startup_failback = not backend.ready
        self.stats = OpStats()
        self.verdicts = verdicts(Outcome(o) for o in health.failure_outcomes)
        self.slow_fraction = health.slow_calls.fraction_of_deadline if health.slow_calls else 1.0
        self.results: deque[Result] = deque(maxlen=100_000)  # appended by engine threads, drained below
        self.last_ok = float("-inf")  # when an engine call last succeeded (clock time)
        self.ok_service: deque[tuple[float, float]] = deque(maxlen=32)  # (when, seconds): successful calls, drained
        self.last_probe_ok: Optional[float] = None  # when a ping or probe last succeeded
        self.listeners: list[TransitionListener] = []
        # Called (from an engine thread) when a result may change the breaker: a failure, or any result
        # while not healthy. The rank's supervisor sets it to its wake-up.
        self.on_news: Callable[[], None] = lambda: None
        self._log = RateLimitedLog(log, clock=clock)

    @property
    def state(self) -> str:
        return self.breaker.state

    @property
    def in_flight(self) -> int:
        return self.bulkhead.in_flight

    # -- the engine path ----------------------------------------------------------------------------
    def call(self, op: str, deadline_s: float, job: Callable[..., Any], *args: Any,
             on_cancel: Optional[Callable[[], None]] = None) -> tuple[Outcome, Any]:
        """An engine call: admitted, run on a worker as ``job(call, *args)``, waited for at most
        ``deadline_s``. Never raises and never blocks on anything but the call. After a timeout the call
        is fenced: its result, whenever it comes, is never looked at, and it writes nothing more.
        ``on_cancel`` runs (on this thread) if the job never ran: refused, or cancelled while queued."""
        start = self._clock()
        with self._lock:
            generation = self.breaker.admit()
            call = None if generation == REFUSED else self.bulkhead.submit_locked(job, args, generation)
            if call is None and (generation == REFUSED or not self.bulkhead.held_by_backend_locked()):
                # Refused by our breaker, or by a bulkhead full of our own load: never held against
                # the backend (a trial permit goes back).
                self.breaker.on_result(generation, start, Verdict.IGNORED)
                self.stats.record(op, Outcome.SHORT_CIRCUITED, 0.0)
                if op == "set":
                    self.stats.dropped_pages += len(args[0])
                refused = True
            else:
                refused = False
        if refused:
            if on_cancel is not None:
                on_cancel()
            return Outcome.SHORT_CIRCUITED, None
        if call is None:  # the backend holds every worker past its deadline: that is a timeout
            if on_cancel is not None:
                on_cancel()
            self.results.append(Result(op, len(args[0]), Outcome.TIMEOUT, start, 0.0, generation, False, False, 0,
                                       None))
            self.on_news()
            return Outcome.TIMEOUT, None
        result = None
        abandoned = False
        if not call.wait(deadline_s):
            # Running: a timeout. Still queued: cancelled, the backend never saw it; that is our own
            # load, unless the backend itself holds every worker past its deadline.
            abandoned = call.fence()
            outcome = Outcome.TIMEOUT if abandoned or self.held_by_backend() else Outcome.SHORT_CIRCUITED
        elif not call.finished:
            abandoned = call.started is not None
            outcome = Outcome.SHORT_CIRCUITED  # fenced: the member tripped, or traffic was forced off it
        elif call.error is not None:
            outcome = classify(call.error)
        else:
            outcome, result = Outcome.OK, call.result
        now = self._clock()
        corrupt = 0
        if outcome is Outcome.OK:
            self.last_ok = now
            if op == "get":
                corrupt = result[1]
                if corrupt:
                    outcome = Outcome.CORRUPT  # the good pages are still delivered
        if on_cancel is not None and call.started is None:  # fenced while queued: the job never runs
            on_cancel()
        service = (call.ended - call.started) if call.finished else now - start
        self.results.append(Result(op, len(args[0]), outcome, now, now - start, generation, service > self.slow_fraction * deadline_s,
                                   abandoned, corrupt, call.error))
        if outcome is not Outcome.OK or self.breaker.state != HEALTHY:
            self.on_news()
        return outcome, result

    def busy_before(self, t: float, now: float, memory_s: float) -> bool:
        """Is an engine call that was running before ``t`` still running, and for no longer than twice
        what this member's successful calls took over the last ``memory_s``? A ping sent at ``t`` may be
        queued behind it (a single-threaded server serves one command at a time, a 128 MiB MGET for
        100+ ms): while that call runs no longer than such calls take, the ping's silence says nothing.
        Small calls make the allowance small, so a frozen server is still found as fast."""
        started = self.bulkhead.oldest_running_before(t)
        if started is None:
            return False
        slowest = max((s for at, s in self.ok_service if at >= now - memory_s), default=0.0)
        return now - started < 2 * slowest

    def held_by_backend(self) -> bool:
        """Is every worker held by a call its caller gave up on (the backend hangs)?"""
        with self._lock:  # a timeout path only
            return self.bulkhead.held_by_backend_locked()

    # -- what runs on the worker threads ----------------------------------------------------------
    def exists_job(self, call: Call, keys: Sequence[str]) -> int:
        return self.backend.exists(keys)

    def exists_each_job(self, call: Call, keys: Sequence[str], nbytes: Union[int, Sequence[int], None]) -> list[bool]:
        return self.backend.exists_pages(keys, nbytes)

    def set_job(self, call: Call, keys: Sequence[str], items: Sequence[Any]) -> Optional[list[bool]]:
        return self.backend.set(keys, items)

    def read_job(self, call: Call, keys: Sequence[str], nbytes: Union[int, Sequence[int], None],
                 sink: Optional[Sink]) -> tuple[list, int]:
        """Fetch pages and check each one (envelope, size) in one pass. With a ``sink``, each good page
        is written into the caller's memory here, on the worker that read it, under a claim on the
        call: once the caller has given up (fenced), no further write happens. Returns (one bool per
        key with a sink, else one page or None per key; the number of corrupt pages)."""
        out: list = [False if sink else None] * len(keys)
        sizes = nbytes if isinstance(nbytes, (list, tuple)) else None
        corrupt = 0
        borrowed = self.backend.capabilities.borrowed
        with self.backend.fetch(keys, nbytes) as blobs:
            for i, (key, blob) in enumerate(zip(keys, blobs)):
                if blob is None:
                    continue
                expected = sizes[i] if sizes is not None else nbytes
                try:
                    if isinstance(blob, CorruptPage):  # failed the backend's own check
                        raise blob
                    page = open_page(key, blob) if self.envelope else blob
                    size = page_nbytes(page)
                    if expected is not None and size != expected:
                        raise CorruptPage(f"page {key!r}: {size} bytes, this layout expects {expected}")
                except CorruptPage as exc:
                    corrupt += 1
                    self._log.warn(("get", "corrupt"), "hicache-ha: get on %r: %s", self.name, exc)
                    continue
                if sink is None:
                    out[i] = bytes(join_parts(page)) if borrowed else page
                    continue
                if not call.claim():
                    break
                try:
                    sink(i, page)
                    out[i] = True
                finally:
                    call.unclaim()
        return out, corrupt

    def prepare_values(self, keys: Sequence[str], values: Sequence[Any]) -> list:
        """Runs on the engine thread, before the call is queued. With an envelope, the header (checksum)
        is computed now from engine memory; the worker reads the payload later, and if the engine has
        reused that memory by then, the stored page fails its checksum and reads as a miss. Without an
        envelope the page is copied now, so a late worker never reads reused memory."""
        if self.envelope:
            return [(seal(k, v), *v) if isinstance(v, tuple) else (seal(k, v), v) for k, v in zip(keys, values)]
        return self.backend.stage(keys, values)

    def refuse(self, op: str, pages: int) -> None:
        """An engine call refused before it was queued, for want of our own room: short-circuited."""
        with self._lock:
            self.stats.record(op, Outcome.SHORT_CIRCUITED, 0.0)
            if op == "set":
                self.stats.dropped_pages += pages

    def not_taken(self, pages: int) -> None:
        """Pages of a successful write the backend does not take by their nature: dropped, counted."""
        with self._lock:
            self.stats.dropped_pages += pages

    # -- the background path ------------------------------------------------------------------------
    def drain(self) -> bool:
        """Judge the results engine calls left: stats, the breaker, transitions and their effects.
        Returns whether any call failed or ran out of its deadline. Never called on an engine thread."""
        transitions, failed = [], []
        with self._lock:  # no I/O under it: engine admissions take it too
            while self.results:
                r = self.results.popleft()
                self.stats.record(r.op, r.outcome, r.seconds)
                self.stats.abandoned += r.abandoned
                self.stats.corrupt_pages += r.corrupt_pages
                if r.op == "set" and r.outcome is not Outcome.OK:
                    self.stats.dropped_pages += r.pages
                if r.outcome is Outcome.OK:
                    self.ok_service.append((r.at, r.seconds))
                elif r.outcome is not Outcome.SHORT_CIRCUITED:
                    failed.append(r)
                t = self.breaker.on_result(r.generation, r.at, self.verdicts[r.outcome], r.slow)
                if t is not None:
                    transitions.append(t)
        for r in failed:
            self._log.warn((r.op, r.outcome), "hicache-ha: %s on %r: %s%s", r.op, self.name, r.outcome,
                           f" ({r.error})" if r.error is not None else "")
        for t in transitions:
            self._announce(t)
        return bool(failed)

    def check(self, fn: Callable[[], Any], on_done: Optional[Callable[[Call], None]] = None) -> Optional[Call]:
        """Run a supervisor check (ping, probe, reconnect) or a control-plane call on a check worker;
        None when all of them are busy."""
        return self.checks.try_submit(lambda _call: fn(), on_done=on_done)

    def run(self, op: str, timeout_s: float, fn: Callable[[], Any]) -> tuple[Outcome, Any]:
        """A control-plane call (switch probe, clear): bypasses the breaker and does not feed it."""
        start = self._clock()
        call = self.check(fn)
        if call is None:
            outcome, result = Outcome.SHORT_CIRCUITED, None
        elif not call.wait(timeout_s) or not call.finished:
            call.fence()
            outcome, result = Outcome.TIMEOUT, None
        elif call.error is not None:
            outcome, result = classify(call.error), None
        else:
            outcome, result = Outcome.OK, call.result
        with self._lock:
            self.stats.record(op, outcome, self._clock() - start)
        return outcome, result

    def feed_ping(self, generation: int, ok: bool) -> None:
        """A health ping admitted in ``generation`` finished (or timed out)."""
        self._step(lambda b, now: b.on_result(generation, now, Verdict.SUCCESS if ok else Verdict.FAILURE), ok)

    def feed_probe(self, ok: bool, detail: str = "") -> None:
        self._step(lambda b, now: b.on_probe(now, ok, detail), ok)

    def apply(self, step: Callable[[Breaker, float], Optional[Transition]]) -> Optional[Transition]:
        """Run one breaker step (tick, trip, detach, attach, reset, retry_now) and act on its transition."""
        return self._step(step, False)

    def _step(self, step: Callable[[Breaker, float], Optional[Transition]], probe_ok: bool) -> Optional[Transition]:
        with self._lock:
            now = self._clock()
            if probe_ok:
                self.last_probe_ok = now
            transition = step(self.breaker, now)
        if transition:
            self._announce(transition)
        return transition

    def _announce(self, transition: Transition) -> None:
        with self._lock:
            t = self.stats.transitions
            t[transition.to_state] = t.get(transition.to_state, 0) + 1
        if transition.to_state in (CIRCUIT_BROKEN, DETACHED):
            self.bulkhead.fence_all()  # nobody waits out a deadline on a member known to be bad
        for listener in self.listeners:
            listener(self, transition)

    def snapshot(self) -> dict:
        self.drain()
        with self._lock:
            age = None if self.last_probe_ok is None else round(self._clock() - self.last_probe_ok, 3)
            return {"state": self.breaker.state, "probe_ok_age_s": age, **self.stats.snapshot()}

    def close(self) -> None:
        self.bulkhead.close()
        self.checks.close()
        try:
            self.backend.close()
        except Exception:  # closing a broken backend must not fail a switch or a shutdown
            log.debug("hicache-ha: closing %r failed", self.name, exc_info=True)
