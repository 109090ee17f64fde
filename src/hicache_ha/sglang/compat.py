"""Which SGLang versions hicache-ha was tested with, and a clear warning at start-up for any other."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

log = logging.getLogger("hicache_ha.sglang")

TESTED_SGLANG = ("0.5.23",)


def check_sglang_version(found: Optional[str] = None) -> Optional[str]:
    """Log (and return) a warning when the installed SGLang is not one hicache-ha was tested with."""
    if found is None:
        try:
            found = version("sglang")
        except PackageNotFoundError:
            found = "unknown (no sglang distribution found)"
    if found in TESTED_SGLANG:
        return None
    message = (f"hicache-ha: SGLang {found} is not a version hicache-ha was tested with "
               f"({', '.join(TESTED_SGLANG)}): its storage interface (legacy, v1, v2, get_stats) may differ; "
               "run hicache-ha's SGLang tests against it before relying on it")
    log.warning(message)
    return message
