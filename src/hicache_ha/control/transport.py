"""Message channel between the controller (ROUTER, binds) and the ranks' agents (DEALER, connect out).

Authenticated and encrypted with ZeroMQ CURVE (keys: ``control.keys``): the controller is the CURVE
server and admits, through its ZAP handler, only clients holding the agents' key; an agent only talks to
a server holding the controller's key. A peer without the admin secret gets no handshake, no message in
or out. Every message also names its deployment, and one for another deployment is dropped. ZeroMQ
heartbeats notice a peer that vanished without closing its connection, and the controller's ROUTER hands
a rank's identity over to the rank's new connection when it comes back.

One I/O thread owns the ZeroMQ socket (sockets are not thread-safe); other threads hand it messages
through a queue and wake it through an inproc pair, so nothing busy-waits. Messages are JSON objects.
Sends never block: a message that cannot be queued (peer gone) is dropped, and the protocol above
retries what matters (heartbeats repeat, commands time out).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import uuid
from queue import Empty, SimpleQueue
from typing import Callable, Optional

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .keys import ChannelKeys

log = logging.getLogger("hicache_ha.control")

OnMessage = Callable[[Optional[bytes], dict], None]


class _AgentKey:
    """The ZAP handler's verdict: only the agents' public key gets in."""

    def __init__(self, agent_public: bytes) -> None:
        self.agent_public = agent_public

    def callback(self, domain: str, client_key: bytes) -> bool:
        return hmac.compare_digest(client_key, self.agent_public)


class Channel:
    def __init__(self, kind: int, endpoint: str, *, bind: bool, on_message: OnMessage, keys: ChannelKeys,
                 identity: Optional[bytes] = None, name: str = "channel", heartbeat_ms: int = 1000) -> None:
        self.keys = keys
        self._ctx = zmq.Context()
        self._auth: Optional[ThreadAuthenticator] = None
        self._sock = self._ctx.socket(kind)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        # ZeroMQ heartbeats: a peer whose host vanished is noticed and its connection dropped.
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
        self._sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * heartbeat_ms)
        if kind == zmq.ROUTER:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a returning rank takes its identity back
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback(keys.zap_domain.decode(), credentials_provider=_AgentKey(keys.agent_public))
            self._sock.setsockopt(zmq.ZAP_DOMAIN, keys.zap_domain)
            self._sock.setsockopt(zmq.CURVE_SERVER, 1)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, keys.controller_secret)
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.controller_public)
        if kind == zmq.DEALER:
            self._sock.setsockopt(zmq.IMMEDIATE, 1)  # don't queue for a controller that is not there
            self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
            self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            self._sock.setsockopt(zmq.CURVE_SERVERKEY, keys.controller_public)
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.agent_public)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, keys.agent_secret)
        if identity is not None:
            self._sock.setsockopt(zmq.IDENTITY, identity)
        try:
            if bind:
                self._sock.bind(endpoint)
            else:
                self._sock.connect(endpoint)
        except zmq.ZMQError:
            self._teardown()
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self._kind = kind
        self._on_message = on_message
        self._out: SimpleQueue = SimpleQueue()
        wake_addr = f"inproc://wake-{uuid.uuid4().hex}"
        self._wake_r = self._ctx.socket(zmq.PAIR)
        self._wake_r.bind(wake_addr)
        self._wake_w = self._ctx.socket(zmq.PAIR)
        self._wake_w.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"hicache-ha-{name}", daemon=True)
        self._thread.start()

    def send(self, msg: dict, to: Optional[bytes] = None) -> None:
        if self._closed.is_set():
            return
        self._out.put((to, json.dumps({**msg, "deployment": self.keys.deployment}).encode()))
        with self._wake_lock:
            try:
                self._wake_w.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._closed.is_set():
            try:
                events = dict(poller.poll(200))
            except zmq.ZMQError:
                break
            if self._wake_r in events:
                while True:
                    try:
                        self._wake_r.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            if self._sock in events:
                self._drain_in()
            self._drain_out()
        self._wake_r.close(0)
        self._wake_w.close(0)
        self._teardown()

    def _teardown(self) -> None:
        self._sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def _drain_in(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer = frames[0] if self._kind == zmq.ROUTER else None
            try:
                msg = json.loads(frames[-1])
            except ValueError:
                log.warning("hicache-ha: dropped a malformed control message")
                continue
            if not isinstance(msg, dict) or msg.get("deployment") != self.keys.deployment:
                log.warning("hicache-ha: dropped a control message for another deployment")
                continue
            try:
                self._on_message(peer, msg)
            except Exception:
                log.exception("hicache-ha: handling a control message failed")

    def _drain_out(self) -> None:
        while True:
            try:
                to, data = self._out.get_nowait()
            except Empty:
                return
            try:
                if self._kind == zmq.ROUTER:
                    self._sock.send_multipart([to, data], zmq.NOBLOCK)
                else:
                    self._sock.send(data, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # peer not connected: dropped, see the module docstring

    def close(self) -> None:
        self._closed.set()
        with self._wake_lock:  # wake the loop so it sees the flag
            try:
                self._wake_w.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._thread.join(2)
