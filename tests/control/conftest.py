import time

import pytest
from fastapi.testclient import TestClient

from hicache_ha import BackendManager, Layout
from hicache_ha.config import parse
from hicache_ha.control.agent import Agent
from hicache_ha.control.api import create_app
from hicache_ha.control.controller import Controller
from hicache_ha.control.keys import channel_keys
from hicache_ha.control.state import FileStateStore
from hicache_ha.sim.servers import free_port

KEY = "test-admin-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEYS = channel_keys(KEY, "default")
MEM = [{"name": "primary", "type": "memory"}, {"name": "standby", "type": "memory"}]
DEADLINES = {"exists": 50, "get": 300, "set": 500}  # the deployments the multi-process tests start


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Cluster:
    """A controller with its API (in-process TestClient) and N ranks' data planes with agents (threads)."""

    def __init__(self, tmp_path, doc: dict, ranks: int = 4) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.doc = {**doc, "admin": {"mode": "remote", "agent_port": self.port, "heartbeat_ms": 100,
                                     "rank_timeout_ms": 1000, "command_timeout_ms": 2000, **doc.get("admin", {})}}
        self.config = parse(self.doc, environ={})
        self.n = ranks
        self.store = FileStateStore(tmp_path / "state.json")
        self.controller = None
        self.client = None
        self.start_controller()
        self.managers = [self.rank_manager(r) for r in range(ranks)]
        self.agents = [self.agent(m) for m in self.managers]
        wait_for(lambda: len(self.controller.alive()) == ranks, what="ranks to register")

    def start_controller(self):
        self.controller = Controller(self.config, store=self.store, expected_ranks=self.n,
                                     bind=f"tcp://127.0.0.1:{self.port}", keys=KEYS)
        self.client = TestClient(create_app(self.controller, KEY))

    def rank_manager(self, r):
        return BackendManager(self.config, Layout(model="ctl", tp_rank=r, tp_size=self.n))

    def agent(self, m):
        admin = self.config.admin
        return Agent(m, f"tcp://127.0.0.1:{self.port}", keys=KEYS, heartbeat_s=admin.heartbeat_ms / 1000,
                     group_failover_timeout_s=admin.group_failover_timeout_ms / 1000,
                     controller_timeout_s=admin.rank_timeout_ms / 1000, prepare_ttl_s=admin.prepare_ttl_ms / 1000,
                     attach_roots=admin.attach_roots)

    def epochs(self):
        return {(m.epoch, m.active.name if m.active else None) for m in self.managers}

    def close(self):
        for a in self.agents:
            a.close()
        for m in self.managers:
            m.close()
        self.controller.close()


@pytest.fixture
def cluster_factory(tmp_path):
    made = []

    def make(doc, ranks=4):
        c = Cluster(tmp_path, doc, ranks)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
