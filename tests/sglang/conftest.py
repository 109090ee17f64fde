import pytest
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

DYNAMIC = {"backend_name": "hicache_ha", "module_path": "hicache_ha.sglang", "class_name": "HAStorage"}


def storage_config(tp_rank=0, tp_size=2, *, mla=False, extra=None, model="test/model"):
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=True, model_name=model,
        extra_config=extra,
    )


_BUILT: list = []


def build(ha: dict, tp_rank=0, tp_size=2, *, mla=False, pool=None, model="test/model"):
    """HAStorage exactly as SGLang builds it: its own factory, the dynamic hook, then the host pool."""
    ha = {"admin": {"mode": "off"}, **ha}  # these tests are about one rank's data plane
    cfg = storage_config(tp_rank, tp_size, mla=mla, extra={**DYNAMIC, "ha": ha}, model=model)
    storage = StorageBackendFactory.create_backend("dynamic", cfg, None)
    _BUILT.append(storage)
    if pool is not None:
        storage.register_mem_pool_host(pool)
    return storage


@pytest.fixture
def fast_deadlines():
    return {"exists": 40, "get": 80, "set": 120}
