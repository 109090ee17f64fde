"""The breaker of one member: healthy → circuit_broken → recovering → healthy (or back), plus detached.

A pure state machine: time comes in as arguments, randomness is injected, nothing blocks and nothing
runs I/O. Its owner serialises calls (one lock per member) and runs probes off the engine's threads.

- healthy: all calls pass; results feed the detector; a trip → circuit_broken.
- circuit_broken: no call passes (the engine's calls short-circuit at once); after a backoff that
  doubles with each consecutive trip (capped, jittered) → recovering.
- recovering: background probes (canary write / read back / verify) plus at most ``trial_calls``
  engine calls; ``probes_required`` probe successes with no failed trial → healthy; any failure, or
  ``time_limit`` passing → circuit_broken with a longer backoff.
- detached: the admin took it out; only the admin brings it back (→ recovering).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

from .backoff import Backoff
from .detectors import Detector

HEALTHY = "healthy"
CIRCUIT_BROKEN = "circuit_broken"
RECOVERING = "recovering"
DETACHED = "detached"
STATES = (HEALTHY, CIRCUIT_BROKEN, RECOVERING, DETACHED)


@dataclass(frozen=True)
class Transition:
    from_state: str
    to_state: str
    reason: str


class Breaker:
    def __init__(self, detector: Detector, backoff: Backoff, *, probes_required: int = 3, trial_calls: int = 10,
                 time_limit: float = 5.0, rand: Callable[[], float] = random.random, now: float = 0.0) -> None:
        self.detector = detector
        self.backoff = backoff
        self.probes_required = probes_required
        self.trial_calls = trial_calls
        self.time_limit = time_limit
        self._rand = rand
        self.state = HEALTHY
        self.trips = 0  # consecutive trips without a successful recovery: the backoff exponent
        self.retry_at: Optional[float] = None
        self.recovering_since: Optional[float] = None
        self.healthy_since: Optional[float] = now
        self.probe_successes = 0
        self.trials_started = 0
        self.trials_ok = 0

    # -- the engine path ----------------------------------------------------------------------------
    def allow(self) -> bool:
        """May an engine call go to this member now? Never blocks; counts trial calls when recovering."""
        if self.state == HEALTHY:
            return True
        if self.state == RECOVERING and self.trials_started < self.trial_calls:
            self.trials_started += 1
            return True
        return False

    def on_result(self, now: float, failed: bool, slow: bool = False) -> Optional[Transition]:
        """A call (or a health ping) finished."""
        if self.state == HEALTHY:
            self.detector.record(now, failed, slow)
            reason = self.detector.tripped(now)
            return self._trip(now, reason) if reason else None
        if self.state == RECOVERING:
            if failed:
                return self._trip(now, "trial call failed")
            self.trials_ok += 1
            return self._maybe_recovered(now)
        return None  # late results of calls admitted before the trip

    # -- the background path ------------------------------------------------------------------------
    def on_probe(self, now: float, ok: bool, detail: str = "") -> Optional[Transition]:
        """A recovery probe finished."""
        if self.state != RECOVERING:
            return None
        if not ok:
            return self._trip(now, f"recovery probe failed{': ' + detail if detail else ''}")
        self.probe_successes += 1
        return self._maybe_recovered(now)

    def tick(self, now: float) -> Optional[Transition]:
        """Advance time: end a backoff, or end a recovery that took too long."""
        if self.state == CIRCUIT_BROKEN and self.retry_at is not None and now >= self.retry_at:
            return self._recover(now, "backoff elapsed")
        if self.state == RECOVERING and now - self.recovering_since >= self.time_limit:
            return self._trip(now, f"recovery not done within {self.time_limit:g} s")
        return None

    def retry_now(self, now: float) -> None:
        """End the backoff early (the adapter found another instance of the cluster to try)."""
        if self.state == CIRCUIT_BROKEN:
            self.retry_at = now

    # -- the admin ----------------------------------------------------------------------------------
    def detach(self, now: float, reason: str = "detached by admin") -> Optional[Transition]:
        if self.state == DETACHED:
            return None
        return self._to(DETACHED, reason)

    def attach(self, now: float, reason: str = "attached by admin") -> Optional[Transition]:
        if self.state != DETACHED:
            return None
        self.trips = 0
        return self._recover(now, reason)

    def reset(self, now: float, reason: str) -> Optional[Transition]:
        """Declare the member healthy (a switch just probed it successfully)."""
        if self.state == HEALTHY:
            return None
        self.trips = 0
        self.recovering_since = self.retry_at = None
        self.healthy_since = now
        self.detector.reset()
        return self._to(HEALTHY, reason)

    def trip(self, now: float, reason: str) -> Optional[Transition]:
        """Take the member out of traffic now (e.g. a failed switch probe)."""
        if self.state in (CIRCUIT_BROKEN, DETACHED):
            return None
        return self._trip(now, reason)

    # -- internals ----------------------------------------------------------------------------------
    def _to(self, state: str, reason: str) -> Transition:
        t = Transition(self.state, state, reason)
        self.state = state
        return t

    def _trip(self, now: float, reason: str) -> Transition:
        self.trips += 1
        self.retry_at = now + self.backoff.compute(self.trips, self._rand)
        self.recovering_since = None
        self.healthy_since = None
        self.detector.reset()
        return self._to(CIRCUIT_BROKEN, reason)

    def _recover(self, now: float, reason: str) -> Transition:
        self.recovering_since = now
        self.retry_at = None
        self.probe_successes = self.trials_started = self.trials_ok = 0
        return self._to(RECOVERING, reason)

    def _maybe_recovered(self, now: float) -> Optional[Transition]:
        if self.probe_successes >= self.probes_required and self.trials_ok == self.trials_started:
            self.trips = 0
            self.recovering_since = None
            self.healthy_since = now
            self.detector.reset()
            return self._to(HEALTHY, f"{self.probe_successes} probes and {self.trials_ok} trial calls succeeded")
        return None
