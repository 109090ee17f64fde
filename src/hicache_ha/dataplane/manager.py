"""The per-rank BackendManager: builds the members and puts the three pieces of a rank together.

- ``DataPath``: the engine's calls (exists / read / set), one lock per call, never raising;
- ``Switcher``: the local switch steps a control plane drives (prepare / commit / abort / detach /
  restore) and the rank's own failover;
- ``Supervisor``: the one thread that judges results, pings, probes, fails over and fails back.

A rank works with no control plane at all; one plugs in by replacing ``failover_handler``.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Optional, Sequence, Union

from ..backends import registry
from ..backends.base import BackendConfig, BackendContext
from ..backends.errors import ConfigError
from ..config import HAConfig, parse
from ..health.breaker import CIRCUIT_BROKEN, DETACHED, Transition
from .datapath import DataPath, Namespace, Route
from .events import EventLog
from .layout import Layout
from .member import Member, Sink
from .supervisor import Supervisor
from .switch import Prepared, Switcher

log = logging.getLogger("hicache_ha.dataplane")
_STATUS_SEQ = itertools.count(1)


class BackendManager:
    def __init__(self, config: Union[HAConfig, dict, str], layout: Optional[Layout] = None,
                 context: Optional[BackendContext] = None, clock: Callable[[], float] = time.monotonic,
                 supervise: bool = True) -> None:
        self.config = parse(config)
        self.layout = layout or Layout()
        self.context = context or BackendContext()
        self.context.default_workers = self.config.bulkhead.max_concurrent
        self._clock = clock
        self.events = EventLog(rank=self.layout.rank)
        self.supervisor = Supervisor(self, self.config.health, self.config.failover, self.config.backends[0].name,
                                     clock=clock)
        self.members: dict[str, Member] = {}
        for spec in self.config.backends:
            self.members[spec.name] = self._build(spec)
        first = self.members[self.config.backends[0].name]
        self.path = DataPath(Route(1, first), self.config.deadlines_ms)
        self.kv = self.namespace(self.layout)  # the KV pool's pages of this rank
        for member in self.members.values():
            self._hold_until_built(member)
        self.switcher = Switcher(self.path, self.members, self._build, self.events,
                                 self.config.health.recovery.probe_timeout_ms / 1000, self.supervisor.wake)
        # Who carries out a failover the supervisor decided on. A control plane replaces it so that all
        # ranks move together; it must not block (the supervisor calls it).
        self.failover_handler: Callable[[Member, str], None] = self.switcher.local_failover
        if supervise:
            self.supervisor.start(f"hicache-ha-supervisor-{self.layout.rank}")

    # -- building -----------------------------------------------------------------------------------
    def _build(self, spec: BackendConfig) -> Member:
        cls = registry.resolve(spec.type)
        try:
            backend = cls.from_config(spec, self.context)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"backend {spec.name!r} ({spec.type}): cannot be built: {exc}") from exc
        workers = spec.max_concurrent or self.config.bulkhead.max_concurrent
        member = Member(spec, backend, workers, self.config.bulkhead.queue, self.config.health, clock=self._clock)
        member.listeners.append(self._on_transition)
        member.on_news = self.supervisor.wake

        def built_late() -> None:  # recover now: probes (then trials) prove it, as after any trip
            member.apply(lambda b, now: b.retry_now(now))
            self.supervisor.wake()

        backend.on_ready = built_late
        if hasattr(self, "path"):  # a member built later (attached): the rank is up
            self._hold_until_built(member)
        return member

    @staticmethod
    def _hold_until_built(member: Member) -> None:
        """A member whose backend is not built yet starts out of traffic: start-up never waits on it."""
        if not member.backend.ready:
            member.apply(lambda b, now: b.trip(now, member.backend.not_ready_reason()))

    def host_ready(self) -> None:
        """SGLang registered its host pool: members that waited for it are built now (each waits at most
        its own ``start_wait_ms``; past that it goes on being built in the background)."""
        for member in list(self.members.values()):
            if not member.backend.ready:
                member.backend.host_ready()

    def _on_transition(self, member: Member, t: Transition) -> None:
        """A member changed state (decided on the supervisor, an admin or a switch thread; never on an
        engine thread): record it, log it, let the supervisor look."""
        self.events.emit(member.name, t.from_state, t.to_state, t.reason, active=member is self.active)
        level = logging.WARNING if t.to_state in (CIRCUIT_BROKEN, DETACHED) else logging.INFO
        log.log(level, "hicache-ha: rank %d: %r %s -> %s (%s)", self.layout.rank, member.name,
                t.from_state, t.to_state, t.reason)
        self.supervisor.wake()

    def namespace(self, layout: Layout) -> Namespace:
        """Where pages of ``layout`` (this rank, one pool) live: ``<key_prefix>-<fingerprint>-<page key>``."""
        return Namespace(f"{self.config.key_prefix}-{layout.fingerprint()}-", layout.is_storage_writer)

    def set_layout(self, layout: Layout) -> None:
        """Complete the layout (SGLang registers the host pool after construction)."""
        self.layout = layout
        self.events.rank = layout.rank
        self.kv = self.namespace(layout)

    def storage_key(self, key: str) -> str:
        return self.kv.prefix + key

    # -- the rank, as its supervisor sees it (SupervisedRank) ---------------------------------------
    def all_members(self) -> list[Member]:
        return list(self.members.values())

    def active_member(self) -> Optional[Member]:
        return self.path.route.member

    def failover_to(self, target: Member, reason: str) -> None:
        self.failover_handler(target, reason)

    def note(self, member: Member, reason: str, **detail) -> None:
        self.events.emit(member.name, member.state, member.state, reason, **detail)

    # -- the engine path, for the KV pool (HAStorage names other pools' pages itself) ------------------
    def exists(self, keys: Sequence[str]) -> int:
        return self.path.exists(self.kv.keys(keys))

    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list:
        return self.path.read(self.kv.keys(keys), nbytes)

    def get_into(self, keys: Sequence[str], nbytes: Optional[int], sink: Sink) -> list[bool]:
        return self.path.read(self.kv.keys(keys), nbytes, sink)

    def set(self, keys: Sequence[str], values: Sequence[Any]) -> list[bool]:
        if not self.kv.writer:  # MLA: another rank of the group writes the shared page
            return [True] * len(keys)
        return self.path.set(self.kv.keys(keys), values)

    def clear(self, prefixes: Optional[Sequence[str]] = None) -> bool:
        """Remove this rank's pages (the KV pool's, or those under ``prefixes``) from the active member."""
        return self.path.clear(prefixes or [self.kv.prefix])

    # -- switch steps -------------------------------------------------------------------------------
    def prepare(self, target: Union[str, BackendConfig, dict], *, probe_deadline_s: Optional[float] = None) -> Prepared:
        return self.switcher.prepare(target, probe_deadline_s=probe_deadline_s)

    def commit(self, prepared: Prepared, **kw) -> int:
        return self.switcher.commit(prepared, **kw)

    def abort(self, prepared: Prepared) -> None:
        self.switcher.abort(prepared)

    def detach(self, **kw) -> int:
        return self.switcher.detach(**kw)

    def restore(self, epoch: int, active: Optional[str]) -> None:
        self.switcher.restore(epoch, active)

    def local_failover(self, target: Member, reason: str) -> None:
        self.switcher.local_failover(target, reason)

    @property
    def configured(self) -> frozenset[str]:
        """The members of the configuration (the others were attached at run time)."""
        return frozenset(b.name for b in self.config.backends)

    def remove_member(self, name: str, reason: str = "removed by admin") -> None:
        """Admin: forget a member attached at run time (closed; never a configured or the active one)."""
        self.switcher.remove(name, self.configured, reason)

    def detach_member(self, name: str) -> None:
        """Admin: take one member out (state ``detached``); if it was active, the supervisor fails over."""
        self.switcher.member(name).apply(lambda b, now: b.detach(now))

    def attach_member(self, name: str) -> None:
        """Admin: bring a detached member back; it recovers through probes before it serves."""
        self.switcher.member(name).apply(lambda b, now: b.attach(now))

    # -- status -------------------------------------------------------------------------------------
    @property
    def active(self) -> Optional[Member]:
        return self.path.route.member

    @property
    def epoch(self) -> int:
        return self.path.route.epoch

    @property
    def failovers(self) -> int:
        """Moves of traffic off a tripped member, by this rank alone or with its group (not failbacks)."""
        return sum(n for r, n in self.switcher.failovers_by_reason.items() if r != "failback")

    @property
    def dropped_writes(self) -> int:
        return self.path.unrouted_writes + sum(m.stats.dropped_pages for m in self.members.values())

    def status(self) -> dict:
        """The compact status a rank reports (heartbeats, metrics): bounded, no keys. ``seq`` orders
        statuses and is taken first, so a status read before a commit never passes for a later one."""
        seq = next(_STATUS_SEQ)
        route = self.path.route
        members = list(self.members.values())
        backends = [{"name": m.name, "type": m.spec.type, "in_flight": m.in_flight, **m.snapshot()} for m in members]
        by_reason = dict(self.switcher.failovers_by_reason)
        return {
            "seq": seq,
            "epoch": route.epoch,
            "active": route.member.name if route.member else None,
            "in_flight": sum(m.in_flight for m in members),
            "dropped_writes": self.path.unrouted_writes + sum(b["dropped_pages"] for b in backends),
            "failovers": self.failovers,
            "failovers_by_reason": by_reason,
            "backends": backends,
            "attached": [m.name for m in members if m.name not in self.configured],  # at run time
        }

    def snapshot(self) -> dict:
        """Everything about this rank, for people and ``hicache-ha``'s own status."""
        status = self.status()
        described = {m.name: m.backend.describe() for m in self.members.values()}
        return {
            **status,
            "rank": self.layout.rank,
            "layout": {"fingerprint": self.layout.fingerprint(), **self.layout.identity()},
            "unserved_reads": self.path.unrouted_reads,
            "backends": [{**described[b["name"]], **b, "active": b["name"] == status["active"]}
                         for b in status["backends"]],
            "events": [e.to_dict() for e in self.events.recent(20)],
        }

    def close(self) -> None:
        self.supervisor.stop()
        for m in self.members.values():
            m.close()
