"""One configured backend inside a rank's data plane: its bulkhead, its counters, its state."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

from ..backends.base import Backend, BackendConfig
from ..backends.envelope import open_page, seal
from ..backends.errors import CorruptPage
from ..health.outcomes import Outcome, classify
from .bulkhead import Bulkhead

log = logging.getLogger("hicache_ha.dataplane")

HEALTHY = "healthy"
CIRCUIT_BROKEN = "circuit_broken"
RECOVERING = "recovering"
DETACHED = "detached"
STATES = (HEALTHY, CIRCUIT_BROKEN, RECOVERING, DETACHED)

Observer = Callable[["Member", str, Outcome, float], None]


class OpStats:
    """Counters per (op, outcome) plus latency sums; one small lock, no allocation per call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, Outcome], int] = {}
        self.latency_sum: dict[str, float] = {}
        self.abandoned = 0
        self.corrupt_pages = 0

    def record(self, op: str, outcome: Outcome, seconds: float) -> None:
        key = (op, outcome)
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            self.latency_sum[op] = self.latency_sum.get(op, 0.0) + seconds

    def add(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + n)

    def snapshot(self) -> dict:
        with self._lock:
            ops: dict[str, dict[str, int]] = {}
            for (op, outcome), n in self.counts.items():
                ops.setdefault(op, {})[outcome.value] = n
            return {"ops": ops, "abandoned": self.abandoned, "corrupt_pages": self.corrupt_pages}


class _RateLimitedLog:
    """Log the first failure of each kind per member, then at most one line every ``every`` seconds."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._last: dict[tuple, float] = {}
        self._every = every
        self._clock = clock

    def warn(self, key: tuple, msg: str, *args: Any) -> None:
        now = self._clock()
        if now - self._last.get(key, -1e18) >= self._every:
            self._last[key] = now
            log.warning(msg, *args)


class Member:
    def __init__(self, spec: BackendConfig, backend: Backend, workers: int, queue: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = spec.name
        self.spec = spec
        self.backend = backend
        self.envelope = backend.capabilities.envelope
        self.bulkhead = Bulkhead(spec.name, workers, queue)
        self.stats = OpStats()
        self.state = HEALTHY
        self.observers: list[Observer] = []
        self._clock = clock
        self._log = _RateLimitedLog(clock=clock)

    @property
    def in_flight(self) -> int:
        return self.bulkhead.in_flight

    def call(self, op: str, deadline_s: float, fn: Callable[..., Any], *args: Any) -> tuple[Outcome, Any]:
        """Run ``fn(*args)`` on a worker and wait at most ``deadline_s``. Never raises.

        After a timeout the call is abandoned: its result, whenever it comes, is never looked at, so
        nothing it read can reach engine memory."""
        start = self._clock()
        call = self.bulkhead.try_submit(fn, *args)
        if call is None:
            return self._finish(op, Outcome.SHORT_CIRCUITED, start, None)
        if not call.wait(deadline_s):
            self.stats.add("abandoned")
            self._log.warn((op, "timeout"), "hicache-ha: %s on %r exceeded its %.0f ms deadline; abandoned",
                           op, self.name, deadline_s * 1000)
            return self._finish(op, Outcome.TIMEOUT, start, None)
        if call.error is not None:
            outcome = classify(call.error)
            self._log.warn((op, outcome), "hicache-ha: %s on %r failed (%s): %s", op, self.name, outcome, call.error)
            return self._finish(op, outcome, start, None)
        return self._finish(op, Outcome.OK, start, call.result)

    def _finish(self, op: str, outcome: Outcome, start: float, result: Any) -> tuple[Outcome, Any]:
        elapsed = self._clock() - start
        self.stats.record(op, outcome, elapsed)
        for observer in self.observers:
            observer(self, op, outcome, elapsed)
        return outcome, result

    # -- what runs on the worker threads ----------------------------------------------------------
    def read_pages(self, keys: Sequence[str], nbytes: Optional[int]) -> tuple[list, int]:
        """Fetch and check pages; a page failing its envelope or size is a miss. Returns (pages, corrupt)."""
        blobs = self.backend.get(keys, nbytes)
        if not self.envelope and nbytes is None:
            return blobs, 0
        pages: list = []
        corrupt = 0
        for key, blob in zip(keys, blobs):
            if blob is None:
                pages.append(None)
                continue
            try:
                page = open_page(key, blob) if self.envelope else memoryview(blob)
                if nbytes is not None and page.nbytes != nbytes:
                    raise CorruptPage(f"page {key!r}: {page.nbytes} bytes, this layout expects {nbytes}")
            except CorruptPage as exc:
                corrupt += 1
                self._log.warn(("get", "corrupt"), "hicache-ha: %s on %r: %s", "get", self.name, exc)
                pages.append(None)
                continue
            pages.append(page)
        return pages, corrupt

    def prepare_values(self, keys: Sequence[str], values: Sequence[Any]) -> list:
        """Runs on the engine thread, before the call is queued. With an envelope, the header (checksum)
        is computed now from engine memory; the worker reads the payload later, and if the engine has
        reused that memory by then, the stored page fails its checksum and reads as a miss. Without an
        envelope the page is copied now, so a late worker never reads reused memory."""
        if self.envelope:
            return [(seal(k, v), v) for k, v in zip(keys, values)]
        return [bytearray(v) for v in values]

    def close(self) -> None:
        self.bulkhead.close()
        try:
            self.backend.close()
        except Exception:
            pass
