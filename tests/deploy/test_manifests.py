"""deploy/kubernetes renders with kustomize and validates against the Kubernetes schemas (offline, strict);
the Prometheus Operator resources, which those schemas do not cover, are checked against what they must
match: the Service they scrape and the rules `hicache-ha alert-rules --kubernetes` prints."""

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from hicache_ha.config import parse
from hicache_ha.observe.alerts import RUNBOOK_BASE, prometheus_rule

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.29.0", "1.33.0")  # a supported range of API servers
CRDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def rendered():
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing (make test-tools installs Debian's kubernetes-client)"
    out = subprocess.run([kubectl, "kustomize", str(KUSTOMIZATION)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {d["kind"]: d for d in docs}


def test_every_piece_is_there_in_one_namespace(rendered):
    assert set(rendered) == {"ConfigMap", "Secret", "Deployment", "Service", "ServiceMonitor", "NetworkPolicy",
                             "PrometheusRule"}
    assert {d["metadata"]["namespace"] for d in rendered.values()} == {"llm"}


@pytest.mark.parametrize("version", VERSIONS)
def test_built_in_resources_validate_strictly(rendered, version):
    for kind, doc in rendered.items():
        if kind not in CRDS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_would_catch_a_mistake(rendered):
    broken = copy.deepcopy(rendered["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = "admin"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_pieces_refer_to_each_other(rendered):
    deploy, service, monitor, policy = (rendered[k] for k in ("Deployment", "Service", "ServiceMonitor",
                                                              "NetworkPolicy"))
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["selector"].items() <= labels.items()
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(port_names)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert set(port_names.values()) <= allowed
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == rendered["ConfigMap"]["metadata"]["name"]
    assert volumes["secret"]["secret"]["secretName"] == rendered["Secret"]["metadata"]["name"]


def test_the_configmap_is_a_valid_config_with_the_secret_mounted(rendered, tmp_path):
    """ha.yaml loads as the controller would, the Secret's keys standing where the pod mounts them."""
    mounts = {m["name"]: m["mountPath"] for m in rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]
              ["volumeMounts"]}
    text = rendered["ConfigMap"]["data"]["ha.yaml"]
    for key, value in rendered["Secret"]["stringData"].items():
        (tmp_path / key).write_text(value)
    cfg = parse(text.replace(mounts["secret"] + "/", f"{tmp_path}/"),
                environ={"HICACHE_HA__ADMIN__HOST": "0.0.0.0"})
    service_ports = {p["name"]: p["port"] for p in rendered["Service"]["spec"]["ports"]}
    assert (cfg.admin.mode, cfg.admin.port, cfg.admin.agent_port) == ("remote", service_ports["admin"],
                                                                     service_ports["agents"])
    assert cfg.admin.state_redis_url, "two controller replicas need the shared (Redis) state for one leader"


def test_the_prometheusrule_is_what_alert_rules_prints(rendered):
    printed = yaml.safe_load(prometheus_rule(RUNBOOK_BASE))
    assert rendered["PrometheusRule"]["spec"] == printed["spec"]
    assert rendered["PrometheusRule"]["apiVersion"] == "monitoring.coreos.com/v1"
