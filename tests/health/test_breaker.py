import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache_ha.health.backoff import Backoff
from hicache_ha.health.breaker import CIRCUIT_BROKEN, DETACHED, HEALTHY, RECOVERING, Breaker
from hicache_ha.health.detectors import ConsecutiveFailures


def breaker(**kw):
    opts = dict(probes_required=2, trial_calls=3, time_limit=2.0, rand=lambda: 1.0)
    opts.update(kw)
    return Breaker(ConsecutiveFailures(2), Backoff(1.0, 8.0, 0.5), **opts)


def test_the_whole_cycle_with_an_injected_clock():
    b = breaker()
    assert b.allow()
    assert b.on_result(0.0, True) is None
    t = b.on_result(0.1, True)
    assert (t.from_state, t.to_state) == (HEALTHY, CIRCUIT_BROKEN)
    assert not b.allow()  # short-circuits at once
    assert b.tick(1.0) is None  # backoff: 1 s from 0.1
    assert b.tick(1.1).to_state == RECOVERING
    assert b.allow() and b.allow() and b.allow() and not b.allow()  # three trial calls, no more
    for _ in range(3):
        b.on_result(1.2, False)
    assert b.on_probe(1.3, True) is None
    assert b.on_probe(1.4, True).to_state == HEALTHY
    assert b.trips == 0 and b.healthy_since == 1.4


def test_a_failed_probe_breaks_again_with_a_longer_backoff():
    b = breaker()
    b.on_result(0, True), b.on_result(0, True)
    first = b.retry_at
    b.tick(first)
    b.on_probe(first + 0.1, False, "canary mismatch")
    assert b.state == CIRCUIT_BROKEN and b.retry_at - (first + 0.1) == 2.0


def test_recovering_never_outlives_its_time_limit():
    b = breaker()
    b.on_result(0, True), b.on_result(0, True)
    b.tick(5)
    assert b.state == RECOVERING
    assert b.tick(6.9) is None
    assert b.tick(7.0).reason == "recovery not done within 2 s"


def test_detach_holds_until_the_admin_attaches():
    b = breaker()
    b.detach(0)
    assert b.state == DETACHED and not b.allow()
    assert b.tick(1000) is None
    assert b.attach(1000).to_state == RECOVERING


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of calls, results, probes and time against the breaker's promises."""

    def __init__(self):
        super().__init__()
        self.rng = random.Random(0)
        self.backoff = Backoff(0.5, 4.0, 0.5)
        self.b = Breaker(ConsecutiveFailures(3), self.backoff, probes_required=2, trial_calls=4, time_limit=1.5,
                         rand=self.rng.random)
        self.now = 0.0
        self.admitted = 0  # trial calls admitted in the current recovering period
        self.tripped_at = None

    def _after(self, transition):
        if transition and transition.to_state == CIRCUIT_BROKEN:
            self.tripped_at = self.now
            low, high = self.backoff.bounds(self.b.trips)
            assert low <= self.b.retry_at - self.now <= high
        if transition and transition.to_state == RECOVERING:
            self.admitted = 0

    @rule(dt=st.floats(0, 3))
    def advance(self, dt):
        self.now += dt
        self._after(self.b.tick(self.now))

    @rule(failed=st.booleans(), slow=st.booleans())
    def engine_call(self, failed, slow):
        state = self.b.state
        if self.b.allow():
            assert state in (HEALTHY, RECOVERING)
            if state == RECOVERING:
                self.admitted += 1
            self._after(self.b.on_result(self.now, failed, slow))
        else:
            assert state != HEALTHY

    @rule(ok=st.booleans())
    def probe(self, ok):
        self._after(self.b.on_probe(self.now, ok))

    @precondition(lambda self: self.b.state != DETACHED)
    @rule()
    def admin_detach(self):
        self.b.detach(self.now)

    @precondition(lambda self: self.b.state == DETACHED)
    @rule()
    def admin_attach(self):
        self._after(self.b.attach(self.now))

    @invariant()
    def trials_never_exceed_the_limit(self):
        assert self.b.trials_started <= self.b.trial_calls
        assert self.admitted <= self.b.trial_calls

    @invariant()
    def recovering_is_bounded_once_time_is_told(self):
        if self.b.state == RECOVERING:
            self.b.tick(self.now)
            if self.b.state == RECOVERING:
                assert self.now - self.b.recovering_since < self.b.time_limit

    @invariant()
    def a_broken_member_always_has_a_retry_time(self):
        if self.b.state == CIRCUIT_BROKEN:
            assert self.b.retry_at is not None


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestBreakerStateMachine = BreakerMachine.TestCase
