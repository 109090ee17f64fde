"""Switch latency across many ranks: the controller's two-phase switch with N agents (threads).

Each rank is a real BackendManager with two in-memory members and a real agent talking to the
controller over ZeroMQ; the time is that of Controller.switch (prepare on all, commit on all).

Usage: python bench/switch.py [--ranks 8,64,256] [--switches 6] [--json out/switch.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hicache_ha import BackendManager, Layout  # noqa: E402
from hicache_ha.config import parse  # noqa: E402
from hicache_ha.control.agent import Agent  # noqa: E402
from hicache_ha.control.controller import Controller  # noqa: E402
from hicache_ha.control.keys import channel_keys  # noqa: E402
from hicache_ha.control.state import FileStateStore  # noqa: E402
from hicache_ha.sim.servers import free_port  # noqa: E402


def run(n: int, switches: int) -> dict:
    port = free_port()
    cfg = parse({
        "backends": [{"name": "primary", "type": "memory", "max_concurrent": 1},
                     {"name": "standby", "type": "memory", "max_concurrent": 1}],
        "bulkhead": {"queue": 1},
        # Hundreds of ranks share two cores here: no detector, so starved pings do not trip members.
        "health": {"consecutive_failures": None, "failure_rate": None, "slow_calls": None,
                   "ping": {"interval_ms": 1000, "standby_interval_ms": 5000, "timeout_ms": 5000},
                   "recovery": {"probe_timeout_ms": 10000}},
        "admin": {"mode": "remote", "agent_port": port, "heartbeat_ms": 1000, "rank_timeout_ms": 10000,
                  "command_timeout_ms": 30000},
    }, environ={})
    keys = channel_keys("bench-admin-secret", "bench")  # the channel is authenticated (CURVE) as in production
    with tempfile.TemporaryDirectory() as tmp:
        controller = Controller(cfg, store=FileStateStore(Path(tmp) / "s.json"), expected_ranks=n,
                                bind=f"tcp://127.0.0.1:{port}", keys=keys)
        managers = [BackendManager(cfg, Layout(model="bench", tp_rank=r, tp_size=n)) for r in range(n)]
        agents = [Agent(m, f"tcp://127.0.0.1:{port}", keys=keys, heartbeat_s=1.0, controller_timeout_s=10.0) for m in managers]
        deadline = time.monotonic() + 120
        while len(controller.alive()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(controller.alive())}/{n} ranks registered")
            time.sleep(0.05)
        out = {}
        for mode, force in (("graceful", False), ("forced", True)):
            times = []
            for i in range(switches):
                target = "standby" if controller.desired.active == "primary" else "primary"
                t0 = time.perf_counter()
                result = controller.switch(target, force=force)
                times.append(time.perf_counter() - t0)
                assert result.status == 200, result.body
                assert {(m.epoch, m.active.name) for m in managers} == {(controller.desired.epoch, target)}
            out[mode] = {"p50_ms": round(statistics.median(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1)}
        for a in agents:
            a.close()
        for m in managers:
            m.close()
        controller.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64,256")
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--json", default="out/switch.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = {}
    for n in (int(x) for x in args.ranks.split(",")):
        results[n] = run(n, args.switches)
        print(f"{n} ranks: {results[n]}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print("| ranks | graceful p50 / max ms | forced p50 / max ms |\n|---:|---:|---:|")
    for n, r in results.items():
        print(f"| {n} | {r['graceful']['p50_ms']} / {r['graceful']['max_ms']} | {r['forced']['p50_ms']} / {r['forced']['max_ms']} |")


if __name__ == "__main__":
    main()
