"""Four rank processes (HAStorage through SGLang's real factory, simulated traffic), a standalone
controller process, real redis-servers: switch, refusal, failover and a controller crash."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hicache_ha.control.client import AdminClient, AdminError
from hicache_ha.sim.servers import RedisServer, free_port
from tests.control.conftest import DEADLINES, wait_for

KEY = "multi-process-admin-key"
RANKS = 4
ROOT = Path(__file__).resolve().parents[2]


class Deployment:
    """A standalone controller process (the CLI) and four rank processes (HAStorage through SGLang's
    factory, simulated traffic, a JSON report each), sharing one config document."""

    def __init__(self, tmp: Path, ha: dict) -> None:
        self.tmp = tmp
        self.port, self.agent_port = free_port(), free_port()
        self.ha = {**ha, "admin": {"mode": "remote", "port": self.port, "agent_port": self.agent_port,
                                   "expected_ranks": RANKS, "heartbeat_ms": 100, "rank_timeout_ms": 1500,
                                   "command_timeout_ms": 3000, "state_file": str(tmp / "state.json"),
                                   **ha.get("admin", {})}}
        self.config_file = tmp / "ha.yaml"
        self.config_file.write_text(yaml.safe_dump(self.ha))
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "HICACHE_HA_ADMIN_API_KEY": KEY}
        self.controller = None
        self.ranks: list[subprocess.Popen] = []
        self.client = AdminClient(f"http://127.0.0.1:{self.port}", KEY, timeout=30)

    def start_controller(self):
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "hicache_ha.cli", "controller", "--config", str(self.config_file)],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(self._controller_up, timeout=30, what="the controller to serve")

    def _controller_up(self):
        try:
            return self.client.status()["leader"]
        except AdminError:
            assert self.controller.poll() is None, self.controller.stdout.read()
            return False

    def kill_controller(self):
        self.controller.kill()
        self.controller.wait(10)

    def start_rank(self, r, env=None) -> subprocess.Popen:
        spec = {"rank": r, "tp_size": RANKS, "ha": self.ha, "out": str(self.tmp / f"rank{r}.json")}
        env = {**self.env, "RANK_SPEC": json.dumps(spec), **(env or {})}
        return subprocess.Popen([sys.executable, "-m", "tests.control.rank_proc"], env=env, cwd=ROOT)

    def start_ranks(self, overrides=None):
        for r in range(RANKS):
            self.ranks.append(self.start_rank(r, (overrides or {}).get(r)))
        wait_for(lambda: len([x for x in self.client.status()["ranks"] if x["alive"]]) == RANKS, timeout=90,
                 what="4 ranks to register")

    def reports(self):
        out = []
        for r in range(RANKS):
            path = self.tmp / f"rank{r}.json"
            try:
                out.append(json.loads(path.read_text()))
            except (FileNotFoundError, ValueError):
                out.append({})
        return out

    def agreed(self, epoch, active):
        return all((x.get("epoch"), x.get("active")) == (epoch, active) for x in self.reports())

    def one_state(self):
        """(epoch, active) if every rank reports the same one, else None."""
        states = {(x.get("epoch"), x.get("active")) for x in self.reports()}
        return states.pop() if len(states) == 1 else None

    def close(self):
        for p in self.ranks:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.ranks:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.controller and self.controller.poll() is None:
            self.controller.kill()


@pytest.fixture
def deployment(tmp_path):
    with RedisServer() as primary, RedisServer() as standby:
        d = Deployment(tmp_path, {
            "backends": [{"name": "primary", "type": "redis", "url": primary.url, "socket_timeout_ms": 500},
                         {"name": "standby", "type": "redis", "url": standby.url, "socket_timeout_ms": 500},
                         {"name": "extra", "type": "redis", "url": standby.url.replace("/0", "/1")}],
            "deadlines_ms": DEADLINES})
        d.primary, d.standby = primary, standby
        try:
            yield d
        finally:
            d.close()


def test_four_rank_processes_switch_refuse_fail_over_and_survive_a_controller_crash(deployment):
    d = deployment
    d.start_controller()
    dead = free_port()
    d.start_ranks({2: {"HICACHE_HA__BACKENDS__2__URL": f"redis://127.0.0.1:{dead}/0"}})  # rank 2 can't reach 'extra'
    time.sleep(1.0)  # traffic flowing

    # Switch primary -> standby -> back: every rank on one epoch after each.
    assert d.client.switch("standby")["epoch"] == 2
    wait_for(lambda: d.agreed(2, "standby"), what="ranks on epoch 2")
    t0 = time.monotonic()
    assert d.client.switch("primary", force=True)["epoch"] == 3  # forced, under load
    assert time.monotonic() - t0 < 1.0
    wait_for(lambda: d.agreed(3, "primary"), what="ranks on epoch 3")

    # A target one rank cannot reach: 503 naming that rank, nothing changed anywhere.
    with pytest.raises(AdminError) as info:
        d.client.switch("extra")
    assert info.value.status == 503 and [f["rank"] for f in info.value.body["failed"]] == [2]
    assert d.client.status()["epoch"] == 3 and d.agreed(3, "primary")

    # The CLI shows the same state as a table.
    out = subprocess.run([sys.executable, "-m", "hicache_ha.cli", "status", "--url", f"http://127.0.0.1:{d.port}"],
                         env=d.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "epoch 3" in out.stdout and "primary" in out.stdout
    # A CLI error keeps what the API said: here the members there are.
    out = subprocess.run([sys.executable, "-m", "hicache_ha.cli", "switch", "nosuch", "--url",
                          f"http://127.0.0.1:{d.port}"], env=d.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "unknown backend 'nosuch'" in out.stderr, out.stderr
    assert "backends: primary, standby, extra" in out.stderr and "Traceback" not in out.stderr

    # The controller is killed: ranks keep serving; restarted, it resumes from the persisted state.
    d.kill_controller()
    before = sum(x["calls"] for x in d.reports())
    time.sleep(1.0)
    assert sum(x["calls"] for x in d.reports()) > before
    d.start_controller()
    body = d.client.status()
    assert (body["epoch"], body["active"]) == (3, "primary")
    wait_for(lambda: len([x for x in d.client.status()["ranks"] if x["alive"]]) == RANKS, what="ranks back")

    # The primary dies: the group fails over together to the standby, on one epoch.
    d.primary.kill()
    wait_for(lambda: d.client.status()["active"] == "standby", timeout=10, what="group failover")
    epoch = d.client.status()["epoch"]
    wait_for(lambda: d.agreed(epoch, "standby"), timeout=10, what="all ranks on the failover epoch")

    d.close()
    reports = d.reports()
    assert sum(x["errors"] for x in reports) == 0 and sum(x["bad_pages"] for x in reports) == 0
    # Six processes share two cores here, so scheduling adds its own delays; the per-call bound of
    # deadline + 20 ms is asserted in tests/sglang/test_faults.py. This catches any real stall.
    assert max(x["max_latency_s"] for x in reports) <= 0.500 + 0.020 + 0.100
