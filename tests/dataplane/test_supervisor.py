"""The supervisor through its narrow interface (``SupervisedRank``), with an injected clock.

Members are real (bulkhead, breaker, stats) over a scripted in-memory backend; the rank around them is
a few lines. Time only moves when a test moves it; checks run on the members' real workers, and each
test waits for them to finish (``settle``) before the next step, so nothing depends on the machine's speed.
"""

import threading
import time

import pytest

from hicache_ha.backends.errors import BackendUnavailable
from hicache_ha.backends.memory import MemoryBackend, MemoryConfig
from hicache_ha.config import FailoverConfig, HealthConfig
from hicache_ha.dataplane.member import Member
from hicache_ha.dataplane.supervisor import FAILOVER_RETRY_S, MAX_STARVED_CREDIT_S, Supervisor, lateness
from hicache_ha.health.breaker import CIRCUIT_BROKEN, HEALTHY, RECOVERING

PING_S, PING_TIMEOUT_S = 0.05, 0.1


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Scripted(MemoryBackend):
    """Pings and probes fail while ``down``; they hang while ``hung`` is set."""

    def __init__(self, config):
        super().__init__(config)
        self.down = False
        self.hung = threading.Event()
        self.pings = 0
        self.probes = 0

    def _answer(self):
        while self.hung.is_set():
            time.sleep(0.001)
        if self.down:
            raise BackendUnavailable("down", backend=self.name)

    def ping(self):
        self.pings += 1
        self._answer()

    def probe(self):
        self.probes += 1
        self._answer()


class Rank:
    """All a supervisor needs of its rank."""

    def __init__(self, members):
        self.members = members
        self.active = members[0]
        self.moves = []
        self.notes = []

    def all_members(self):
        return self.members

    def active_member(self):
        return self.active

    def failover_to(self, target, reason):
        self.moves.append((target.name, reason))
        self.active = target

    def note(self, member, reason, **detail):
        self.notes.append((member.name, reason))


def health(**over):
    doc = {"ping": {"interval_ms": 50, "standby_interval_ms": 1000, "timeout_ms": 100},
           "backoff": {"base_ms": 500, "cap_ms": 4000, "jitter": 0},
           "recovery": {"probes": 2, "probe_interval_ms": 50, "probe_timeout_ms": 200}}
    doc.update(over)
    return HealthConfig.model_validate(doc)


@pytest.fixture
def world():
    clock = Clock()
    built = []

    def make(names=("primary", "standby"), failover=None, **health_over):
        h = health(**health_over)
        members = [Member(MemoryConfig(name=n, type="memory"), Scripted(MemoryConfig(name=n, type="memory")),
                          2, 2, h, clock=clock) for n in names]
        built.extend(members)
        rank = Rank(members)
        sup = Supervisor(rank, h, FailoverConfig.model_validate(failover or {}), names[0], clock=clock)
        return rank, sup, {m.name: m for m in members}

    yield clock, make
    for m in built:
        m.backend.hung.clear()
        m.close()


def settle(sup):
    """Wait (real time) until every check has finished, or hangs in a hung backend, or waits for a
    worker that every hung call holds: then the next step sees what a fast machine would."""
    def waiting(c):
        if c.call is None or c.call.finished:
            return False
        if not c.member.backend.hung.is_set():
            return True
        bulkhead = c.member.checks
        with bulkhead.lock:
            running = sum(1 for o in bulkhead._calls if o.started is not None and not o.finished)
        return c.call.started is None and running < bulkhead._workers

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(waiting(c) for c in sup.pending.values()):
            return
        time.sleep(0.001)
    raise AssertionError("checks did not finish")


def run(sup, clock, seconds, step=0.01):
    """Step the supervisor while the injected clock moves ``seconds`` forward."""
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        sup.step()
        settle(sup)
        clock.advance(step)
    sup.step()
    settle(sup)
    sup.step()


def test_an_idle_active_member_is_pinged_every_interval_and_a_down_one_trips(world):
    clock, make = world
    rank, sup, m = make()
    run(sup, clock, 0.5)
    assert 9 <= m["primary"].backend.pings <= 12  # every 50 ms over 0.5 s
    assert m["standby"].backend.pings == 1  # standbys every second
    m["primary"].backend.down = True
    run(sup, clock, 0.2)
    assert m["primary"].state == CIRCUIT_BROKEN


def test_engine_calls_that_just_succeeded_stand_in_for_pings(world):
    clock, make = world
    rank, sup, m = make()
    run(sup, clock, 0.1)
    before = m["primary"].backend.pings
    for _ in range(30):  # traffic: an engine call succeeds every 10 ms
        m["primary"].last_ok = clock.now
        run(sup, clock, 0.01)
    assert m["primary"].backend.pings == before


def test_an_unanswered_ping_is_a_failure_once_its_timeout_passes_on_the_injected_clock(world):
    clock, make = world
    rank, sup, m = make()
    primary = m["primary"]
    primary.backend.hung.set()
    run(sup, clock, 0.09)
    assert primary.state == HEALTHY  # the first ping is not late yet
    run(sup, clock, 0.2)
    assert primary.state == CIRCUIT_BROKEN
    assert rank.moves == [("standby", "failover")]  # make-before-break: the standby was probed


def test_time_the_process_was_kept_from_running_is_not_held_against_a_ping(world):
    """On a host whose cores are all busy, the supervisor wakes late, and so does a ping's worker: a ping
    gets its whole timeout of running time. A hung backend is still found, once the process runs."""
    clock, make = world
    rank, sup, m = make()
    primary = m["primary"]
    primary.backend.hung.set()
    for _ in range(50):  # 0.5 s in which every 10 ms step came 9 ms late: 50 ms of running time
        sup.note_lateness(clock.now, 0.009)
        run(sup, clock, 0.01)
    assert primary.state == HEALTHY and rank.moves == []  # unanswered, but for less than 100 ms of running time
    run(sup, clock, 0.3)  # the process runs again
    assert primary.state == CIRCUIT_BROKEN and rank.moves == [("standby", "failover")]


def test_a_host_that_stays_starved_still_finds_a_hung_backend(world):
    clock, make = world
    rank, sup, m = make()
    m["primary"].backend.hung.set()
    for _ in range(200):  # 2 s, every 10 ms step 9.9 ms late, for ever
        sup.note_lateness(clock.now, 0.0099)
        run(sup, clock, 0.01)
        if m["primary"].state == CIRCUIT_BROKEN:
            break
    assert m["primary"].state == CIRCUIT_BROKEN
    assert clock.now - 100.0 <= 0.1 + MAX_STARVED_CREDIT_S + 0.2  # timeout + the most credit + pings' pace


@pytest.mark.parametrize("began,wait,asked,woke,late", [
    (0.0, 0.1, None, 0.1, 0.0),  # woke when its wait ended
    (0.0, 0.1, None, 0.13, 0.03),  # 30 ms late
    (0.0, 0.1, 0.02, 0.02, 0.0),  # woken at once by a wake-up asked for during the wait
    (0.0, 0.1, 0.02, 0.05, 0.03),  # ... but ran 30 ms after it
    (0.0, 0.1, -0.5, 0.001, 0.001),  # asked before the wait began: due at once
])
def test_lateness_is_measured_from_when_the_supervisor_was_due(began, wait, asked, woke, late):
    assert lateness(began, wait, asked, woke) == pytest.approx(late)


def test_a_check_that_never_reached_the_backend_is_not_news_about_it(world):
    clock, make = world
    rank, sup, m = make()
    primary = m["primary"]
    gate = threading.Event()
    taken = [primary.check(gate.wait) for _ in range(8)]  # our own work fills the check workers and queue
    try:
        run(sup, clock, 0.5)
        assert primary.state == HEALTHY and primary.backend.pings == 0
    finally:
        gate.set()
    for call in taken:
        call.wait(2)


def test_recovery_after_the_backoff_needs_its_probes(world):
    clock, make = world
    rank, sup, m = make()
    primary = m["primary"]
    primary.backend.down = True
    run(sup, clock, 0.3)
    assert primary.state == CIRCUIT_BROKEN and rank.active.name == "standby"
    retry_at = primary.breaker.retry_at
    run(sup, clock, retry_at - clock.now - 0.02)
    assert primary.state == CIRCUIT_BROKEN  # backoff 500 ms, no jitter
    primary.backend.down = False
    run(sup, clock, 0.03)
    assert primary.state == RECOVERING
    run(sup, clock, 0.1)  # two probes, 50 ms apart
    assert primary.state == HEALTHY
    assert rank.active.name == "standby"  # failback is manual by default


def test_a_failed_probe_sends_it_back_with_a_doubled_backoff(world):
    clock, make = world
    rank, sup, m = make()
    primary = m["primary"]
    primary.backend.down = True
    run(sup, clock, 0.3)
    run(sup, clock, 0.6)  # backoff over; the probe fails
    assert primary.state == CIRCUIT_BROKEN and primary.breaker.trips == 2
    assert primary.breaker.retry_at - clock.now > 0.5


def test_no_failover_to_a_standby_that_fails_its_probe_and_a_retry_at_a_pace(world):
    clock, make = world
    rank, sup, m = make()
    m["standby"].backend.down = True
    m["primary"].backend.down = True
    run(sup, clock, 0.3)
    assert rank.moves == [] and m["standby"].backend.probes >= 1
    probes = m["standby"].backend.probes
    run(sup, clock, 10 * FAILOVER_RETRY_S)
    assert m["standby"].backend.probes - probes <= 11  # paced, not a busy loop


def test_auto_failback_waits_for_the_primary_to_stay_healthy(world):
    clock, make = world
    rank, sup, m = make(failover={"failback": "auto", "failback_after_ms": 1000})
    m["primary"].backend.down = True
    run(sup, clock, 0.3)
    m["primary"].backend.down = False
    run(sup, clock, 0.5)
    assert m["primary"].state == HEALTHY and rank.active.name == "standby"
    healthy_since = m["primary"].breaker.healthy_since
    run(sup, clock, healthy_since + 0.95 - clock.now)
    assert rank.active.name == "standby"  # healthy for less than 1 s
    run(sup, clock, 0.3)
    assert rank.moves[-1] == ("primary", "failback")


def test_engine_results_are_judged_here_and_late_ones_from_before_a_trip_are_dropped(world):
    clock, make = world
    rank, sup, m = make()
    primary = m["primary"]
    gate = threading.Event()

    def hung_then_fail(call, keys):
        gate.wait(5)
        raise BackendUnavailable("late", backend="primary")

    def failing(call, keys):
        raise BackendUnavailable("refused", backend="primary")

    late = threading.Thread(target=primary.call, args=("exists", 5.0, hung_then_fail, ["k"]))
    late.start()  # admitted while healthy; its answer comes after the trip
    for _ in range(3):
        primary.call("exists", 1.0, failing, ["k"])
    assert primary.state == HEALTHY  # nothing is decided on the engine's thread
    sup.step()
    assert primary.state == CIRCUIT_BROKEN
    late.join(2)  # released by the trip's fencing, as short_circuited
    assert not late.is_alive()
    gate.set()
    run(sup, clock, 0.6)
    assert primary.state in (RECOVERING, HEALTHY)
    assert primary.breaker.trials_done == 0


def test_a_timed_out_engine_call_is_confirmed_by_a_ping_at_once(world):
    clock, make = world
    rank, sup, m = make()
    primary = m["primary"]
    run(sup, clock, 0.02)
    pings = primary.backend.pings  # the next scheduled ping is 30 ms away

    def slow(call, keys):
        time.sleep(0.05)

    assert primary.call("get", 0.001, slow, ["k"])[0].value == "timeout"
    sup.step()
    settle(sup)
    assert primary.backend.pings == pings + 1
