"""The alert rules, checked and unit-tested with promtool against a Prometheus that scrapes two
deployments (each with a rank 0, as every deployment has): an outage on one fires for exactly that one."""

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from hicache_ha.observe.alerts import RUNBOOK_BASE, render

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "hicache-ha-rules.yml"


def promtool():
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (make test does it)"
    return path


def ident(deployment, rank=0):
    """The labels a scrape of deployment ``deployment``'s controller gives a rank's series."""
    return {"job": "hicache-ha", "instance": f"ctl-{deployment}:18080", "namespace": "llm", "pod": f"ctl-{deployment}-0",
            "deployment": deployment, "rank": str(rank), "tp_rank": str(rank), "pp_rank": "0", "dp_rank": "0",
            "cp_rank": "0"}


def series(name, labels, values):
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def healthy(d, rank=0, minutes=40):
    n = minutes * 4
    i = ident(d, rank)
    ctl = {k: v for k, v in i.items() if k not in ("rank", "tp_rank", "pp_rank", "dp_rank", "cp_rank")}
    return [series("hicache_ha_backend_state", {**i, "backend": "primary", "state": "healthy"}, f"1x{n}"),
            series("hicache_ha_backend_state", {**i, "backend": "primary", "state": "circuit_broken"}, f"0x{n}"),
            series("hicache_ha_backend_state", {**i, "backend": "standby", "state": "healthy"}, f"1x{n}"),
            series("hicache_ha_backend_active", {**i, "backend": "primary"}, f"1x{n}"),
            series("hicache_ha_backend_active", {**i, "backend": "standby"}, f"0x{n}"),
            series("hicache_ha_ops_total", {**i, "backend": "primary", "op": "get", "outcome": "ok"}, f"0+100x{n}"),
            series("hicache_ha_ops_total", {**i, "backend": "primary", "op": "get", "outcome": "timeout"}, f"0+1x{n}"),
            series("hicache_ha_failovers_total", {**i, "reason": "failover"}, f"0x{n}"),
            series("hicache_ha_abandoned_calls_total", {**i, "backend": "primary"}, f"0+1x{n}"),
            series("hicache_ha_active_epoch", i, f"5x{n}"),
            series("hicache_ha_desired_epoch", ctl, f"5x{n}"),
            series("hicache_ha_rank_up", i, f"1x{n}")]


def alert(name, d, severity, summary, rank=0, **extra):
    return {"exp_labels": {**ident(d, rank), "severity": severity, **extra},
            "exp_annotations": {"summary": summary, "runbook_url": f"{RUNBOOK_BASE}#{name.lower()}"}}


def run_promtool(tmp_path, tests):
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    doc = {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": tests}
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = subprocess.run([promtool(), "test", "rules", str(tmp_path / "rules.test.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def quiet(name, at="10m"):
    return {"eval_time": at, "alertname": name, "exp_alerts": []}


NAMES = ["HicacheHACircuitBroken", "HicacheHANoHealthyMember", "HicacheHAFailover", "HicacheHAStandbyUnavailable",
         "HicacheHAHighFailureRate", "HicacheHAAbandonedCallsPilingUp", "HicacheHAEpochMismatch",
         "HicacheHAControllerUnreachable"]


def without(items, name):
    return [s for s in items if not s["series"].startswith(name + "{")]


def test_the_rules_file_is_what_the_generator_renders_and_promtool_accepts():
    assert RULES.read_text() == render(RUNBOOK_BASE)
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0 and "8 rules found" in out.stdout, out.stdout + out.stderr


def test_two_healthy_deployments_raise_nothing(tmp_path):
    run_promtool(tmp_path, [{"interval": "15s", "input_series": healthy("a") + healthy("b"),
                             "alert_rule_test": [quiet(n) for n in NAMES]}])


def test_an_outage_on_one_deployment_fires_for_exactly_that_one(tmp_path):
    n = 160
    a = ident("a")
    # Deployment a: both members down on its rank 0, its epoch off the desired one, its rank 0 silent.
    outage = without(without(without(healthy("a"), "hicache_ha_backend_state"), "hicache_ha_active_epoch"),
                     "hicache_ha_rank_up") + [
        series("hicache_ha_backend_state", {**a, "backend": "primary", "state": "healthy"}, f"1x4 0x{n}"),
        series("hicache_ha_backend_state", {**a, "backend": "primary", "state": "circuit_broken"}, f"0x4 1x{n}"),
        series("hicache_ha_backend_state", {**a, "backend": "standby", "state": "healthy"}, f"1x4 0x{n}"),
        series("hicache_ha_active_epoch", a, f"5x4 6x{n}"),
        series("hicache_ha_rank_up", a, f"1x4 0x{n}"),
    ]
    run_promtool(tmp_path, [{"interval": "15s", "input_series": outage + healthy("b"), "alert_rule_test": [
        {"eval_time": "5m", "alertname": "HicacheHANoHealthyMember", "exp_alerts": [alert(
            "HicacheHANoHealthyMember", "a", "critical", "hicache-ha: rank 0 of a (ctl-a:18080) has no healthy storage "
            "member (L3 reads miss, writes are dropped)")]},
        {"eval_time": "5m", "alertname": "HicacheHACircuitBroken", "exp_alerts": [alert(
            "HicacheHACircuitBroken", "a", "warning", "hicache-ha: primary is circuit_broken on rank 0 of a (ctl-a:18080)",
            backend="primary", state="circuit_broken")]},
        {"eval_time": "5m", "alertname": "HicacheHAEpochMismatch", "exp_alerts": [alert(
            "HicacheHAEpochMismatch", "a", "critical", "hicache-ha: rank 0 of a (ctl-a:18080) is on epoch 6, not the "
            "desired one")]},
        {"eval_time": "5m", "alertname": "HicacheHAControllerUnreachable", "exp_alerts": [alert(
            "HicacheHAControllerUnreachable", "a", "critical", "hicache-ha: rank 0 of a (ctl-a:18080) has not reached "
            "the controller for a minute")]},
    ]}])


def test_a_failover_on_one_deployment_and_a_standby_it_no_longer_has(tmp_path):
    n = 160
    a = ident("a")
    moved = without(without(healthy("a"), "hicache_ha_failovers_total"), "hicache_ha_backend_active") + [
        series("hicache_ha_failovers_total", {**a, "reason": "failover"}, f"0x8 1x{n}"),
        series("hicache_ha_backend_active", {**a, "backend": "primary"}, f"1x8 0x{n}"),
        series("hicache_ha_backend_active", {**a, "backend": "standby"}, f"0x8 1x{n}"),
    ]
    moved = without(moved, "hicache_ha_backend_state") + [
        series("hicache_ha_backend_state", {**a, "backend": "primary", "state": "healthy"}, f"1x8 0x{n}"),
        series("hicache_ha_backend_state", {**a, "backend": "primary", "state": "circuit_broken"}, f"0x8 1x{n}"),
        series("hicache_ha_backend_state", {**a, "backend": "standby", "state": "healthy"}, f"1x{n + 8}"),
    ]
    run_promtool(tmp_path, [{"interval": "15s", "input_series": moved + healthy("b"), "alert_rule_test": [
        {"eval_time": "3m", "alertname": "HicacheHAFailover", "exp_alerts": [alert(
            "HicacheHAFailover", "a", "warning", "hicache-ha: rank 0 of a (ctl-a:18080) failed over (failover) in the "
            "last 5 minutes", reason="failover")]},
        {"eval_time": "4m", "alertname": "HicacheHAStandbyUnavailable", "exp_alerts": [alert(
            "HicacheHAStandbyUnavailable", "a", "warning", "hicache-ha: rank 0 of a (ctl-a:18080) has no healthy "
            "standby left to fail over to")]},
    ]}])


def test_failing_and_abandoned_calls_on_one_deployment(tmp_path):
    a = ident("a")
    bad = without(without(healthy("a"), "hicache_ha_ops_total"), "hicache_ha_abandoned_calls_total") + [
        series("hicache_ha_ops_total", {**a, "backend": "primary", "op": "get", "outcome": "ok"}, "0+10x160"),
        series("hicache_ha_ops_total", {**a, "backend": "primary", "op": "get", "outcome": "timeout"}, "0+5x160"),
        series("hicache_ha_abandoned_calls_total", {**a, "backend": "primary"}, "0+30x160"),
    ]
    run_promtool(tmp_path, [{"interval": "15s", "input_series": bad + healthy("b"), "alert_rule_test": [
        {"eval_time": "12m", "alertname": "HicacheHAHighFailureRate", "exp_alerts": [alert(
            "HicacheHAHighFailureRate", "a", "warning", "hicache-ha: 33.33% of calls to primary fail on rank 0 of a "
            "(ctl-a:18080)", backend="primary")]},
        {"eval_time": "12m", "alertname": "HicacheHAAbandonedCallsPilingUp", "exp_alerts": [alert(
            "HicacheHAAbandonedCallsPilingUp", "a", "warning", "hicache-ha: calls to primary on rank 0 of a "
            "(ctl-a:18080) keep missing their deadline", backend="primary")]},
    ]}])


def test_every_alert_has_severity_summary_and_an_absolute_runbook_link_to_a_section():
    runbooks = (ROOT / "docs" / "runbooks.md").read_text().lower()
    for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert "{{ $labels.deployment }}" in rule["annotations"]["summary"]
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://") and url.split("#")[0] == RUNBOOK_BASE
        assert re.search(rf"^#+ {url.split('#')[1]}\b", runbooks, re.M), f"no runbook section for {rule['alert']}"
    assert "runbook:" not in RULES.read_text()  # the standard key only
