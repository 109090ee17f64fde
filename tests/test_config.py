import json

import pytest

from hicache_ha.backends.errors import ConfigError
from hicache_ha.backends.redis_backend import RedisConfig
from hicache_ha.config import load, parse

YAML = """
backends:
  - name: primary
    type: redis
    url: redis://127.0.0.1:6379/0
  - name: standby
    type: file
    path: /var/cache/hicache
    capacity_bytes: 10GiB
deadlines_ms: {exists: 50, get: 500, set: 1000}
admin: {host: 127.0.0.1, port: 18080, api_key_file: KEYFILE}
"""


def test_the_design_example_parses_with_defaults(tmp_path):
    key = tmp_path / "admin.key"
    key.write_text("k" * 32)
    path = tmp_path / "ha.yaml"
    path.write_text(YAML.replace("KEYFILE", str(key)))
    cfg = load(path, environ={})
    assert [b.name for b in cfg.backends] == ["primary", "standby"]
    assert cfg.backends[1].capacity_bytes == 10 * 2**30
    assert cfg.deadlines_ms.get == 500
    assert cfg.bulkhead.max_concurrent == 4


def test_json_text_and_inline_dict_are_the_same_document():
    doc = {"backends": [{"name": "m", "type": "memory"}], "deadlines_ms": {"get": 200}}
    assert parse(json.dumps(doc), environ={}) == parse(doc, environ={})


def test_environment_overrides_win_and_leave_the_document_alone():
    doc = {"backends": [{"name": "p", "type": "redis", "url": "redis://a:1/0"}]}
    cfg = parse(doc, environ={"HICACHE_HA__DEADLINES_MS__GET": "120",
                              "HICACHE_HA__BACKENDS__0__URL": "redis://b:2/0"})
    assert cfg.deadlines_ms.get == 120
    assert cfg.backends[0].url == "redis://b:2/0"
    assert doc["backends"][0]["url"] == "redis://a:1/0"


@pytest.mark.parametrize("doc, words", [
    ({"backends": [{"name": "x", "type": "nope"}]}, ["backends[0].type", "unknown backend type 'nope'", "redis"]),
    ({"backends": [{"name": "x", "type": "file", "path": "/t", "colour": 1}]}, ["colour", "Extra inputs"]),
    ({"backends": [{"name": "x", "type": "file", "path": "/t"}], "deadlines_ms": {"get": "soon"}},
     ["deadlines_ms.get", "integer"]),
    ({"backends": [{"name": "x", "type": "file", "path": "/t"}], "deadlines_ms": {"get": 0}},
     ["deadlines_ms.get", "greater than or equal to 1"]),
    ({"backends": [{"name": "x", "type": "redis"}]}, ["exactly one of 'url', 'urls' or 'sentinel'"]),
    ({"backends": [{"name": "x", "type": "redis", "url": "http://h:1"}]}, ["scheme"]),
    ({"backends": [{"name": "x", "type": "redis", "sentinel": {"master": "m", "addresses": ["nohostport"]}}]},
     ["host:port"]),
    ({"backends": [{"name": "a", "type": "memory"}, {"name": "a", "type": "memory"}]}, ["used twice"]),
    ({"backends": []}, ["backends", "at least 1"]),
    ({"backends": [{"type": "memory"}]}, ["name", "Field required"]),
    ({"backends": [{"name": "bad name!", "type": "memory"}]}, ["name", "pattern"]),
    ({"backends": [{"name": "x", "type": "memory"}], "surprise": True}, ["surprise"]),
    ({"backends": [{"name": "x", "type": "os:path"}]}, ["not a hicache_ha.backends.Backend subclass"]),
    ({"backends": [{"name": "x", "type": "no_such_module_zz:Thing"}]}, ["cannot import module"]),
])
def test_invalid_documents_name_the_field(doc, words):
    with pytest.raises(ConfigError) as info:
        parse(doc, environ={})
    for word in words:
        assert word in str(info.value)


def test_a_module_class_plugin_is_a_valid_type():
    cfg = parse({"backends": [{"name": "g", "type": "tests.helpers:GateBackend"}]}, environ={})
    assert cfg.backends[0].type == "tests.helpers:GateBackend"


def test_unreadable_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_an_override_can_name_a_backend_and_a_wrong_one_names_the_variable():
    doc = {"backends": [{"name": "primary", "type": "redis", "url": "redis://a:1/0"},
                        {"name": "standby", "type": "memory"}]}
    cfg = parse(doc, environ={"HICACHE_HA__BACKENDS__primary__URL": "redis://b:2/0"})
    assert cfg.backends[0].url == "redis://b:2/0"
    with pytest.raises(ConfigError) as info:
        parse(doc, environ={"HICACHE_HA__BACKENDS__primray__URL": "redis://b:2/0"})
    assert "$HICACHE_HA__BACKENDS__primray__URL" in str(info.value) and "primary, standby" in str(info.value)
    with pytest.raises(ConfigError) as info:  # a valid path, an invalid value: the variable is named too
        parse(doc, environ={"HICACHE_HA__DEADLINES_MS__GET": "soon", "HICACHE_HA__KEY_PREFIX": "ok"})
    assert "deadlines_ms.get" in str(info.value) and "(from $HICACHE_HA__DEADLINES_MS__GET)" in str(info.value)
    with pytest.raises(ConfigError, match=r"\$HICACHE_HA__BACKENDS__0__URL__X: backends.0.url is not a section"):
        parse(doc, environ={"HICACHE_HA__BACKENDS__0__URL__X": "1"})
    with pytest.raises(ConfigError, match=r"deadlines_ms.get: .*\(from \$HICACHE_HA__DEADLINES_MS__GET__X\)"):
        parse(doc, environ={"HICACHE_HA__DEADLINES_MS__GET__X": "1"})


def test_valkey_is_redis_and_an_unknown_sglang_backend_is_refused():
    cfg = parse({"backends": [{"name": "v", "type": "valkey", "url": "redis://h:1/0"}]}, environ={})
    assert isinstance(cfg.backends[0], RedisConfig) and cfg.backends[0].socket_timeout_ms == 2000
    with pytest.raises(ConfigError) as info:
        parse({"backends": [{"name": "s", "type": "sglang", "backend": "moonckae"}]}, environ={})
    assert "moonckae" in str(info.value) and "mooncake" in str(info.value)


@pytest.mark.parametrize("section, field", [
    ("admin", "api_key_file"),
    ("backend", "password_file"),
    ("webhook", "secret_file"),
])
def test_a_named_file_that_cannot_be_read_fails_the_load_naming_the_field(tmp_path, section, field):
    missing = str(tmp_path / "nope")
    doc = {"backends": [{"name": "r", "type": "redis", "url": "redis://h:1/0"}]}
    where = {"admin": "admin", "backend": "backends[0]", "webhook": "observe.webhooks[0]"}[section]
    if section == "admin":
        doc["admin"] = {field: missing}
    elif section == "backend":
        doc["backends"][0][field] = missing
    else:
        doc["observe"] = {"webhooks": [{"url": "http://127.0.0.1:9/", field: missing}]}
    with pytest.raises(ConfigError) as info:
        parse(doc, environ={})
    assert f"{where}.{field}: cannot read {missing!r}" in str(info.value)
