"""The benchmarks' short profile: each one runs end to end (so `make bench` cannot rot) and writes rows a
reader can use. Their figures are read from `make bench`, never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, script: str, *args: str):
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, f"bench/{script}", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_overhead_runs_ha_direct_and_raw_side_by_side_on_every_member(tmp_path):
    rows = _bench(tmp_path, "overhead.py", "--rounds", "1", "--pages", "64", "--members", "file,redis,mooncake")
    assert [r["member"] for r in rows] == ["file", "redis", "mooncake"]
    for r in rows:
        assert r["page_bytes"] == 64 * 1024
        assert set(r["median_ms"]) == {"ha", "direct", "raw"}
        assert all(v > 0 for ops in r["median_ms"].values() for v in ops.values())
    assert rows[2]["bounce_mib"] == (4 * 128 + 4) * 64 / 1024  # the wrapped member's own pool, reported


def test_switch_runs(tmp_path):
    rows = _bench(tmp_path, "switch.py", "--ranks", "4", "--switches", "2")
    assert set(rows) == {"4"} and set(rows["4"]) == {"graceful", "forced"}
    assert all(r["p50_ms"] > 0 for r in rows["4"].values())


def test_failover_runs_hicache_ha_and_the_baseline_side_by_side(tmp_path):
    rows = _bench(tmp_path, "failover.py", "--trials", "1", "--baseline-trials", "1", "--engines", "sim")
    assert set(rows) == {f"sim {who}/{fault}" for who in ("hicache-ha", "baseline") for fault in ("kill", "hang")}
    assert all(rows[f"sim hicache-ha/{f}"]["trials"] == 1 for f in ("kill", "hang"))


def test_failover_on_sglangs_own_controller_runs_both_sides(tmp_path):
    rows = _bench(tmp_path, "failover.py", "--sglang-trials", "1", "--baseline-trials", "1", "--engines", "sglang")
    assert set(rows) == {f"sglang {who}/{fault}" for who in ("hicache-ha", "baseline") for fault in ("kill", "hang")}
    assert all(rows[f"sglang hicache-ha/{f}"]["trials"] == 1 for f in ("kill", "hang"))
