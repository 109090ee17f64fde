"""The breaker of one member: healthy → circuit_broken → recovering → healthy (or back), plus detached.

A pure state machine: time comes in as arguments, randomness is injected, nothing blocks and nothing
runs I/O. Its owner serialises calls (one lock per member) and acts on the transitions it returns.

- healthy: every call is admitted; results feed the detector; a trip → circuit_broken.
- circuit_broken: nothing is admitted; after a backoff → recovering. The backoff grows with each trip
  that follows another without a lasting recovery, and shrinks one step for every ``decay`` seconds the
  member then stays healthy (Envoy's ejection multiplier), so a flapping member is retried ever later.
- recovering: background probes (canary write / read back / verify) plus at most ``trial_calls``
  engine calls. Once ``probes_required`` probes passed, the trials that came back decide: a failure
  share below ``trial_failure_threshold`` → healthy (resilience4j's half-open verdict). A failed probe,
  too many failed trials, or ``time_limit`` passing → circuit_broken.
- detached: the admin took it out; only the admin brings it back (→ recovering).

Every admission carries the breaker's ``generation``, which changes with every transition. A result is
only counted by the generation that admitted it: a late answer of a call admitted before a trip never
judges the recovery that follows. ``IGNORED`` results (refused by our own bulkhead, fenced by a switch
or a trip, cancelled before they reached the backend) are news about hicache-ha, not about the backend:
they give back a trial permit and count neither way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

from .backoff import Backoff
from .detectors import Detector

HEALTHY = "healthy"
CIRCUIT_BROKEN = "circuit_broken"
RECOVERING = "recovering"
DETACHED = "detached"
STATES = (HEALTHY, CIRCUIT_BROKEN, RECOVERING, DETACHED)

# Which transitions exist (resilience4j checks against a table too): anything else is a bug.
ALLOWED = {
    (HEALTHY, CIRCUIT_BROKEN), (HEALTHY, DETACHED),
    (CIRCUIT_BROKEN, RECOVERING), (CIRCUIT_BROKEN, DETACHED), (CIRCUIT_BROKEN, HEALTHY),
    (RECOVERING, HEALTHY), (RECOVERING, CIRCUIT_BROKEN), (RECOVERING, DETACHED),
    (DETACHED, RECOVERING), (DETACHED, HEALTHY),
}

REFUSED = -1  # what ``admit`` returns when the call may not go to the backend


class Verdict(Enum):
    """How one finished call counts."""

    SUCCESS = "success"
    FAILURE = "failure"
    SLOW = "slow"  # it ran out of its deadline: judged by the slow-call rate, not as a failure
    IGNORED = "ignored"


@dataclass(frozen=True)
class Transition:
    from_state: str
    to_state: str
    reason: str


class Breaker:
    def __init__(self, detector: Detector, backoff: Backoff, *, probes_required: int = 3, trial_calls: int = 10,
                 trial_failure_threshold: float = 0.5, time_limit: float = 5.0, decay: float = 10.0,
                 rand: Callable[[], float] = random.random, now: float = 0.0) -> None:
        self.detector = detector
        self.backoff = backoff
        self.probes_required = probes_required
        self.trial_calls = trial_calls
        self.trial_failure_threshold = trial_failure_threshold
        self.time_limit = time_limit
        self.decay = decay
        self._rand = rand
        self.state = HEALTHY
        self.generation = 0
        self.trips = 0  # the backoff exponent: grows with each trip, decays while healthy
        self.retry_at: Optional[float] = None
        self.recovering_since: Optional[float] = None
        self.healthy_since: Optional[float] = now
        self.next_decay: Optional[float] = None
        self.probe_successes = 0
        self.trials_admitted = 0
        self.trials_done = 0
        self.trials_failed = 0

    # -- admission and results ----------------------------------------------------------------------
    def admit(self) -> int:
        """The generation a call is admitted in, or REFUSED. Never blocks; counts trial permits."""
        if self.state == HEALTHY:
            return self.generation
        if self.state == RECOVERING and self.trials_admitted < self.trial_calls:
            self.trials_admitted += 1
            return self.generation
        return REFUSED

    def on_result(self, generation: int, now: float, verdict: Verdict, slow: bool = False) -> Optional[Transition]:
        """A call admitted in ``generation`` finished (or a health ping, admitted by ``admit`` too)."""
        if generation != self.generation:
            return None  # admitted before a transition: it says nothing about the state we are in now
        if self.state == HEALTHY:
            if verdict is Verdict.IGNORED:
                return None
            self.detector.record(now, verdict is Verdict.FAILURE, slow or verdict is Verdict.SLOW)
            reason = self.detector.tripped(now)
            return self._trip(now, reason) if reason else None
        if self.state == RECOVERING:
            if verdict is Verdict.IGNORED:
                self.trials_admitted = max(0, self.trials_admitted - 1)  # the permit goes back
                return None
            self.trials_done += 1
            self.trials_failed += verdict is not Verdict.SUCCESS  # a recovering member must also be quick
            return self._judge(now)
        return None

    def on_probe(self, now: float, ok: bool, detail: str = "") -> Optional[Transition]:
        """A recovery probe finished (probes that could not run are not reported at all)."""
        if self.state != RECOVERING:
            return None
        if not ok:
            return self._trip(now, f"recovery probe failed{': ' + detail if detail else ''}")
        self.probe_successes += 1
        return self._judge(now)

    def tick(self, now: float) -> Optional[Transition]:
        """Advance time: end a backoff, end a recovery that took too long, decay the backoff."""
        if self.state == CIRCUIT_BROKEN and self.retry_at is not None and now >= self.retry_at:
            return self._recover(now, "backoff elapsed")
        if self.state == RECOVERING and now - self.recovering_since >= self.time_limit:
            return self._trip(now, f"recovery not done within {self.time_limit:g} s")
        if self.state == HEALTHY and self.trips and self.next_decay is not None and now >= self.next_decay:
            self.trips -= 1
            self.next_decay = now + self.decay if self.trips else None
        return None

    def retry_now(self, now: float) -> None:
        """End the backoff early (the adapter found another instance of the cluster to try)."""
        if self.state == CIRCUIT_BROKEN:
            self.retry_at = now

    # -- the admin and the switch -------------------------------------------------------------------
    def detach(self, now: float, reason: str = "detached by admin") -> Optional[Transition]:
        if self.state == DETACHED:
            return None
        self.retry_at = self.recovering_since = self.healthy_since = None
        return self._to(DETACHED, reason)

    def attach(self, now: float, reason: str = "attached by admin") -> Optional[Transition]:
        if self.state != DETACHED:
            return None
        self.trips = 0
        return self._recover(now, reason)

    def reset(self, now: float, reason: str) -> Optional[Transition]:
        """Declare the member healthy (a switch just probed it successfully). The backoff exponent stays:
        only time spent healthy earns it down."""
        if self.state == HEALTHY:
            return None
        return self._healthy(now, reason)

    def trip(self, now: float, reason: str) -> Optional[Transition]:
        """Take the member out of traffic now (e.g. a failed switch probe)."""
        if self.state in (CIRCUIT_BROKEN, DETACHED):
            return None
        return self._trip(now, reason)

    # -- internals ----------------------------------------------------------------------------------
    def _to(self, state: str, reason: str) -> Transition:
        if (self.state, state) not in ALLOWED:
            raise AssertionError(f"breaker: no transition {self.state} -> {state}")
        t = Transition(self.state, state, reason)
        self.state = state
        self.generation += 1
        return t

    def _trip(self, now: float, reason: str) -> Transition:
        self.trips += 1
        self.retry_at = now + self.backoff.compute(self.trips, self._rand)
        self.recovering_since = self.healthy_since = self.next_decay = None
        self.detector.reset()
        return self._to(CIRCUIT_BROKEN, reason)

    def _recover(self, now: float, reason: str) -> Transition:
        self.recovering_since = now
        self.retry_at = None
        self.probe_successes = self.trials_admitted = self.trials_done = self.trials_failed = 0
        return self._to(RECOVERING, reason)

    def _healthy(self, now: float, reason: str) -> Transition:
        self.recovering_since = self.retry_at = None
        self.healthy_since = now
        self.next_decay = now + self.decay if self.trips else None
        self.detector.reset()
        return self._to(HEALTHY, reason)

    def _judge(self, now: float) -> Optional[Transition]:
        """The recovering verdict, over the trials that came back."""
        allowed_failures = self.trial_failure_threshold * self.trial_calls
        if self.trials_failed and self.trials_failed >= allowed_failures:
            return self._trip(now, f"{self.trials_failed} of {self.trials_done} trial calls failed")
        if self.probe_successes < self.probes_required:
            return None
        if self.trials_done and self.trials_failed >= self.trial_failure_threshold * self.trials_done:
            return self._trip(now, f"{self.trials_failed} of {self.trials_done} trial calls failed")
        return self._healthy(now, f"{self.probe_successes} probes and {self.trials_done - self.trials_failed} "
                                  f"of {self.trials_done} trial calls succeeded")
