"""The page layout a rank reads and writes, and the fingerprint that keys carry.

A page is only ever served to the layout it was written under: the rank's identity (model, TP / PP /
DP / CP / DCP) and the pool's geometry (which pool, its memory layout, dtype, page size in tokens and
bytes). SGLang's sharing rules are kept: MLA KV is replicated across TP (and DP) ranks, so its pages
are shared by the group and written by one rank; TP-sharded state gets a key per TP rank (and per DP
rank, conservatively), and Mamba state is TP-sharded even in an MLA model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from hashlib import blake2b
from typing import Any, Optional

KV = "kv"
TP_SHARDED_POOLS = frozenset({"mamba"})  # per TP rank even when the model's KV is replicated (MLA)


@dataclass(frozen=True)
class Layout:
    model: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    dcp_rank: int = 0
    dcp_size: int = 1
    is_mla: bool = False
    pool: str = KV  # which of SGLang's host pools (kv, mamba, swa, indexer, ...)
    mem_layout: Optional[str] = None  # the host pool's layout: page_first, layer_first, page_first_direct
    page_size: Optional[int] = None  # tokens per page
    dtype: Optional[str] = None
    page_bytes: Optional[int] = None

    @property
    def shared(self) -> bool:
        """Pages replicated across the TP group: one copy, one writer."""
        return self.is_mla and self.pool not in TP_SHARDED_POOLS

    @property
    def is_storage_writer(self) -> bool:
        """Shared pages have one writer per group (SGLang's ``is_storage_writer``); others: every rank."""
        return not self.shared or self.tp_rank == self.dcp_rank

    @property
    def rank(self) -> int:
        """A flat rank id within the deployment (tp fastest, then cp, pp, dp)."""
        return self.tp_rank + self.tp_size * (self.cp_rank + self.cp_size * (self.pp_rank + self.pp_size * self.dp_rank))

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def ranks(self) -> int:
        """How many ranks the deployment has (every TP, CP, PP and DP combination)."""
        return self.tp_size * self.cp_size * self.pp_size * self.dp_size

    def describe(self) -> dict:
        """The rank's place in the deployment, as its agent reports it."""
        return {"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.dp_rank, "cp": self.cp_rank,
                "tp_size": self.tp_size, "pp_size": self.pp_size, "dp_size": self.dp_size, "cp_size": self.cp_size}

    def identity(self) -> dict:
        """The fields that decide which pages this rank may read."""
        fields = asdict(self)
        fields.pop("dp_size")  # the page is the same however many replicas there are
        if self.shared:  # replicated across the TP group (and DP replicas): one shared page
            for name in ("tp_rank", "tp_size", "dp_rank"):
                fields.pop(name)
        return fields

    def fingerprint(self) -> str:
        blob = repr(sorted(self.identity().items())).encode()
        return blake2b(blob, digest_size=8).hexdigest()

    def for_pool(self, name: str, pool: Any) -> "Layout":
        """This rank's layout for one of SGLang's host pools, with that pool's geometry."""
        return replace(self, pool=str(getattr(name, "value", name)), **pool_geometry(pool))

    def with_host_pool(self, pool: Any) -> "Layout":
        """The KV layout completed with what the host pool knows."""
        return self.for_pool(KV, pool)

    @classmethod
    def from_storage_config(cls, cfg: Any) -> "Layout":
        """Build from SGLang's HiCacheStorageConfig (read by attribute, so sglang is not imported)."""
        model = getattr(cfg, "model_name", None) or ""
        return cls(
            model=model,
            tp_rank=cfg.tp_rank,
            tp_size=cfg.tp_size,
            pp_rank=cfg.pp_rank,
            pp_size=cfg.pp_size,
            dp_rank=getattr(cfg, "dp_rank", 0) or 0,
            cp_rank=getattr(cfg, "attn_cp_rank", 0) or 0,
            cp_size=getattr(cfg, "attn_cp_size", 1) or 1,
            dcp_rank=getattr(cfg, "dcp_rank", 0) or 0,
            dcp_size=getattr(cfg, "dcp_size", 1) or 1,
            is_mla=bool(cfg.is_mla_model),
            page_size=getattr(cfg, "logical_page_size", None),
        )


def pool_geometry(pool: Any) -> dict:
    """What makes a host pool's pages readable by another pool: layout, dtype, tokens and bytes per page.
    The dtype is the flat page's (an fp8 pool stores uint8; a Mamba pool's pages are bytes)."""
    page = pool.get_dummy_flat_data_page()
    layout = getattr(pool, "layout", None)
    page_size = getattr(pool, "page_size", None)
    return {
        "mem_layout": layout if isinstance(layout, str) else None,
        "page_size": page_size if isinstance(page_size, int) else None,
        "dtype": str(page.dtype).removeprefix("torch."),
        "page_bytes": page.numel() * page.element_size(),
    }
