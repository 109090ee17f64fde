"""Run the control plane: the controller with its HTTP server, and the agent of each rank."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import uvicorn

from ..config import HAConfig
from ..dataplane import BackendManager
from ..observe.metrics import serve_process_metrics
from ..observe.webhooks import WebhookSink
from .agent import Agent
from .api import create_app
from .auth import load_api_key
from .controller import Controller
from .state import FileStateStore, RedisStateStore, StateStore

log = logging.getLogger("hicache_ha.control")


def state_store(config: HAConfig) -> StateStore:
    admin = config.admin
    if admin.state_redis_url:
        return RedisStateStore(admin.state_redis_url)
    path = admin.state_file or os.path.join(tempfile.gettempdir(), f"hicache-ha-state-{admin.port}.json")
    return FileStateStore(path)


def connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


@dataclass
class ControllerService:
    controller: Controller
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    webhooks: Optional[WebhookSink] = None

    @property
    def url(self) -> str:
        return f"http://{connect_host(self.controller.config.admin.host)}:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.controller.close()
        if self.webhooks is not None:
            self.webhooks.close()


def start_controller(config: HAConfig, *, expected_ranks: int, api_key: Optional[str] = None,
                     port: Optional[int] = None, agent_port: Optional[int] = None,
                     store: Optional[StateStore] = None) -> ControllerService:
    """Start the controller and its HTTP server in background threads. Raises OSError if a port is taken."""
    admin = config.admin
    port = admin.port if port is None else port
    agent_port = admin.agent_port if agent_port is None else agent_port
    sock = socket.socket(socket.AF_INET6 if ":" in admin.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((admin.host, port))  # bind here, so a taken port is an OSError for the caller
    key = load_api_key(api_key, admin.api_key_file)
    controller = Controller(config, store=store or state_store(config), expected_ranks=expected_ranks,
                            bind=f"tcp://{admin.host}:{agent_port}")
    server = uvicorn.Server(uvicorn.Config(create_app(controller, key), log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hicache-ha-admin-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            controller.close()
            raise OSError(f"the admin HTTP server did not start on {admin.host}:{port}")
        time.sleep(0.01)
    sink = None
    if config.observe.webhooks:
        sink = WebhookSink(config.observe.webhooks, config.observe.webhook_queue)
        controller.listeners.append(sink)
    return ControllerService(controller, server, thread, sock.getsockname()[1], sink)


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


def attach_control_plane(manager: BackendManager, config: HAConfig) -> ControlPlane:
    """Per DESIGN: the leader rank serves the controller (embedded mode); every rank runs an agent."""
    admin, observe = config.admin, config.observe
    plane = ControlPlane()
    if observe.metrics_port is not None:
        try:
            plane.metrics_server, _ = serve_process_metrics(observe.metrics_port,
                                                            lambda: [(manager.layout.rank, manager.status())])
        except OSError as exc:
            log.error("hicache-ha: cannot serve /metrics on port %d: %s", observe.metrics_port, exc)
    if admin.mode == "off":
        if observe.webhooks:  # no controller to send them: each process sends its own
            plane.webhooks = WebhookSink(observe.webhooks, observe.webhook_queue)
            manager.events.subscribe(plane.webhooks)
        return plane
    service = None
    layout = manager.layout
    if admin.mode == "embedded" and layout.is_leader:
        expected = admin.expected_ranks or layout.tp_size * layout.pp_size * layout.cp_size
        try:
            service = start_controller(config, expected_ranks=expected)
            log.info("hicache-ha: controller serving the admin API on %s", service.url)
        except OSError as exc:
            log.error("hicache-ha: cannot start the embedded controller on %s:%d/%d (%s); ranks fail over "
                      "alone until one is reachable", admin.host, admin.port, admin.agent_port, exc)
    plane.service = service
    plane.agent = Agent(manager, f"tcp://{connect_host(admin.host)}:{admin.agent_port}",
                        heartbeat_s=admin.heartbeat_ms / 1000,
                        group_failover_timeout_s=admin.group_failover_timeout_ms / 1000,
                        controller_timeout_s=admin.rank_timeout_ms / 1000)
    return plane
