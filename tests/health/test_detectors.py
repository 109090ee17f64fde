import pytest

from hicache_ha.health.backoff import Backoff
from hicache_ha.health.detectors import ConsecutiveFailures, FailureRate, SlowCallRate


def feed(d, now, failed, n=1, slow=False):
    for _ in range(n):
        d.record(now, failed, slow)


def test_consecutive_failures_trip_at_the_threshold_and_a_success_resets():
    d = ConsecutiveFailures(3)
    feed(d, 0, True, 2)
    assert d.tripped(0) is None
    feed(d, 0, False)
    feed(d, 0, True, 2)
    assert d.tripped(0) is None
    feed(d, 0, True)
    assert d.tripped(0) == "3 consecutive failures"


def test_failure_rate_needs_the_minimum_volume():
    d = FailureRate(0.5, window=1.0, min_calls=10)
    feed(d, 0.1, True, 9)
    assert d.tripped(0.1) is None
    feed(d, 0.2, False)
    assert d.tripped(0.2) == "failure rate 9/10 in 1 s"


def test_failure_rate_forgets_calls_older_than_its_window():
    d = FailureRate(0.5, window=1.0, min_calls=4)
    feed(d, 0.05, True, 10)
    assert d.tripped(0.5)
    feed(d, 1.5, False, 4)
    assert d.tripped(1.5) is None  # the old failures slid out of the window


def test_failure_rate_below_threshold_stays_quiet():
    d = FailureRate(0.5, window=1.0, min_calls=10)
    feed(d, 0.1, True, 4)
    feed(d, 0.1, False, 6)
    assert d.tripped(0.1) is None


def test_slow_call_rate_counts_slowness_not_failure():
    d = SlowCallRate(0.8, window=1.0, min_calls=5)
    feed(d, 0.1, True, 5)
    assert d.tripped(0.1) is None
    feed(d, 0.2, False, 20, slow=True)
    assert d.tripped(0.2).startswith("slow-call rate")


def test_detectors_combine_with_or():
    d = ConsecutiveFailures(2) | FailureRate(0.9, 1.0, 100) | SlowCallRate(0.5, 1.0, 2)
    assert len(d.detectors) == 3
    feed(d, 0, False, 2, slow=True)
    assert d.tripped(0).startswith("slow-call")
    d.reset()
    assert d.tripped(0) is None


@pytest.mark.parametrize("n", range(1, 12))
def test_backoff_doubles_up_to_its_cap_within_jitter_bounds(n):
    b = Backoff(base=0.5, cap=30, jitter=0.5)
    low, high = b.bounds(n)
    assert high == min(30, 0.5 * 2 ** (n - 1)) and low == high / 2
    assert b.compute(n, lambda: 0.0) == low and b.compute(n, lambda: 1.0) == high


def test_invalid_detector_parameters_are_refused():
    with pytest.raises(ValueError):
        ConsecutiveFailures(0)
    with pytest.raises(ValueError):
        FailureRate(1.5, 1, 1)
