"""Failover: detection and fault → standby serving, against the unprotected baseline, on two engines.

Each trial: a fresh redis-server primary and a file standby, two engine ranks, then a fault on the
primary (SIGKILL, or SIGSTOP = hang). For hicache-ha it reports the time from the fault to
``circuit_broken`` and to the standby serving (the active pointer moved on every rank), the
engine-visible latency of storage calls during the fault, and errors that reached the engine. The
baseline runs the same traffic calling redis-py directly (no deadline, no breaker, no standby).

Engines: ``sim`` (the simulator: 64 KiB pages, the multi-turn workload) and ``sglang`` (SGLang 0.5.23's
own HiCacheController, its prefetch and backup threads and gloo all-reduce, on CPU: see
hicache_ha.sim.sglang_engine). Both in one run, side by side.

Usage: python bench/failover.py [--trials 20] [--baseline-trials 3] [--sglang-trials 5] [--engines sim,sglang]
                                [--json out/failover.json]
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


def sglang_trials(fault: str, trials: int, *, baseline: bool = False) -> list[dict]:
    """``trials`` trials on SGLang's real controller, in one spawn of the two rank processes."""
    from hicache_ha.sim.sglang_baseline import DYNAMIC_BASELINE
    from hicache_ha.sim.sglang_engine import EngineSpec, SGLangEngine, ha_spec

    servers = [RedisServer().start() for _ in range(trials)]
    with tempfile.TemporaryDirectory() as standby:
        specs = [EngineSpec(f"t{i}", {**DYNAMIC_BASELINE, "interface_v1": 1, "redis_url": srv.url}) if baseline else
                 ha_spec(f"t{i}", {**config(srv.url, f"{standby}/{i}"), "admin": {"mode": "off"}})
                 for i, srv in enumerate(servers)]
        engine = SGLangEngine(specs).start()
        faults = []
        try:
            for spec, server in zip(specs, servers):
                assert engine.wait_ready(spec.name), "the SGLang ranks did not start"
                time.sleep(STEADY_S)
                faults.append((time.time(), time.monotonic()))
                inject(server, fault)
                time.sleep(FAULT_S)
                server.thaw()  # a hung baseline call returns only now: its latency is the whole outage
                engine.stop(spec.name)
            results = engine.results()
        finally:
            engine.close()
            for srv in servers:
                srv.close()
    out = []
    for spec, (wall, mono) in zip(specs, faults):
        ranks = [results[(r, spec.name)] for r in range(2)]
        events = [e for r in ranks for e in (r.status or {}).get("events", []) if e["time"] >= wall]
        broken = [e["time"] for e in events if e["backend"] == "primary" and e["to"] == "circuit_broken"]
        serving = {e["rank"]: e["time"] for e in events if e.get("detail", {}).get("role") == "active"
                   and e["to"] == "standby"}
        calls = [c for r in ranks for c in r.calls if c[1] >= mono]
        out.append({
            "detect_ms": (min(broken) - wall) * 1000 if broken else None,
            "serve_ms": (max(serving.values()) - wall) * 1000 if len(serving) == 2 else None,
            "latencies_s": [c[2] for c in calls],
            "errors": sum(1 for c in calls if c[3]),
            "bad_pages": sum(1 for r in ranks for it in r.iterations if not it["exact"]),
        })
    return out


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
    ap.add_argument("--trials", type=int, default=20, help="simulator trials per fault (hicache-ha)")
    ap.add_argument("--baseline-trials", type=int, default=3, help="baseline trials per fault (each engine)")
    ap.add_argument("--sglang-trials", type=int, default=5, help="trials per fault on SGLang's controller")
    ap.add_argument("--engines", default="sim,sglang", help="sim, sglang or both")
    ap.add_argument("--json", default="out/failover.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # every transition would be logged otherwise
    engines = args.engines.split(",")
    results = {}
    for fault in ("kill", "hang"):
        runs = []
        if "sim" in engines:
            runs += [(f"sim hicache-ha/{fault}", lambda: [ha_trial(fault, i) for i in range(args.trials)]),
                     (f"sim baseline/{fault}", lambda: [baseline_trial(fault, i) for i in range(args.baseline_trials)])]
        if "sglang" in engines:
            runs += [(f"sglang hicache-ha/{fault}", lambda: sglang_trials(fault, args.sglang_trials)),
                     (f"sglang baseline/{fault}", lambda: sglang_trials(fault, args.baseline_trials, baseline=True))]
        for name, trials in runs:
            results[name] = summarize(trials())
            print(f"{name}: {results[name]}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print("| engine run | trials | detect p50 / p99 ms | fault → standby serving p50 / p99 ms | storage call p99.9 ms "
          "| max ms | errors surfaced |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        det = f"{r['detect_ms_p50']} / {r['detect_ms_p99']}" if r["detected"] else "never"
        srv = f"{r['serve_ms_p50']} / {r['serve_ms_p99']}" if r["serve_ms_p50"] is not None else "never"
        print(f"| {name} | {r['trials']} | {det} | {srv} | {r['engine_latency_ms_p99_9']} | "
              f"{r['engine_latency_ms_max']} | {r['errors_surfaced']} |")


if __name__ == "__main__":
    main()
