"""deploy/kubernetes renders with kustomize and validates against the Kubernetes schemas (offline, strict).
The Prometheus Operator resources (ServiceMonitor, PrometheusRule), which those schemas do not cover,
validate against the schemas of the operator's own CRDs, as the PyPI package
cloudcoil-models-prometheus-operator (the [dev] extra) carries them: pydantic models generated from the
CRDs, whose JSON Schema is checked strictly as the API server's field validation is (an unknown field is
an error); and against what they must match: the Service they scrape and the rules
`hicache-ha alert-rules --kubernetes` prints."""

import copy
import functools
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hicache_ha.config import parse
from hicache_ha.observe.alerts import RUNBOOK_BASE, prometheus_rule

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.29.0", "1.33.0")  # a supported range of API servers
CRDS = {"ServiceMonitor", "PrometheusRule"}
CRD_MODELS = "cloudcoil-models-prometheus-operator"  # the PyPI package: a module per API version
CRD_GROUP = "monitoring.coreos.com"


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


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, apiversion: str) -> jsonschema.Draft202012Validator:
    """The schema of ``kind`` at ``apiversion`` (group/version) as a JSON Schema validator, from the pydantic
    model that cloudcoil-models-prometheus-operator generated from the operator's CRD. Kubernetes'
    structural schemas prune unknown fields and the API server's strict field validation (kubectl's
    default) refuses them: here an object with ``properties`` admits no other field, unless the schema
    says ``additionalProperties`` (a map). The models' ``Optional`` (a field one may leave out) is not a
    ``null`` the CRDs allow: it is dropped. The CRDs' CEL rules (``x-kubernetes-validations``) are not
    evaluated (these two CRDs have none)."""
    group, _, version = apiversion.partition("/")
    assert group == CRD_GROUP, f"{apiversion} is not the Prometheus Operator's group"
    try:
        module = importlib.import_module(f"cloudcoil.models.prometheus_operator.{version}")
    except ModuleNotFoundError as e:
        raise AssertionError(f"{e}: {CRD_MODELS} is missing or serves no {apiversion} "
                             "(`make install` installs it with the [dev] extra)") from None
    model = getattr(module, kind, None)
    assert model is not None, f"{CRD_MODELS} has no {kind} in {apiversion}"
    schema = model.model_json_schema(by_alias=True)
    defs = schema.pop("$defs", {})
    strict = _strict(schema)
    strict["$defs"] = {name: _strict(d) for name, d in defs.items()}
    jsonschema.Draft202012Validator.check_schema(strict)
    return jsonschema.Draft202012Validator(strict)


def _strict(schema):
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    alternatives = [s for s in schema.get("anyOf", ()) if s != {"type": "null"}]
    if "anyOf" in schema and len(alternatives) == 1:  # Optional[X]: X
        return _strict({**{k: v for k, v in schema.items() if k != "anyOf"}, **alternatives[0]})
    out = {k: _strict(v) for k, v in schema.items() if k not in ("title", "default")}
    if isinstance(schema.get("pattern"), str):  # Go's "^(?i)…" is Python's "(?i)^…"
        out["pattern"] = re.sub(r"^\^\(\?([a-zA-Z]+)\)", r"(?\1)^", schema["pattern"])
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def validate_custom(doc: dict, version: str) -> None:
    """A Prometheus Operator resource: its body against its CRD, its metadata as any ObjectMeta."""
    crd_validator(doc["kind"], doc["apiVersion"]).validate(doc)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, version,
                                 strict=True)


MAPS = {"labels", "annotations", "matchLabels"}  # string maps: any key is allowed there


def objects_in(doc, path=()):
    """The path of every object (not a map) in ``doc``."""
    if isinstance(doc, dict):
        if not path or path[-1] not in MAPS:
            yield path
        for key, value in doc.items():
            yield from objects_in(value, path + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from objects_in(value, path + (i,))


def test_the_crd_schemas_are_the_operators_and_strict(rendered):
    """Each kind's schema comes from the pinned package and names its own group, version and kind; an
    unknown field is refused in every object of the rendered resource, at every depth."""
    assert importlib.metadata.version(CRD_MODELS) == "0.80.1.0"  # as pyproject.toml pins it
    for kind in sorted(CRDS):
        doc = rendered[kind]
        validator = crd_validator(kind, doc["apiVersion"])
        assert validator.schema["properties"]["apiVersion"]["const"] == f"{CRD_GROUP}/v1"
        assert validator.schema["properties"]["kind"]["const"] == kind
        paths = list(objects_in(doc))
        assert {(), ("metadata",), ("spec",)} <= set(paths) and max(map(len, paths)) >= 3  # down to an endpoint, a rule
        for path in paths:
            broken = copy.deepcopy(doc)
            target = broken
            for key in path:
                target = target[key]
            target["notAField"] = "x"
            with pytest.raises(jsonschema.ValidationError, match="'notAField' was unexpected"):
                validator.validate(broken)


@pytest.mark.parametrize("version", VERSIONS)
def test_prometheus_operator_resources_validate_against_their_crds(rendered, version):
    for kind in sorted(CRDS):
        validate_custom(rendered[kind], version)


@pytest.mark.parametrize("kind, break_it, says", [
    pytest.param("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(prot="admin"), "'prot' was unexpected",
                 id="misspelt-field"),
    pytest.param("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"),
                 "'15 seconds' does not match", id="not-a-duration"),
    pytest.param("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(scheme="ftp"), "'ftp' is not one of",
                 id="not-in-enum"),
    pytest.param("ServiceMonitor", lambda d: d["spec"].pop("selector"), "'selector' is a required property",
                 id="required-selector"),
    pytest.param("ServiceMonitor", lambda d: d["metadata"].update(lables={"a": "b"}), "'lables' was unexpected",
                 id="objectmeta-strict"),
    pytest.param("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr"),
                 "'expr' is a required property", id="required-expr"),
    pytest.param("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update({"for": "1 minute"}),
                 "'1 minute' does not match", id="rule-for-not-a-duration"),
    pytest.param("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(severity="critical"),
                 "'severity' was unexpected", id="severity-outside-labels"),
    pytest.param("PrometheusRule", lambda d: d["spec"]["groups"][0].update(name=""), "should be non-empty",
                 id="empty-group-name"),
])
def test_the_crd_validation_would_catch_a_mistake(rendered, kind, break_it, says):
    broken = copy.deepcopy(rendered[kind])
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError), match=re.escape(says)):
        validate_custom(broken, VERSIONS[-1])


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
