"""The engine's door to storage: the active member and the per-op deadlines.

The active member and its epoch are one immutable ``Route``, swapped whole by the switch steps and read
once per engine call, without a lock. Each call takes one lock (its member's admission) and never
raises: failures become the caller's failure values.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from ..backends.errors import Refused
from ..config import Deadlines
from ..health.breaker import CIRCUIT_BROKEN
from ..health.outcomes import Outcome
from .member import Member, Sink

log = logging.getLogger("hicache_ha.dataplane")


@dataclass(frozen=True)
class Route:
    """Where engine calls go: ``member`` (None: detached, reads miss, writes are dropped) at ``epoch``."""

    epoch: int
    member: Optional[Member]


@dataclass(frozen=True)
class Namespace:
    """Where one pool's pages of this rank live: the storage-key prefix (the layout fingerprint), and
    whether this rank writes them (shared MLA pages have one writer per group)."""

    prefix: str
    writer: bool = True

    def keys(self, keys: Sequence[str]) -> list[str]:
        prefix = self.prefix
        return [prefix + k for k in keys]


class DataPath:
    """Engine calls on storage keys (namespaced by the caller). Never raises."""

    def __init__(self, route: Route, deadlines: Deadlines) -> None:
        self.route = route
        self.deadlines = {"exists": deadlines.exists / 1000, "get": deadlines.get / 1000,
                          "set": deadlines.set / 1000, "clear": deadlines.clear / 1000}
        self.unrouted_reads = 0  # pages asked for while no member was active
        self.unrouted_writes = 0  # pages dropped while no member was active (or not buffers)
        self._counters = threading.Lock()  # failure paths only

    def exists(self, skeys: Sequence[str]) -> int:
        """How many leading keys are stored; 0 when storage cannot answer in time."""
        member = self.route.member
        if member is None or not skeys:
            return 0
        outcome, found = member.call("exists", self.deadlines["exists"], member.exists_job, skeys)
        return found if outcome is Outcome.OK else 0

    def exists_each(self, skeys: Sequence[str], nbytes: Union[int, Sequence[int], None] = None) -> Optional[list[bool]]:
        """Whether each key is stored; None when storage cannot answer in time. ``nbytes`` as for ``read``."""
        member = self.route.member
        if member is None:
            return None
        if not skeys:
            return []
        outcome, found = member.call("exists", self.deadlines["exists"], member.exists_each_job, skeys, nbytes)
        return found if outcome is Outcome.OK else None

    def read(self, skeys: Sequence[str], nbytes: Union[int, Sequence[int], None],
             sink: Optional[Sink] = None) -> list:
        """One checked page (a buffer the data plane owns) or None per key; with ``sink``, each good
        page is written by ``sink(i, page)`` on the worker, fenced, and the answer is one bool per key.
        ``nbytes``: the page size the caller expects, one for all keys or one per key."""
        miss = None if sink is None else False
        member = self.route.member
        if member is None:
            self._count("unrouted_reads", len(skeys))
            return [miss] * len(skeys)
        outcome, result = member.call("get", self.deadlines["get"], member.read_job, skeys, nbytes, sink)
        if outcome is Outcome.OK or outcome is Outcome.CORRUPT:
            return result[0]
        return [miss] * len(skeys)

    def set(self, skeys: Sequence[str], values: Sequence[Any]) -> list[bool]:
        """Store pages (buffers in engine memory, or tuples of such pieces); one bool per key."""
        n = len(skeys)
        member = self.route.member
        if member is None:
            self._count("unrouted_writes", n)
            return [False] * n
        if member.state == CIRCUIT_BROKEN:  # it would be refused: spare the staging copy (or checksum)
            member.refuse("set", n)
            return [False] * n
        try:
            items = member.prepare_values(skeys, values)
        except Refused:  # no staging room now: our own load, never news about the backend
            member.refuse("set", n)
            return [False] * n
        except (TypeError, ValueError) as exc:  # not a buffer: the caller's bug, not the backend's
            log.error("hicache-ha: set of %d pages: values are not buffers: %s", n, exc)
            self._count("unrouted_writes", n)
            return [False] * n
        outcome, stored = member.call("set", self.deadlines["set"], member.set_job, skeys, items,
                                      on_cancel=None if member.envelope else lambda: member.backend.unstage(items))
        if outcome is not Outcome.OK:
            return [False] * n
        if stored is None:
            return [True] * n
        member.not_taken(n - sum(stored))  # pages the backend does not take (not a failure)
        return [bool(ok) for ok in stored]

    def clear(self, prefixes: Sequence[str]) -> bool:
        """Remove the pages under these prefixes from the active member, within the clear deadline."""
        member = self.route.member
        if member is None:
            return False

        def clear_all() -> None:
            for prefix in prefixes:
                member.backend.clear(prefix)

        outcome, _ = member.run("clear", self.deadlines["clear"], clear_all)
        return outcome is Outcome.OK

    def _count(self, counter: str, n: int) -> None:
        with self._counters:
            setattr(self, counter, getattr(self, counter) + n)
