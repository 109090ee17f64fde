"""The rank side of the control plane: connects out to the controller, registers, heartbeats, and
executes prepare / commit / abort / restore / detach on this rank's BackendManager.

The data plane never waits on the agent: commands run on the agent's own thread, and the only hook
into the data plane is the failover handler, which sends a message and returns at once. When the
controller does not move the whole group in time (or is unreachable), the rank fails over alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from queue import SimpleQueue
from typing import Optional

import zmq

from ..backends.errors import ConfigError
from ..dataplane import BackendManager, SwitchError
from ..dataplane.member import Member
from .transport import Channel

log = logging.getLogger("hicache_ha.control")


class Agent:
    def __init__(self, manager: BackendManager, endpoint: str, *, heartbeat_s: float = 0.5,
                 group_failover_timeout_s: float = 1.0, controller_timeout_s: float = 3.0) -> None:
        self.manager = manager
        self.rank = manager.layout.rank
        self.heartbeat_s = heartbeat_s
        self.group_failover_timeout_s = group_failover_timeout_s
        self.controller_timeout_s = controller_timeout_s
        self.last_heard: Optional[float] = None
        self._prepared: dict = {}
        self._commands: SimpleQueue = SimpleQueue()
        self._failover_asked: dict[str, float] = {}  # target -> when we first asked the controller
        self._stop = threading.Event()
        self._events: deque = deque(maxlen=200)  # transitions not yet reported to the controller
        manager.events.subscribe(lambda e: self._events.append(e.to_dict()))
        self.channel = Channel(zmq.DEALER, endpoint, bind=False, on_message=self._on_message,
                               identity=f"rank-{self.rank}".encode(), name=f"agent-{self.rank}")
        manager.failover_handler = self._failover_handler
        for target, name in ((self._heartbeats, "heartbeat"), (self._execute, "commands")):
            threading.Thread(target=target, name=f"hicache-ha-agent-{self.rank}-{name}", daemon=True).start()

    # -- messages -----------------------------------------------------------------------------------
    def _on_message(self, _peer, msg: dict) -> None:
        self.last_heard = time.monotonic()
        if msg.get("type") == "command":
            self._commands.put(msg)

    def _hello(self, kind: str) -> dict:
        events = []
        while self._events:
            events.append(self._events.popleft())
        return {"type": kind, "rank": self.rank, "identity": self.manager.layout.describe(),
                "status": self.manager.status(), "events": events}

    def _heartbeats(self) -> None:
        self.channel.send(self._hello("register"))
        while not self._stop.wait(self.heartbeat_s):
            self.channel.send(self._hello("heartbeat"))

    @property
    def controller_alive(self) -> bool:
        return self.last_heard is not None and time.monotonic() - self.last_heard < self.controller_timeout_s

    # -- commands -----------------------------------------------------------------------------------
    def _execute(self) -> None:
        while not self._stop.is_set():
            msg = self._commands.get()
            if msg is None:
                return
            reply = {"type": "reply", "id": msg.get("id"), "rank": self.rank}
            try:
                reply.update(ok=True, **(self._run(msg["op"], msg.get("args") or {}) or {}))
            except SwitchError as exc:
                reply.update(ok=False, status=exc.status, error=str(exc))
            except (ConfigError, KeyError, ValueError) as exc:
                reply.update(ok=False, status=400, error=str(exc))
            except Exception as exc:  # report, never kill the agent
                log.exception("hicache-ha: rank %d: command %s failed", self.rank, msg.get("op"))
                reply.update(ok=False, status=500, error=f"{type(exc).__name__}: {exc}")
            reply["status_now"] = self.manager.status()
            self.channel.send(reply)

    def _run(self, op: str, args: dict) -> Optional[dict]:
        m = self.manager
        if op == "prepare":
            target = args.get("spec") or args["backend"]
            self._prepared[args["token"]] = m.prepare(target)
            return None
        if op == "commit":
            prepared = self._prepared.pop(args["token"], None)
            if prepared is None:
                raise SwitchError(f"rank {self.rank}: no prepared switch {args['token']!r} (restarted?)")
            try:
                epoch = m.commit(prepared, force=args.get("force", False),
                                 drain_timeout_s=args.get("drain_timeout_s", 5.0), epoch=args.get("epoch"),
                                 reason=args.get("reason", "switch"))
            except SwitchError:
                m.abort(prepared)
                raise
            return {"epoch": epoch}
        if op == "abort":
            prepared = self._prepared.pop(args.get("token"), None)
            if prepared is not None:
                m.abort(prepared)
            return None
        if op == "restore":
            m.restore(args["epoch"], args.get("active"))
            return {"epoch": m.epoch}
        if op == "detach":
            return {"epoch": m.detach(force=args.get("force", False),
                                      drain_timeout_s=args.get("drain_timeout_s", 5.0), epoch=args.get("epoch"))}
        raise ValueError(f"unknown command {op!r}")

    # -- group failover -----------------------------------------------------------------------------
    def _failover_handler(self, target: Member, reason: str) -> None:
        """Called by the supervisor (never an engine thread) when it wants to move traffic to ``target``."""
        now = time.monotonic()
        if reason == "failover" and self.controller_alive:
            asked = self._failover_asked.get(target.name)
            if asked is None or now - asked > 10 * self.group_failover_timeout_s:  # a new episode
                asked = self._failover_asked[target.name] = now
            if now - asked < self.group_failover_timeout_s:
                self.channel.send({"type": "failover_request", "rank": self.rank, "target": target.name,
                                   "from": self.manager.active.name if self.manager.active else None})
                return
            log.warning("hicache-ha: rank %d: the controller did not fail the group over within %.1f s; "
                        "failing over alone", self.rank, self.group_failover_timeout_s)
        self._failover_asked.pop(target.name, None)
        self.manager.local_failover(target, reason)

    def close(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self.channel.close()
