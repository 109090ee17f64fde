"""The keys of the channel between the controller and the ranks' agents (ZeroMQ CURVE).

Both keypairs are derived from the admin secret and the deployment id (HMAC-SHA256), so every rank
that holds the admin key, and nobody else, can talk to its controller, and two deployments on one
network never mix even when they share a secret. The controller is the CURVE server: an agent only
completes a handshake with a peer that holds the controller's secret key (a forged controller gets
nothing out of it), and the controller's ZAP handler admits only clients holding the agents' key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import zmq
from zmq.utils import z85


@dataclass(frozen=True)
class ChannelKeys:
    deployment: str
    controller_public: bytes  # Z85, as ZeroMQ wants them
    controller_secret: bytes
    agent_public: bytes
    agent_secret: bytes

    @property
    def zap_domain(self) -> bytes:
        return f"hicache-ha:{self.deployment}".encode()


def _secret(admin_secret: str, role: str, deployment: str) -> bytes:
    raw = hmac.new(admin_secret.encode(), f"hicache-ha/curve/{role}/{deployment}".encode(), hashlib.sha256).digest()
    return z85.encode(raw)


def channel_keys(admin_secret: str, deployment: str) -> ChannelKeys:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support: the agent channel cannot be authenticated")
    controller = _secret(admin_secret, "controller", deployment)
    agent = _secret(admin_secret, "agent", deployment)
    return ChannelKeys(deployment, zmq.curve_public(controller), controller, zmq.curve_public(agent), agent)
