"""SGLang's own storage backends behind HAStorage, on real servers: a Mooncake master, SGLang's 3FS metadata
server, an S3 server (for SGLang's SeaweedFS backend); NIXL's POSIX plugin and AIBrix's local tiers."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from hicache_ha.sim.lag import LagProbe
from hicache_ha.sim.storage_servers import Hf3fsMetadataServer, MooncakeMaster, S3Server
from tests.sglang.conftest import build
from tests.sglang.realpools import fill, mha_pool, pages_at

KINDS = ["mooncake", "hf3fs", "seaweedfs", "nixl", "aibrix", "file"]
VERIFIED = {"mooncake", "seaweedfs", "file"}  # a checksum record beside every page
SCOPED_CLEAR = {"mooncake", "seaweedfs", "nixl", "file"}
NIXL_EXTRA = {"plugin": {"posix": {"active": True}}, "use_direct_io": False}


@pytest.fixture(scope="module")
def mooncake_master():
    with MooncakeMaster(lease_ms=100) as master:
        yield master


@pytest.fixture(scope="module")
def hf3fs_server():
    with Hf3fsMetadataServer() as server:
        yield server


@pytest.fixture(scope="module")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture
def hf3fs_env(hf3fs_server, monkeypatch):
    """The 3FS client settings, for a data file that lives as long as its metadata server (one names
    pages in the other: a fresh file under old metadata would read zeros as pages)."""
    monkeypatch.setenv("SGLANG_HICACHE_HF3FS_CONFIG_PATH", hf3fs_server.config_file(hf3fs_server.dir))
    return hf3fs_server


@pytest.fixture
def aibrix_env(monkeypatch):
    import aibrix_kvcache.cache_manager as cache_manager

    monkeypatch.setattr(cache_manager, "TESTING_DISABLE_PIN_MEMORY", True)
    monkeypatch.setenv("AIBRIX_KV_CACHE_OL_L1_CACHE_CAPACITY_GB", "0.05")  # its local memory tier only


def member(kind: str, request, tmp_path, name: str = "primary", **fields) -> dict:
    """The ``sglang`` member section for one of SGLang's backends, its server started by a fixture."""
    if kind == "mooncake":
        extra = request.getfixturevalue("mooncake_master").extra_config()
    elif kind == "hf3fs":
        request.getfixturevalue("hf3fs_env")
        extra = {"use_mock_hf3fs_client": True}
    elif kind == "seaweedfs":
        extra = request.getfixturevalue("s3_server").extra_config(bucket=f"b{abs(hash(request.node.name)) % 10**8}")
    elif kind == "nixl":
        request.getfixturevalue("monkeypatch").setenv("SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR", str(tmp_path / "nixl"))
        extra = dict(NIXL_EXTRA)
    elif kind == "aibrix":
        request.getfixturevalue("aibrix_env")
        extra = {}
    else:
        extra = {"file_storage_path": str(tmp_path / "sglang-file")}
    # Start-up waits for the build (boto3's first client alone takes seconds on a loaded machine); what
    # happens past ``start_wait_ms`` is tested by itself.
    fields.setdefault("start_wait_ms", 30_000)
    return {"name": name, "type": "sglang", "backend": kind, "extra_config": extra, **fields}


def engine_pool(kind: str, tokens: int = 256, **geometry):
    pool = mha_pool("page_first", torch.bfloat16, tokens=tokens, **geometry)
    if kind == "aibrix":  # a server passes the exclusive end layer; the CPU pool builder the last one
        pool.end_layer = pool.start_layer + pool.layer_num
    return pool


def member_status(storage, name: str = "primary") -> dict:
    """Member ``name`` as ``ha_status()`` describes it."""
    return next(b for b in storage.ha_status()["backends"] if b["name"] == name)


def wait_healthy(storage, name: str = "primary", timeout: float = 20.0, active: bool = True) -> None:
    """Until member ``name`` is healthy (and, with ``active``, serving the rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = storage.ha_status()
        states = {b["name"]: b["state"] for b in status["backends"]}
        if states.get(name) == "healthy" and (not active or status["active"] == name):
            return
        time.sleep(0.02)
    status = storage.ha_status()
    raise AssertionError(f"{name} not healthy{' and active' if active else ''} after {timeout} s: "
                         f"{status['backends']}, events {status['events']}")


class Load:
    """Engine-like traffic on one HAStorage from ``threads`` threads: fill pages, batch_set_v1,
    batch_exists, batch_get_v1 of the prefix found, every loaded page compared byte for byte. Records
    each call's duration, any exception, any wrong page, and how long the process was kept from running."""

    def __init__(self, storage, pool, threads: int = 2, pages: int = 4) -> None:
        self.storage, self.pool, self.pages = storage, pool, pages
        self.calls: list[tuple[str, float, float]] = []  # (op, start, seconds)
        self.errors: list[str] = []
        self.wrong = 0
        self.loaded = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        self.lag = LagProbe()

    def __enter__(self) -> "Load":
        self.lag.start()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.lag.stop()

    def _timed(self, op: str, fn, *args):
        t0 = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.calls.append((op, t0, time.monotonic() - t0))

    def _run(self, tid: int) -> None:
        ps, n = self.pool.page_size, self.pages
        src = torch.arange(tid * 2 * n * ps, (tid * 2 * n + n) * ps)
        dst = torch.arange((tid * 2 * n + n) * ps, (tid * 2 + 2) * n * ps)
        i = 0
        while not self._stop.is_set():
            keys = [f"load-{tid}-{i}-{j}" for j in range(n)]
            try:
                want = fill(self.pool, src, seed=tid * 100_000 + i)
                self._timed("set", self.storage.batch_set_v1, keys, src)
                hits = self._timed("exists", self.storage.batch_exists, keys)
                if hits:
                    ok = self._timed("get", self.storage.batch_get_v1, keys[:hits], dst[:hits * ps])
                    got = pages_at(self.pool, dst[:hits * ps])
                    for j, loaded in enumerate(ok):
                        if loaded:
                            self.loaded += 1
                            self.wrong += got[j] != want[j]
            except Exception as exc:  # what the engine would see: must never happen
                self.errors.append(repr(exc))
            i += 1
            time.sleep(0.002)

    def late(self, deadlines: dict, slack: float) -> list:
        """Calls over their deadline + slack (+ the longest the process was kept from running)."""
        bound = {op: ms / 1000 + slack + self.lag.worst for op, ms in deadlines.items()}
        return [(op, round(s * 1000)) for op, _t, s in self.calls if s > bound[op]]

    def since(self, t: float) -> list:
        return [c for c in self.calls if c[1] >= t]


def ha(primary: dict, standby: dict | None = None, **doc) -> dict:
    return {"backends": [primary, standby or {"name": "standby", "type": "memory"}], **doc}


__all__ = ["KINDS", "VERIFIED", "SCOPED_CLEAR", "member", "engine_pool", "wait_healthy", "Load", "ha", "build",
           "fill", "pages_at", "os"]
