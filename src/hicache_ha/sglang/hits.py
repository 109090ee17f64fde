"""The hit verdict of ``batch_exists_v2``, exactly as SGLang 0.5.23's ``HiCacheFile`` computes it.

A pure function of which pages are stored, so it is tested on its own: the KV hit is the longest stored
prefix; each extra pool names the prefix lengths it can restore (``all_pages``: every page up to a
boundary; ``trailing_pages``: the last N pages of the prefix), and the restorable lengths are the
intersection over all pools, whatever their order. ``block_groups`` is declared by SGLang but used by
none of its pools or backends (``HiCacheFile`` rejects it); this follows its definition: the pool reports
the pages its leading complete groups cover, and never gates the KV hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

ALL_PAGES, TRAILING_PAGES, BLOCK_GROUPS = "all_pages", "trailing_pages", "block_groups"


@dataclass
class PoolQuery:
    name: str
    policy: str
    present: Sequence[bool]  # per page of the queried span: is this pool's page stored?
    window: int = 1  # trailing_pages: how many last pages must be there
    block_pages: int = 0  # block_groups: KV pages per block
    group_pages: int = 0  # block_groups: this pool's pages (keys) per group


@dataclass
class Verdict:
    kv_hit_pages: int
    extra_pool_hit_pages: dict
    restorable_prefix_pages: list[int]


def leading(present: Sequence[bool]) -> int:
    for i, hit in enumerate(present):
        if not hit:
            return i
    return len(present)


def verdict(kv_name: str, kv_present: Sequence[bool], pools: Sequence[PoolQuery]) -> Verdict:
    kv_pages = leading(kv_present)
    hits: dict = {kv_name: kv_pages} if kv_pages else {}
    restorable = list(range(1, kv_pages + 1))
    for pool in pools:
        if not restorable:
            break
        legal, boundary = _restorable(pool, kv_pages)
        if boundary:
            hits[pool.name] = boundary
        if legal is not None:
            restorable = [p for p in restorable if p in legal]
    return Verdict(restorable[-1] if restorable else 0, hits, restorable)


def _restorable(pool: PoolQuery, kv_pages: int) -> tuple[Optional[set[int]], int]:
    """The prefix lengths the pool allows (None: it does not gate), and its own hit boundary."""
    has = pool.present
    if pool.policy == ALL_PAGES:
        boundary = next((i for i in range(kv_pages) if not has[i]), kv_pages)
        return set(range(1, boundary + 1)), boundary
    if pool.policy == TRAILING_PAGES:
        trailing = max(1, pool.window)
        legal = {p for p in range(1, kv_pages + 1) if all(has[i] for i in range(max(0, p - trailing), p))}
        return legal, max(legal, default=0)
    if pool.policy == BLOCK_GROUPS:
        block, group = pool.block_pages, pool.group_pages
        if block <= 0 or group <= 0:
            return None, 0
        covered = 0
        while covered + block <= kv_pages and all(has[covered + k] for k in range(min(group, block))):
            covered += block
        return None, covered
    raise ValueError(f"unknown pool hit policy {pool.policy!r}")
