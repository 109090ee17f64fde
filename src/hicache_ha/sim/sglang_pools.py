"""SGLang's host pools on CPU, built as its pool assembler builds them (``pin_memory=False``): MHA, MLA, and
the group of a hybrid model (KV, SWA state, indexer)."""

from __future__ import annotations

from typing import Any

PAGE = 4  # tokens per page


def mha_pools(layout: str = "page_first", dtype: Any = None, *, tokens: int = 64, page: int = PAGE, heads: int = 2,
              head_dim: int = 8, layers: int = 2):
    """(device pool, host pool), built as SGLang's pool assembler builds them, with ``pin_memory=False``."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import get_mha_host_pool_cls

    dev = MHATokenToKVPool(size=tokens, page_size=page, dtype=dtype or torch.bfloat16, head_num=heads,
                           head_dim=head_dim, layer_num=layers, device="cpu", enable_memory_saver=False)
    info = dev.get_device_pool_infos()[0].buffer_info
    return dev, get_mha_host_pool_cls(info)(info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
                                            device_capacity_tokens=dev.size, start_layer=dev.start_layer,
                                            end_layer=dev.end_layer)


def mla_pools(layout: str = "page_first", dtype: Any = None, *, tokens: int = 64, page: int = PAGE, layers: int = 2):
    import torch
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    dev = MLATokenToKVPool(size=tokens, page_size=page, dtype=dtype or torch.bfloat16, kv_lora_rank=16,
                           qk_rope_head_dim=8, layer_num=layers, device="cpu", enable_memory_saver=False)
    info = dev.get_device_pool_infos()[0].buffer_info
    return dev, MLATokenToKVPoolHost(info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
                                     device_capacity_tokens=dev.size, start_layer=dev.start_layer,
                                     end_layer=dev.end_layer, target_layer_num=dev.layer_num,
                                     override_kv_cache_dim=dev.kv_cache_dim)


def hybrid_pools(host, device):
    """The KV pool, an SWA state pool (its own slots, trailing pages) and an indexer pool (on the KV
    slots), grouped as SGLang's hybrid pool assembler groups them."""
    from sglang.srt.mem_cache.hicache_storage import PoolName
    from sglang.srt.mem_cache.pool_host import HostPoolGroup, PoolEntry

    swa_dev, swa = mha_pools("page_first", tokens=256, layers=1)
    idx_dev, indexer = mha_pools("layer_first", tokens=256, layers=1)

    def ident(layer: int) -> int:
        return layer

    group = HostPoolGroup([
        PoolEntry(name=PoolName.KV, host_pool=host, device_pool=device, layer_mapper=ident, is_primary_index_anchor=True),
        PoolEntry(name=PoolName.SWA, host_pool=swa, device_pool=swa_dev, layer_mapper=ident),
        PoolEntry(name=PoolName.INDEXER, host_pool=indexer, device_pool=idx_dev, layer_mapper=ident),
    ])
    return group, {PoolName.SWA: swa, PoolName.INDEXER: indexer}
