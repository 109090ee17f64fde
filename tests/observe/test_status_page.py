"""The status page in headless Chromium, during a failover: it shows ranks × members and the events."""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from hicache_ha import BackendManager, Layout
from hicache_ha.config import parse
from hicache_ha.control.agent import Agent
from hicache_ha.control.service import start_controller
from hicache_ha.control.state import FileStateStore
from hicache_ha.sim.servers import free_port
from tests.control.conftest import KEY, KEYS, wait_for
from tests.control.outsider import Outsider
from tests.helpers import GATE

OUT = Path(__file__).resolve().parents[2] / "out"


def chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is missing: apt-get install chromium (make test does it)"
    profile = tempfile.mkdtemp(prefix="hicache-ha-chromium-")
    try:
        return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_the_status_page_shows_a_failover_as_it_happens(tmp_path):
    port, agent_port = free_port(), free_port()
    cfg = parse({"backends": [{"name": "primary", "type": GATE}, {"name": "standby", "type": "memory"}],
                 "health": {"failure_rate": None, "slow_calls": None, "ping": {"interval_ms": 20, "timeout_ms": 50}},
                 "admin": {"mode": "remote", "port": port, "agent_port": agent_port, "heartbeat_ms": 100}},
                environ={})
    service = start_controller(cfg, expected_ranks=2, api_key=KEY, store=FileStateStore(tmp_path / "s.json"))
    managers = [BackendManager(cfg, Layout(model="page", tp_rank=r, tp_size=2)) for r in range(2)]
    agents = [Agent(m, f"tcp://127.0.0.1:{agent_port}", keys=KEYS, heartbeat_s=0.1) for m in managers]
    try:
        wait_for(lambda: len(service.controller.alive()) == 2, what="ranks")
        gate = managers[1].members["primary"].backend
        gate.close_gate()
        wait_for(lambda: service.controller.desired.active == "standby", timeout=5, what="group failover")
        time.sleep(0.5)  # the heartbeats carry the new states
        url = f"{service.url}/status#key={KEY}"
        dom = chromium("--dump-dom", url).stdout
        assert "circuit_broken" in dom and "standby" in dom and "failover (asked by rank 1)" in dom
        assert "desired epoch </span><b>2</b>" in dom
        OUT.mkdir(exist_ok=True)
        shot = OUT / "status-failover.png"
        chromium(f"--screenshot={shot}", "--window-size=1100,700", url)
        assert shot.exists() and shot.stat().st_size > 10_000
        # Without the key the page shows no data, only the form.
        dom = chromium("--dump-dom", f"{service.url}/status").stdout
        assert '<table id="ranks"></table>' in dom and '<table id="events"></table>' in dom
        gate.open_gate()
    finally:
        for a in agents:
            a.close()
        for m in managers:
            m.close()
        service.close()


MARKUP = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def test_markup_sent_by_a_rank_is_shown_as_text_and_never_runs(tmp_path):
    """Even a peer holding the agent key (a compromised rank) cannot put script on the admin's page."""
    port, agent_port = free_port(), free_port()
    cfg = parse({"backends": [{"name": "primary", "type": "memory"}],
                 "admin": {"mode": "remote", "port": port, "agent_port": agent_port}}, environ={})
    service = start_controller(cfg, expected_ranks=1, api_key=KEY, store=FileStateStore(tmp_path / "s.json"))
    rank = Outsider(f"tcp://127.0.0.1:{agent_port}", KEYS.agent_public, KEYS.agent_secret, KEYS.controller_public,
                    identity=b"rank-0")
    try:
        hello = {"type": "register", "rank": 0, "deployment": "default",
                 "identity": {"tp": 0, "pp": 0, "dp": 0, "cp": 0, "tp_size": 1, "pp_size": 1, "dp_size": 1, "cp_size": 1},
                 "status": {"seq": 1, "epoch": MARKUP, "active": MARKUP, "in_flight": MARKUP,
                            "backends": [{"name": "primary", "state": MARKUP}]},
                 "events": [{"time": time.time(), "backend": MARKUP, "from": MARKUP, "to": MARKUP, "reason": MARKUP}]}
        rank.send(hello)
        wait_for(lambda: service.controller.alive() == [0], what="the rank to register")
        out = chromium("--dump-dom", f"{service.url}/status#key={KEY}")
        dom = out.stdout
        assert "<title>hicache-ha status</title>" in dom  # no script renamed the page
        assert "&lt;img src=x" in dom and "&lt;script&gt;" in dom  # shown as text
        assert "<img src=" not in dom and '<script>document.title' not in dom
    finally:
        rank.close()
        service.close()
