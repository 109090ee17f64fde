"""Failover under simulator traffic: detection and fault → standby serving, against the unprotected baseline.

Each trial: a fresh redis-server primary and a file standby, two engine ranks running the simulated
HiCache traffic, then a fault on the primary (SIGKILL, or SIGSTOP = hang). For hicache-ha it reports the
time from the fault to ``circuit_broken`` and to the standby serving (the active pointer moved), the
engine-visible latency during the fault, and errors that reached the engine. The baseline runs the
same traffic with the engine calling redis-py directly (no deadline, no breaker, no standby).

Usage: python bench/failover.py [--trials 20] [--baseline-trials 3] [--json out/failover.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hicache_ha import BackendManager, Layout  # noqa: E402
from hicache_ha.sim.baseline import DirectRedis  # noqa: E402
from hicache_ha.sim.engine import Simulation, percentile  # noqa: E402
from hicache_ha.sim.servers import RedisServer  # noqa: E402
from hicache_ha.sim.workload import Workload  # noqa: E402

PAGE = 64 * 1024
DEADLINES = {"exists": 50, "get": 500, "set": 1000}  # the shipped defaults
STEADY_S, FAULT_S = 0.8, 1.5


def config(url: str, standby: str) -> dict:
    return {"backends": [{"name": "primary", "type": "redis", "url": url, "socket_timeout_ms": 2000},
                         {"name": "standby", "type": "file", "path": standby}],
            "deadlines_ms": DEADLINES}


def inject(server: RedisServer, fault: str) -> None:
    (server.kill if fault == "kill" else server.freeze)()


def ha_trial(fault: str, seed: int) -> dict:
    with RedisServer() as server, tempfile.TemporaryDirectory() as standby:
        managers = [BackendManager(config(server.url, standby), Layout(model="bench", tp_rank=r, tp_size=2))
                    for r in range(2)]
        sim = Simulation(managers, page_size=PAGE, workload=Workload(conversations=16, seed=seed)).start()
        time.sleep(STEADY_S)
        t_fault = time.time()
        t_rel = sim.stats.now()
        inject(server, fault)
        time.sleep(FAULT_S)
        stats = sim.finish()
        server.thaw()
        ev = [e for m in managers for e in m.events.recent(1000) if e.time >= t_fault]
        broken = [e.time for e in ev if e.backend == "primary" and e.to_state == "circuit_broken"]
        serving = [e.time for e in ev if e.detail.get("role") == "active" and e.to_state == "standby"]
        for m in managers:
            m.close()
        during = [s.seconds for s in stats.samples if s.t >= t_rel]
        return {
            "detect_ms": (min(broken) - t_fault) * 1000 if broken else None,
            # the slower rank decides when the whole engine is served again
            "serve_ms": (max(serving) - t_fault) * 1000 if len(serving) == 2 else None,
            "latencies_s": during,
            "errors": stats.errors_surfaced,
            "bad_pages": stats.verify_failures,
        }


def baseline_trial(fault: str, seed: int) -> dict:
    with RedisServer() as server:
        storages = [DirectRedis(server.url, prefix=f"r{r}-") for r in range(2)]
        sim = Simulation(storages, page_size=PAGE, workload=Workload(conversations=16, seed=seed)).start()
        time.sleep(STEADY_S)
        t_rel = sim.stats.now()
        inject(server, fault)
        time.sleep(FAULT_S)
        server.thaw()  # a hung baseline call returns only now: its latency is the whole outage
        stats = sim.finish(timeout=60)
        during = [s.seconds for s in stats.samples if s.t >= t_rel]
        for s in storages:
            s.close()
        return {"detect_ms": None, "serve_ms": None, "latencies_s": during, "errors": stats.errors_surfaced,
                "bad_pages": stats.verify_failures}


def summarize(trials: list[dict]) -> dict:
    detect = [t["detect_ms"] for t in trials if t["detect_ms"] is not None]
    serve = [t["serve_ms"] for t in trials if t["serve_ms"] is not None]
    lat = [x * 1000 for t in trials for x in t["latencies_s"]]
    return {
        "trials": len(trials),
        "detected": len(detect),
        "detect_ms_p50": round(percentile(detect, 50), 1) if detect else None,
        "detect_ms_p99": round(percentile(detect, 99), 1) if detect else None,
        "serve_ms_p50": round(percentile(serve, 50), 1) if serve else None,
        "serve_ms_p99": round(percentile(serve, 99), 1) if serve else None,
        "engine_latency_ms_p99_9": round(percentile(lat, 99.9), 1) if lat else None,
        "engine_latency_ms_max": round(max(lat), 1) if lat else None,
        "engine_calls_during_fault": len(lat),
        "errors_surfaced": sum(t["errors"] for t in trials),
        "bad_pages": sum(t["bad_pages"] for t in trials),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--baseline-trials", type=int, default=3)
    ap.add_argument("--json", default="out/failover.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # every transition would be logged otherwise
    results = {}
    for fault in ("kill", "hang"):
        results[f"hicache-ha/{fault}"] = summarize([ha_trial(fault, i) for i in range(args.trials)])
        print(f"hicache-ha {fault}: {results[f'hicache-ha/{fault}']}", flush=True)
        results[f"baseline/{fault}"] = summarize([baseline_trial(fault, i) for i in range(args.baseline_trials)])
        print(f"baseline {fault}: {results[f'baseline/{fault}']}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print("| run | trials | detect p50 / p99 ms | fault → standby serving p50 / p99 ms | engine p99.9 ms | engine max ms | errors surfaced |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        det = f"{r['detect_ms_p50']} / {r['detect_ms_p99']}" if r["detected"] else "never"
        srv = f"{r['serve_ms_p50']} / {r['serve_ms_p99']}" if r["serve_ms_p50"] is not None else "never"
        print(f"| {name} | {r['trials']} | {det} | {srv} | {r['engine_latency_ms_p99_9']} | "
              f"{r['engine_latency_ms_max']} | {r['errors_surfaced']} |")


if __name__ == "__main__":
    main()
