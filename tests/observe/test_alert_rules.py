"""The alert rules, checked and unit-tested with promtool (firing on a failover, quiet in steady state)."""

import re
import shutil
import subprocess
from pathlib import Path

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool():
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (make test does it)"
    return path


def test_rules_are_valid():
    out = subprocess.run([promtool(), "check", "rules", str(RULES / "hicache-ha-rules.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 rules found" in out.stdout


def test_rules_fire_on_failover_and_stay_quiet_in_steady_state():
    out = subprocess.run([promtool(), "test", "rules", str(RULES / "hicache-ha-rules.test.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_severity_summary_and_a_runbook_in_the_readme():
    import yaml

    readme = (RULES.parents[1] / "README.md").read_text().lower()
    rules = yaml.safe_load((RULES / "hicache-ha-rules.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        anchor = rule["annotations"]["runbook"].split("#")[1]
        assert re.search(rf"^#+ {anchor}\b", readme, re.M), f"no runbook section for {rule['alert']}"
