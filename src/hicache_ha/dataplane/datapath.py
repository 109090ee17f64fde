"""The engine's door to storage: the active member, the key prefix, the per-op deadlines.

The active member and its epoch are one immutable ``Route``, swapped whole by the switch steps and read
once per engine call, without a lock. Each call takes one lock (its member's admission) and never
raises: failures become the caller's failure values.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..config import Deadlines
from ..health.outcomes import Outcome
from .member import Member, Sink

log = logging.getLogger("hicache_ha.dataplane")


@dataclass(frozen=True)
class Route:
    """Where engine calls go: ``member`` (None: detached, reads miss, writes are dropped) at ``epoch``."""

    epoch: int
    member: Optional[Member]


class DataPath:
    def __init__(self, route: Route, deadlines: Deadlines, prefix: str, is_storage_writer: bool = True) -> None:
        self.route = route
        self.deadlines = {"exists": deadlines.exists / 1000, "get": deadlines.get / 1000,
                          "set": deadlines.set / 1000, "clear": deadlines.clear / 1000}
        self.prefix = prefix
        self.is_storage_writer = is_storage_writer
        self.unrouted_reads = 0  # pages asked for while no member was active
        self.unrouted_writes = 0  # pages dropped while no member was active (or not buffers)
        self._counters = threading.Lock()  # failure paths only

    def exists(self, keys: Sequence[str]) -> int:
        """How many leading keys are stored; 0 when storage cannot answer in time."""
        member = self.route.member
        if member is None or not keys:
            return 0
        prefix = self.prefix
        outcome, found = member.call("exists", self.deadlines["exists"], member.exists_job, [prefix + k for k in keys])
        return found if outcome is Outcome.OK else 0

    def read(self, keys: Sequence[str], nbytes: Optional[int], sink: Optional[Sink] = None) -> list:
        """One checked page (a buffer the data plane owns) or None per key; with ``sink``, each good
        page is written by ``sink(i, page)`` on the worker, fenced, and the answer is one bool per key."""
        miss = None if sink is None else False
        member = self.route.member
        if member is None:
            self._count("unrouted_reads", len(keys))
            return [miss] * len(keys)
        prefix = self.prefix
        outcome, result = member.call("get", self.deadlines["get"], member.read_job, [prefix + k for k in keys],
                                      nbytes, sink)
        if outcome is Outcome.OK or outcome is Outcome.CORRUPT:
            return result[0]
        return [miss] * len(keys)

    def set(self, keys: Sequence[str], values: Sequence[Any]) -> list[bool]:
        """Store pages (buffers in engine memory); one bool per key."""
        n = len(keys)
        if not self.is_storage_writer:  # MLA: another rank of the group writes the shared page
            return [True] * n
        member = self.route.member
        if member is None:
            self._count("unrouted_writes", n)
            return [False] * n
        skeys = [self.prefix + k for k in keys]
        try:
            items = member.prepare_values(skeys, values)
        except (TypeError, ValueError) as exc:  # not a buffer: the caller's bug, not the backend's
            log.error("hicache-ha: set of %d pages: values are not buffers: %s", n, exc)
            self._count("unrouted_writes", n)
            return [False] * n
        outcome, _ = member.call("set", self.deadlines["set"], member.set_job, skeys, items)
        return [outcome is Outcome.OK] * n

    def clear(self) -> bool:
        """Remove this layout's pages from the active member, within the clear deadline."""
        member = self.route.member
        if member is None:
            return False
        outcome, _ = member.run("clear", self.deadlines["clear"], lambda: member.backend.clear(self.prefix))
        return outcome is Outcome.OK

    def _count(self, counter: str, n: int) -> None:
        with self._counters:
            setattr(self, counter, getattr(self, counter) + n)
