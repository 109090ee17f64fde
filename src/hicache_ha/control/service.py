"""Run the control plane: the controller with its HTTP server, and the agent of each rank.

Nothing here can stop SGLang from starting or serving: ``attach_control_plane`` turns every failure to
start (no admin key, the agent port taken, the state store down, an unreadable state) into a log line
and a rank on local failover.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

import uvicorn

from ..config import HAConfig
from ..dataplane import BackendManager
from ..observe.metrics import WebhookMetrics, serve_process_metrics
from ..observe.webhooks import WebhookSink
from .agent import Agent
from .api import create_app
from .auth import ENV_KEY, load_api_key
from .controller import Controller
from .keys import ChannelKeys, channel_keys
from .state import FileStateStore, RedisStateStore, StateStore, default_state_dir

log = logging.getLogger("hicache_ha.control")


def state_store(config: HAConfig) -> StateStore:
    admin = config.admin
    if admin.state_redis_url:
        return RedisStateStore(admin.state_redis_url, admin.deployment)
    return FileStateStore(admin.state_file or default_state_dir() / f"state-{admin.deployment}.json")


def connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def keys_for(config: HAConfig, api_key: Optional[str] = None) -> ChannelKeys:
    """The agent channel's keys; raises ConfigError naming where the admin key should come from."""
    from ..backends.errors import ConfigError

    secret = load_api_key(api_key, config.admin.api_key_file)
    if not secret:
        raise ConfigError(f"the control plane needs the admin key on every rank (${ENV_KEY} or admin.api_key_file): "
                          "the agent channel is authenticated with keys derived from it")
    return channel_keys(secret, config.admin.deployment)


@dataclass
class ControllerService:
    controller: Controller
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    tls: bool = False
    webhooks: Optional[WebhookSink] = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{connect_host(self.controller.config.admin.host)}:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.controller.close()
        if self.webhooks is not None:
            self.webhooks.close()


def start_controller(config: HAConfig, *, expected_ranks: int, api_key: Optional[str] = None,
                     port: Optional[int] = None, agent_port: Optional[int] = None,
                     store: Optional[StateStore] = None) -> ControllerService:
    """Start the controller and its HTTP server in background threads. Raises OSError if the HTTP port is
    taken, ConfigError without an admin key. A controller that cannot lead yet (another one does) waits
    as a standby and takes over when the lease is free."""
    admin = config.admin
    port = admin.port if port is None else port
    agent_port = admin.agent_port if agent_port is None else agent_port
    key = load_api_key(api_key, admin.api_key_file)
    keys = keys_for(config, key)
    sock = socket.socket(socket.AF_INET6 if ":" in admin.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((admin.host, port))  # bind here, so a taken port is an OSError for the caller
    controller = Controller(config, store=store or state_store(config), expected_ranks=expected_ranks,
                            bind=f"tcp://{admin.host}:{agent_port}", keys=keys)
    tls = admin.tls_cert_file is not None
    sink = None
    if config.observe.webhooks:
        sink = WebhookSink(config.observe.webhooks, config.observe.webhook_queue)
        controller.listeners.append(sink)
    server = uvicorn.Server(uvicorn.Config(
        create_app(controller, key, sink), log_level="warning", access_log=False, lifespan="off",
        ssl_certfile=str(admin.tls_cert_file) if tls else None, ssl_keyfile=str(admin.tls_key_file) if tls else None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hicache-ha-admin-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            controller.close()
            if sink is not None:
                sink.close()
            raise OSError(f"the admin HTTP server did not start on {admin.host}:{port}")
        time.sleep(0.01)
    return ControllerService(controller, server, thread, sock.getsockname()[1], tls, sink)


@dataclass
class ControlPlane:
    """What a rank runs: its agent, on the leader (embedded mode) the controller too; without a control
    plane, its own webhooks and /metrics when configured."""

    agent: Optional[Agent] = None
    service: Optional[ControllerService] = None
    webhooks: Optional[WebhookSink] = None
    metrics_server: Optional[object] = None

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
        if self.service is not None:
            self.service.close()
        if self.webhooks is not None:
            self.webhooks.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


def attach_control_plane(manager: BackendManager, config: HAConfig) -> ControlPlane:
    """Per DESIGN: the leader rank serves the controller (embedded mode); every rank runs an agent. Never
    raises: whatever fails leaves the rank on local failover, and says why."""
    plane = ControlPlane()
    try:
        _attach(plane, manager, config)
    except Exception as exc:
        log.error("hicache-ha: rank %d: the control plane did not start (%s); this rank fails over on its own",
                  manager.layout.rank, exc)
        plane.close()
        plane = ControlPlane()
    observe = config.observe
    if plane.agent is None and observe.webhooks:  # no controller to send them: each process sends its own
        plane.webhooks = WebhookSink(observe.webhooks, observe.webhook_queue)
        manager.events.subscribe(plane.webhooks)
    if observe.metrics_port is not None:
        extra = [WebhookMetrics(plane.webhooks, config.admin.deployment)] if plane.webhooks else []
        try:
            plane.metrics_server, _ = serve_process_metrics(
                observe.metrics_port, lambda: [(manager.layout.rank, manager.layout.describe(), manager.status())],
                config.admin.deployment, observe.metrics_host, *extra)
        except OSError as exc:
            log.error("hicache-ha: cannot serve /metrics on port %d: %s", observe.metrics_port, exc)
    return plane


def _attach(plane: ControlPlane, manager: BackendManager, config: HAConfig) -> None:
    admin = config.admin
    if admin.mode == "off":
        return
    keys = keys_for(config)
    layout = manager.layout
    if admin.mode == "embedded" and layout.is_leader:
        expected = admin.expected_ranks or layout.ranks
        try:
            plane.service = start_controller(config, expected_ranks=expected)
            log.info("hicache-ha: controller serving the admin API on %s", plane.service.url)
        except Exception as exc:  # a taken port, an unreachable state store: the ranks go on alone
            log.error("hicache-ha: cannot start the embedded controller on %s:%d/%d (%s); ranks fail over "
                      "alone until one is reachable", admin.host, admin.port, admin.agent_port, exc)
    plane.agent = Agent(manager, f"tcp://{connect_host(admin.host)}:{admin.agent_port}", keys=keys,
                        heartbeat_s=admin.heartbeat_ms / 1000,
                        group_failover_timeout_s=admin.group_failover_timeout_ms / 1000,
                        controller_timeout_s=admin.rank_timeout_ms / 1000,
                        prepare_ttl_s=admin.prepare_ttl_ms / 1000, attach_roots=admin.attach_roots)
