"""A raw ZeroMQ peer on the agent port, with whatever keys a test gives it (or none): an outsider, an
impostor, or a compromised rank. It speaks the wire protocol by hand."""

from __future__ import annotations

import json
import time
from typing import Optional

import zmq


class Outsider:
    def __init__(self, endpoint: str, public: Optional[bytes] = None, secret: Optional[bytes] = None,
                 server_key: Optional[bytes] = None, identity: Optional[bytes] = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        if server_key is not None:  # CURVE, with these keys
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self.sock.connect(endpoint)

    def send(self, msg: dict) -> None:
        self.sock.send(json.dumps(msg).encode(), zmq.NOBLOCK)

    def receive(self, timeout_s: float) -> Optional[dict]:
        if self.sock.poll(int(timeout_s * 1000)):
            return json.loads(self.sock.recv())
        return None

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class ForgedController:
    """A ROUTER bound where the agents connect, with keys of its own: it tries to command a rank."""

    def __init__(self, endpoint: str, public: Optional[bytes] = None, secret: Optional[bytes] = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if secret is not None:
            self.sock.setsockopt(zmq.CURVE_SERVER, 1)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        self.sock.bind(endpoint)

    def receive(self, timeout_s: float) -> Optional[tuple[bytes, dict]]:
        if self.sock.poll(int(timeout_s * 1000)):
            peer, data = self.sock.recv_multipart()
            return peer, json.loads(data)
        return None

    def send(self, peer: bytes, msg: dict) -> None:
        self.sock.send_multipart([peer, json.dumps(msg).encode()], zmq.NOBLOCK)

    def hear_every_rank(self, ranks: int, timeout_s: float = 20.0) -> None:
        """Until each of ``ranks`` rank agents has sent a heartbeat here (it reconnected to this port)."""
        heard, deadline = set(), time.monotonic() + timeout_s
        while len(heard) < ranks:
            assert time.monotonic() < deadline, f"ranks heard: {sorted(heard)}"
            got = self.receive(0.2)
            if got is not None and got[1].get("type") == "heartbeat":
                heard.add(got[0])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def replies_of(ghost: ForgedController, want: int, timeout: float = 10.0) -> dict:
    """Read what ranks send a controller until ``want`` command replies came: {(rank, op id): reply}."""
    out, deadline = {}, time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        got = ghost.receive(0.2)
        if got is not None and got[1].get("type") == "reply":
            out[(got[1]["rank"], got[1]["id"])] = got[1]
    return out


GHOST_COMMANDS = (("prepare", {"token": "t", "backend": "standby"}),
                  ("commit", {"token": "t", "epoch": 99, "force": True}),
                  ("detach", {"epoch": 99, "force": True}))


def ghost_commands(endpoint: str, keys, ranks: int, fences, commands=GHOST_COMMANDS, timeout_s: float = 10.0) -> dict:
    """An old leader back on the agent port (it holds the real controller ``keys``: it was a real controller,
    paused or partitioned while its successor led): it waits for every rank, then sends each rank each of
    ``commands`` (op, args) under each of its old fencing tokens ``fences``. Returns the replies."""
    ghost = ForgedController(endpoint, keys.controller_public, keys.controller_secret)
    try:
        ghost.hear_every_rank(ranks, timeout_s)
        sent = 0
        for r in range(ranks):
            for fence in fences:
                for op, args in commands:
                    ghost.send(f"rank-{r}".encode(), {"type": "command", "id": f"{r}-{op}-{fence}", "op": op,
                                                      "args": args, "fence": fence, "deployment": "default"})
                    sent += 1
        return replies_of(ghost, sent, timeout_s)
    finally:
        ghost.close()
