"""One contract, run against every built-in backend on real storage (a real redis-server, a real directory)."""

import pytest

from hicache_ha.backends import registry
from hicache_ha.backends.base import BackendContext
from hicache_ha.config import parse


@pytest.fixture(params=["memory", "file", "redis"])
def backend(request, tmp_path):
    spec = {"name": "b", "type": request.param}
    if request.param == "file":
        spec["path"] = str(tmp_path / "pages")
    if request.param == "redis":
        spec["url"] = request.getfixturevalue("redis_server").url
    cfg = parse({"backends": [spec]}, environ={}).backends[0]
    b = registry.resolve(cfg.type).from_config(cfg, BackendContext())
    yield b
    b.close()


def test_set_then_get_returns_the_same_bytes(backend):
    keys = [f"p-{i}" for i in range(128)]
    values = [bytes([i]) * 4096 for i in range(128)]
    backend.set(keys, values)
    assert [bytes(v) for v in backend.get(keys)] == values


def test_a_miss_is_none_and_exists_counts_the_leading_run(backend):
    backend.set(["a", "b", "d"], [b"1", b"2", b"4"])
    assert backend.get(["a", "c"])[1] is None
    assert backend.exists(["a", "b", "c", "d"]) == 2
    assert backend.exists(["c", "a"]) == 0
    assert backend.exists([]) == 0


def test_header_and_payload_pairs_are_stored_as_one_page(backend):
    backend.set(["k"], [(b"head-", memoryview(b"payload"))])
    assert bytes(backend.get(["k"])[0]) == b"head-payload"


def test_probe_round_trips(backend):
    backend.probe()


def test_clear_removes_only_the_prefix(backend):
    backend.set(["mine-1", "mine-2", "theirs-1"], [b"a", b"b", b"c"])
    backend.clear("mine-")
    assert backend.get(["mine-1", "mine-2", "theirs-1"])[:2] == [None, None]
    assert bytes(backend.get(["theirs-1"])[0]) == b"c"


def test_builtins_are_registered():
    assert {"redis", "file", "memory", "sglang"} <= set(registry.known_types())
