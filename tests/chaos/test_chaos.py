"""The chaos suite, short profile: every fault on real processes with the CPUs busy (stress-ng on
every core). The long profile is ``make chaos`` (bench/chaos.py)."""


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


@pytest.fixture(scope="module")
def sglang_rows():
    """Every SGLang scenario in one spawn of SGLang's two rank processes (importing SGLang is the cost)."""
    assert chaos.Stress().available, "stress-ng is missing: make test installs it (apt-get install stress-ng)"
    rows = chaos.run_sglang(chaos.SGLANG_SCENARIOS, chaos.SHORT)
    ROWS.extend(rows)
    return {row.fault: row for row in rows}


@pytest.mark.parametrize("scenario", chaos.SGLANG_SCENARIOS, ids=[s.name for s in chaos.SGLANG_SCENARIOS])
def test_a_fault_under_load_never_reaches_sglangs_own_controller(sglang_rows, scenario):
    """SGLang's real HiCacheController (TP = 2 over gloo): each of its storage calls is timed on its rank,
    each loaded page compared byte for byte; the same promises as the simulator's rows."""
    row = sglang_rows[scenario.name]
    assert row.engine == "sglang" and row.stress
    assert row.detect_ms is not None
    assert row.calls_during_fault > 0, "SGLang's controller stopped calling storage while the fault lasted"
    assert row.problems() == [], chaos.markdown([row])
