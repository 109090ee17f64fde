"""R ranks replaying HiCache's L3 traffic, as SGLang's cache controller issues it.

Per request, every rank: prefetch = ``exists`` in 128-page batches → MIN of the hit count across
ranks (the all-reduce that makes one slow rank stall all) → ``get`` of the agreed prefix, each page
verified; backup = ``set`` of the pages storage lacks, in 128-page batches. Ranks are threads here.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from queue import Full, Queue
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

from .workload import Workload, page_bytes

STORAGE_BATCH_SIZE = 128
BACKUP_QUEUE = 4  # write-backs waiting per rank; beyond, a write-back is skipped (and counted)


class RankStorage(Protocol):
    def exists(self, keys: Sequence[str]) -> int: ...
    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list: ...
    def set(self, keys: Sequence[str], values: Sequence) -> list: ...


class MinReducer:
    """The all-reduce(MIN) across rank threads: everyone waits for the slowest, as with gloo."""

    def __init__(self, ranks: int, timeout: float = 120.0) -> None:
        self._values = [0] * ranks
        self._barrier = threading.Barrier(ranks, timeout=timeout)
        self._result = 0

    def __call__(self, rank: int, value: int) -> int:
        self._values[rank] = value
        if self._barrier.wait() == 0:
            self._result = min(self._values)
        self._barrier.wait()
        return self._result

    def abort(self) -> None:
        self._barrier.abort()


@dataclass
class Sample:
    t: float  # seconds since the run started
    rank: int
    op: str
    seconds: float
    pages: int
    ok: bool


@dataclass
class SimStats:
    """Everything the engine saw. Thread-safe appends; readers take copies."""

    started: float = field(default_factory=time.monotonic)
    samples: deque = field(default_factory=lambda: deque(maxlen=2_000_000))
    pages_requested: int = 0
    pages_hit: int = 0
    pages_written: int = 0
    verify_failures: int = 0
    errors_surfaced: int = 0
    backups_skipped: int = 0
    requests: int = 0
    hits: deque = field(default_factory=lambda: deque(maxlen=1_000_000))  # (t, pages asked, pages hit) per request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.started

    def add(self, rank: int, op: str, seconds: float, pages: int, ok: bool) -> None:
        self.samples.append(Sample(self.now(), rank, op, seconds, pages, ok))

    def hit_rate(self, seconds: float) -> float:
        """Pages hit / pages asked over the last ``seconds``."""
        cut = self.now() - seconds
        asked = hit = 0
        for t, a, h in reversed(self.hits):
            if t < cut:
                break
            asked += a
            hit += h
        return hit / asked if asked else 0.0

    def window(self, seconds: float) -> list[Sample]:
        cut = self.now() - seconds
        out = []
        for s in reversed(self.samples):
            if s.t < cut:
                break
            out.append(s)
        return out


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class Plan:
    """The request sequence, made lazily and shared: every rank serves the same requests, like TP ranks."""

    def __init__(self, workload: Workload, limit: int) -> None:
        self._workload = workload
        self._items: list = []
        self._lock = threading.Lock()
        self.limit = limit

    def __getitem__(self, i: int):
        with self._lock:
            while len(self._items) <= i:
                self._items.append(self._workload.next_request())
            return self._items[i]

    def __iter__(self):
        return (self[i] for i in range(self.limit))


class Rank(threading.Thread):
    """One rank's prefetch thread; its backup thread writes pages back concurrently, as in SGLang's
    cache controller (write-back never holds up the next request's prefetch)."""

    def __init__(self, rank: int, storage: RankStorage, workload: Workload, reducer: MinReducer,
                 stats: SimStats, page_size: int, stop: threading.Event, requests: Plan) -> None:
        super().__init__(name=f"sim-rank-{rank}", daemon=True)
        self.rank, self.storage, self.reducer, self.stats = rank, storage, reducer, stats
        self.page_size, self.stop, self.requests = page_size, stop, requests
        self.error: Optional[BaseException] = None
        self.backups: Queue = Queue(maxsize=BACKUP_QUEUE)
        self.backup_thread = threading.Thread(target=self._backup_loop, name=f"sim-backup-{rank}", daemon=True)

    def _timed(self, op: str, fn: Callable, *args):
        t0 = time.perf_counter()
        try:
            result = fn(*args)
        except Exception:  # the contract says this never happens; count it if it does
            with self.stats.lock:
                self.stats.errors_surfaced += 1
            result = None
        self.stats.add(self.rank, op, time.perf_counter() - t0, len(args[0]), result is not None)
        return result

    def run(self) -> None:
        self.backup_thread.start()
        try:
            for request in self.requests:
                if self.stop.is_set():
                    break
                self.serve(request.keys)
                if self.rank == 0:
                    with self.stats.lock:
                        self.stats.requests += 1
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the runner
            self.error = exc
            self.reducer.abort()
        finally:
            self.backups.put(None)

    def _backup_loop(self) -> None:
        while True:
            keys = self.backups.get()
            if keys is None:
                return
            for start in range(0, len(keys), STORAGE_BATCH_SIZE):
                batch = keys[start:start + STORAGE_BATCH_SIZE]
                values = [page_bytes(self.rank, k, self.page_size) for k in batch]
                ok = self._timed("set", self.storage.set, batch, values)
                if ok and all(ok):
                    with self.stats.lock:
                        self.stats.pages_written += len(batch)

    def serve(self, keys: list[str]) -> None:
        # Prefetch: query hits batch by batch, stop at the first partial batch (as SGLang does).
        hits = 0
        for start in range(0, len(keys), STORAGE_BATCH_SIZE):
            batch = keys[start:start + STORAGE_BATCH_SIZE]
            n = self._timed("exists", self.storage.exists, batch) or 0
            hits += n
            if n < len(batch):
                break
        hits = self.reducer(self.rank, hits)
        loaded = 0
        for start in range(0, hits, STORAGE_BATCH_SIZE):
            batch = keys[start:min(hits, start + STORAGE_BATCH_SIZE)]
            pages = self._timed("get", self.storage.get, batch, self.page_size) or [None] * len(batch)
            bad = 0
            for key, page in zip(batch, pages):
                if page is None:
                    break
                if bytes(page) != page_bytes(self.rank, key, self.page_size):
                    bad += 1
                    break
                loaded += 1
            if bad:
                with self.stats.lock:
                    self.stats.verify_failures += bad
            if loaded < start + len(batch):
                break
        with self.stats.lock:
            self.stats.pages_requested += len(keys)
            self.stats.pages_hit += loaded
        self.stats.hits.append((self.stats.now(), len(keys), loaded))
        # Backup: the backup thread writes what storage did not have (dropped when it is behind).
        if loaded < len(keys):
            try:
                self.backups.put_nowait(keys[loaded:])
            except Full:
                with self.stats.lock:
                    self.stats.backups_skipped += 1


class Simulation:
    """Run ``ranks`` engine ranks over ``storages`` (one per rank) for a duration or a request count."""

    def __init__(self, storages: Sequence[RankStorage], *, page_size: int = 64 * 1024,
                 workload: Optional[Workload] = None, requests: int = 1_000_000) -> None:
        self.storages = list(storages)
        self.page_size = page_size
        self.workload = workload or Workload()
        self.stats = SimStats()
        self.stop = threading.Event()
        self.reducer = MinReducer(len(self.storages))
        plan = Plan(self.workload, requests)
        self.ranks = [Rank(r, s, self.workload, self.reducer, self.stats, page_size, self.stop, plan)
                      for r, s in enumerate(self.storages)]

    def start(self) -> "Simulation":
        self.stats.started = time.monotonic()
        for r in self.ranks:
            r.start()
        return self

    def finish(self, timeout: float = 30.0) -> SimStats:
        """Stop the ranks. A rank that stopped first leaves the others waiting in the all-reduce, so
        after a grace period the collective is aborted (as a real engine's would time out)."""
        self.stop.set()
        grace = time.monotonic() + 2.0
        for r in self.ranks:
            r.join(max(0.0, grace - time.monotonic()))
        self.reducer.abort()
        for r in self.ranks:
            r.join(timeout)
            r.backup_thread.join(timeout)
        for r in self.ranks:
            if r.error is not None:
                raise RuntimeError(f"sim rank {r.rank} failed: {r.error!r}") from r.error
        return self.stats

    def run_for(self, seconds: float) -> SimStats:
        self.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end and any(r.is_alive() for r in self.ranks):
            time.sleep(0.05)
        return self.finish()
