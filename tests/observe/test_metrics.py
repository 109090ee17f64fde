"""Metrics as Prometheus scrapes them: names, labels, bounded series, and what a failover shows."""

import json
import re
from pathlib import Path

import pytest
import yaml

from hicache_ha import BackendManager, Layout
from hicache_ha.observe.metrics import RankMetrics, registry_for, render
from tests.control.conftest import AUTH, wait_for
from tests.helpers import GATE
from tests.observe.conftest import scrape, solo_process

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def has(samples, labels: dict, value: float) -> bool:
    """Some sample carries at least these labels and this value."""
    return any(v == value and labels.items() <= got.items() for got, v in samples)


def one_process(m: BackendManager) -> dict:
    return scrape(render(registry_for(RankMetrics(lambda: [(m.layout.rank, m.layout.describe(), m.status())]))).decode())


def test_a_rank_exports_states_outcomes_latencies_and_epoch():
    m = BackendManager({"backends": [{"name": "a", "type": "memory"}, {"name": "b", "type": "memory"}]},
                       Layout(model="m"), supervise=False)
    m.set(["k"], [b"v"])
    m.get(["k", "missing"])
    got = one_process(m)
    ident = {"deployment": "default", "rank": "0", "tp_rank": "0", "pp_rank": "0", "dp_rank": "0", "cp_rank": "0"}
    assert has(got["hicache_ha_backend_state"], {**ident, "backend": "a", "state": "healthy"}, 1.0)
    assert has(got["hicache_ha_backend_state"], {"rank": "0", "backend": "a", "state": "circuit_broken"}, 0.0)
    assert has(got["hicache_ha_ops_total"], {"rank": "0", "backend": "a", "op": "set", "outcome": "ok"}, 1.0)
    buckets = [s for s in got["hicache_ha_op_duration_seconds_bucket"] if s[0]["op"] == "get"]
    assert [b[0]["le"] for b in buckets][:2] == ["0.0001", "0.00025"] and buckets[-1][0]["le"] == "+Inf"
    assert buckets[-1][1] == 1.0
    assert got["hicache_ha_active_epoch"] == [(ident, 1.0)]  # joins SGLang's tp_rank / pp_rank / dp_rank series
    assert has(got["hicache_ha_backend_active"], {"rank": "0", "backend": "a"}, 1.0)
    m.close()


def test_series_stay_bounded_while_keys_vary():
    m = BackendManager({"backends": [{"name": "a", "type": "memory"}]}, Layout(model="m"), supervise=False)
    m.set([f"k{i}" for i in range(10)], [b"v"] * 10)
    before = sum(len(v) for v in one_process(m).values())
    for i in range(500):
        m.set([f"other-{i}"], [b"v"])
        m.get([f"other-{i}", f"never-{i}"])
    after = sum(len(v) for v in one_process(m).values())
    assert after == before or after - before <= 20  # new op kinds may add a histogram, keys never do
    m.close()


def exported_names(cluster) -> set:
    names = set()
    for name in scrape(cluster.client.get("/metrics").text):
        names.add(re.sub(r"_(bucket|sum|count|created)$", "", name))
    return names


def test_the_controller_scrape_shows_a_failover_per_rank(cluster_factory):
    doc = {"backends": [{"name": "primary", "type": GATE}, {"name": "standby", "type": "memory"}],
           "health": {"failure_rate": None, "slow_calls": None, "ping": {"interval_ms": 20, "timeout_ms": 50}}}
    c = cluster_factory(doc)
    gate = c.managers[2].members["primary"].backend
    gate.close_gate()
    try:
        wait_for(lambda: c.epochs() == {(2, "standby")}, timeout=5, what="group failover")

        def shown():
            got = scrape(c.client.get("/metrics").text)
            return (has(got.get("hicache_ha_circuit_transitions_total", []),
                        {"rank": "2", "tp_rank": "2", "backend": "primary", "to": "circuit_broken"}, 1.0)
                    and all(has(got["hicache_ha_failovers_total"], {"rank": str(r), "reason": "group"}, 1.0)
                            for r in range(4))
                    and all(has(got["hicache_ha_backend_active"], {"rank": str(r), "backend": "standby"}, 1.0)
                            for r in range(4)))

        wait_for(shown, timeout=5, what="the failover in the scrape")
        got = scrape(c.client.get("/metrics").text)
        assert has(got["hicache_ha_backend_state"], {"rank": "2", "backend": "primary", "state": "healthy"}, 0.0)
        assert got["hicache_ha_desired_epoch"] == [({"deployment": "default"}, 2.0)]
        assert has(got["hicache_ha_switch_operations_total"], {"kind": "failover", "result": "ok"}, 1.0)
        assert all(v == 1.0 for _, v in got["hicache_ha_rank_up"])
    finally:
        gate.open_gate()


def test_every_dashboard_and_alert_query_uses_exported_metrics(cluster_factory):
    c = cluster_factory({"backends": [{"name": "primary", "type": "memory"}, {"name": "standby", "type": "memory"}]},
                        ranks=2)
    c.managers[0].set(["k"], [b"v"])
    c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    wait_for(lambda: "hicache_ha_op_duration_seconds" in exported_names(c), what="latency series")
    names = exported_names(c)
    dashboard = json.loads((DEPLOY / "grafana" / "hicache-ha-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "hicache-ha-rules.yml").read_text())["groups"][0]["rules"]
    queries += [r["expr"] for r in rules]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for q in queries for n in re.findall(r"hicache_ha_[a-z_]+", q)}
    assert used, "no query found"
    assert used <= names, f"queries use metrics nobody exports: {sorted(used - names)}"


def test_every_dashboard_query_is_scoped_to_the_chosen_deployment_and_instance():
    """One Prometheus scrapes many deployments: every series a panel selects is filtered by the dashboard's
    deployment and instance variables, and every aggregation keeps them apart."""
    dashboard = json.loads((DEPLOY / "grafana" / "hicache-ha-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "deployment", "instance"} <= set(variables)
    assert "deployment=~\"$deployment\"" in variables["instance"]["query"]["query"]  # instances of that deployment
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        selectors = re.findall(r"hicache_ha_[a-z_]+(\{[^}]*\})?", expr)
        assert selectors and all('deployment=~"$deployment"' in s and 'instance=~"$instance"' in s
                                 for s in selectors), expr
        for by in re.findall(r"\bby \(([^)]*)\)", expr):
            assert {"deployment", "instance"} <= {x.strip() for x in by.split(",")}, expr


def test_without_a_controller_each_process_serves_metrics_and_readiness():
    """admin.mode off, observe.metrics_port set: /metrics, /healthz, and /readyz that follows the active
    member (ready on a healthy standby after a failover, not ready when detached)."""
    import httpx

    health = {"failure_rate": None, "slow_calls": None, "ping": {"interval_ms": 20, "timeout_ms": 50}}
    with solo_process([{"name": "primary", "type": GATE}, {"name": "standby", "type": "memory"}],
                      health) as (m, url):
        gate = m.members["primary"].backend
        try:
            assert httpx.get(f"{url}/healthz").json()["ok"] is True
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 200 and ready.json()["ranks"] == [
                {"rank": 0, "ready": True, "active": "primary", "state": "healthy"}]
            assert has(scrape(httpx.get(f"{url}/metrics").text)["hicache_ha_backend_active"],
                       {"deployment": "solo", "rank": "0", "backend": "primary"}, 1.0)
            gate.close_gate()  # the primary hangs: the rank fails over, and is ready on the standby
            wait_for(lambda: m.status()["active"] == "standby", timeout=5, what="failover")
            assert httpx.get(f"{url}/readyz").status_code == 200
            m.detach(force=True)
            answer = httpx.get(f"{url}/readyz")
            assert answer.status_code == 503 and answer.json()["ranks"][0]["state"] == "detached"
        finally:
            gate.open_gate()
    try:  # closed: the port is free again
        httpx.get(f"{url}/healthz", timeout=1)
        raise AssertionError("still serving after close")
    except httpx.TransportError:
        pass


def test_the_process_endpoints_listen_where_metrics_host_says():
    """127.0.0.1 by default; an operator exposes them (0.0.0.0, or here another loopback address)."""
    import httpx

    with solo_process([{"name": "primary", "type": "memory"}], metrics_host="127.0.0.2") as (_, url):
        assert httpx.get(f"{url}/healthz", timeout=5).json()["ok"] is True
        with pytest.raises(httpx.ConnectError):
            httpx.get(url.replace("127.0.0.2", "127.0.0.1") + "/healthz", timeout=1)
