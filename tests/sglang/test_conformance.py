"""HAStorage built by SGLang's real StorageBackendFactory passes the round trips SGLang's own HiCacheFile
passes. The same tests run against HiCacheFile itself, so they are known to test the right thing."""

import subprocess
import sys

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheFile
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from hicache_ha.backends.errors import ConfigError
from hicache_ha.sglang import HAStorage

from tests.sglang.conftest import build, storage_config
from tests.sglang.realpools import fill, mha_pool, pages_at

KINDS = ["sglang-file-baseline", "ha-sglang-file", "ha-redis", "ha-file"]


@pytest.fixture(params=KINDS)
def storage(request, tmp_path):
    kind = request.param
    if kind == "sglang-file-baseline":
        s = StorageBackendFactory.create_backend(
            "file", storage_config(0, 2, extra={"file_storage_path": str(tmp_path / "sg")}), None)
        assert isinstance(s, HiCacheFile)
        yield s
        return
    member = {
        "ha-sglang-file": {"name": "m", "type": "sglang", "backend": "file",
                           "extra_config": {"file_storage_path": str(tmp_path / "sg")}},
        "ha-redis": {"name": "m", "type": "redis", "url": request.getfixturevalue("redis_server").url}
        if kind == "ha-redis" else None,
        "ha-file": {"name": "m", "type": "file", "path": str(tmp_path / "ha")},
    }[kind]
    s = build({"backends": [member]})
    assert isinstance(s, HAStorage)
    yield s
    s.close()


def page(seed: int, n: int = 4096, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype)


def test_set_get_round_trip_into_a_target(storage):
    value = page(1)
    assert storage.set("key-1", value) is True
    target = torch.zeros_like(value)
    out = storage.get("key-1", target)
    assert out is not None and torch.equal(target, value)


def test_a_miss_is_none_and_false(storage):
    assert storage.get("absent", torch.zeros(4096, dtype=torch.bfloat16)) is None
    assert storage.exists("absent") is False


def test_exists_after_set(storage):
    storage.set("key-2", page(2))
    assert storage.exists("key-2") is True


def test_batches_round_trip_and_exists_counts_the_prefix(storage):
    keys = [f"batch-{i}" for i in range(8)]
    values = [page(10 + i) for i in range(8)]
    assert storage.batch_set(keys[:5], values[:5]) is True
    assert storage.batch_exists(keys) == 5
    targets = [torch.zeros_like(v) for v in values[:5]]
    got = storage.batch_get(keys[:5], targets)
    assert all(g is not None and torch.equal(t, v) for g, t, v in zip(got, targets, values))
    assert storage.batch_get(keys[5:6], [torch.zeros(4096, dtype=torch.bfloat16)]) == [None]


def test_tp_ranks_0_and_1_of_a_two_rank_config_are_built_by_sglang(tmp_path):
    for rank in (0, 1):
        s = build({"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}, tp_rank=rank)
        assert isinstance(s, HAStorage)
        assert s.manager.layout.tp_rank == rank and s.manager.layout.tp_size == 2
        assert s.set("k", page(rank)) is True
        s.close()


def test_v1_moves_pages_between_the_host_pool_and_storage(tmp_path):
    pool = mha_pool("page_first", torch.bfloat16)
    s = build({"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}, pool=pool)
    keys = ["v1-a", "v1-b", "v1-c"]
    written = pool.alloc(3 * pool.page_size)
    expected = fill(pool, written, seed=4)
    assert s.batch_set_v1(keys, written) == [True, True, True]
    target = pool.alloc(4 * pool.page_size)
    assert s.batch_get_v1(keys + ["v1-missing"], target) == [True, True, True, False]
    assert pages_at(pool, target)[:3] == expected
    assert s.manager.layout.dtype == "bfloat16" and s.manager.layout.page_bytes == 2 * 2 * 4 * 2 * 8 * 2
    assert s.ha_status()["backends"][0]["ops"]["get"]["ok"] == 1


def test_an_invalid_ha_config_fails_at_startup_with_the_field_named():
    with pytest.raises(ConfigError, match=r"deadlines_ms\.get"):
        build({"backends": [{"name": "m", "type": "memory"}], "deadlines_ms": {"get": -1}})


def test_a_missing_ha_config_says_where_to_put_it():
    cfg = storage_config(extra={"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang",
                                "class_name": "HAStorage"})
    with pytest.raises(ConfigError, match=r"extra_config\['ha'\]"):
        StorageBackendFactory.create_backend("dynamic", cfg, None)


def test_ha_config_can_be_a_file(tmp_path):
    path = tmp_path / "ha.yaml"
    path.write_text(f"admin: {{mode: \"off\"}}\nbackends:\n  - name: f\n    type: file\n    path: {tmp_path / 'pages'}\n")
    cfg = storage_config(extra={"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang",
                                "class_name": "HAStorage", "ha_config": str(path)})
    s = StorageBackendFactory.create_backend("dynamic", cfg, None)
    try:
        assert s.manager.members["f"].backend.root == tmp_path / "pages"
    finally:
        s.close()


def test_importing_hicache_ha_needs_neither_torch_nor_sglang():
    code = ("import sys, hicache_ha, hicache_ha.dataplane, hicache_ha.sim.engine, hicache_ha.cli; "
            "bad = [m for m in ('torch', 'sglang') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
