"""SGLang's own storage unit tests (test/registered/unit/mem_cache/test_hicache_storage_unit.py and
test_hicache_file_prefix.py), adapted only to build the storage under test: HAStorage over each kind of
member, and SGLang 0.5.23's HiCacheFile itself as the baseline that shows they test the right thing.

Adaptations, all of the setup: the storage is built by SGLang's factory; the mocked host pools of the
v2 tests are registered before use (SGLang's hybrid controller always registers them); a pool's pages
are written through ``batch_set_v2`` (HiCacheFile's on-disk naming, ``set("<hash>.<pool>")``, is an
internal). Left out as HiCacheFile internals: key suffixes and file paths, the evictor, the metadata
cache, "a second set does not overwrite" (HiCacheFile's shortcut for content-addressed keys; hicache-ha
writes again, which also repairs a page that failed verification), and ``batch_set`` calling ``set``.
``PoolTransferResult``'s own tests test SGLang's class, not a backend. Expectations that 0.5.23's
HiCacheFile does not meet (the pre-intersection v2 rule) are not ported.
"""

from unittest.mock import MagicMock

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, PoolHitPolicy, PoolName, PoolTransfer
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from tests.sglang.conftest import build, storage_config

KINDS = ["sglang-hicachefile-baseline", "ha-memory", "ha-file", "ha-redis", "ha-sglang-file"]


def _make_host_pool(page_size: int = 1, page_numel: int = 4) -> MagicMock:
    """SGLang's test helper, verbatim: a mock host pool with float32 pages."""
    pool = MagicMock()
    pool.page_size = page_size
    pool.get_dummy_flat_data_page.return_value = torch.zeros(page_numel, dtype=torch.float32)
    pool.get_data_page.return_value = torch.ones(page_numel, dtype=torch.float32)
    return pool


@pytest.fixture(params=KINDS)
def storage(request, tmp_path):
    kind = request.param
    if kind == "sglang-hicachefile-baseline":
        s = StorageBackendFactory.create_backend(
            "file", storage_config(0, 1, extra={"file_storage_path": str(tmp_path / "sg")},
                                   model="meta-llama/Llama-3.2-1B"), None)
        assert isinstance(s, HiCacheFile)
        return s
    member = {
        "ha-memory": {"name": "m", "type": "memory"},
        "ha-file": {"name": "m", "type": "file", "path": str(tmp_path / "ha")},
        "ha-redis": {"name": "m", "type": "redis", "url": request.getfixturevalue("redis_server").url}
        if kind == "ha-redis" else None,
        "ha-sglang-file": {"name": "m", "type": "sglang", "backend": "file",
                           "extra_config": {"file_storage_path": str(tmp_path / "sg")}},
    }[kind]
    return build({"backends": [member]}, tp_rank=0, tp_size=1, model="meta-llama/Llama-3.2-1B")


def register(storage, *names, page_size=1):
    pools = {}
    for name in names:
        pools[name] = _make_host_pool(page_size=page_size)
        storage.register_mem_host_pool_v2(pools[name], name)
    return pools


def write_component(storage, key, pool_name):
    """Store page ``key`` of ``pool_name`` the way SGLang's hybrid controller does: batch_set_v2."""
    out = storage.batch_set_v2([PoolTransfer(name=pool_name, keys=[key], host_indices=torch.arange(1))])
    assert out[pool_name] == [True]


# -- TestHiCacheFileIO (interface behaviour) -----------------------------------------------------------
T = torch.randn(4, dtype=torch.float32, generator=torch.Generator().manual_seed(0))


def test_exists_returns_false_for_missing_key(storage):
    assert storage.exists("missing") is False


def test_set_then_exists_returns_true(storage):
    assert storage.set("k", T) is True
    assert storage.exists("k") is True


def test_get_returns_none_for_missing_key(storage):
    assert storage.get("missing", torch.zeros(4)) is None


def test_set_then_get_roundtrip(storage):
    storage.set("k", T)
    target = torch.zeros(4)
    out = storage.get("k", target)
    assert out is not None and torch.equal(target, T)


def test_clear_removes_all_pages(storage):
    storage.set("a", T)
    storage.set("b", T)
    storage.clear()
    assert storage.exists("a") is False and storage.exists("b") is False


def test_batch_exists_returns_zero_when_all_missing(storage):
    assert storage.batch_exists(["a", "b", "c"]) == 0


def test_batch_exists_returns_contiguous_prefix_count(storage):
    for k in ("a", "b", "d"):
        storage.set(k, T)
    assert storage.batch_exists(["a", "b", "c", "d"]) == 2


def test_batch_exists_returns_full_count_when_all_present(storage):
    for k in ("a", "b", "c"):
        storage.set(k, T)
    assert storage.batch_exists(["a", "b", "c"]) == 3


# -- TestHiCacheFileBatchV1 (the legacy batch calls) ---------------------------------------------------
def test_batch_set_writes_all_and_returns_true(storage):
    assert storage.batch_set(["a", "b"], [T, T * 2]) is True
    assert storage.batch_exists(["a", "b"]) == 2


def test_batch_get_roundtrip(storage):
    storage.batch_set(["a", "b"], [T, T * 2])
    targets = [torch.zeros(4), torch.zeros(4)]
    out = storage.batch_get(["a", "b"], targets)
    assert all(o is not None for o in out)
    assert torch.equal(targets[0], T) and torch.equal(targets[1], T * 2)


def test_batch_get_missing_key_returns_none(storage):
    storage.set("a", T)
    out = storage.batch_get(["a", "missing"], [torch.zeros(4), torch.zeros(4)])
    assert out[0] is not None and out[1] is None


# -- TestHiCacheFileBatchV2IO --------------------------------------------------------------------------
def test_batch_set_v2_writes_pages_and_returns_true_flags(storage):
    register(storage, PoolName.KV)
    out = storage.batch_set_v2([PoolTransfer(name=PoolName.KV, keys=["k1", "k2"], host_indices=torch.arange(2))])
    assert out == {PoolName.KV: [True, True]}
    assert storage.exists("k1") is True


def test_batch_get_v2_reads_pages_and_calls_set_from_flat(storage):
    pools = register(storage, PoolName.KV, page_size=2)
    storage.batch_set_v2([PoolTransfer(name=PoolName.KV, keys=["k1", "k2"], host_indices=torch.tensor([0, 1, 2, 3]))])
    out = storage.batch_get_v2([PoolTransfer(name=PoolName.KV, keys=["k1", "k2"],
                                             host_indices=torch.tensor([10, 11, 20, 21]))])
    assert out == {PoolName.KV: [True, True]}
    offsets = [c.args[0] for c in pools[PoolName.KV].set_from_flat_data_page.call_args_list]
    assert offsets == [10, 20] and all(isinstance(o, int) for o in offsets)


def test_batch_get_v2_returns_false_for_missing_page(storage):
    pools = register(storage, PoolName.KV)
    out = storage.batch_get_v2([PoolTransfer(name=PoolName.KV, keys=["missing"], host_indices=torch.arange(1))])
    assert out == {PoolName.KV: [False]}
    pools[PoolName.KV].set_from_flat_data_page.assert_not_called()


def test_batch_io_v2_returns_false_list_on_index_length_mismatch(storage):
    register(storage, PoolName.KV, page_size=2)
    out = storage.batch_set_v2([PoolTransfer(name=PoolName.KV, keys=["a", "b"], host_indices=torch.arange(3))])
    assert out == {PoolName.KV: [False, False]}


def test_batch_io_v2_get_returns_false_list_on_index_length_mismatch(storage):
    register(storage, PoolName.KV, page_size=2)
    out = storage.batch_get_v2([PoolTransfer(name=PoolName.KV, keys=["a", "b"], host_indices=torch.arange(3))])
    assert out == {PoolName.KV: [False, False]}


def test_batch_set_v2_multiple_transfers_processed_independently(storage):
    register(storage, PoolName.KV, PoolName.MAMBA)
    out = storage.batch_set_v2([
        PoolTransfer(name=PoolName.KV, keys=["a", "b"], host_indices=torch.arange(2)),
        PoolTransfer(name=PoolName.MAMBA, keys=["a"], host_indices=torch.arange(3)),  # wrong length
    ])
    assert out == {PoolName.KV: [True, True], PoolName.MAMBA: [False]}


# -- TestBatchExistsV2 ---------------------------------------------------------------------------------
def _kv(storage, *keys):
    for k in keys:
        storage.set(k, T)


def _pool_transfer(name, policy, keys=None):
    return PoolTransfer(name=name, keys=keys, hit_policy=policy)


def test_kv_only_all_missing(storage):
    r = storage.batch_exists_v2(["a", "b"])
    assert r.kv_hit_pages == 0 and r.extra_pool_hit_pages == {}


def test_kv_only_full_prefix(storage):
    _kv(storage, "a", "b", "c", "d")
    assert storage.batch_exists_v2(["a", "b", "c", "d"]).kv_hit_pages == 4


def test_kv_only_partial_prefix(storage):
    _kv(storage, "a", "b", "d")
    assert storage.batch_exists_v2(["a", "b", "c", "d"]).kv_hit_pages == 2


def test_all_pages_pool_shrinks_prefix_when_pool_page_missing(storage):
    register(storage, "dsa")
    _kv(storage, "a", "b", "c")
    for k in ("a", "b"):
        write_component(storage, k, "dsa")
    r = storage.batch_exists_v2(["a", "b", "c"], [_pool_transfer("dsa", PoolHitPolicy.ALL_PAGES)])
    assert r.kv_hit_pages == 2


def test_all_pages_pool_full_match(storage):
    register(storage, "dsa")
    _kv(storage, "a", "b", "c")
    for k in ("a", "b", "c"):
        write_component(storage, k, "dsa")
    r = storage.batch_exists_v2(["a", "b", "c"], [_pool_transfer("dsa", PoolHitPolicy.ALL_PAGES)])
    assert r.kv_hit_pages == 3


def test_all_pages_pool_does_not_expand_beyond_kv(storage):
    register(storage, "dsa")
    _kv(storage, "a", "b")
    for k in ("a", "b", "c"):
        write_component(storage, k, "dsa")
    r = storage.batch_exists_v2(["a", "b", "c"], [_pool_transfer("dsa", PoolHitPolicy.ALL_PAGES)])
    assert r.kv_hit_pages == 2


def test_trailing_pages_only_last_n_required(storage):
    register(storage, PoolName.MAMBA)
    _kv(storage, "a", "b", "c", "d")
    for k in ("c", "d"):
        write_component(storage, k, PoolName.MAMBA)
    r = storage.batch_exists_v2(["a", "b", "c", "d"], [_pool_transfer(PoolName.MAMBA, PoolHitPolicy.TRAILING_PAGES,
                                                                      ["c", "d"])])
    assert r.kv_hit_pages == 4


def test_trailing_pages_partial_prefix_when_tail_absent(storage):
    register(storage, PoolName.MAMBA)
    _kv(storage, "a", "b", "c", "d")
    write_component(storage, "b", PoolName.MAMBA)
    r = storage.batch_exists_v2(["a", "b", "c", "d"], [_pool_transfer(PoolName.MAMBA, PoolHitPolicy.TRAILING_PAGES,
                                                                      ["d"])])
    assert r.kv_hit_pages == 2


def test_trailing_pages_zero_when_no_mamba_at_all(storage):
    register(storage, PoolName.MAMBA)
    _kv(storage, "a", "b")
    r = storage.batch_exists_v2(["a", "b"], [_pool_transfer(PoolName.MAMBA, PoolHitPolicy.TRAILING_PAGES, ["b"])])
    assert r.kv_hit_pages == 0


def test_no_kv_hit_skips_pool_evaluation(storage):
    register(storage, PoolName.MAMBA)
    write_component(storage, "a", PoolName.MAMBA)
    r = storage.batch_exists_v2(["a"], [_pool_transfer(PoolName.MAMBA, PoolHitPolicy.TRAILING_PAGES, ["a"])])
    assert r.kv_hit_pages == 0 and r.extra_pool_hit_pages == {}


def test_empty_keys_returns_zero_hit(storage):
    r = storage.batch_exists_v2([])
    assert r.kv_hit_pages == 0 and r.restorable_prefix_pages == []


def test_kv_zero_hit_does_not_include_kv_in_hit_count(storage):
    r = storage.batch_exists_v2(["a"])
    assert PoolName.KV not in r.extra_pool_hit_pages


# -- TestHiCacheFilePrefix: restorable_prefix_pages is the intersection, whatever the pool order ---------
PREFIX_CASES = {
    "aligned_checkpoints": ({1, 2, 3}, [(PoolName.SWA, {3}, "trailing", 1), (PoolName.MAMBA, {3}, "trailing", 1)], [3], 3),
    "disjoint_checkpoints": ({1, 2, 3}, [(PoolName.SWA, {3}, "trailing", 1), (PoolName.MAMBA, {2}, "trailing", 1)], [], 3),
    "non_contiguous_stop_points": ({1, 2, 3}, [(PoolName.MAMBA, {1, 3}, "trailing", 1)], [1, 3], 3),
    "earlier_common_checkpoint": ({1, 2, 3}, [(PoolName.SWA, {1, 3}, "trailing", 1),
                                              (PoolName.MAMBA, {1, 2}, "trailing", 1)], [1], 3),
    "all_pages_truncates_trailing_pool": ({1, 2, 3}, [(PoolName.INDEXER, {1, 2}, "all", 3),
                                                      (PoolName.MAMBA, {1, 3}, "trailing", 1)], [1], 3),
    "multi_page_window_with_holes": ({1, 2, 3, 4, 5}, [(PoolName.SWA, {1, 2, 4, 5}, "trailing", 2),
                                                       (PoolName.MAMBA, {2, 4}, "trailing", 1)], [2], 5),
    "prefix_shorter_than_window": ({1, 2}, [(PoolName.SWA, {1, 2}, "trailing", 3)], [1, 2], 3),
    "kv_hole_limits_auxiliary_hits": ({1, 3}, [(PoolName.MAMBA, {3}, "trailing", 1)], [], 3),
    "kv_only": ({1, 3}, [], [1], 3),
    "kv_only_empty": (set(), [], [], 3),
    "no_pages": (set(), [], [], 0),
}


@pytest.mark.parametrize("case", list(PREFIX_CASES))
@pytest.mark.parametrize("reverse", [False, True])
def test_restorable_prefix_pages(storage, case, reverse):
    kv_pages, pools, expected, num_pages = PREFIX_CASES[case]
    keys = [f"page{i}" for i in range(1, num_pages + 1)]
    register(storage, *[name for name, *_ in pools])
    for page in kv_pages:
        storage.set(keys[page - 1], T)
    for name, pages, _policy, _window in pools:
        for page in pages:
            write_component(storage, keys[page - 1], name)
    policies = {"trailing": PoolHitPolicy.TRAILING_PAGES, "all": PoolHitPolicy.ALL_PAGES}
    transfers = [PoolTransfer(name=name, keys=keys[-window:], hit_policy=policies[policy])
                 for name, _pages, policy, window in pools]
    if reverse:
        transfers.reverse()
    for _ in range(2):  # the second query is served warm
        result = storage.batch_exists_v2(keys, transfers)
        assert result.kv_hit_pages == max(expected, default=0)
        assert result.restorable_prefix_pages == expected
