"""The controller: one desired state for every rank, changed by a two-phase switch.

Phase 1 (prepare): every rank builds and probes the target; any refusal or silence aborts everywhere
and nothing changes. Phase 2 (commit): every rank moves its active pointer to the new epoch; if one
fails, the ranks that had committed are restored to the previous epoch (``rolled_back``). The desired
state is persisted before and after, so a restarted controller aborts a switch it died in and brings
every rank back to one epoch. Ranks that were away converge when they return.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import zmq

from ..backends.errors import ConfigError
from ..config import HAConfig, parse
from ..health.breaker import CIRCUIT_BROKEN, DETACHED, HEALTHY, RECOVERING
from .state import DesiredState, StateStore
from .transport import Channel

log = logging.getLogger("hicache_ha.control")

_WORST = {HEALTHY: 0, RECOVERING: 1, CIRCUIT_BROKEN: 2, DETACHED: 3}


@dataclass
class RankInfo:
    rank: int
    identity: dict
    status: dict
    last_seen: float
    converge_after: float = 0.0


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Optional[dict] = None


@dataclass
class Outcome:
    """What a controller operation answers: an HTTP status and a JSON body."""

    status: int
    body: dict


class Controller:
    def __init__(self, config: HAConfig, *, store: StateStore, expected_ranks: int, bind: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.expected_ranks = expected_ranks
        self.clock = clock
        admin = config.admin
        self.rank_timeout_s = admin.rank_timeout_ms / 1000
        self.command_timeout_s = admin.command_timeout_ms / 1000
        self.ranks: dict[int, RankInfo] = {}
        self.events: deque = deque(maxlen=2000)
        self.hooks: dict[str, list[Callable[[], None]]] = {"after_prepare": []}  # for tests and plugins
        self._lock = threading.Lock()
        self._switch = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._failing_over = threading.Event()
        self.switch_results: dict[tuple[str, str], int] = {}
        self.listeners: list[Callable[[dict], None]] = []  # every event (rank transitions, switches)
        desired = store.load()
        self.desired = desired or DesiredState(epoch=1, active=config.backends[0].name)
        self._resume()
        self.channel = Channel(zmq.ROUTER, bind, bind=True, on_message=self._on_message, name="controller")
        self._stop = threading.Event()
        self._converger = threading.Thread(target=self._converge_loop, name="hicache-ha-converge", daemon=True)
        self._converger.start()

    # -- persistence ----------------------------------------------------------------------------------
    def _save(self) -> None:
        self.store.save(self.desired)

    def _resume(self) -> None:
        inflight = self.desired.switch_in_flight
        if inflight:
            # We died mid-switch. Ranks may be prepared or even committed: converge them all back to
            # the last desired state, which the switch had not replaced yet.
            self._event(None, None, "switch", "aborted", f"controller restarted during switch to {inflight.get('target')!r}")
            self.desired.switch_in_flight = None
            self._save()

    def _event(self, rank: Optional[int], backend: Optional[str], from_state: str, to_state: str, reason: str,
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

    # -- messages from ranks ----------------------------------------------------------------------------
    def _on_message(self, peer: Optional[bytes], msg: dict) -> None:
        kind = msg.get("type")
        rank = msg.get("rank")
        if not isinstance(rank, int):
            return
        now = self.clock()
        with self._lock:
            info = self.ranks.get(rank)
            if kind in ("register", "heartbeat"):
                if info is None:
                    info = self.ranks[rank] = RankInfo(rank, msg.get("identity") or {}, msg.get("status") or {}, now)
                    self._event(rank, None, "absent", "registered", "agent connected")
                info.identity = msg.get("identity") or info.identity
                self._update_status(info, msg.get("status"))
                info.last_seen = now
                for e in msg.get("events") or []:
                    self._publish({**e, "rank": rank})
                ack = {"type": "ack", "epoch": self.desired.epoch, "active": self.desired.active}
            elif kind == "reply":
                if info is not None:
                    info.last_seen = now
                    self._update_status(info, msg.get("status_now"))
                pending = self._pending.get(msg.get("id"))
                if pending is not None:
                    pending.reply = msg
                    pending.done.set()
        if kind in ("register", "heartbeat") and peer is not None:
            self.channel.send(ack, to=peer)  # tells the agent its controller is alive
        if kind == "failover_request" and not self._failing_over.is_set():
            self._failing_over.set()  # one group failover at a time; ranks repeat their request
            threading.Thread(target=self._group_failover, args=(rank, msg.get("target"), msg.get("from")),
                             daemon=True).start()

    @staticmethod
    def _update_status(info: RankInfo, status: Optional[dict]) -> None:
        if status and status.get("seq", 0) >= info.status.get("seq", 0):
            info.status = status

    # -- commands to ranks ------------------------------------------------------------------------------
    def alive(self) -> list[int]:
        now = self.clock()
        with self._lock:
            return sorted(r for r, i in self.ranks.items() if now - i.last_seen < self.rank_timeout_s)

    def missing(self) -> list[int]:
        alive = set(self.alive())
        return [r for r in range(self.expected_ranks) if r not in alive]

    def call(self, ranks: list[int], op: str, args: dict, timeout: float) -> dict[int, Optional[dict]]:
        """Send ``op`` to each rank and wait for all replies; a rank silent until ``timeout`` maps to None."""
        ids = {}
        with self._lock:
            for r in ranks:
                cid = uuid.uuid4().hex
                ids[r] = cid
                self._pending[cid] = _Pending()
        for r, cid in ids.items():
            self.channel.send({"type": "command", "id": cid, "op": op, "args": args}, to=f"rank-{r}".encode())
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

    # -- the two-phase switch -------------------------------------------------------------------------
    def known_backends(self) -> list[str]:
        return [b.name for b in self.config.backends] + [n for n in self.desired.specs if n not in
                                                          {b.name for b in self.config.backends}]

    def _begin(self, wait_s: float) -> Optional[Outcome]:
        """Take the one-switch-at-a-time lock (a convergence step holds it briefly), or say why not."""
        if self._switch.acquire(timeout=wait_s):
            return None
        return Outcome(409, {"error": "another switch is in progress; retry when it is done"})

    def _count(self, kind: str, outcome: Outcome) -> Outcome:
        result = {200: "ok", 404: "unknown", 409: "conflict", 422: "invalid"}.get(outcome.status, "failed")
        if outcome.body.get("rolled_back") is not None:
            result = "rolled_back"
        key = (kind, result)
        self.switch_results[key] = self.switch_results.get(key, 0) + 1
        return outcome

    def switch(self, backend: Optional[str] = None, spec: Optional[dict] = None, *, force: bool = False,
               drain_timeout_s: float = 5.0, reason: str = "switch", wait_s: float = 5.0) -> Outcome:
        kind = "failover" if reason.startswith("failover") else "switch"
        busy = self._begin(wait_s)
        if busy:
            return self._count(kind, busy)
        try:
            return self._count(kind, self._switch_locked(backend, spec, force, drain_timeout_s, reason))
        finally:
            self._switch.release()

    def _switch_locked(self, backend, spec, force, drain_timeout_s, reason) -> Outcome:
        if spec is not None:
            try:
                name = parse({"backends": [spec]}).backends[0].name
            except ConfigError as exc:
                return Outcome(422, {"error": str(exc)})
        else:
            name = backend
            if name not in self.known_backends():
                return Outcome(404, {"error": f"unknown backend {name!r}", "backends": self.known_backends()})
        ranks = self.alive()
        missing = self.missing()
        if missing and not force:
            return Outcome(503, {"error": "ranks missing; nothing changed (force to switch the ranks present)",
                                 "missing": missing})
        if not ranks:
            return Outcome(503, {"error": "no rank is connected; nothing changed", "missing": missing})
        base_epoch, base_active = self.desired.epoch, self.desired.active
        token, epoch = uuid.uuid4().hex, base_epoch + 1
        self.desired.switch_in_flight = {"token": token, "target": name, "base_epoch": base_epoch}
        self._save()
        self._event(None, name, base_active or "none", "preparing", reason)
        try:
            replies = self.call(ranks, "prepare", {"token": token, "backend": name, "spec": spec}, self.command_timeout_s)
            refused = _failures(replies)
            if refused:
                self.call(ranks, "abort", {"token": token}, self.command_timeout_s)
                self._event(None, name, "preparing", "aborted", f"prepare refused on ranks {sorted(refused)}")
                return Outcome(503, {"error": "prepare refused; nothing changed", "failed": _describe(refused),
                                     "epoch": base_epoch, "active": base_active})
            for hook in self.hooks["after_prepare"]:
                hook()
            replies = self.call(ranks, "commit", {"token": token, "epoch": epoch, "force": force,
                                                  "drain_timeout_s": drain_timeout_s, "reason": reason},
                                self.command_timeout_s + drain_timeout_s)
            failed = _failures(replies)
            if failed:
                committed = [r for r in ranks if r not in failed]
                self.call(committed, "restore", {"epoch": base_epoch, "active": base_active}, self.command_timeout_s)
                self.call(sorted(failed), "abort", {"token": token}, self.command_timeout_s)
                status = 409 if all((f or {}).get("status") == 409 for f in failed.values()) else 503
                self._event(None, name, "committing", "rolled back",
                            f"commit failed on ranks {sorted(failed)}; restored ranks {committed}")
                return Outcome(status, {"error": "commit failed; the ranks that had moved were rolled back",
                                        "failed": _describe(failed), "rolled_back": committed,
                                        "epoch": base_epoch, "active": base_active})
            self.desired.epoch, self.desired.active = epoch, name
            if spec is not None:
                self.desired.specs[name] = spec
            self._event(None, name, base_active or "none", name, reason)
            return Outcome(200, {"epoch": epoch, "active": name, "ranks": ranks, "missing": missing})
        finally:
            self.desired.switch_in_flight = None
            self._save()

    def detach(self, *, force: bool = False, drain_timeout_s: float = 5.0, wait_s: float = 5.0) -> Outcome:
        busy = self._begin(wait_s)
        if busy:
            return self._count("detach", busy)
        try:
            return self._count("detach", self._detach_locked(force, drain_timeout_s))
        finally:
            self._switch.release()

    def _detach_locked(self, force: bool, drain_timeout_s: float) -> Outcome:
        ranks, missing = self.alive(), self.missing()
        if missing and not force:
            return Outcome(503, {"error": "ranks missing; nothing changed", "missing": missing})
        base_epoch, base_active = self.desired.epoch, self.desired.active
        epoch = base_epoch + 1
        replies = self.call(ranks, "detach", {"epoch": epoch, "force": force, "drain_timeout_s": drain_timeout_s},
                            self.command_timeout_s + drain_timeout_s)
        failed = _failures(replies)
        if failed:
            committed = [r for r in ranks if r not in failed]
            self.call(committed, "restore", {"epoch": base_epoch, "active": base_active}, self.command_timeout_s)
            status = 409 if all((f or {}).get("status") == 409 for f in failed.values()) else 503
            return Outcome(status, {"error": "detach failed; the ranks that had detached were rolled back",
                                    "failed": _describe(failed), "rolled_back": committed})
        self.desired.epoch, self.desired.active = epoch, None
        self._save()
        self._event(None, base_active, base_active or "none", "none", "detached by admin")
        return Outcome(200, {"epoch": epoch, "active": None, "ranks": ranks})

    # -- failover of the whole group --------------------------------------------------------------------
    def _group_failover(self, rank: int, target: Optional[str], from_: Optional[str]) -> None:
        try:
            if not target or from_ != self.desired.active or target == self.desired.active:
                return  # stale, or the group already moved
            log.info("hicache-ha: rank %d asks to fail the group over from %r to %r", rank, from_, target)
            result = self.switch(backend=target, force=True, drain_timeout_s=0.0,
                                 reason=f"failover (asked by rank {rank})", wait_s=0.5)
            if result.status != 200:
                log.warning("hicache-ha: group failover to %r failed (%d): %s", target, result.status,
                            result.body.get("error"))
        finally:
            self._failing_over.clear()

    # -- convergence ------------------------------------------------------------------------------------
    def _converge_loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.converge()
            except Exception:
                log.exception("hicache-ha: converge step failed")

    def converge(self) -> None:
        """Bring every live rank to the desired (epoch, active), one rank at a time, make-before-break.
        A rank that left the desired member because it is broken there moves the group instead."""
        if self._switch.locked():
            return
        want = (self.desired.epoch, self.desired.active)
        now = self.clock()
        for r in self.alive():
            info = self.ranks[r]
            st = info.status
            if (st.get("epoch"), st.get("active")) == want or now < info.converge_after:
                continue
            info.converge_after = now + 2.0
            states = {b["name"]: b["state"] for b in st.get("backends", [])}
            active = self.desired.active
            if active in states and states[active] != HEALTHY and st.get("active") not in (None, active):
                self._group_failover(r, st["active"], active)
                return
            if not self._switch.acquire(blocking=False):
                return
            try:
                self._converge_rank(r, st)
            finally:
                self._switch.release()

    def _converge_rank(self, rank: int, status: dict) -> None:
        epoch, active = self.desired.epoch, self.desired.active
        if active is None:
            self.call([rank], "detach", {"epoch": epoch, "force": True}, self.command_timeout_s)
            return
        token = uuid.uuid4().hex
        spec = self.desired.specs.get(active)
        replies = self.call([rank], "prepare", {"token": token, "backend": active, "spec": spec}, self.command_timeout_s)
        if _failures(replies):
            self.call([rank], "abort", {"token": token}, self.command_timeout_s)
            return
        replies = self.call([rank], "commit", {"token": token, "epoch": epoch, "force": True}, self.command_timeout_s)
        if not _failures(replies):
            self._event(rank, active, f"epoch {status.get('epoch')}", f"epoch {epoch}", "converged to the desired state")

    # -- status -----------------------------------------------------------------------------------------
    def status(self) -> dict:
        now = self.clock()
        alive = set(self.alive())
        with self._lock:
            infos = sorted(self.ranks.values(), key=lambda i: i.rank)
            ranks = [{"rank": i.rank, "identity": i.identity, "alive": i.rank in alive,
                      "last_seen_s": round(now - i.last_seen, 3), "epoch": i.status.get("epoch"),
                      "active": i.status.get("active"), "in_flight": i.status.get("in_flight", 0),
                      "backends": {b["name"]: b["state"] for b in i.status.get("backends", [])}}
                     for i in infos]
        backends = []
        for name in self.known_backends():
            states = [r["backends"][name] for r in ranks if r["alive"] and name in r["backends"]]
            worst = max(states, key=lambda s: _WORST.get(s, 0)) if states else "unknown"
            spec = next((b for b in self.config.backends if b.name == name), None)
            type_ = spec.type if spec else (self.desired.specs.get(name) or {}).get("type")
            backends.append({"name": name, "type": type_, "state": worst,
                             "ranks": {str(r["rank"]): r["backends"].get(name) for r in ranks if name in r["backends"]}})
        return {"epoch": self.desired.epoch, "active": self.desired.active,
                "switch_in_progress": self._switch.locked(), "expected_ranks": self.expected_ranks,
                "missing_ranks": self.missing(), "backends": backends, "ranks": ranks}

    def rank_statuses(self) -> list[tuple[int, dict]]:
        """(rank, last status) for every rank that ever registered, for the metrics collector."""
        with self._lock:
            return [(r, i.status) for r, i in sorted(self.ranks.items())]

    def recent_events(self, limit: int = 100) -> list[dict]:
        with self._lock:
            return sorted(self.events, key=lambda e: e["time"])[-limit:]

    def close(self) -> None:
        self._stop.set()
        self._converger.join(self.command_timeout_s)
        self.channel.close()


def _failures(replies: dict[int, Optional[dict]]) -> dict[int, Optional[dict]]:
    return {r: rep for r, rep in replies.items() if rep is None or not rep.get("ok")}


def _describe(failed: dict[int, Optional[dict]]) -> list[dict]:
    return [{"rank": r, "status": (rep or {}).get("status", 504),
             "reason": (rep or {}).get("error", "no answer in time")} for r, rep in sorted(failed.items())]
