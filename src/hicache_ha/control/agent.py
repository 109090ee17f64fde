"""The rank side of the control plane: connects out to the controller, registers, heartbeats, and
executes prepare / commit / abort / restore / detach / remove on this rank's BackendManager.

It only talks to a controller that proves it holds the deployment's controller key (CURVE), and it
refuses a command whose fencing token is older than one it has seen, in a command or in the ack of a
heartbeat (a controller that lost its lease), a commit or detach to an epoch older than one a
controller already moved it to, and a spec attached over the API that names a type outside the
allow-list or a path outside the attach roots. Every message it sends says the newest token and epoch
it has seen (``seen``), in the order it learned them, so that a leader whose state store forgot them
(restarted empty) moves past them instead of being refused. A switch prepared and never committed
expires. The data plane never waits on the agent: commands run on the agent's own thread, and the only
hook into the data plane is the failover handler, which sends a message and returns at once. When the
controller does not move the whole group in time (or cannot be reached), the rank fails over alone;
it fails back only through the controller, so ranks never diverge.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from queue import SimpleQueue
from typing import Optional

import zmq

from ..backends.errors import ConfigError
from ..dataplane import BackendManager, SwitchError
from ..dataplane.member import Member
from .keys import ChannelKeys
from .transport import Channel
from .twophase import check_attach

log = logging.getLogger("hicache_ha.control")


class StaleCommand(SwitchError):
    status = 409


class Agent:
    def __init__(self, manager: BackendManager, endpoint: str, *, keys: ChannelKeys, heartbeat_s: float = 0.5,
                 group_failover_timeout_s: float = 1.0, controller_timeout_s: float = 3.0,
                 prepare_ttl_s: float = 60.0, attach_roots: Optional[list] = None) -> None:
        self.manager = manager
        self.rank = manager.layout.rank
        self.heartbeat_s = heartbeat_s
        self.group_failover_timeout_s = group_failover_timeout_s
        self.controller_timeout_s = controller_timeout_s
        self.prepare_ttl_s = prepare_ttl_s
        self.attach_roots = list(attach_roots or [])
        self.last_heard: Optional[float] = None
        self.max_fence = 0  # the newest controller leadership seen (in a command or a heartbeat's ack)
        self._fence_by: set[str] = set()  # the controllers whose commands carried max_fence
        self._fence_lock = threading.Lock()  # guards what we have seen and its reporting, in order
        self.max_epoch = 0  # the newest epoch a controller moved this rank to
        self._prepared: dict[str, tuple] = {}  # token -> (Prepared, expires at)
        self._commands: SimpleQueue = SimpleQueue()
        self._failover_asked: dict[str, float] = {}  # target -> when we first asked the controller
        self._stop = threading.Event()
        self._events: deque = deque(maxlen=200)  # transitions not yet reported to the controller
        manager.events.subscribe(lambda e: self._events.append(e.to_dict()))
        self.channel = Channel(zmq.DEALER, endpoint, bind=False, on_message=self._on_message, keys=keys,
                               identity=f"rank-{self.rank}".encode(), name=f"agent-{self.rank}")
        manager.failover_handler = self._failover_handler
        for target, name in ((self._heartbeats, "heartbeat"), (self._execute, "commands")):
            threading.Thread(target=target, name=f"hicache-ha-agent-{self.rank}-{name}", daemon=True).start()

    # -- messages -----------------------------------------------------------------------------------
    def _on_message(self, _peer, msg: dict) -> None:
        # The channel only delivers what the authenticated controller sent.
        self.last_heard = time.monotonic()
        if msg.get("type") == "command":
            self._commands.put(msg)
        elif msg.get("type") == "ack" and isinstance(msg.get("fence"), int):
            # A leader's acknowledgement carries its fencing token: once a rank has heard a new leader,
            # the one it replaced (paused, partitioned, or a ghost of a killed process) is refused, even
            # if the new leader has not commanded anything yet.
            self._saw_fence(msg["fence"])

    def _hello(self, kind: str) -> dict:
        events = []
        while self._events:
            events.append(self._events.popleft())
        return {"type": kind, "rank": self.rank, "identity": self.manager.layout.describe(),
                "status": self.manager.status(), "events": events}

    def _send(self, msg: dict) -> None:
        """Send with what this rank has seen, read and queued under one lock: the controller gets the
        values in the order they changed (a heartbeat never brings back an epoch a restore undid)."""
        with self._fence_lock:
            self.channel.send({**msg, "seen": {"fence": self.max_fence, "by": sorted(self._fence_by),
                                               "epoch": self.max_epoch}})

    def _heartbeats(self) -> None:
        self._send(self._hello("register"))
        while not self._stop.wait(self.heartbeat_s):
            self._send(self._hello("heartbeat"))

    @property
    def controller_alive(self) -> bool:
        return self.last_heard is not None and time.monotonic() - self.last_heard < self.controller_timeout_s

    # -- commands -----------------------------------------------------------------------------------
    def _execute(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._commands.get(timeout=1.0)
            except queue.Empty:
                self._expire_prepared()
                continue
            if msg is None:
                return
            self._expire_prepared()
            reply = {"type": "reply", "id": msg.get("id"), "rank": self.rank}
            try:
                self._check_fence(msg.get("fence"), msg.get("leader"))
                reply.update(ok=True, **(self._run(msg.get("op"), msg.get("args") or {}) or {}))
            except SwitchError as exc:
                reply.update(ok=False, status=exc.status, error=str(exc))
            except (ConfigError, KeyError, ValueError, TypeError) as exc:
                reply.update(ok=False, status=400, error=str(exc))
            except Exception as exc:  # report, never kill the agent
                log.exception("hicache-ha: rank %d: command %s failed", self.rank, msg.get("op"))
                reply.update(ok=False, status=500, error=f"{type(exc).__name__}: {exc}")
            reply["status_now"] = self.manager.status()
            self._send(reply)

    def _saw_fence(self, fence: int) -> None:
        with self._fence_lock:
            if fence > self.max_fence:
                self.max_fence, self._fence_by = fence, set()

    def _check_fence(self, fence, leader=None) -> None:
        if not isinstance(fence, int):
            raise StaleCommand(f"rank {self.rank}: a command without a fencing token")
        with self._fence_lock:
            if fence < self.max_fence:
                raise StaleCommand(f"rank {self.rank}: fencing token {fence} is older than {self.max_fence} "
                                   "(that controller is no longer the leader)")
            if fence > self.max_fence:
                self.max_fence, self._fence_by = fence, set()
            if isinstance(leader, str) and len(self._fence_by) < 8:
                # Two controllers with one token: a store that restarted empty gave it again. The
                # leader that hears of another one's commands under its token moves past it.
                self._fence_by.add(leader[:200])

    def _saw_epoch(self, epoch: int, *, rollback: bool = False) -> None:
        with self._fence_lock:
            self.max_epoch = epoch if rollback else max(self.max_epoch, epoch)

    def _check_epoch(self, epoch) -> None:
        if isinstance(epoch, int) and epoch < self.max_epoch:
            raise StaleCommand(f"rank {self.rank}: epoch {epoch} is older than {self.max_epoch}")

    def _expire_prepared(self) -> None:
        now = time.monotonic()
        for token, (prepared, expires) in list(self._prepared.items()):
            if now >= expires:
                del self._prepared[token]
                self.manager.abort(prepared)
                log.warning("hicache-ha: rank %d: a prepared switch to %r was never committed; dropped",
                            self.rank, prepared.member.name)

    def _run(self, op: str, args: dict) -> Optional[dict]:
        m = self.manager
        if op == "prepare":
            spec = args.get("spec")
            if spec is not None:
                check_attach(spec, self.attach_roots)
            self._prepared[args["token"]] = (m.prepare(spec or args["backend"]),
                                             time.monotonic() + self.prepare_ttl_s)
            return None
        if op == "commit":
            self._check_epoch(args.get("epoch"))
            prepared, _ = self._prepared.pop(args["token"], (None, None))
            if prepared is None:
                raise SwitchError(f"rank {self.rank}: no prepared switch {args['token']!r} (expired or restarted)")
            try:
                epoch = m.commit(prepared, force=args.get("force", False),
                                 drain_timeout_s=args.get("drain_timeout_s", 5.0), epoch=args.get("epoch"),
                                 reason=args.get("reason", "switch"))
            except Exception:  # a member built only for this switch is closed
                m.abort(prepared)
                raise
            self._saw_epoch(epoch)
            return {"epoch": epoch}
        if op == "abort":
            prepared, _ = self._prepared.pop(args.get("token"), (None, None))
            if prepared is not None:
                m.abort(prepared)
            return None
        if op == "restore":  # the rollback of a commit this leader just made
            m.restore(args["epoch"], args.get("active"))
            self._saw_epoch(args["epoch"], rollback=True)
            return {"epoch": m.epoch}
        if op == "detach":
            self._check_epoch(args.get("epoch"))
            epoch = m.detach(force=args.get("force", False), drain_timeout_s=args.get("drain_timeout_s", 5.0),
                             epoch=args.get("epoch"))
            self._saw_epoch(epoch)
            return {"epoch": epoch}
        if op == "remove":
            m.remove_member(args["backend"], args.get("reason", "removed by admin"))
            return None
        raise ValueError(f"unknown command {op!r}")

    # -- failover and failback of the group ---------------------------------------------------------
    def _failover_handler(self, target: Member, reason: str) -> None:
        """Called by the supervisor (never an engine thread) when it wants to move traffic to ``target``."""
        now = time.monotonic()
        if reason == "failback":  # never alone: the controller moves the whole group, once
            if self.controller_alive:
                self._ask(target, reason)
            return
        if self.controller_alive:
            asked = self._failover_asked.get(target.name)
            if asked is None or now - asked > 10 * self.group_failover_timeout_s:  # a new episode
                asked = self._failover_asked[target.name] = now
            if now - asked < self.group_failover_timeout_s:
                self._ask(target, reason)
                return
            log.warning("hicache-ha: rank %d: the controller did not fail the group over within %.1f s; "
                        "failing over alone", self.rank, self.group_failover_timeout_s)
        self._failover_asked.pop(target.name, None)
        self.manager.local_failover(target, reason)

    def _ask(self, target: Member, reason: str) -> None:
        active = self.manager.active
        self._send({"type": "failover_request", "rank": self.rank, "target": target.name,
                    "from": active.name if active else None, "reason": reason})

    def close(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self.channel.close()
        for prepared, _ in self._prepared.values():
            self.manager.abort(prepared)
        self._prepared.clear()
