"""The local switch steps a control plane drives across ranks: prepare, then commit or abort; detach;
restore (the rollback of a commit); and a rank's own failover.

One lock serialises changes of the route, and it is only ever held for the change itself: building a
backend, probing it and draining the old member's calls all happen outside it, so a failover (or the
supervisor) never waits behind a switch's drain.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..backends.base import BackendConfig
from ..backends.errors import ConfigError
from ..config import parse
from ..health.breaker import HEALTHY
from ..health.outcomes import Outcome
from .datapath import DataPath, Route
from .events import EventLog
from .member import Member


class SwitchError(Exception):
    """A local switch step was refused; ``status`` is the HTTP status a control plane should answer."""

    status = 503


class UnknownBackend(SwitchError):
    status = 404


class PrepareRefused(SwitchError):
    status = 503


class DrainTimeout(SwitchError):
    status = 409


class Superseded(SwitchError):
    """The route changed (a failover, another command) while this step was draining."""

    status = 409


@dataclass
class Prepared:
    """A target that was built and probed, ready to commit (or abort)."""

    token: str
    member: Member
    is_new: bool
    base_epoch: int


class Switcher:
    def __init__(self, path: DataPath, members: dict[str, Member], build: Callable[[BackendConfig], Member],
                 events: EventLog, probe_timeout_s: float, on_move: Callable[[], None]) -> None:
        self.path = path
        self.members = members
        self._build = build
        self.events = events
        self.probe_timeout_s = probe_timeout_s
        self._on_move = on_move  # the supervisor's wake-up
        self._lock = threading.Lock()
        self.failovers_by_reason: dict[str, int] = {}

    def member(self, name: str) -> Member:
        member = self.members.get(name)
        if member is None:
            raise UnknownBackend(f"unknown backend {name!r}; members: {', '.join(self.members)}")
        return member

    # -- two-phase switch ---------------------------------------------------------------------------
    def prepare(self, target: Union[str, BackendConfig, dict], *, probe_deadline_s: Optional[float] = None) -> Prepared:
        """Build (if new) and probe the target. Raises UnknownBackend, PrepareRefused or ConfigError;
        changes nothing."""
        if isinstance(target, dict):
            target = parse({"backends": [target]}, environ={}).backends[0]
        base = self.path.route.epoch
        if isinstance(target, BackendConfig):
            existing = self.members.get(target.name)
            if existing is not None and existing.spec != target:
                raise ConfigError(f"backend {target.name!r} already exists with another spec; pick a new name")
            member, is_new = (existing, False) if existing else (self._build(target), True)
        else:
            member, is_new = self.member(target), False
        timeout = self.probe_timeout_s if probe_deadline_s is None else probe_deadline_s
        outcome, _ = member.run("probe", timeout, member.backend.probe)
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
        with self._lock:
            if prepared.is_new:
                self.members.setdefault(prepared.member.name, prepared.member)
            before = self.path.route
        if reason.startswith("failover") and before.member is not prepared.member:
            self._count_failover("group")
        try:
            return self._move(prepared.member, reason, force, drain_timeout_s, epoch)
        except BaseException:
            if prepared.is_new:  # built for this switch only: it leaves with it
                with self._lock:
                    if (self.members.get(prepared.member.name) is prepared.member
                            and self.path.route.member is not prepared.member):
                        del self.members[prepared.member.name]
            raise

    def abort(self, prepared: Prepared) -> None:
        """Forget a prepared switch; a member built only for it is closed."""
        with self._lock:
            orphan = prepared.is_new and self.members.get(prepared.member.name) is not prepared.member
        if orphan:
            prepared.member.close()

    def detach(self, *, force: bool = False, drain_timeout_s: float = 5.0, epoch: Optional[int] = None) -> int:
        """Run without L3: reads miss, writes are dropped and counted."""
        return self._move(None, "detach", force, drain_timeout_s, epoch)

    def restore(self, epoch: int, active: Optional[str]) -> None:
        """Go back to a previous (epoch, active) pair: the rollback of a commit that others refused."""
        member = self.member(active) if active else None
        with self._lock:
            old = self.path.route.member
            self.path.route = Route(epoch, member)
        self._mark(old, member, epoch, "rollback")

    def remove(self, name: str, configured: set[str], reason: str = "removed by admin") -> None:
        """Forget a member attached at run time (never a configured one, never the active one)."""
        with self._lock:
            member = self.member(name)
            if name in configured:
                raise SwitchError(f"{name!r} is in the configuration; only members attached at run time can be removed")
            if self.path.route.member is member:
                raise DrainTimeout(f"{name!r} is active: switch to another member first")
            del self.members[name]
        member.close()
        self.events.emit(name, member.state, "removed", reason)

    # -- a rank's own failover ----------------------------------------------------------------------
    def local_failover(self, target: Member, reason: str) -> None:
        """Move this rank alone (``failover``, or ``failback`` to the primary): forced, make-before-break
        (the supervisor probed the target)."""
        with self._lock:
            old = self.path.route.member
            if old is target or (reason == "failover" and (old is None or old.state == HEALTHY)):
                return  # nothing to do any more: the admin detached, or the active member came back
        self._count_failover(reason)
        self._move(target, reason, force=True, drain_timeout_s=0.0)

    def _count_failover(self, reason: str) -> None:
        """``failover`` (this rank alone), ``group`` (moved with the group by the controller), ``failback``."""
        with self._lock:
            self.failovers_by_reason[reason] = self.failovers_by_reason.get(reason, 0) + 1

    # -- the move itself ----------------------------------------------------------------------------
    def _move(self, target: Optional[Member], reason: str, force: bool, drain_timeout_s: float,
              epoch: Optional[int] = None) -> int:
        """Point traffic at ``target``; the new epoch is ``epoch`` (a control plane's) or the next one."""
        with self._lock:
            before = self.path.route
            if before.member is target:
                if epoch is not None and epoch != before.epoch:
                    self.path.route = Route(epoch, target)
                return self.path.route.epoch
            after = self.path.route = Route(before.epoch + 1 if epoch is None else epoch, target)
        old = before.member
        if old is not None and not force and not old.bulkhead.wait_idle(drain_timeout_s):
            with self._lock:
                undone = self.path.route is after
                if undone:
                    self.path.route = before
            if not undone:
                raise Superseded(f"the route changed while {old.name!r} drained; {reason} not applied")
            raise DrainTimeout(
                f"{old.in_flight} call(s) in flight on {old.name!r} did not finish within {drain_timeout_s} s; "
                "retry later or use force"
            )
        if old is not None and force:
            old.bulkhead.fence_all()  # forced: nobody waits for the old member
        if target is not None and target.state != HEALTHY:
            # It just passed its probe: an explicit switch (or failover) to it means "serve now".
            target.apply(lambda b, now: b.reset(now, f"{reason}: probe passed"))
        self._mark(old, target, after.epoch, reason + (" (forced)" if force and reason in ("switch", "detach") else ""))
        self._on_move()
        return after.epoch

    def _mark(self, old: Optional[Member], new: Optional[Member], epoch: int, reason: str) -> None:
        """Record a move of the route as an event: which member, from where, why, which epoch."""
        self.events.emit(new.name if new else None, old.name if old else "none", new.name if new else "none",
                         reason, epoch=epoch, role="active")
