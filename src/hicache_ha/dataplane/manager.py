"""The per-rank BackendManager: the engine's only door to storage.

Every engine call goes to the active member through its bulkhead and returns within the op's deadline,
whatever the backend does. The active member is one pointer read per call (no lock on the hot path); an
integer epoch counts every change of it. Switches are local two-phase steps (prepare, then commit or
abort) that a control plane drives across ranks; a rank also works with no control plane at all.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from ..backends import registry
from ..backends.base import BackendConfig, BackendContext
from ..backends.errors import ConfigError
from ..config import HAConfig, parse
from ..health.outcomes import Outcome
from .events import EventLog
from .layout import Layout
from ..health.breaker import CIRCUIT_BROKEN, DETACHED, HEALTHY, Transition
from .member import Member
from .supervisor import Supervisor

log = logging.getLogger("hicache_ha.dataplane")
_STATUS_SEQ = itertools.count(1)


class SwitchError(Exception):
    """A local switch step was refused; ``status`` is the HTTP status a control plane should answer."""

    status = 503


class UnknownBackend(SwitchError):
    status = 404


class PrepareRefused(SwitchError):
    status = 503


class DrainTimeout(SwitchError):
    status = 409


@dataclass
class Prepared:
    """A target that was built and probed, ready to commit (or abort)."""

    token: str
    member: Member
    is_new: bool
    base_epoch: int


class BackendManager:
    def __init__(self, config: Union[HAConfig, dict, str], layout: Optional[Layout] = None,
                 context: Optional[BackendContext] = None, clock: Callable[[], float] = time.monotonic,
                 supervise: bool = True) -> None:
        self.config = parse(config)
        self.layout = layout or Layout()
        self.context = context or BackendContext()
        self._clock = clock
        d = self.config.deadlines_ms
        self.deadlines = {"exists": d.exists / 1000, "get": d.get / 1000, "set": d.set / 1000}
        self.events = EventLog(rank=self.layout.rank)
        self._control = threading.Lock()  # serialises switches; never taken on the engine path
        self._prefix = self._key_prefix()
        self.members: dict[str, Member] = {}
        for spec in self.config.backends:
            self.members[spec.name] = self._build(spec)
        self.active: Optional[Member] = self.members[self.config.backends[0].name]
        self.epoch = 1
        self.dropped_writes = 0
        self.unserved_reads = 0
        self._counters = threading.Lock()  # for the two counters above (failure paths only)
        self.failovers = 0
        self.failovers_by_reason: dict[str, int] = {}
        # Who carries out a failover the supervisor decided on. A control plane replaces it so that all
        # ranks move together; it must not block (the supervisor calls it).
        self.failover_handler: Callable[[Member, str], None] = self.local_failover
        self.supervisor = Supervisor(self, clock=clock)
        if supervise:
            self.supervisor.start()

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
        return member

    def _on_transition(self, member: Member, t: Transition) -> None:
        self.events.emit(member.name, t.from_state, t.to_state, t.reason, active=member is self.active)
        level = logging.WARNING if t.to_state in (CIRCUIT_BROKEN, DETACHED) else logging.INFO
        log.log(level, "hicache-ha: rank %d: %r %s -> %s (%s)", self.layout.rank, member.name,
                t.from_state, t.to_state, t.reason)
        supervisor = getattr(self, "supervisor", None)
        if supervisor is not None:
            supervisor.wake()

    def _key_prefix(self) -> str:
        return f"{self.config.key_prefix}-{self.layout.fingerprint()}-"

    def set_layout(self, layout: Layout) -> None:
        """Complete the layout (SGLang registers the host pool after construction)."""
        self.layout = layout
        self.events.rank = layout.rank
        self._prefix = self._key_prefix()

    def storage_key(self, key: str) -> str:
        return self._prefix + key

    # -- the engine path ----------------------------------------------------------------------------
    def exists(self, keys: Sequence[str]) -> int:
        """How many leading keys are stored; 0 when storage cannot answer in time."""
        member = self.active
        if member is None or not keys:
            return 0
        prefix = self._prefix
        outcome, found = member.call("exists", self.deadlines["exists"], member.backend.exists,
                                     [prefix + k for k in keys])
        return found if outcome is Outcome.OK else 0

    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list:
        """One checked page (a buffer the data plane owns) or None per key. Never raises."""
        return self._read(keys, None, "read_pages", nbytes)

    def get_into(self, keys: Sequence[str], nbytes: Optional[int], sink: Callable[[int, Any], None]) -> list[bool]:
        """Like ``get``, but each good page is handed to ``sink(i, page)`` on the worker, which writes it
        into the caller's memory; fenced, so nothing is written after this returns. Never raises."""
        return self._read(keys, False, "read_into", nbytes, sink, with_call=True)

    def _read(self, keys: Sequence[str], miss: Any, reader: str, *args: Any, with_call: bool = False) -> list:
        """Run the active member's ``reader`` (read_pages / read_into) within the get deadline; ``miss``
        per key when nothing could be read."""
        member = self.active
        if member is None:
            self._count("unserved_reads", len(keys))
            return [miss] * len(keys)
        prefix = self._prefix
        outcome, result = member.call("get", self.deadlines["get"], getattr(member, reader),
                                      [prefix + k for k in keys], *args, with_call=with_call)
        if outcome is not Outcome.OK:
            return [miss] * len(keys)
        found, corrupt = result
        if corrupt:
            member.count("corrupt_pages", corrupt)
            member.record("get", Outcome.CORRUPT, 0.0)
        return found

    def set(self, keys: Sequence[str], values: Sequence[Any]) -> list[bool]:
        """Store pages (buffers in engine memory); one bool per key. Never raises."""
        n = len(keys)
        if not self.layout.is_storage_writer:  # MLA: another rank of the group writes the shared page
            return [True] * n
        member = self.active
        if member is None:
            self._count("dropped_writes", n)
            return [False] * n
        skeys = [self._prefix + k for k in keys]
        try:
            items = member.prepare_values(skeys, values)
        except (TypeError, ValueError) as exc:  # not a buffer: the caller's bug, not the backend's
            log.error("hicache-ha: set of %d pages: values are not buffers: %s", n, exc)
            self._count("dropped_writes", n)
            return [False] * n
        outcome, _ = member.call("set", self.deadlines["set"], member.backend.set, skeys, items)
        if outcome is not Outcome.OK:
            self._count("dropped_writes", n)
            return [False] * n
        return [True] * n

    def _count(self, counter: str, n: int) -> None:
        with self._counters:
            setattr(self, counter, getattr(self, counter) + n)

    # -- local switch steps (driven by a control plane, or by an operator in-process) ---------------
    def prepare(self, target: Union[str, BackendConfig, dict], *, probe_deadline_s: Optional[float] = None) -> Prepared:
        """Build (if new) and probe the target. Raises UnknownBackend or PrepareRefused; changes nothing.
        The probe may take ``health.recovery.probe_timeout_ms`` unless told otherwise."""
        if probe_deadline_s is None:
            probe_deadline_s = self.config.health.recovery.probe_timeout_ms / 1000
        if isinstance(target, dict):
            target = parse({"backends": [target]}).backends[0]
        with self._control:
            base = self.epoch
            if isinstance(target, BackendConfig):
                existing = self.members.get(target.name)
                if existing is not None and existing.spec != target:
                    raise ConfigError(f"backend {target.name!r} already exists with another spec; pick a new name")
                member, is_new = (existing, False) if existing else (self._build(target), True)
            else:
                member = self.members.get(target)
                if member is None:
                    raise UnknownBackend(f"unknown backend {target!r}; members: {', '.join(self.members)}")
                is_new = False
        outcome, _ = member.run("probe", probe_deadline_s, member.backend.probe)
        if outcome is not Outcome.OK:
            if is_new:
                member.close()
            raise PrepareRefused(f"backend {member.name!r} failed its probe ({outcome})")
        return Prepared(uuid.uuid4().hex, member, is_new, base)

    def commit(self, prepared: Prepared, *, force: bool = False, drain_timeout_s: float = 5.0,
               epoch: Optional[int] = None, reason: str = "switch") -> int:
        """Make the prepared member active at a new epoch and return it.

        New engine calls go to the target at once. Without ``force``, the old member's in-flight calls
        must finish within ``drain_timeout_s`` or the switch is undone (DrainTimeout). With ``force``
        they are abandoned: nobody waits for them and their results are never used."""
        with self._control:
            if prepared.is_new:
                self.members.setdefault(prepared.member.name, prepared.member)
            moved_from = self.active
            new_epoch = self._move(prepared.member, reason, force, drain_timeout_s, epoch)
            if reason.startswith("failover") and moved_from is not prepared.member:
                self._count_failover("group")
            return new_epoch

    def abort(self, prepared: Prepared) -> None:
        """Forget a prepared switch; a member built only for it is closed."""
        with self._control:
            if prepared.is_new and self.members.get(prepared.member.name) is not prepared.member:
                prepared.member.close()

    def detach(self, *, force: bool = False, drain_timeout_s: float = 5.0, epoch: Optional[int] = None) -> int:
        """Run without L3: reads miss, writes are dropped and counted."""
        with self._control:
            return self._move(None, "detach", force, drain_timeout_s, epoch)

    def _count_failover(self, reason: str) -> None:
        """``failover`` (this rank alone), ``group`` (moved with the group by the controller), ``failback``."""
        if reason != "failback":
            self.failovers += 1
        self.failovers_by_reason[reason] = self.failovers_by_reason.get(reason, 0) + 1

    def failover_to(self, target: Member, reason: str) -> None:
        """The supervisor found ``target`` healthy and probed: hand the move to the failover handler."""
        self.failover_handler(target, reason)

    def local_failover(self, target: Member, reason: str) -> None:
        with self._control:
            old = self.active
            if old is target or (reason == "failover" and (old is None or old.state == HEALTHY)):
                return  # nothing to do any more: the admin detached, or the active member came back
            self._count_failover(reason)
            self._move(target, reason, force=True, drain_timeout_s=0.0)

    def detach_member(self, name: str) -> None:
        """Admin: take one member out (state ``detached``); if it was active, the supervisor fails over."""
        member = self._member(name)
        member.apply(lambda b, now: b.detach(now))

    def attach_member(self, name: str) -> None:
        """Admin: bring a detached member back; it recovers through probes before it serves."""
        member = self._member(name)
        member.apply(lambda b, now: b.attach(now))

    def _member(self, name: str) -> Member:
        member = self.members.get(name)
        if member is None:
            raise UnknownBackend(f"unknown backend {name!r}; members: {', '.join(self.members)}")
        return member

    def restore(self, epoch: int, active: Optional[str]) -> None:
        """Go back to a previous (epoch, active) pair: the rollback of a commit that others refused."""
        with self._control:
            member = self._member(active) if active else None
            old = self.active
            self.active = member
            self.epoch = epoch
            self._mark(old, member, "rollback")

    def _move(self, target: Optional[Member], reason: str, force: bool, drain_timeout_s: float,
              epoch: Optional[int] = None) -> int:
        """Point traffic at ``target``; the new epoch is ``epoch`` (a control plane's) or the next one."""
        old, old_epoch = self.active, self.epoch
        if old is target:
            if epoch is not None:
                self.epoch = epoch
            return self.epoch
        self.active = target
        self.epoch = epoch if epoch is not None else old_epoch + 1
        if old is not None and not force and not old.bulkhead.wait_idle(drain_timeout_s):
            self.active, self.epoch = old, old_epoch
            raise DrainTimeout(
                f"{old.in_flight} call(s) in flight on {old.name!r} did not finish within {drain_timeout_s} s; "
                "retry later or use force"
            )
        if old is not None and force:
            old.bulkhead.fence_all()  # forced: nobody waits for the old member
        if target is not None and target.state != HEALTHY:
            # It just passed its probe: an explicit switch (or failover) to it means "serve now".
            target.apply(lambda b, now: b.reset(now, f"{reason}: probe passed"))
        self._mark(old, target, reason + (" (forced)" if force and reason in ("switch", "detach") else ""))
        self.supervisor.wake()
        return self.epoch

    def _mark(self, old: Optional[Member], new: Optional[Member], reason: str) -> None:
        """Record a move of the active pointer as an event: which member, from where, why, which epoch."""
        self.events.emit(new.name if new else None, old.name if old else "none", new.name if new else "none",
                         reason, epoch=self.epoch, role="active")

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict:
        """The compact status a rank reports (heartbeats, metrics): bounded, no keys. ``seq`` orders
        statuses and is taken first, so a status read before a commit never passes for a later one."""
        seq = next(_STATUS_SEQ)
        active = self.active
        members = list(self.members.values())
        return {
            "seq": seq,
            "epoch": self.epoch,
            "active": active.name if active else None,
            "in_flight": sum(m.in_flight for m in members),
            "dropped_writes": self.dropped_writes,
            "failovers": self.failovers,
            "failovers_by_reason": dict(self.failovers_by_reason),
            "backends": [{"name": m.name, "type": m.spec.type, "in_flight": m.in_flight, **m.snapshot()}
                         for m in members],
        }

    def snapshot(self) -> dict:
        """Everything about this rank, for ``HAStorage.get_stats()`` and people."""
        status = self.status()
        described = {m.name: m.backend.describe() for m in self.members.values()}
        return {
            **status,
            "rank": self.layout.rank,
            "layout": {"fingerprint": self.layout.fingerprint(), **self.layout.identity()},
            "unserved_reads": self.unserved_reads,
            "backends": [{**described[b["name"]], **b, "active": b["name"] == status["active"]}
                         for b in status["backends"]],
            "events": [e.to_dict() for e in self.events.recent(20)],
        }

    def clear(self) -> None:
        member = self.active
        if member is not None:
            member.run("clear", max(self.deadlines.values()) * 10, member.backend.clear, self._prefix)

    def close(self) -> None:
        self.supervisor.stop()
        for m in self.members.values():
            m.close()
