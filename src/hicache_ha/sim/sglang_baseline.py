"""The unprotected baseline on SGLang's real controller: a storage backend that calls redis-py directly,
as a backend without HA does (no deadline, no breaker, no standby; redis-py's own defaults). Built by
SGLang's factory through the ``dynamic`` hook, with ``extra_config["redis_url"]``; v1 and legacy calls.
Its exceptions reach SGLang's controller, which logs them and counts zero hits."""

from __future__ import annotations

from typing import Any, List, Optional

import redis
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

DYNAMIC_BASELINE = {"backend_name": "baseline", "module_path": "hicache_ha.sim.sglang_baseline",
                    "class_name": "DirectRedisStorage"}


class DirectRedisStorage(HiCacheStorage):
    def __init__(self, storage_config, kwargs: Optional[dict] = None) -> None:
        self.client = redis.Redis.from_url(storage_config.extra_config["redis_url"])
        self.prefix = f"baseline-{storage_config.tp_rank}-"
        self.mem_pool_host = None

    def _keys(self, keys: List[str]) -> list[str]:
        return [self.prefix + k for k in keys]

    def batch_exists(self, keys: List[str], extra_info: Optional[Any] = None) -> int:
        pipe = self.client.pipeline(transaction=False)
        for k in self._keys(keys):
            pipe.exists(k)
        found = pipe.execute()
        return next((i for i, f in enumerate(found) if not f), len(keys))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> list:
        pool = self.mem_pool_host
        pipe = self.client.pipeline(transaction=False)
        for k, slot in zip(self._keys(keys), host_indices[:: pool.page_size].tolist()):
            pipe.set(k, pool.get_data_page(slot, flat=True).contiguous().view(torch.uint8).numpy().tobytes())
        pipe.execute()
        return [True] * len(keys)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> list:
        pool = self.mem_pool_host
        dtype = pool.get_dummy_flat_data_page().dtype
        out = []
        for blob, slot in zip(self.client.mget(self._keys(keys)), host_indices[:: pool.page_size].tolist()):
            if blob is None:
                out.append(False)
                continue
            pool.set_from_flat_data_page(slot, torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype))
            out.append(True)
        return out

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        pipe = self.client.pipeline(transaction=False)
        for k, v in zip(self._keys(keys), values):
            pipe.set(k, v.contiguous().view(torch.uint8).numpy().tobytes())
        pipe.execute()
        return True

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        out = []
        for blob, target in zip(self.client.mget(self._keys(keys)), target_locations):
            if blob is None:
                out.append(None)
                continue
            target.view(torch.uint8).reshape(-1).copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            out.append(target)
        return out

    def get(self, key, target_location=None, target_sizes=None):
        return self.batch_get([key], [target_location])[0]

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        return self.batch_set([key], [value])

    def close(self) -> None:
        self.client.close()
