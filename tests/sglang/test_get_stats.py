"""``get_stats`` as SGLang's scheduler uses it with --enable-metrics: UnifiedRadixCache's own
``check_hicache_events`` hands the result to SGLang's ``StorageMetricsCollector``, every step."""

from types import SimpleNamespace

import prometheus_client
import pytest
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.observability.metrics_collector import StorageMetrics, StorageMetricsCollector

from hicache_ha.sglang import HAStorage
from hicache_ha.sglang.compat import TESTED_SGLANG, check_sglang_version
from tests.sglang.conftest import DYNAMIC, _BUILT, storage_config
from tests.sglang.realpools import fill, mha_pool

LABELS = {"model_name": "hicache-ha-test"}


@pytest.fixture(scope="module")
def collector():
    return StorageMetricsCollector(labels=LABELS)  # registers SGLang's histograms once per process


def build_with_metrics(enabled: bool, pool):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    cfg = storage_config(extra={**DYNAMIC, "ha": {"admin": {"mode": "off"},
                                                  "backends": [{"name": "m", "type": "memory"}]}})
    cfg.enable_storage_metrics = enabled
    s = StorageBackendFactory.create_backend("dynamic", cfg, None)
    _BUILT.append(s)
    s.register_mem_pool_host(pool)
    return s


def scheduler_step(storage, collector):
    """One scheduler step's storage-metrics part, run by SGLang's own method."""
    fake = SimpleNamespace(
        linker=None, _drain_async_work=lambda: None, flush_pending_backups=lambda: None,
        _sync_hicache_ready_counts=lambda: (0, 0, [], []), writing_check=lambda finish_count: None,
        loading_check=lambda finish_count: None, enable_storage=False, buffer_pipeline=None,
        enable_storage_metrics=True, storage_metrics_collector=collector,
        cache_controller=SimpleNamespace(storage_backend=storage), prefetch_outcome_stats_snapshot=lambda: {},
    )
    UnifiedRadixCache.check_hicache_events(fake)


def sample(name):
    return prometheus_client.REGISTRY.get_sample_value(name, LABELS) or 0.0


def test_sglangs_metrics_code_takes_what_get_stats_returns_step_after_step(collector):
    pool = mha_pool()
    s = build_with_metrics(True, pool)
    assert isinstance(s, HAStorage)
    slots = pool.alloc(3 * pool.page_size)
    fill(pool, slots, seed=1)
    before = sample("sglang:backup_pgs_count"), sample("sglang:prefetch_pgs_sum")
    assert s.batch_set_v1(["a", "b", "c"], slots) == [True] * 3
    assert s.batch_get_v1(["a", "b", "c"], pool.alloc(3 * pool.page_size)) == [True] * 3
    for _ in range(3):  # every step; the calls are reported once
        scheduler_step(s, collector)
    assert sample("sglang:backup_pgs_count") == before[0] + 1
    assert sample("sglang:prefetch_pgs_sum") == before[1] + 3
    stats = s.get_stats()
    assert isinstance(stats, StorageMetrics) and stats.prefetch_pgs == [] and stats.backup_pgs == []
    assert s.ha_status()["backends"][0]["ops"]["get"]["ok"] == 1  # hicache-ha's own view, separately


def test_without_metrics_get_stats_is_none_and_the_engine_path_counts_nothing(collector):
    s = build_with_metrics(False, mha_pool())
    s.batch_exists(["a"])
    assert s.get_stats() is None
    scheduler_step(s, collector)  # SGLang substitutes an empty StorageMetrics for None


def test_a_warning_names_the_tested_versions_for_any_other_sglang():
    assert check_sglang_version(TESTED_SGLANG[0]) is None
    message = check_sglang_version("0.6.0")
    assert "0.6.0" in message and ", ".join(TESTED_SGLANG) in message
