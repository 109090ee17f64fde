"""The admin key: where it comes from, and how a request is checked against it."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Optional

from ..backends.errors import ConfigError

ENV_KEY = "HICACHE_HA_ADMIN_API_KEY"
NO_KEY = ("admin API disabled: no admin key is configured; restart with --admin-api-key, "
          f"${ENV_KEY} or admin.api_key_file to enable it")


def load_api_key(explicit: Optional[str] = None, key_file: Optional[Path] = None) -> Optional[str]:
    """The key from the command line, else the environment, else the key file; None when none is set."""
    for candidate in (explicit, os.environ.get(ENV_KEY)):
        if candidate and candidate.strip():
            return candidate.strip()
    if key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"admin.api_key_file {str(key_file)!r}: {exc.strerror}") from None
        return key or None
    return None


def check_bearer(header: Optional[str], api_key: str) -> bool:
    """Constant-time comparison of an ``Authorization: Bearer <key>`` header with the key."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())
