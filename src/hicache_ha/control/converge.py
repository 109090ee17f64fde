"""Convergence: the leader brings every live rank to the desired (epoch, active), one rank at a time,
make-before-break, removes members a rank holds that the desired state does not, and moves the whole group
on a failover or failback one rank asks for (or when a rank left a desired member that is broken there).
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import TYPE_CHECKING, Optional

from ..health.breaker import HEALTHY
from .ranks import RankInfo
from .state import DesiredState, NotLeader
from .twophase import failures

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("hicache_ha.control")


class Convergence:
    """The convergence half of ``Controller`` (a mixin: the attributes below are the controller's)."""

    desired: DesiredState
    ranks: dict[int, RankInfo]
    command_timeout_s: float
    clock: Callable[[], float]
    _switch: threading.Lock
    _stop: threading.Event
    _moving_group: threading.Event
    is_leader: bool
    alive: Callable[[], list[int]]
    call: Callable[..., dict]
    switch: Callable[..., object]
    event: Callable[..., None]
    _catch_up_due: Callable[[], bool]
    _catch_up: Callable[[], None]

    # -- group moves: a failover or a failback one rank asks for --------------------------------------
    def _group_move(self, rank: int, target: Optional[str], from_: Optional[str], reason: str) -> None:
        try:
            if not target or target == from_ or not isinstance(reason, str):
                return
            label = "failback" if reason == "failback" else "failover"
            log.info("hicache-ha: rank %d asks to move the group from %r to %r (%s)", rank, from_, target, label)
            result = self.switch(backend=target, force=True, drain_timeout_s=0.0, wait_s=0.5, expect_active=from_,
                                 reason=f"{label} (asked by rank {rank})")
            if result.status not in (200, 409):
                log.warning("hicache-ha: group %s to %r failed (%d): %s", label, target, result.status,
                            result.body.get("error"))
        finally:
            self._moving_group.clear()

    # -- convergence --------------------------------------------------------------------------------
    def _converge_loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                if self.is_leader:
                    self.converge()
            except NotLeader:
                pass
            except Exception:
                log.exception("hicache-ha: converge step failed")

    def converge(self) -> None:
        """Bring every live rank to the desired (epoch, active), one rank at a time, make-before-break.
        A rank that left the desired member because it is broken there moves the group instead."""
        if self._switch.locked():
            return
        if self._catch_up_due():  # a state store that restarted empty: nothing moves until it is caught up
            if self._switch.acquire(blocking=False):
                try:
                    self._catch_up()
                finally:
                    self._switch.release()
            return
        want = (self.desired.epoch, self.desired.active)
        now = self.clock()
        for r in self.alive():
            info = self.ranks[r]
            st = info.status
            moved = (st.get("epoch"), st.get("active")) != want
            stray = [n for n in st.get("attached", []) if n not in self.desired.specs and n != self.desired.active]
            if not (moved or stray) or now < info.converge_after:
                continue
            info.converge_after = now + 2.0
            states = {b.get("name"): b.get("state") for b in st.get("backends", []) if isinstance(b, dict)}
            active = self.desired.active
            if active in states and states[active] != HEALTHY and st.get("active") not in (None, active):
                self._moving_group.set()
                self._group_move(r, st["active"], active, "failover")
                return
            if not self._switch.acquire(blocking=False):
                return
            try:
                if moved:
                    self._converge_rank(r, st)
                self._forget(r, stray)
            finally:
                self._switch.release()

    def _forget(self, rank: int, names: list[str]) -> None:
        """Members a rank holds that the desired state does not: attached by a switch that was rolled
        back or whose controller died before it was recorded."""
        for name in names:
            if name not in self.desired.specs and name != self.desired.active:
                if not failures(self.call([rank], "remove", {"backend": name, "reason": "not in the desired state"},
                                          self.command_timeout_s)):
                    self.event(rank, name, "attached", "removed", "not in the desired state (a switch that did not land)")

    def _converge_rank(self, rank: int, status: dict) -> None:
        epoch, active = self.desired.epoch, self.desired.active
        if active is None:
            self.call([rank], "detach", {"epoch": epoch, "force": True}, self.command_timeout_s)
            return
        token = uuid.uuid4().hex
        spec = self.desired.specs.get(active)
        if failures(self.call([rank], "prepare", {"token": token, "backend": active, "spec": spec},
                              self.command_timeout_s)):
            self.call([rank], "abort", {"token": token}, self.command_timeout_s)
            return
        if not failures(self.call([rank], "commit", {"token": token, "epoch": epoch, "force": True,
                                                     "reason": "converge"}, self.command_timeout_s)):
            self.event(rank, active, f"epoch {status.get('epoch')}", f"epoch {epoch}", "converged to the desired state")
