"""SGLang's own Mooncake, 3FS and S3 (SeaweedFS) backends behind HAStorage, driven by SGLang 0.5.23's real
HiCacheController in two rank processes (TP = 2, gloo), while their servers are frozen (SIGSTOP), killed
(SIGKILL) and restarted empty (``hicache_ha.sim.wrapped_faults`` runs the matrix; ``bench/wrapped.py``
reports it). What SGLang's threads see is what is checked: every storage call returns within its
deadline + 20 ms (+ the rank's measured lag), none raises, every loaded page is byte-exact, the ranks serve
from the standby within 1 s of the freeze, and the wrapped member is healthy again after the restart.
Unprotected, the same backends block SGLang's threads for 30 s (Mooncake), as long as the freeze lasts
(3FS) or 200 s (S3), and 3FS and S3 never recover from the restart by themselves."""

from __future__ import annotations

import pytest

from hicache_ha.sim import wrapped_faults
from hicache_ha.sim.wrapped_faults import FAULTS, LATE


@pytest.fixture(scope="module")
def run():
    return wrapped_faults.run()


def _complete(it: dict) -> bool:
    return it["backed"] == it["tokens"] == it["loaded"]


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_frozen_then_killed_and_restarted_server_never_stalls_sglang_and_the_member_comes_back(run, kind):
    t = run.timeline[kind]
    assert t["recovered"], f"{kind}: the member was not healthy on both ranks within {FAULTS[kind][1]} s of the restart"
    for rank in (0, 1):
        r = run.results[(rank, kind)]
        assert r.interface == "v1"
        assert [c for c in r.calls if c[3]] == [], "an exception reached SGLang's controller"
        assert run.late_calls(rank, kind) == [], f"rank {rank}: calls over their bound (lag {r.lag * 1000:.0f} ms)"
        its = r.iterations
        assert its and all(it["exact"] for it in its), "a loaded page was not what was written"
        # Start-up: the member is out of traffic until it is built and proven (reads miss, writes are
        # dropped); from the moment both ranks have it healthy, every page goes to it and comes back.
        before = [it for it in its if run.serving(kind) < it["t0"] and it["t1"] < t["freeze"]]
        assert before and all(_complete(it) for it in before)
        # On the standby within 1 s of the freeze; SGLang's threads complete backups and prefetches again.
        assert run.first(rank, kind, t["freeze_wall"], to="standby", **{"from": "primary"}) <= 1.0
        during = [it for it in its if t["freeze"] <= it["t0"] and it["t1"] <= t["restart"]]
        assert during and all(_complete(it) for it in during[1:])
        assert [c for c in r.calls if t["freeze"] <= c[1] <= t["restart"]], "the controller stopped calling storage"
        primary = next(b for b in r.status["backends"] if b["name"] == "primary")
        assert primary["state"] == "healthy" and primary["built"]
        assert r.status["active"] == "standby"  # failback is manual by default


def test_sglang_starts_and_serves_with_the_mooncake_master_down_and_the_member_joins_when_it_comes_up(run):
    t = run.timeline[LATE]
    assert t["joined"], "the Mooncake member did not become healthy within 30 s of its master coming up"
    joined_at = t["up"] + run.both(LATE, t["up_wall"], backend="primary", to="healthy")  # a hit needs both ranks
    for rank in (0, 1):
        r = run.results[(rank, LATE)]
        assert [c for c in r.calls if c[3]] == [] and run.late_calls(rank, LATE) == []
        its = r.iterations
        down = [it for it in its if it["t1"] < t["up"]]
        assert len(down) >= 2 and all(it["loaded"] == 0 for it in down)  # it served: reads missed
        after = [it for it in its if it["t0"] > joined_at]
        assert after and all(_complete(it) and it["exact"] for it in after)
        primary = r.status["backends"][0]
        assert primary["state"] == "healthy" and r.status["active"] == "primary"
        assert primary["dropped_pages"] > 0  # writes while the master was down: dropped and counted


def test_the_summary_an_operator_reads_agrees_with_the_run(run):
    rows = wrapped_faults.summary(run)
    for kind in FAULTS:
        row = rows[kind]
        assert row["exceptions"] == row["wrong_pages"] == row["over_bound"] == 0
        assert 0 < row["to_standby_ms"] <= 1000 and row["calls_while_frozen"] > 0
        assert row["full_hits_while_frozen"] > 0.9
    assert rows[LATE]["dropped_pages"] > 0 and rows[LATE]["up_to_healthy_s"] < 30
