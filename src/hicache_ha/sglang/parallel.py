"""The data-parallel place of a rank: SGLang's storage config carries a DP rank only with DP attention,
and never the DP size; SGLang's published parallel state has both."""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("hicache_ha.sglang")


def dp_place() -> Optional[tuple[int, int]]:
    """(dp rank, dp size) from SGLang's parallel state: the attention-DP group with DP attention, the
    data-parallel replica otherwise. None when SGLang has not published it (outside a server)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        p = get_parallel()
        if p.attn_dp_enabled:
            return int(p.attn_dp_rank), int(p.attn_dp_size)
        return int(p.dp_rank), int(p.dp_size)
    except Exception:  # not published (tests, tools), or another SGLang: the config says
        return None
