"""The chaos suite, short profile: every fault on real processes with the CPUs busy (stress-ng on
every core). The long profile is ``make chaos`` (bench/chaos.py)."""

import os

import pytest

from hicache_ha.sim import chaos
from hicache_ha.sim.netns import netns_available

ROWS = []

needs_root = {chaos.Blackhole, chaos.DiskFull, chaos.DiskReadOnly}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if ROWS:  # the table, for the log of the run
        print("\n" + chaos.markdown(ROWS))


@pytest.mark.parametrize("scenario", chaos.SCENARIOS, ids=[s.name for s in chaos.SCENARIOS])
def test_a_fault_under_load_never_reaches_the_engine(scenario):
    if scenario in needs_root and not netns_available():
        pytest.skip("needs root with iproute2 and iptables (network namespaces, tmpfs mounts)")
    assert chaos.Stress().available, "stress-ng is missing: make test installs it (apt-get install stress-ng)"
    row = chaos.run_scenario(scenario, chaos.SHORT)
    ROWS.append(row)
    assert row.stress
    assert row.problems() == [], chaos.markdown([row])
    if row.expect in ("failover", "cluster"):
        assert row.detect_ms is not None or row.expect == "cluster"
