"""A two-phase switch correct under crashes, on real processes: the standalone controller is SIGKILLed
after prepare, mid-commit, mid-rollback and mid-detach; restarted, it brings every live rank to one epoch
and one active member, and nothing a dead switch prepared is left behind on any rank."""

import signal
import time
from pathlib import Path

import pytest

from hicache_ha.control.client import AdminError
from tests.control.conftest import DEADLINES, wait_for
from tests.control.test_multiprocess import RANKS, Deployment
from tests.helpers import FILE_GATE

ATTACHED = {"name": "fresh", "type": "memory"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    gates = tmp / "gates"
    gates.mkdir()
    d = Deployment(tmp, {
        "backends": [{"name": "primary", "type": FILE_GATE, "gate_dir": str(gates)},
                     {"name": "standby", "type": "memory"}],
        "deadlines_ms": DEADLINES,
        # The tests hang calls on purpose: only the switch decides where traffic goes.
        "health": {"consecutive_failures": None, "failure_rate": None, "slow_calls": None,
                   "ping": {"interval_ms": 60_000, "standby_interval_ms": 60_000}},
        "admin": {"prepare_ttl_ms": 3000}})
    d.gates = gates
    d.start_controller()
    d.start_ranks()
    d.baseline_threads = None
    try:
        wait_for(lambda: all(x.get("threads") for x in d.reports()), timeout=30, what="rank reports")
        time.sleep(0.5)
        d.baseline_threads = [x["threads"] for x in d.reports()]
        yield d
    finally:
        d.close()


def gate(d, rank, closed: bool):
    path = Path(d.gates) / f"gate-{rank}"
    if closed:
        path.touch()
    else:
        path.unlink(missing_ok=True)


def hang(d, rank):
    """Close rank ``rank``'s gate and wait until one of its calls is stuck there: a drain of its primary
    then cannot finish while the gate is closed."""
    gate(d, rank, True)
    wait_for(lambda: d.reports()[rank].get("in_flight", {}).get("primary", 0) > 0, timeout=10,
             what=f"a call stuck on rank {rank}'s primary")


def in_background(fn):
    import threading

    out = {}

    def run():
        try:
            out["result"] = fn()
        except AdminError as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return out


def recover(d, within=30):
    """Restart the controller; every rank on one (epoch, active), no prepared switch left, no member or
    thread more than before."""
    for r in range(RANKS):
        gate(d, r, False)
    for p in d.ranks:
        p.send_signal(signal.SIGCONT)
    d.start_controller()
    status = d.client.status()
    want = (status["epoch"], status["active"])
    wait_for(lambda: d.one_state() == want, timeout=within, what=f"every rank on {want}")
    wait_for(lambda: all(x.get("prepared") == 0 and "fresh" not in x.get("members", []) for x in d.reports()),
             timeout=within, what="prepared switches dropped and their members closed")
    wait_for(lambda: all(x["threads"] <= b for x, b in zip(d.reports(), d.baseline_threads)), timeout=within,
             what="no thread left behind")
    return want


def test_controller_killed_after_prepare(deployment):
    d = deployment
    d.ranks[3].send_signal(signal.SIGSTOP)  # rank 3 cannot answer its prepare: the others hold a prepared member
    in_background(lambda: d.client.switch(spec=ATTACHED, force=True))
    wait_for(lambda: sum(1 for x in d.reports() if x.get("prepared")) == 3, timeout=10, what="three ranks prepared")
    d.kill_controller()
    assert recover(d) == (3, "primary")  # the dead switch's epoch (2) is skipped: one fresh epoch for all


def test_controller_killed_mid_commit(deployment):
    d = deployment
    hang(d, 2)  # a call hangs on rank 2's old member: its commit drains, the others commit at once
    base = d.client.status()["epoch"]
    in_background(lambda: d.client.switch("standby", drain_timeout_s=20))
    # Every rank routes to the standby at once; rank 2's commit is still draining its stuck call.
    wait_for(lambda: all(x.get("active") == "standby" for x in d.reports()), timeout=15,
             what="every rank committed or committing")
    d.kill_controller()
    assert recover(d) == (base + 2, "primary")


def test_controller_killed_mid_commit_of_an_attach(deployment):
    d = deployment
    hang(d, 1)
    base = d.client.status()["epoch"]
    in_background(lambda: d.client.switch(spec=ATTACHED, drain_timeout_s=20))
    wait_for(lambda: all(x.get("active") == "fresh" for x in d.reports()), timeout=15,
             what="every rank committed or committing the attached member")
    d.kill_controller()
    assert recover(d) == (base + 2, "primary")  # and no rank keeps the member the dead switch attached


def test_controller_killed_mid_rollback(deployment):
    d = deployment
    base = d.client.status()["epoch"]
    hang(d, 2)  # rank 2 will refuse its commit (drain timeout)...
    in_background(lambda: d.client.switch("standby", drain_timeout_s=2))
    wait_for(lambda: all(x.get("active") == "standby" for x in d.reports()), timeout=15,
             what="every rank committed or committing (rank 2 draining for 2 s)")
    d.ranks[1].send_signal(signal.SIGSTOP)  # ... and rank 1 will not answer the rollback
    wait_for(lambda: [x.get("active") for i, x in enumerate(d.reports()) if i in (0, 3)] == ["primary", "primary"],
             timeout=15, what="ranks 0 and 3 restored (rollback under way)")
    d.kill_controller()
    assert recover(d) == (base + 2, "primary")


def test_controller_killed_mid_detach(deployment):
    d = deployment
    base = d.client.status()["epoch"]
    hang(d, 0)
    in_background(lambda: d.client.detach(drain_timeout_s=20))
    wait_for(lambda: all(x.get("active") is None for x in d.reports()), timeout=15,
             what="every rank detached or detaching (rank 0 draining its stuck call)")
    d.kill_controller()
    assert recover(d) == (base + 2, "primary")
    reports = d.reports()
    assert sum(x["errors"] for x in reports) == 0 and sum(x["bad_pages"] for x in reports) == 0
