"""SGLang 0.5.23's own host pools, built on CPU as its pool assembler builds them (from the device pool's
buffer info), with ``pin_memory=False``. No stand-in: these are the objects HAStorage meets in SGLang."""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost

from hicache_ha.sim.sglang_engine import PAGE, mha_pools, mla_pools  # noqa: F401 - the builders the engine uses

LAYOUTS = ("page_first", "layer_first", "page_first_direct")
DTYPES = (torch.bfloat16, torch.float8_e4m3fn)


def mha_pool(layout: str = "page_first", dtype: torch.dtype = torch.bfloat16, **kw):
    return mha_pools(layout, dtype, **kw)[1]


def mla_pool(layout: str = "page_first", dtype: torch.dtype = torch.bfloat16, **kw):
    return mla_pools(layout, dtype, **kw)[1]


def mamba_pool(slots: int = 16):
    from sglang.srt.mem_cache.device_pool_info import MambaStateBufferInfo

    info = MambaStateBufferInfo(temporal=torch.randn(2, slots + 1, 4, 8),
                                conv=(torch.randn(2, slots + 1, 3, 16, dtype=torch.bfloat16),))
    return MambaPoolHost(info, 2.0, 0, device_capacity=slots, pin_memory=False, device="cpu", layout="page_first")


def fill(pool, host_indices: torch.Tensor, seed: int) -> list[bytes]:
    """Random bytes into every page at ``host_indices`` (through the pool's own flat-page method);
    returns each page's bytes as the pool reports them."""
    g = torch.Generator().manual_seed(seed)
    dummy = pool.get_dummy_flat_data_page()
    out = []
    for slot in host_indices[:: pool.page_size].tolist():
        raw = torch.randint(0, 256, (dummy.numel() * dummy.element_size(),), dtype=torch.uint8, generator=g)
        if dummy.dtype.is_floating_point and dummy.element_size() > 1:
            raw = _finite(raw, dummy.dtype)
        pool.set_from_flat_data_page(slot, raw.view(dummy.dtype))
        out.append(page_bytes(pool, slot))
    return out


def _finite(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Random values of ``dtype`` as bytes (no NaN bit patterns, which compare unequal to themselves)."""
    values = torch.randn(raw.numel() // torch.tensor([], dtype=dtype).element_size()).to(dtype)
    return values.view(torch.uint8)


def page_bytes(pool, slot: int) -> bytes:
    return bytes(pool.get_data_page(slot, flat=True).contiguous().view(torch.uint8).numpy())


def pages_at(pool, host_indices: torch.Tensor) -> list[bytes]:
    return [page_bytes(pool, slot) for slot in host_indices[:: pool.page_size].tolist()]
