"""The controller: one desired state for every rank, one leader at a time.

A controller leads while it holds the state store's lease (``leadership``); its fencing token goes with
every command, and ranks refuse tokens older than one they have seen. A standby controller waits for the
lease and then resumes from the persisted state (a switch it finds in flight: every rank is moved to one
fresh epoch). The leader listens for the ranks' agents on an authenticated, encrypted channel, accepts
only ranks whose identity fits the deployment's shape (``ranks``), runs two-phase switches
(``twophase``), moves the whole group on a failover or failback one rank asks for, and converges ranks
that were away (``converge``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..backends.errors import ConfigError
from ..config import HAConfig
from ..dataplane.member import RateLimitedLog
from ..health.breaker import CIRCUIT_BROKEN, DETACHED, HEALTHY, RECOVERING
from .converge import Convergence
from .keys import ChannelKeys
from .leadership import Leadership
from .ranks import RankInfo, rank_problem
from .state import DesiredState, NotLeader, StateStore
from .transport import Channel
from .twophase import Outcome, TwoPhase, check_attach, failures

log = logging.getLogger("hicache_ha.control")

_WORST = {HEALTHY: 0, RECOVERING: 1, CIRCUIT_BROKEN: 2, DETACHED: 3}


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Optional[dict] = None


class Controller(Leadership, Convergence):
    def __init__(self, config: HAConfig, *, store: StateStore, expected_ranks: int, bind: str, keys: ChannelKeys,
                 owner: Optional[str] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.expected_ranks = expected_ranks
        self.bind = bind
        self.keys = keys
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.clock = clock
        admin = config.admin
        self.rank_timeout_s = admin.rank_timeout_ms / 1000
        self.command_timeout_s = admin.command_timeout_ms / 1000
        self.lease_s = admin.lease_ms / 1000
        self.ranks: dict[int, RankInfo] = {}
        self.events: deque = deque(maxlen=2000)
        self.listeners: list[Callable[[dict], None]] = []  # every event (rank transitions, switches)
        self.switch_results: dict[tuple[str, str], int] = {}
        self.desired = DesiredState(epoch=1, active=config.backends[0].name)
        self.fence: Optional[int] = None  # our fencing token while we lead
        self.channel: Optional[Channel] = None
        self._lock = threading.Lock()
        self._switch = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._moving_group = threading.Event()
        self._refused: dict[int, float] = {}  # rank -> when an impostor was last logged
        self._twophase = TwoPhase(self)
        self._log = RateLimitedLog(log, every=30.0)
        self._stop = threading.Event()
        self._unsettled = False  # the store's fencing counter may be behind tokens ranks saw (it restarted empty)
        self._settled = False  # every expected rank reported a token not newer than ours
        self._ranks_behind = False  # every expected rank reported an epoch not newer than the desired one
        self._lead_once()  # a controller that can lead does so from the start
        self._threads = [threading.Thread(target=loop, name=f"hicache-ha-{name}", daemon=True)
                         for loop, name in ((self._lead_loop, "lease"), (self._converge_loop, "converge"))]
        for t in self._threads:
            t.start()

    # -- events -------------------------------------------------------------------------------------
    def event(self, rank: Optional[int], backend: Optional[str], from_state: str, to_state: str, reason: str,
              at: Optional[float] = None) -> None:
        self._publish({"time": at or time.time(), "rank": rank, "backend": backend, "from": from_state,
                       "to": to_state, "reason": reason})

    def _publish(self, event: dict) -> None:
        self.events.append(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break the controller
                log.exception("hicache-ha: event listener failed")

    # -- messages from ranks ------------------------------------------------------------------------
    def _on_message(self, peer: Optional[bytes], msg: dict) -> None:
        kind, rank = msg.get("type"), msg.get("rank")
        if kind in ("register", "heartbeat"):
            problem = rank_problem(rank, msg.get("identity"), self.expected_ranks)
            if problem is not None or peer != f"rank-{rank}".encode():
                self._refuse(rank, problem or f"connection identity {peer!r} is not rank-{rank}")
                return
        elif not isinstance(rank, int) or rank not in self.ranks:
            return
        now = self.clock()
        with self._lock:
            info = self.ranks.get(rank)
            if kind in ("register", "heartbeat"):
                if info is None:
                    info = self.ranks[rank] = RankInfo(rank, msg["identity"], {}, now)
                    self.event(rank, None, "absent", "registered", "agent connected")
                info.identity = msg["identity"]
                info.update_status(msg.get("status"))
                info.saw(msg.get("seen"))
                self._note_report(info)
                info.last_seen = now
                for e in msg.get("events") or []:
                    if isinstance(e, dict):
                        self._publish({**e, "rank": rank})
            elif kind == "reply":
                info.last_seen = now
                info.update_status(msg.get("status_now"))
                info.saw(msg.get("seen"))
                self._note_report(info)
                pending = self._pending.get(msg.get("id"))
                if pending is not None:
                    pending.reply = msg
                    pending.done.set()
        if kind in ("register", "heartbeat") and self.channel is not None:
            self.channel.send({"type": "ack", "fence": self.fence}, to=peer)  # tells the agent its controller lives
        if kind == "failover_request" and not self._moving_group.is_set():
            self._moving_group.set()  # one group move at a time; ranks repeat their request
            threading.Thread(target=self._group_move, args=(rank, msg.get("target"), msg.get("from"),
                                                             msg.get("reason", "failover")), daemon=True).start()

    def _refuse(self, rank, problem: str) -> None:
        now = self.clock()
        key = rank if isinstance(rank, int) else -1
        if now - self._refused.get(key, -1e9) > 10:
            self._refused[key] = now
            log.warning("hicache-ha: refused an agent claiming rank %r: %s", rank, problem)

    # -- commands to ranks --------------------------------------------------------------------------
    def alive(self) -> list[int]:
        now = self.clock()
        with self._lock:
            return sorted(r for r, i in self.ranks.items() if now - i.last_seen < self.rank_timeout_s)

    def missing(self) -> list[int]:
        alive = set(self.alive())
        return [r for r in range(self.expected_ranks) if r not in alive]

    def call(self, ranks: list[int], op: str, args: dict, timeout: float) -> dict[int, Optional[dict]]:
        """Send ``op`` to each rank and wait for all replies; a rank silent until ``timeout`` maps to None."""
        channel = self.channel
        if self.fence is None or channel is None:
            raise NotLeader("not the leader")
        ids = {}
        with self._lock:
            for r in ranks:
                ids[r] = uuid.uuid4().hex
                self._pending[ids[r]] = _Pending()
        for r, cid in ids.items():
            channel.send({"type": "command", "id": cid, "op": op, "args": args, "fence": self.fence,
                          "leader": self.owner},
                         to=f"rank-{r}".encode())
        deadline = self.clock() + timeout
        out = {}
        for r, cid in ids.items():
            pending = self._pending[cid]
            pending.done.wait(max(0.0, deadline - self.clock()))
            out[r] = pending.reply
        with self._lock:
            for cid in ids.values():
                self._pending.pop(cid, None)
        return out

    # -- the switch API -----------------------------------------------------------------------------
    def known_backends(self) -> list[str]:
        configured = [b.name for b in self.config.backends]
        return configured + [n for n in self.desired.specs if n not in configured]

    def _count(self, kind: str, outcome: Outcome) -> Outcome:
        result = {200: "ok", 404: "unknown", 409: "conflict", 422: "invalid"}.get(outcome.status, "failed")
        if outcome.body.get("rolled_back") is not None:
            result = "rolled_back"
        self.switch_results[(kind, result)] = self.switch_results.get((kind, result), 0) + 1
        return outcome

    def _locked(self, kind: str, wait_s: float, step: Callable[[], Outcome]) -> Outcome:
        if not self.is_leader:
            return self._count(kind, self.not_leader())
        if not self._switch.acquire(timeout=wait_s):
            return self._count(kind, Outcome(409, {"error": "another switch is in progress; retry when it is done"}))
        try:
            if not self.is_leader:
                return self._count(kind, self.not_leader())
            try:
                if self._catch_up_due():
                    self._catch_up()
            except NotLeader:
                return self._count(kind, self.not_leader())
            except Exception as exc:  # the state store failed
                return self._count(kind, Outcome(503, {"error": f"the state store failed: {exc!r}"}))
            return self._count(kind, step())
        finally:
            self._switch.release()

    def switch(self, backend: Optional[str] = None, spec: Optional[dict] = None, *, force: bool = False,
               drain_timeout_s: float = 5.0, reason: str = "switch", wait_s: float = 5.0,
               expect_active: Optional[str] = None) -> Outcome:
        """Switch every rank to ``backend`` (or attach ``spec``). ``expect_active``: only if the desired
        member is still this one (checked under the switch lock: a stale group move changes nothing)."""
        kind = reason.split(" ")[0] if reason.startswith(("failover", "failback")) else "switch"

        def step() -> Outcome:
            if expect_active is not None and self.desired.active != expect_active:
                return Outcome(409, {"error": f"stale: the group is on {self.desired.active!r} already"})
            if spec is not None:
                try:
                    name = check_attach(spec, self.config.admin.attach_roots)
                except ConfigError as exc:
                    return Outcome(422, {"error": str(exc)})
            else:
                name = backend
                if name not in self.known_backends():
                    return Outcome(404, {"error": f"unknown backend {name!r}", "backends": self.known_backends()})
            return self._twophase.switch(name, spec, force, drain_timeout_s, reason)

        return self._locked(kind, wait_s, step)

    def detach(self, *, force: bool = False, drain_timeout_s: float = 5.0, wait_s: float = 5.0) -> Outcome:
        return self._locked("detach", wait_s, lambda: self._twophase.detach(force, drain_timeout_s))

    def remove_member(self, name: str, wait_s: float = 5.0) -> Outcome:
        """Remove a member attached over the API from every rank (configured members stay)."""

        def step() -> Outcome:
            if name not in self.desired.specs:
                return Outcome(404 if name not in self.known_backends() else 409, {
                    "error": f"{name!r} is not a member attached over the API; those are: {sorted(self.desired.specs)}"})
            if self.desired.active == name:
                return Outcome(409, {"error": f"{name!r} is active: switch to another member first"})
            ranks = self.alive()
            failed = failures(self.call(ranks, "remove", {"backend": name}, self.command_timeout_s))
            if failed:
                return Outcome(503, {"error": "some ranks did not remove it; retry", "failed": sorted(failed)})
            del self.desired.specs[name]
            self.save()
            self.event(None, name, "attached", "removed", "removed by admin")
            return Outcome(200, {"removed": name, "ranks": ranks})

        return self._locked("remove", wait_s, step)


    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict:
        now = self.clock()
        alive = set(self.alive())
        with self._lock:
            infos = sorted(self.ranks.values(), key=lambda i: i.rank)
            ranks = [{"rank": i.rank, "identity": i.identity, "alive": i.rank in alive,
                      "last_seen_s": round(now - i.last_seen, 3), "epoch": i.status.get("epoch"),
                      "active": i.status.get("active"), "in_flight": i.status.get("in_flight", 0),
                      "backends": {b.get("name"): b.get("state") for b in i.status.get("backends", [])
                                   if isinstance(b, dict)}}
                     for i in infos]
        backends = []
        for name in self.known_backends():
            states = [r["backends"][name] for r in ranks if r["alive"] and name in r["backends"]]
            worst = max(states, key=lambda s: _WORST.get(s, 0)) if states else "unknown"
            spec = next((b for b in self.config.backends if b.name == name), None)
            type_ = spec.type if spec else (self.desired.specs.get(name) or {}).get("type")
            backends.append({"name": name, "type": type_, "state": worst, "attached": name in self.desired.specs,
                             "ranks": {str(r["rank"]): r["backends"].get(name) for r in ranks if name in r["backends"]}})
        return {"epoch": self.desired.epoch, "active": self.desired.active, "leader": self.is_leader,
                "deployment": self.keys.deployment, "switch_in_progress": self._switch.locked(),
                "expected_ranks": self.expected_ranks, "missing_ranks": self.missing(), "backends": backends,
                "ranks": ranks}

    def rank_statuses(self) -> list[tuple[int, dict, dict]]:
        """(rank, identity, last status) for every rank that ever registered, for the metrics collector."""
        with self._lock:
            return [(r, i.identity, i.status) for r, i in sorted(self.ranks.items())]

    def recent_events(self, limit: int = 100) -> list[dict]:
        with self._lock:
            return sorted(self.events, key=lambda e: e["time"])[-limit:]

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.command_timeout_s)
        if self.fence is not None:
            try:
                self.store.release(self.owner, self.fence)
            except Exception:  # the lease expires by itself
                log.debug("hicache-ha: releasing the lease failed", exc_info=True)
            self.fence = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
