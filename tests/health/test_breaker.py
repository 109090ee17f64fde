import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache_ha.health.backoff import Backoff
from hicache_ha.health.breaker import (
    ALLOWED, CIRCUIT_BROKEN, DETACHED, HEALTHY, RECOVERING, REFUSED, Breaker, Verdict,
)
from hicache_ha.health.detectors import ConsecutiveFailures

OK, FAIL, IGNORE = Verdict.SUCCESS, Verdict.FAILURE, Verdict.IGNORED


def breaker(**kw):
    opts = dict(probes_required=2, trial_calls=4, time_limit=2.0, decay=10.0, rand=lambda: 1.0)
    opts.update(kw)
    return Breaker(ConsecutiveFailures(2), Backoff(1.0, 8.0, 0.5), **opts)


def trip(b, now=0.0):
    g = b.admit()
    b.on_result(g, now, FAIL)
    t = b.on_result(b.admit(), now, FAIL)
    assert t.to_state == CIRCUIT_BROKEN
    return t


def test_the_whole_cycle_with_an_injected_clock():
    b = breaker()
    trip(b, 0.1)
    assert b.admit() == REFUSED  # short-circuits at once
    assert b.tick(1.0) is None  # backoff: 1 s from 0.1
    assert b.tick(1.1).to_state == RECOVERING
    gens = [b.admit() for _ in range(4)]
    assert REFUSED not in gens and b.admit() == REFUSED  # four trial calls, no more
    for g in gens:
        assert b.on_result(g, 1.2, OK) is None
    assert b.on_probe(1.3, True) is None
    t = b.on_probe(1.4, True)
    assert t.to_state == HEALTHY and "4 of 4 trial calls" in t.reason
    assert b.healthy_since == 1.4


def test_a_late_result_of_a_call_admitted_before_the_trip_never_judges_the_recovery():
    b = breaker()
    stuck = [b.admit() for _ in range(3)]  # admitted while healthy, their answers come late
    trip(b)
    b.tick(10)
    assert b.state == RECOVERING
    for g in stuck:
        assert b.on_result(g, 10.1, FAIL) is None  # from an earlier generation: dropped
    assert b.state == RECOVERING and b.trials_done == 0
    b.on_probe(10.2, True)
    assert b.on_probe(10.3, True).to_state == HEALTHY


def test_ignored_results_give_the_trial_permit_back_and_count_neither_way():
    b = breaker(trial_calls=1)
    trip(b)
    b.tick(10)
    g = b.admit()
    assert b.admit() == REFUSED
    assert b.on_result(g, 10.1, IGNORE) is None  # refused by our own bulkhead: the permit returns
    g = b.admit()
    assert g != REFUSED
    assert b.trials_done == 0


def test_ignored_results_never_trip_a_healthy_member():
    b = breaker()
    for _ in range(100):
        assert b.on_result(b.admit(), 0.0, IGNORE) is None
    assert b.state == HEALTHY


def test_recovery_is_a_threshold_over_the_trials_that_came_back():
    b = breaker(trial_calls=10, trial_failure_threshold=0.5)
    trip(b)
    b.tick(10)
    gens = [b.admit() for _ in range(10)]
    b.on_result(gens[0], 10.1, FAIL)  # one bad trial out of the ones that came back is not a verdict
    for g in gens[1:4]:
        b.on_result(g, 10.1, OK)
    b.on_probe(10.2, True)
    t = b.on_probe(10.3, True)
    assert t.to_state == HEALTHY and "3 of 4 trial calls succeeded" in t.reason


def test_too_many_failed_trials_break_it_again_before_the_probes_finish():
    b = breaker(trial_calls=10, trial_failure_threshold=0.5)
    trip(b)
    b.tick(10)
    gens = [b.admit() for _ in range(10)]
    for g in gens[:4]:
        assert b.on_result(g, 10.1, FAIL) is None
    t = b.on_result(gens[4], 10.1, FAIL)
    assert t.to_state == CIRCUIT_BROKEN and t.reason == "5 of 5 trial calls failed"


def test_a_failed_probe_breaks_again_with_a_longer_backoff():
    b = breaker()
    trip(b)
    first = b.retry_at
    b.tick(first)
    b.on_probe(first + 0.1, False, "canary mismatch")
    assert b.state == CIRCUIT_BROKEN and b.retry_at - (first + 0.1) == 2.0


def test_recovering_never_outlives_its_time_limit():
    b = breaker()
    trip(b)
    b.tick(5)
    assert b.state == RECOVERING
    assert b.tick(6.9) is None
    assert b.tick(7.0).reason == "recovery not done within 2 s"


def test_the_backoff_decays_one_step_per_decay_interval_of_health_instead_of_resetting():
    b = breaker(decay=10.0)
    now = 0.0
    for expected in (1.0, 2.0, 4.0):  # a flapping member waits longer each time
        trip(b, now)
        assert b.retry_at - now == expected
        now = b.retry_at
        b.tick(now)
        b.on_probe(now, True)
        assert b.on_probe(now, True).to_state == HEALTHY
    assert b.trips == 3  # a recovery alone does not forget the flapping
    trip(b, now + 1)
    assert b.retry_at - (now + 1) == 8.0
    now = b.retry_at
    b.tick(now), b.on_probe(now, True), b.on_probe(now, True)
    assert b.trips == 4
    b.tick(now + 9.9)
    assert b.trips == 4
    b.tick(now + 10.0)
    assert b.trips == 3
    b.tick(now + 20.0)
    b.tick(now + 30.0)
    b.tick(now + 40.0)
    assert b.trips == 0 and b.next_decay is None


def test_detach_holds_until_the_admin_attaches():
    b = breaker()
    b.detach(0)
    assert b.state == DETACHED and b.admit() == REFUSED
    assert b.tick(1000) is None
    assert b.attach(1000).to_state == RECOVERING


def test_a_transition_outside_the_table_is_a_bug():
    b = breaker()
    with pytest.raises(AssertionError):
        b._to(RECOVERING, "no such edge")


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of admissions, late results, probes, admin steps and time against the
    breaker's promises. Calls are admitted and answered out of order, as on a loaded machine."""

    def __init__(self):
        super().__init__()
        self.rng = random.Random(0)
        self.backoff = Backoff(0.5, 4.0, 0.5)
        self.b = Breaker(ConsecutiveFailures(3), self.backoff, probes_required=2, trial_calls=4, time_limit=1.5,
                         decay=5.0, rand=self.rng.random)
        self.now = 0.0
        self.open_calls: list[int] = []  # generations of calls admitted and not answered yet
        self.last_state = HEALTHY

    def _after(self, transition):
        if transition is not None:
            assert (transition.from_state, transition.to_state) in ALLOWED
            if transition.to_state == CIRCUIT_BROKEN:
                low, high = self.backoff.bounds(self.b.trips)
                assert low <= self.b.retry_at - self.now <= high

    @rule(dt=st.floats(0, 3))
    def advance(self, dt):
        self.now += dt
        self._after(self.b.tick(self.now))

    @rule()
    def admit(self):
        state = self.b.state
        g = self.b.admit()
        if g == REFUSED:
            assert state != HEALTHY
        else:
            assert state in (HEALTHY, RECOVERING) and g == self.b.generation
            self.open_calls.append(g)

    @precondition(lambda self: self.open_calls)
    @rule(i=st.integers(0, 100), verdict=st.sampled_from(list(Verdict)), slow=st.booleans())
    def answer(self, i, verdict, slow):
        g = self.open_calls.pop(i % len(self.open_calls))
        before = (self.b.state, self.b.generation, self.b.trials_done)
        t = self.b.on_result(g, self.now, verdict, slow)
        self._after(t)
        if g != before[1]:  # late: from an earlier generation, it changes nothing
            assert t is None and (self.b.state, self.b.generation, self.b.trials_done) == before
        if verdict is Verdict.IGNORED:  # our own refusal or fencing: never a transition
            assert t is None

    @rule(ok=st.booleans())
    def probe(self, ok):
        self._after(self.b.on_probe(self.now, ok))

    @precondition(lambda self: self.b.state != DETACHED)
    @rule()
    def admin_detach(self):
        self._after(self.b.detach(self.now))

    @precondition(lambda self: self.b.state == DETACHED)
    @rule()
    def admin_attach(self):
        self._after(self.b.attach(self.now))

    @precondition(lambda self: self.b.state != HEALTHY)
    @rule()
    def switch_resets(self):
        self._after(self.b.reset(self.now, "switch probe passed"))

    @invariant()
    def trials_never_exceed_the_limit(self):
        assert 0 <= self.b.trials_admitted <= self.b.trial_calls
        assert self.b.trials_done <= self.b.trial_calls

    @invariant()
    def recovering_is_bounded_once_time_is_told(self):
        if self.b.state == RECOVERING:
            self._after(self.b.tick(self.now))
            if self.b.state == RECOVERING:
                assert self.now - self.b.recovering_since < self.b.time_limit

    @invariant()
    def a_broken_member_always_has_a_retry_time(self):
        if self.b.state == CIRCUIT_BROKEN:
            assert self.b.retry_at is not None

    @invariant()
    def the_backoff_exponent_is_never_negative(self):
        assert self.b.trips >= 0


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=80, deadline=None)
TestBreakerStateMachine = BreakerMachine.TestCase
