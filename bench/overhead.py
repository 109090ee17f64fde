"""What HA costs on the engine's path: HAStorage vs the same backend called directly, in one run.

For each member (file, redis) and page size (64 KiB, 1 MiB), 128-page batches of set / get / exists
go from and into a host pool, three ways, interleaved round by round so that machine noise hits all
three alike:

  ha      HAStorage built by SGLang's StorageBackendFactory (batch_set_v1 / batch_get_v1 / batch_exists)
  direct  the same backend adapter with the same integrity envelope, called on the engine thread
          (no worker hop, no deadline, no accounting): the cost of the HA layer is ha / direct
  raw     what SGLang does today without hicache-ha: HiCacheFile for file, plain redis-py for redis
          (no envelope): the whole cost including integrity is ha / raw

Usage: python bench/overhead.py [--rounds 15] [--scrape-hz 10] [--json out/overhead.json]
(--scrape-hz renders this process's Prometheus metrics that often meanwhile: "metrics on")
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hicache_ha.backends import registry  # noqa: E402
from hicache_ha.backends.base import BackendContext  # noqa: E402
from hicache_ha.backends.envelope import open_page, seal  # noqa: E402
from hicache_ha.config import parse  # noqa: E402
from hicache_ha.sglang.storage import as_buffer  # noqa: E402
from hicache_ha.sim.servers import RedisServer  # noqa: E402
from tests.sglang.hostpool import CpuHostPool  # noqa: E402

BATCH = 128
EXISTS_REPEAT = 20
TARGETS = {"get": 1.02, "set": 1.02, "exists": 1.05}


def storage_config(extra=None):
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                model_name="bench", extra_config=extra)


class Direct:
    """Our adapter and envelope, called on the caller's thread: everything HAStorage does but the HA layer."""

    def __init__(self, spec: dict, pool: CpuHostPool) -> None:
        cfg = parse({"backends": [spec]}, environ={}).backends[0]
        self.backend = registry.resolve(cfg.type).from_config(cfg, BackendContext())
        self.pool = pool
        self.prefix = "direct-"
        self.nbytes = pool.get_dummy_flat_data_page().numel() * pool.dtype.itemsize

    def set(self, keys, idx):
        ps = self.pool.page_size
        skeys = [self.prefix + k for k in keys]
        vals = [as_buffer(self.pool.get_data_page(idx[i * ps])) for i in range(len(keys))]
        self.backend.set(skeys, [(seal(k, v), v) for k, v in zip(skeys, vals)])

    def get(self, keys, idx):
        ps = self.pool.page_size
        skeys = [self.prefix + k for k in keys]
        for i, (k, blob) in enumerate(zip(skeys, self.backend.get(skeys, self.nbytes))):
            self.pool.set_from_flat_data_page(idx[i * ps], torch.frombuffer(open_page(k, blob), dtype=torch.uint8))

    def exists(self, keys):
        return self.backend.exists([self.prefix + k for k in keys])


class HA:
    def __init__(self, spec: dict, pool: CpuHostPool) -> None:
        extra = {"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage",
                 "ha": {"backends": [spec], "deadlines_ms": {"exists": 5000, "get": 20000, "set": 20000},
               "admin": {"mode": "off"}}}
        self.s = StorageBackendFactory.create_backend("dynamic", storage_config(extra), None)
        self.s.register_mem_pool_host(pool)

    def set(self, keys, idx):
        assert all(self.s.batch_set_v1(keys, idx))

    def get(self, keys, idx):
        assert all(self.s.batch_get_v1(keys, idx))

    def exists(self, keys):
        return self.s.batch_exists(keys)


class RawRedis:
    """A plain redis-py client doing what a backend without HA does: SET / MGET of raw pages."""

    def __init__(self, url: str, pool: CpuHostPool) -> None:
        self.r = redis.Redis.from_url(url)
        self.pool = pool

    def set(self, keys, idx):
        ps = self.pool.page_size
        pipe = self.r.pipeline(transaction=False)
        for i, k in enumerate(keys):
            pipe.set("raw-" + k, memoryview(as_buffer(self.pool.get_data_page(idx[i * ps]))))
        pipe.execute()

    def get(self, keys, idx):
        ps = self.pool.page_size
        for i, blob in enumerate(self.r.mget(["raw-" + k for k in keys])):
            self.pool.set_from_flat_data_page(idx[i * ps], torch.frombuffer(blob, dtype=torch.uint8))

    def exists(self, keys):
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.exists("raw-" + k)
        found = pipe.execute()
        return next((i for i, f in enumerate(found) if not f), len(keys))


class RawFile:
    """SGLang's own HiCacheFile through the generic page path (what the cache controller uses for it)."""

    def __init__(self, path: str, pool: CpuHostPool) -> None:
        self.s = StorageBackendFactory.create_backend("file", storage_config({"file_storage_path": path}), None)
        self.pool = pool

    def set(self, keys, idx):
        ps = self.pool.page_size
        assert self.s.batch_set(keys, [self.pool.get_data_page(idx[i * ps]) for i in range(len(keys))])

    def get(self, keys, idx):
        ps = self.pool.page_size
        pages = self.s.batch_get(keys, [self.pool.get_dummy_flat_data_page() for _ in keys])
        for i, p in enumerate(pages):
            self.pool.set_from_flat_data_page(idx[i * ps], p)

    def exists(self, keys):
        return self.s.batch_exists(keys)


def scraper(storage, hz: float, stop: threading.Event) -> threading.Thread:
    """Render this process's Prometheus metrics ``hz`` times a second, as a scraper would."""
    from hicache_ha.observe.metrics import RankMetrics, registry_for, render

    m = storage.manager
    registry = registry_for(RankMetrics(lambda: [(m.layout.rank, m.layout.describe(), m.status())]))

    def run():
        while not stop.wait(1 / hz):
            render(registry)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def run_case(member: str, page_kib: int, rounds: int, redis_url: str, workdir: str, scrape_hz: float = 0) -> dict:
    head_bytes = page_kib * 1024 // (2 * 16)
    pool = CpuHostPool(pages=BATCH * 2, page_size=16, layer_num=2, head_bytes=head_bytes)
    pool.fill_random()
    src = pool.host_indices(list(range(BATCH)))
    dst = pool.host_indices(list(range(BATCH, 2 * BATCH)))
    case_dir = tempfile.mkdtemp(dir=workdir)
    if member == "file":
        spec = {"name": "m", "type": "file", "path": f"{case_dir}/ours"}
        impls = {"ha": HA(spec, pool), "direct": Direct(spec, pool), "raw": RawFile(f"{case_dir}/raw", pool)}
    else:
        spec = {"name": "m", "type": "redis", "url": redis_url}
        impls = {"ha": HA(spec, pool), "direct": Direct(spec, pool), "raw": RawRedis(redis_url, pool)}
    times = {name: {"set": [], "get": [], "exists": []} for name in impls}
    stop_scraping = threading.Event()
    if scrape_hz:
        scraper(impls["ha"].s, scrape_hz, stop_scraping)
    order = list(impls)
    for rnd in range(rounds + 1):  # round 0 warms up and is not counted
        random.shuffle(order)
        for name in order:
            impl = impls[name]
            keys = [f"r{rnd}-{name}-{i}" for i in range(BATCH)]
            t0 = time.perf_counter()
            impl.set(keys, src)
            t1 = time.perf_counter()
            impl.get(keys, dst)
            t2 = time.perf_counter()
            for _ in range(EXISTS_REPEAT):
                assert impl.exists(keys) == BATCH
            t3 = time.perf_counter()
            if rnd:
                times[name]["set"].append(t1 - t0)
                times[name]["get"].append(t2 - t1)
                times[name]["exists"].append((t3 - t2) / EXISTS_REPEAT)
        if member == "redis":
            redis.Redis.from_url(redis_url).flushall()
        else:
            for d, _, files in os.walk(case_dir):  # keep the directories: HiCacheFile made its own once
                for f in files:
                    os.unlink(os.path.join(d, f))
    stop_scraping.set()
    assert torch.equal(pool.kv_buffer[:BATCH], pool.kv_buffer[BATCH:])
    impls["ha"].s.close()
    shutil.rmtree(case_dir, ignore_errors=True)
    med = {name: {op: statistics.median(v) for op, v in ops.items()} for name, ops in times.items()}

    def paired(a: str, b: str, op: str) -> float:
        # The median of per-round ratios: each round's pair ran back to back, so slow drifts of the
        # machine (page cache, other tenants) cancel out of each ratio.
        return round(statistics.median(x / y for x, y in zip(times[a][op], times[b][op])), 3)

    return {
        "member": member, "page_kib": page_kib, "rounds": rounds,
        "median_ms": {n: {op: round(v * 1000, 3) for op, v in ops.items()} for n, ops in med.items()},
        "ha_over_direct": {op: paired("ha", "direct", op) for op in TARGETS},
        "ha_over_raw": {op: paired("ha", "raw", op) for op in TARGETS},
    }


def markdown(results: list[dict]) -> str:
    lines = ["| member | page | op | ha ms | direct ms | raw ms | ha/direct (target) | ha/raw |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for op, target in TARGETS.items():
            m = r["median_ms"]
            ratio = r["ha_over_direct"][op]
            mark = "" if ratio <= target else " ✗"
            lines.append(f"| {r['member']} | {r['page_kib']} KiB | {op} | {m['ha'][op]:.2f} | {m['direct'][op]:.2f} | "
                         f"{m['raw'][op]:.2f} | {ratio:.3f} (≤ {target}){mark} | {r['ha_over_raw'][op]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pages", default="64,1024", help="page sizes in KiB")
    ap.add_argument("--members", default="file,redis")
    ap.add_argument("--json", default="out/overhead.json")
    ap.add_argument("--scrape-hz", type=float, default=0, help="render the metrics this often during the run")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="hicache-ha-bench-")
    results = []
    try:
        with RedisServer() as server:
            for member in args.members.split(","):
                for kib in (int(p) for p in args.pages.split(",")):
                    r = run_case(member, kib, args.rounds, server.url, workdir, args.scrape_hz)
                    results.append(r)
                    print(f"{member} {kib} KiB: ha/direct {r['ha_over_direct']}  ha/raw {r['ha_over_raw']}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
