"""What HA costs on the engine's path: HAStorage vs the same backend called directly, in one run.

For each member (file, redis, and Mooncake wrapped through SGLang's own MooncakeStore) and page size
(64 KiB, 1 MiB), 128-page batches of set / get / exists go from and into SGLang 0.5.23's real
``MHATokenToKVPoolHost`` (page_first, bf16), three ways, interleaved round by round so that machine noise
hits all three alike:

  ha      HAStorage built by SGLang's StorageBackendFactory (batch_set_v1 / batch_get_v1 / batch_exists)
  direct  the same backend adapter doing the same work (integrity envelope or checksum records; for
          Mooncake the copies through the member's bounce pool), called on the engine thread (no worker
          hop, no deadline, no accounting): the cost of the HA layer is ha / direct
  raw     what SGLang does today without hicache-ha: HiCacheFile for file, plain redis-py SET / MGET for
          redis, SGLang's MooncakeStore zero-copy into the engine's own pool for mooncake: the whole cost,
          integrity and (Mooncake) the bounce copy included, is ha / raw

Usage: python bench/overhead.py [--rounds 15] [--pages 64,1024] [--members file,redis,mooncake]
                                [--scrape-hz 10] [--json out/overhead.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hicache_ha.backends import registry  # noqa: E402
from hicache_ha.backends.base import BackendContext  # noqa: E402
from hicache_ha.backends.envelope import open_page, seal  # noqa: E402
from hicache_ha.backends.wrapped.hostpool import PagePool, as_bytes  # noqa: E402
from hicache_ha.config import parse  # noqa: E402
from hicache_ha.sim.servers import RedisServer  # noqa: E402
from hicache_ha.sim.sglang_engine import mha_pools  # noqa: E402
from hicache_ha.sim.storage_servers import MooncakeMaster  # noqa: E402

BATCH = 128
EXISTS_REPEAT = 20
TARGETS = {"get": 1.02, "set": 1.02, "exists": 1.05}
PAGE_TOKENS, HEADS, LAYERS = 16, 8, 2  # a page is LAYERS x K,V x PAGE_TOKENS x HEADS x head_dim bf16 values


def storage_config(extra=None):
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                model_name="bench", extra_config=extra)


def host_pool(page_kib: int):
    """SGLang's own MHA host pool (page_first, bf16) with room for two batches, filled with random bytes."""
    head_dim = page_kib * 1024 // (LAYERS * 2 * PAGE_TOKENS * HEADS * 2)
    _dev, pool = mha_pools("page_first", torch.bfloat16, tokens=2 * BATCH * PAGE_TOKENS, page=PAGE_TOKENS,
                           heads=HEADS, head_dim=head_dim, layers=LAYERS)
    pool.kv_buffer.view(torch.int16).random_(-2**15, 2**15 - 1)
    return pool


def slots_of(pool, idx) -> list[int]:
    return idx[:: pool.page_size].tolist()


class Direct:
    """Our adapter doing what HAStorage makes it do, on the caller's thread: everything but the HA layer."""

    def __init__(self, spec: dict, pool) -> None:
        cfg = parse({"backends": [spec]}, environ={}).backends[0]
        host = type("Host", (), {"mem_pool_host": pool})()
        self.backend = registry.resolve(cfg.type).from_config(
            cfg, BackendContext(storage_config=storage_config(), host=host))
        deadline = time.monotonic() + 60
        while not self.backend.ready:  # a wrapped backend is built on a thread of its own
            assert time.monotonic() < deadline, self.backend.not_ready_reason()
            time.sleep(0.05)
        self.pages = PagePool("kv", pool)
        self.envelope = self.backend.capabilities.envelope
        self.prefix = "direct-"

    def set(self, keys, idx):
        skeys = [self.prefix + k for k in keys]
        pages = self.pages.pages(idx, slots_of(self.pages.pool, idx))
        if self.envelope:
            self.backend.set(skeys, [(seal(k, v), *v) if isinstance(v, tuple) else (seal(k, v), v)
                                     for k, v in zip(skeys, pages)])
        else:
            self.backend.set(skeys, self.backend.stage(skeys, pages))

    def get(self, keys, idx):
        skeys = [self.prefix + k for k in keys]
        write = self.pages.writer(idx, slots_of(self.pages.pool, idx))
        with self.backend.fetch(skeys, self.pages.page_bytes) as blobs:
            for i, (k, blob) in enumerate(zip(skeys, blobs)):
                write(i, open_page(k, blob) if self.envelope else blob)

    def exists(self, keys):
        return self.backend.exists([self.prefix + k for k in keys])

    def close(self):
        self.backend.close()


class HA:
    def __init__(self, spec: dict, pool) -> None:
        extra = {"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage",
                 "ha": {"backends": [spec], "deadlines_ms": {"exists": 5000, "get": 20000, "set": 20000},
                        "admin": {"mode": "off"}}}
        self.s = StorageBackendFactory.create_backend("dynamic", storage_config(extra), None)
        self.s.register_mem_pool_host(pool)
        deadline = time.monotonic() + 60
        while self.s.ha_status()["backends"][0]["state"] != "healthy":  # a wrapped member is built late
            assert time.monotonic() < deadline, self.s.ha_status()
            time.sleep(0.05)

    def set(self, keys, idx):
        assert all(self.s.batch_set_v1(keys, idx))

    def get(self, keys, idx):
        assert all(self.s.batch_get_v1(keys, idx))

    def exists(self, keys):
        return self.s.batch_exists(keys)

    def close(self):
        self.s.close()


class RawRedis:
    """A plain redis-py client doing what a backend without HA does: SET / MGET of raw pages."""

    def __init__(self, url: str, pool) -> None:
        self.r = redis.Redis.from_url(url)
        self.pool = pool

    def set(self, keys, idx):
        pipe = self.r.pipeline(transaction=False)
        for k, slot in zip(keys, slots_of(self.pool, idx)):
            pipe.set("raw-" + k, memoryview(as_bytes(self.pool.get_data_page(slot, flat=True))))
        pipe.execute()

    def get(self, keys, idx):
        dtype = self.pool.dtype
        for slot, blob in zip(slots_of(self.pool, idx), self.r.mget(["raw-" + k for k in keys])):
            self.pool.set_from_flat_data_page(slot, torch.frombuffer(blob, dtype=torch.uint8).view(dtype))

    def exists(self, keys):
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.exists("raw-" + k)
        found = pipe.execute()
        return next((i for i, f in enumerate(found) if not f), len(keys))

    def close(self):
        self.r.close()


class RawFile:
    """SGLang's own HiCacheFile through the generic page path (what the cache controller uses for it)."""

    def __init__(self, path: str, pool) -> None:
        self.s = StorageBackendFactory.create_backend("file", storage_config({"file_storage_path": path}), None)
        self.pool = pool

    def set(self, keys, idx):
        assert self.s.batch_set(keys, [self.pool.get_data_page(slot, flat=True) for slot in slots_of(self.pool, idx)])

    def get(self, keys, idx):
        pages = self.s.batch_get(keys, [self.pool.get_dummy_flat_data_page() for _ in keys])
        for slot, page in zip(slots_of(self.pool, idx), pages):
            self.pool.set_from_flat_data_page(slot, page)

    def exists(self, keys):
        return self.s.batch_exists(keys)

    def close(self):
        pass


class RawMooncake:
    """SGLang's MooncakeStore as SGLang runs it without hicache-ha: zero-copy v1 into the engine's pool."""

    def __init__(self, extra: dict, pool) -> None:
        self.s = StorageBackendFactory.create_backend("mooncake", storage_config(dict(extra)), pool)
        self.s.register_mem_pool_host(pool)

    def set(self, keys, idx):
        assert all(self.s.batch_set_v1(["raw-" + k for k in keys], idx))

    def get(self, keys, idx):
        assert all(self.s.batch_get_v1(["raw-" + k for k in keys], idx))

    def exists(self, keys):
        return self.s.batch_exists(["raw-" + k for k in keys])

    def clear(self):
        self.s.store.remove_all()

    def close(self):
        pass


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


def run_case(member: str, page_kib: int, rounds: int, servers: dict, workdir: str, scrape_hz: float = 0) -> dict:
    pool = host_pool(page_kib)
    src = torch.arange(0, BATCH * PAGE_TOKENS)
    dst = torch.arange(BATCH * PAGE_TOKENS, 2 * BATCH * PAGE_TOKENS)
    case_dir = tempfile.mkdtemp(dir=workdir)
    if member == "file":
        spec = {"name": "m", "type": "file", "path": f"{case_dir}/ours"}
        raw = RawFile(f"{case_dir}/raw", pool)
    elif member == "redis":
        spec = {"name": "m", "type": "redis", "url": servers["redis"].url}
        raw = RawRedis(servers["redis"].url, pool)
    else:  # three clients, each with a segment for a batch of every impl
        extra = servers["mooncake"].extra_config(segment_mib=max(64, 4 * page_kib * BATCH // 1024))
        spec = {"name": "m", "type": "sglang", "backend": "mooncake", "extra_config": extra}
        raw = RawMooncake(extra, pool)
    impls = {"ha": HA(spec, pool), "direct": Direct(spec, pool), "raw": raw}
    times = {name: {"set": [], "get": [], "exists": []} for name in impls}
    stop_scraping = threading.Event()
    if scrape_hz:
        scraper(impls["ha"].s, scrape_hz, stop_scraping)
    order = list(impls)
    for rnd in range(rounds + 1):  # round 0 warms up and is not counted
        random.shuffle(order)
        for name in order:
            impl = impls[name]
            keys = [f"p{page_kib}-r{rnd}-{name}-{i}" for i in range(BATCH)]  # unique across cases on one store
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
            redis.Redis.from_url(servers["redis"].url).flushall()
        elif member == "mooncake":
            time.sleep(0.15)  # objects just read are leased (100 ms on the benchmark's master)
            raw.clear()
        else:
            for d, _, files in os.walk(case_dir):  # keep the directories: HiCacheFile made its own once
                for f in files:
                    os.unlink(os.path.join(d, f))
    stop_scraping.set()
    pages = PagePool("kv", pool)  # every impl loaded every page back byte for byte
    assert [bytes(as_bytes(pool.get_data_page(s, flat=True))) for s in slots_of(pool, src)] == \
        [bytes(as_bytes(pool.get_data_page(s, flat=True))) for s in slots_of(pool, dst)]
    bounce = impls["ha"].s.ha_status()["backends"][0].get("bounce_bytes")
    for impl in impls.values():
        impl.close()
    shutil.rmtree(case_dir, ignore_errors=True)
    med = {name: {op: statistics.median(v) for op, v in ops.items()} for name, ops in times.items()}

    def paired(a: str, b: str, op: str) -> float:
        # The median of per-round ratios: each round's pair ran back to back, so slow drifts of the
        # machine (page cache, other tenants) cancel out of each ratio.
        return round(statistics.median(x / y for x, y in zip(times[a][op], times[b][op])), 3)

    return {
        "member": member, "page_kib": page_kib, "rounds": rounds, "page_bytes": pages.page_bytes,
        "bounce_mib": None if bounce is None else round(bounce / 2**20, 2),
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
            name = r["member"] + (f" (bounce pool {r['bounce_mib']} MiB)" if r.get("bounce_mib") else "")
            lines.append(f"| {name} | {r['page_kib']} KiB | {op} | {m['ha'][op]:.2f} | {m['direct'][op]:.2f} | "
                         f"{m['raw'][op]:.2f} | {ratio:.3f} (≤ {target}){mark} | {r['ha_over_raw'][op]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pages", default="64,1024", help="page sizes in KiB")
    ap.add_argument("--members", default="file,redis,mooncake")
    ap.add_argument("--json", default="out/overhead.json")
    ap.add_argument("--scrape-hz", type=float, default=0, help="render the metrics this often during the run")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="hicache-ha-bench-")
    members = args.members.split(",")
    results = []
    servers = {}
    try:
        servers["redis"] = RedisServer().start()
        if "mooncake" in members:
            servers["mooncake"] = MooncakeMaster(lease_ms=100).start()
        for member in members:
            for kib in (int(p) for p in args.pages.split(",")):
                r = run_case(member, kib, args.rounds, servers, workdir, args.scrape_hz)
                results.append(r)
                print(f"{member} {kib} KiB: ha/direct {r['ha_over_direct']}  ha/raw {r['ha_over_raw']}", flush=True)
    finally:
        for server in servers.values():
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
