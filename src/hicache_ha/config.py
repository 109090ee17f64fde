"""The configuration document: one YAML or JSON document, validated by pydantic.

Sources, later ones winning: the document (a file, or SGLang's ``extra_config["ha"]`` inline), then
environment overrides ``HICACHE_HA__<FIELD>__<SUBFIELD>=value`` (values parsed as YAML scalars).
Errors name the field and what is allowed; nothing is half-applied.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .backends import registry
from .backends.base import BackendConfig
from .backends.errors import ConfigError

ENV_PREFIX = "HICACHE_HA__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Deadlines(_Strict):
    """Per-op-kind deadlines in milliseconds: no engine call waits longer (plus 20 ms)."""

    exists: int = Field(default=50, ge=1, le=60_000)
    get: int = Field(default=500, ge=1, le=60_000)
    set: int = Field(default=1000, ge=1, le=60_000)
    clear: int = Field(default=2000, ge=1, le=600_000, description="SGLang's clear() (flush_cache) waits no longer")


class BulkheadConfig(_Strict):
    max_concurrent: int = Field(default=4, ge=1, le=256, description="worker threads per member")
    queue: int = Field(default=4, ge=0, le=1024, description="calls that may wait for a worker before new ones are refused")


# A timeout is not among them by default: on a busy host a big transfer runs out of its deadline while the
# backend is fine. Timeouts count as slow calls (health.slow_calls); a hung backend also stops answering
# health pings, and each unanswered ping is a failure.
FAILURE_DEFAULT = ("unavailable", "rejected", "corrupt", "error")
FAILURE_CHOICES = ("timeout", *FAILURE_DEFAULT)


class RateDetectorConfig(_Strict):
    threshold: float = Field(default=0.5, gt=0, le=1, description="fraction of calls in the window")
    window_ms: int = Field(default=1000, ge=10)
    min_calls: int = Field(default=10, ge=1, description="no verdict on fewer calls than this")


class SlowCallConfig(RateDetectorConfig):
    threshold: float = Field(default=0.8, gt=0, le=1)
    fraction_of_deadline: float = Field(default=0.8, gt=0, le=1, description="a call slower than this share of its deadline is slow")


class PingConfig(_Strict):
    interval_ms: int = Field(default=50, ge=5, description="health ping period of the active member")
    standby_interval_ms: int = Field(default=1000, ge=5, description="health ping period of the other members")
    timeout_ms: int = Field(default=100, ge=1, description="a ping unanswered this long is a failure, unless engine calls succeeded meanwhile")


class BackoffConfig(_Strict):
    base_ms: int = Field(default=500, ge=1)
    cap_ms: int = Field(default=30_000, ge=1)
    jitter: float = Field(default=0.5, ge=0, le=1, description="random share of each wait")
    decay_ms: int = Field(default=10_000, ge=1, description="each this long healthy, the backoff shrinks one step")


class RecoveryConfig(_Strict):
    probes: int = Field(default=3, ge=1, description="canary round trips that must pass")
    probe_interval_ms: int = Field(default=50, ge=1)
    probe_timeout_ms: int = Field(default=500, ge=1)
    trial_calls: int = Field(default=10, ge=0, description="engine calls let through while recovering")
    trial_failure_threshold: float = Field(default=0.5, gt=0, le=1,
                                           description="this share of failed trial calls sends it back to circuit_broken")
    time_limit_ms: int = Field(default=5000, ge=10, description="recovering longer than this → circuit_broken")


class HealthConfig(_Strict):
    failure_outcomes: list[str] = Field(default=list(FAILURE_DEFAULT), description="outcomes that count against a member")
    consecutive_failures: Optional[int] = Field(default=3, ge=1, description="null disables this detector")
    failure_rate: Optional[RateDetectorConfig] = Field(default_factory=RateDetectorConfig)
    slow_calls: Optional[SlowCallConfig] = Field(default_factory=SlowCallConfig)
    ping: PingConfig = Field(default_factory=PingConfig)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)

    @field_validator("failure_outcomes")
    @classmethod
    def _known_outcomes(cls, value: list[str]) -> list[str]:
        for name in value:
            if name == "short_circuited":
                raise ValueError("'short_circuited' cannot count as a failure: it is hicache-ha's own refusal "
                                 f"(breaker, bulkhead, fencing), not news about the backend; choose from "
                                 f"{', '.join(FAILURE_CHOICES)}")
            if name not in FAILURE_CHOICES:
                raise ValueError(f"{name!r} cannot count as a failure; choose from {', '.join(FAILURE_CHOICES)}")
        return value


class FailoverConfig(_Strict):
    enabled: bool = Field(default=True, description="move traffic off a tripped active member")
    failback: Literal["manual", "auto"] = "manual"
    failback_after_ms: int = Field(default=30_000, ge=0, description="auto failback once the primary stayed healthy this long")
    cluster_patience_ms: int = Field(default=3000, ge=0, description="wait this long for another instance of the same cluster before a standby")


class AdminConfig(_Strict):
    mode: Literal["embedded", "remote", "off"] = Field(
        default="embedded",
        description="embedded: the leader rank (TP0/PP0/DP0/CP0) serves the controller; remote: a standalone "
                    "`hicache-ha controller` does; off: no control plane (each rank fails over alone)")
    deployment: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                            description="this deployment's id: the agent channel's keys are bound to it, so "
                                        "deployments on one network never mix (give each its own)")
    host: str = Field(default="127.0.0.1", description="where the controller listens (HTTP and agents)")
    port: int = Field(default=18080, ge=0, le=65535, description="admin REST API port")
    agent_port: int = Field(default=18081, ge=0, le=65535, description="port the ranks' agents connect to")
    api_key_file: Optional[Path] = Field(
        default=None, description="file holding the admin key (never the key itself); every rank needs it too: "
                                  "the agent channel's keys derive from it")
    tls_cert_file: Optional[Path] = Field(default=None, description="serve the admin API over HTTPS with this certificate")
    tls_key_file: Optional[Path] = Field(default=None, description="the certificate's private key")
    expected_ranks: Optional[int] = Field(
        default=None, ge=1, description="ranks in the deployment (default: tp × pp × cp × dp, the DP size read "
                                        "from SGLang's parallel state)")
    attach_roots: list[Path] = Field(
        default_factory=list, description="directories under which backends attached over the API may keep files "
                                          "(none: no file-based backend can be attached over the API)")
    state_file: Optional[Path] = Field(
        default=None, description="where the desired state is kept (default: <private state dir>/state-<deployment>.json)")
    state_redis_url: Optional[str] = Field(default=None, description="keep the desired state in Redis instead (fleets)")
    lease_ms: int = Field(default=3000, ge=100, description="leadership lease of a controller; a standby takes over after it")
    prepare_ttl_ms: int = Field(default=60_000, ge=100, description="a prepared switch not committed by then is dropped by the rank")
    heartbeat_ms: int = Field(default=500, ge=10, description="agent heartbeat period")
    rank_timeout_ms: int = Field(default=3000, ge=50, description="a rank silent this long counts as missing")
    command_timeout_ms: int = Field(default=10_000, ge=10, description="how long the controller waits for a rank's answer")
    group_failover_timeout_ms: int = Field(default=1000, ge=0, description="a rank fails over alone if the controller has not moved the group by then")

    @model_validator(mode="after")
    def _tls_pair(self) -> "AdminConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("admin.tls_cert_file and admin.tls_key_file go together: give both or neither")
        return self


class WebhookConfig(_Strict):
    url: str = Field(pattern=r"^https?://", description="where events are POSTed")
    format: Literal["generic", "alertmanager"] = "generic"
    timeout_ms: int = Field(default=2000, ge=1, le=60_000)
    retries: int = Field(default=3, ge=0, le=20)
    backoff_ms: int = Field(default=200, ge=0, le=60_000, description="first retry delay, doubled each time")
    secret_file: Optional[Path] = Field(default=None, description="HMAC-SHA256 key: requests carry X-Hicache-HA-Signature")
    auth_header_file: Optional[Path] = Field(default=None, description="file holding an Authorization header value to send")


class ObserveConfig(_Strict):
    webhooks: list[WebhookConfig] = Field(default_factory=list, description="where transitions and switches are POSTed")
    webhook_queue: int = Field(default=1000, ge=1, le=100_000,
                               description="events waiting for delivery, per receiver; beyond, dropped and counted")
    metrics_port: Optional[int] = Field(default=None, ge=0, le=65535,
                                        description="serve this process's /metrics here (deployments without a controller)")
    metrics_host: str = Field(default="127.0.0.1", min_length=1,
                              description="address /metrics, /healthz and /readyz of metrics_port listen on "
                                          "(0.0.0.0 for a scraper or kubelet on another host; no key is asked)")


READ_FILES = ("api_key_file", "tls_cert_file", "tls_key_file", "password_file", "secret_file", "auth_header_file")


class HAConfig(_Strict):
    backends: list[BackendConfig] = Field(min_length=1, description="members in priority order: primary first")
    deadlines_ms: Deadlines = Field(default_factory=Deadlines)
    bulkhead: BulkheadConfig = Field(default_factory=BulkheadConfig)
    key_prefix: str = Field(default="hicache", pattern=r"^[A-Za-z0-9_.]{1,32}$")
    admin: AdminConfig = Field(default_factory=AdminConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    observe: ObserveConfig = Field(default_factory=ObserveConfig)

    @field_validator("backends", mode="before")
    @classmethod
    def _typed_backends(cls, value: Any) -> Any:
        """Validate each section with its own backend's model, so errors name that backend's fields."""
        if not isinstance(value, list):
            return value
        out = []
        for i, item in enumerate(value):
            if isinstance(item, BackendConfig):
                out.append(item)
                continue
            if not isinstance(item, Mapping):
                raise ValueError(f"backends[{i}] must be a mapping with at least 'name' and 'type'")
            type_name = item.get("type")
            if not isinstance(type_name, str):
                raise ValueError(
                    f"backends[{i}].type is required; one of: {', '.join(registry.known_types())}"
                )
            try:
                model = registry.config_model(type_name)
            except ConfigError as exc:
                raise ValueError(f"backends[{i}].type: {exc}") from exc
            try:
                out.append(model.model_validate(dict(item)))
            except ValidationError as exc:
                raise ValueError(f"backends[{i}] ({item.get('name', '?')}): {_describe(exc)}") from exc
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> "HAConfig":
        seen = set()
        for b in self.backends:
            if b.name in seen:
                raise ValueError(f"backends: name {b.name!r} is used twice; names must be unique")
            seen.add(b.name)
        return self

    @model_validator(mode="after")
    def _named_files_are_readable(self) -> "HAConfig":
        """A key, password or certificate file that cannot be read fails the load, naming the field."""
        sections = [("admin", self.admin)] + [(f"backends[{i}]", b) for i, b in enumerate(self.backends)] + \
                   [(f"observe.webhooks[{i}]", w) for i, w in enumerate(self.observe.webhooks)]
        for where, section in sections:
            for field in READ_FILES:
                path = getattr(section, field, None)
                if path is None:
                    continue
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise ValueError(f"{where}.{field}: cannot read {str(path)!r}: {exc.strerror}") from None
        return self

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)


_SECRET_NAME = re.compile(r"pass|secret|token|credential|(^|_)key$", re.IGNORECASE)


def effective_document(cfg: HAConfig) -> dict:
    """The whole effective document (every backend's own fields, every default) with secrets redacted:
    URL passwords and inline values under secret-looking names (``*_file`` paths are shown)."""
    from .backends.redis_backend import redact

    def walk(value: Any, name: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, name) for v in value]
        if isinstance(value, str):
            if _SECRET_NAME.search(name) and not name.endswith("_file"):
                return "***"
            return redact(value) if "://" in value else value
        return value

    return walk(cfg.model_dump(mode="json", serialize_as_any=True))


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(document)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(msg if msg.startswith(where) else f"{where}: {msg}")
    return "; ".join(parts)


def _set_path(doc: dict, path: list[str], value: Any, var: str) -> None:
    """Put ``value`` at ``path``; a list is indexed by position or by the ``name`` of its item."""
    node: Any = doc
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            index = next((j for j, item in enumerate(node) if isinstance(item, Mapping) and
                          str(item.get("name", "")).lower() == part), None)
            if index is None and part.isdigit():
                index = int(part)
            if index is None or index >= len(node):
                names = [str(item.get("name")) for item in node if isinstance(item, Mapping)]
                raise ConfigError(f"${var}: {where!r} names no item; use an index below {len(node)}"
                                  + (f" or a name: {', '.join(names)}" if names else ""))
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"${var}: {'.'.join(path[:i]) or 'the document'} is not a section")


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[list[str], Any]]:
    """``HICACHE_HA__a__b=value`` variables: name -> (path, value parsed as a YAML scalar)."""
    out = {}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            try:
                value = yaml.safe_load(environ[name])
            except yaml.YAMLError as exc:
                raise ConfigError(f"${name}: not a valid YAML value: {str(exc).splitlines()[0]}") from None
            out[name] = (name[len(ENV_PREFIX):].lower().split("__"), value)
    return out


def apply_env(doc: dict, overrides: Mapping[str, tuple[list[str], Any]]) -> dict:
    """Apply overrides (backends by index or by name: ``HICACHE_HA__BACKENDS__primary__URL``)."""
    for var, (path, value) in overrides.items():
        _set_path(doc, path, value, var)
    return doc


def parse(source: Any, *, environ: Optional[Mapping[str, str]] = None) -> HAConfig:
    """Validate a document (a mapping, or YAML/JSON text) into an HAConfig; raise ConfigError naming the
    field, and the environment variable when an override is what is wrong."""
    if isinstance(source, HAConfig):
        return source
    if isinstance(source, (str, bytes)):
        try:
            source = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config is not valid YAML/JSON: {exc}") from exc
    if not isinstance(source, Mapping):
        raise ConfigError("config must be a mapping with at least 'backends'")
    overrides = env_overrides(os.environ if environ is None else environ)
    try:
        return HAConfig.model_validate(apply_env(_plain(source), overrides))
    except ValidationError as exc:
        message = f"invalid hicache-ha config: {_describe(exc)}"
    culprits = [var for var in overrides if _valid(source, {k: v for k, v in overrides.items() if k != var})]
    if culprits:
        message += f" (from ${', $'.join(culprits)})"
    raise ConfigError(message)


def _valid(source: Mapping, overrides: Mapping) -> bool:
    try:
        HAConfig.model_validate(apply_env(_plain(source), overrides))
        return True
    except (ValidationError, ConfigError):
        return False


def load(path: str | os.PathLike, *, environ: Optional[Mapping[str, str]] = None) -> HAConfig:
    """Read and validate a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    return parse(text, environ=environ)


def _plain(value: Any) -> Any:
    """A fresh copy made of plain dicts and lists, so overrides never touch the caller's document."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
