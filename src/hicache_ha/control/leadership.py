"""Leadership of a controller: the state store's lease, the fencing token, and the desired state it saves.

A controller leads while it holds the lease; a standby waits for it and resumes from the persisted state
(a switch it finds in flight: every rank is moved to one fresh epoch). The leader also catches up with
what ranks saw when the store forgot it (restarted empty): it moves the store's counter past their newest
token and takes the state they were moved to.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Optional

import zmq

from ..config import HAConfig
from ..dataplane.member import RateLimitedLog
from .keys import ChannelKeys
from .ranks import RankInfo
from .state import DesiredState, NotLeader, StateStore
from .transport import Channel
from .twophase import Outcome

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("hicache_ha.control")


class Leadership:
    """The leadership half of ``Controller`` (a mixin: the attributes below are the controller's)."""

    config: HAConfig
    store: StateStore
    owner: str
    keys: ChannelKeys
    bind: str
    lease_s: float
    expected_ranks: int
    desired: DesiredState
    fence: Optional[int]
    channel: Optional[Channel]
    ranks: dict[int, RankInfo]
    _lock: threading.Lock
    _switch: threading.Lock
    _stop: threading.Event
    _unsettled: bool
    _settled: bool
    _ranks_behind: bool
    _log: RateLimitedLog
    _on_message: Callable[[Optional[bytes], dict], None]
    event: Callable[..., None]

    @property
    def is_leader(self) -> bool:
        return self.fence is not None

    def _lead_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._lead_once()
            except Exception:  # a store hiccup must not kill the loop
                log.exception("hicache-ha: leadership step failed")

    def _lead_once(self) -> None:
        try:
            if self.fence is None:
                fence = self.store.acquire(self.owner, self.lease_s)
                if fence is not None:
                    self._become_leader(fence)
            elif not self.store.renew(self.owner, self.fence, self.lease_s):
                self._step_down("the lease was lost")
        except (OSError, ConnectionError) as exc:
            if self.fence is not None:
                self._step_down(f"the state store is unreachable ({exc})")
        except Exception as exc:  # e.g. redis-py's errors
            if self.fence is not None:
                self._step_down(f"the state store failed ({exc!r})")
            else:
                self._log.warn(("lead", type(exc)), "hicache-ha: cannot take the leadership: %r", exc)

    def _become_leader(self, fence: int) -> None:
        desired = self.store.load() or DesiredState(epoch=1, active=self.config.backends[0].name, provisional=True)
        self._unsettled, self._settled, self._ranks_behind = self.store.unsettled(), False, False
        inflight = desired.switch_in_flight
        if inflight is not None:
            # The previous leader died mid-way: ranks may be prepared, committed, or not. One fresh epoch
            # past anything it could have used brings every live rank to one state.
            desired.epoch, desired.active = inflight.base_epoch + 2, inflight.base_active
            desired.switch_in_flight = None
            self.event(None, inflight.target, inflight.kind, "aborted",
                       f"a controller died during a {inflight.kind}; every rank converges to epoch {desired.epoch}")
        self.desired, self.fence = desired, fence
        self.save()
        try:
            self.channel = Channel(zmq.ROUTER, self.bind, bind=True, on_message=self._on_message, keys=self.keys,
                                   name="controller")
        except zmq.ZMQError as exc:
            self._step_down(f"cannot listen for agents on {self.bind}: {exc}")
            return
        log.info("hicache-ha: controller %s leads deployment %r (fencing token %d)", self.owner, self.keys.deployment,
                 fence)

    # -- catching up with what ranks saw: a state store that restarted empty ---------------------------
    def _ahead(self) -> tuple[int, int]:
        """(the newest fencing token a rank reports, if a leader other than us used it or a newer one, else
        0; the newest epoch a rank reports a controller moved it to)."""
        with self._lock:
            infos = list(self.ranks.values())
        fence, top_fence, top_epoch = self.fence or 0, 0, 0
        for i in infos:
            if i.ahead_of(fence, self.owner):
                top_fence = max(top_fence, i.fence_seen)
            top_epoch = max(top_epoch, i.epoch_seen)
        return top_fence, top_epoch

    def _catch_up_due(self) -> bool:
        if self.fence is None or not (self._unsettled or self.desired.provisional):
            return False
        fence_ahead, epoch = self._ahead()
        return (self._unsettled and (self._settled or fence_ahead > 0)) or \
            (self.desired.provisional and (self._ranks_behind or epoch > self.desired.epoch))

    def _note_report(self, info: RankInfo) -> None:
        """Called with ``_lock`` held after ``info``'s rank reported what it saw. Once every expected rank
        reported and none saw a newer token than ours, the store's counter is known to be past every token in
        use (settled); once none was moved past the desired epoch, a provisional desired state is the fleet's
        own. The convergence loop catches up (``_catch_up_due``)."""
        fence, desired = self.fence, self.desired
        if fence is None or not (self._unsettled or desired.provisional):
            return
        if all(r in self.ranks for r in range(self.expected_ranks)):
            if self._unsettled and not self._settled and \
                    not any(i.ahead_of(fence, self.owner) for i in self.ranks.values()):
                self._settled = True
            if desired.provisional:
                self._ranks_behind = all(i.epoch_seen <= desired.epoch for i in self.ranks.values())

    def _catch_up(self) -> None:
        """With the switch lock held. A store that restarted empty counts tokens from 1 again and forgot the
        desired state: ranks, which saw newer tokens and epochs, would refuse every command of ours. While its
        counter is unsettled we move it past the newest token a rank saw (atomically, on our lease); once every
        expected rank is behind our token, we mark it settled. A provisional desired state (the configuration's,
        the store having had none) takes the state ranks were moved to (nothing moves), and is the fleet's own
        once every expected rank reported none newer."""
        fence_ahead, epoch = self._ahead()
        if self._unsettled and fence_ahead and not self._settled:
            token = self.store.advance(self.owner, self.fence, fence_ahead, self.lease_s)
            if token is None:
                self._step_down("the lease was lost")
                raise NotLeader("the lease was lost")
            if token > self.fence:
                log.warning("hicache-ha: ranks saw fencing token %d, newer than ours (%d): the state store forgot "
                            "it (restarted empty?); moved its counter past it, leading with token %d",
                            fence_ahead, self.fence, token)
                self.event(None, None, f"fence {self.fence}", f"fence {token}",
                           f"ranks saw token {fence_ahead}: the state store's counter was behind")
                self.fence = token
            else:
                self._unsettled = False  # another leader settled it: a newer token is a real newer leader
        elif self._unsettled and self._settled:
            if not self.store.settle(self.owner, self.fence):
                self._step_down("the lease was lost")
                raise NotLeader("the lease was lost")
            self._unsettled = False
        if self.desired.provisional:
            if epoch > self.desired.epoch:
                self._adopt(epoch)
            elif self._ranks_behind:
                self.desired.provisional = False
                self.save()

    def _adopt(self, epoch: int) -> None:
        with self._lock:
            top = [i for i in self.ranks.values() if i.epoch_seen == epoch and "active" in i.status]
        if not top:
            return  # no status from that rank yet: on its next report
        on_it = [i for i in top if i.status.get("epoch") == epoch] or top
        desired = self.desired
        before = (desired.epoch, desired.active)
        desired.epoch = epoch if on_it[0].status.get("epoch") == epoch else epoch + 1
        desired.active = on_it[0].status.get("active")
        self._ranks_behind = False  # until every rank reports again, against the new epoch
        self.save()
        log.warning("hicache-ha: the state store had no desired state and ranks were moved to epoch %d: taking "
                    "theirs (epoch %d, active %r)", epoch, desired.epoch, desired.active)
        self.event(None, desired.active, f"epoch {before[0]}", f"epoch {desired.epoch}",
                   "the state store had no desired state; took the one ranks were moved to")

    def _step_down(self, why: str) -> None:
        log.error("hicache-ha: controller %s stops leading: %s", self.owner, why)
        self.fence = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def save(self) -> None:
        if self.fence is None:
            raise NotLeader("not the leader")
        self.store.save(self.desired, self.fence)

    def save_if_leader(self) -> None:
        try:
            self.save()
        except (NotLeader, OSError, ConnectionError) as exc:
            log.error("hicache-ha: the desired state was not saved: %s", exc)

    def not_leader(self) -> Outcome:
        return Outcome(503, {"error": "this controller is a standby; the leader is "
                                      f"{self.store.leader() or 'unknown'}", "leader": self.store.leader()})
