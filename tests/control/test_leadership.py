"""One leader, a control plane that never stops SGLang, HTTPS, and a failback the group makes once."""

import os
import socket
import stat
import subprocess
import time

import httpx
import pytest

from hicache_ha.config import parse
from hicache_ha.control.service import start_controller
from hicache_ha.control.state import FileStateStore, RedisStateStore
from hicache_ha.sim.servers import free_port
from tests.control.conftest import AUTH, KEY, MEM, wait_for
from tests.helpers import GATE
from tests.sglang.conftest import build


def config(tmp_path, **admin):
    return parse({"backends": MEM, "admin": {"mode": "remote", "port": free_port(), "agent_port": free_port(),
                                             "lease_ms": 600, "state_file": str(tmp_path / "state.json"), **admin}},
                 environ={})


@pytest.mark.parametrize("store_kind", ["file", "redis"])
def test_two_controllers_on_one_store_one_leads_and_the_other_takes_over_when_it_dies(tmp_path, store_kind, request):
    cfg = config(tmp_path)

    def store():
        if store_kind == "file":
            return FileStateStore(tmp_path / "state.json")
        return RedisStateStore(request.getfixturevalue("redis_server").url, "default")

    a = start_controller(cfg, expected_ranks=1, api_key=KEY, store=store(), port=free_port())
    b = start_controller(cfg, expected_ranks=1, api_key=KEY, store=store(), port=free_port())
    try:
        time.sleep(1.0)
        assert [a.controller.is_leader, b.controller.is_leader] == [True, False]
        follower = httpx.put(f"{b.url}/hicache/storage-backend", json={"backend": "standby", "force": True},
                             headers=AUTH, timeout=10)
        assert follower.status_code == 503 and "standby" in follower.json()["error"]  # only the leader switches
        assert httpx.get(f"{b.url}/readyz", timeout=5).status_code == 503
        # The leader is ready although its one expected rank never connected: ranks reach it through
        # what routes on readiness (a Kubernetes Service), and it says which are missing.
        ready = httpx.get(f"{a.url}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["missing_ranks"] == [0]
        fence = a.controller.fence
        a.close()
        wait_for(lambda: b.controller.is_leader, timeout=5, what="the standby to take over")
        assert b.controller.fence > fence  # a newer fencing token: ranks will refuse the old leader
    finally:
        b.close()


def test_the_default_state_lives_in_a_private_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    cfg = parse({"backends": MEM, "admin": {"mode": "remote", "deployment": "fleet-a"}}, environ={})
    from hicache_ha.control.service import state_store

    store = state_store(cfg)
    assert store.acquire("me", 1.0) == 1
    store.save(store.load() or __import__("hicache_ha.control.state", fromlist=["DesiredState"]).DesiredState(), 1)
    path = tmp_path / "xdg" / "hicache-ha" / "state-fleet-a.json"
    assert path.exists()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store.release("me", 1)


def test_an_unreadable_state_is_kept_aside_and_the_controller_starts_from_its_config(tmp_path):
    (tmp_path / "state.json").write_text('{"epoch": "many", "active": 3}')
    service = start_controller(config(tmp_path), expected_ranks=1, api_key=KEY)
    try:
        assert service.controller.is_leader
        assert (service.controller.desired.epoch, service.controller.desired.active) == (1, "primary")
        assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    finally:
        service.close()


def embedded(tmp_path, **admin):
    return {"backends": MEM, "admin": {"mode": "embedded", "port": free_port(), "agent_port": free_port(),
                                       "state_file": str(tmp_path / "state.json"), **admin}}


def test_sglang_starts_and_serves_with_the_agent_port_already_taken(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HICACHE_HA_ADMIN_API_KEY", KEY)
    ha = embedded(tmp_path)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", ha["admin"]["agent_port"]))
    squatter.listen(1)
    try:
        s = build(ha, tp_size=1)
        assert s.set("k", torch_page()) is True and s.exists("k") is True  # serving, on local failover
        assert s.control.service is None or not s.control.service.controller.is_leader
    finally:
        squatter.close()


def test_sglang_starts_and_serves_with_the_state_redis_down(tmp_path, monkeypatch):
    monkeypatch.setenv("HICACHE_HA_ADMIN_API_KEY", KEY)
    s = build(embedded(tmp_path, state_redis_url=f"redis://127.0.0.1:{free_port()}/0"), tp_size=1)
    assert s.set("k", torch_page()) is True and s.exists("k") is True


def test_sglang_starts_and_serves_with_a_corrupt_state_file_or_no_admin_key(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{not json")
    monkeypatch.setenv("HICACHE_HA_ADMIN_API_KEY", KEY)
    s = build(embedded(tmp_path), tp_size=1)
    assert s.set("k", torch_page()) is True
    monkeypatch.delenv("HICACHE_HA_ADMIN_API_KEY")
    s2 = build(embedded(tmp_path / "other"), tp_size=1)  # no key: no control plane, the rank runs alone
    assert s2.control.agent is None and s2.set("k", torch_page()) is True


def torch_page():
    import torch

    return torch.ones(64, dtype=torch.bfloat16)


def test_the_admin_api_over_https(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    service = start_controller(config(tmp_path, tls_cert_file=str(cert), tls_key_file=str(key)), expected_ranks=1,
                               api_key=KEY)
    try:
        assert service.url.startswith("https://")
        r = httpx.get(f"{service.url}/hicache/storage-backend", headers=AUTH, verify=str(cert), timeout=5)
        assert r.status_code == 200 and r.json()["active"] == "primary"
        with pytest.raises(httpx.HTTPError):  # a client that does not trust the certificate gets nothing
            httpx.get(f"{service.url}/hicache/storage-backend", headers=AUTH, timeout=5)
        with pytest.raises(httpx.HTTPError):  # nor does plain HTTP
            httpx.get(service.url.replace("https", "http") + "/healthz", timeout=5)
    finally:
        service.close()


def test_auto_failback_with_a_controller_moves_the_group_once(cluster_factory):
    doc = {"backends": [{"name": "primary", "type": GATE}, {"name": "standby", "type": "memory"}],
           "health": {"failure_rate": None, "slow_calls": None, "ping": {"interval_ms": 20, "timeout_ms": 50},
                      "backoff": {"base_ms": 100, "cap_ms": 200}},
           "failover": {"failback": "auto", "failback_after_ms": 500}}
    c = cluster_factory(doc)
    gates = [m.members["primary"].backend for m in c.managers]
    for g in gates:
        g.close_gate()
    wait_for(lambda: c.epochs() == {(2, "standby")}, timeout=10, what="the group to fail over")
    for g in gates:
        g.open_gate()
    wait_for(lambda: c.epochs() == {(3, "primary")}, timeout=15, what="the group to fail back together")
    time.sleep(3.0)  # and nothing moves after that: no rank fails back alone, no convergence ping-pong
    assert c.epochs() == {(3, "primary")} and c.controller.desired.epoch == 3
    for m in c.managers:
        moves = [e.reason for e in m.events.recent(200) if e.detail.get("role") == "active"]
        assert len(moves) == 2 and moves[1].startswith("failback (asked by rank"), moves
