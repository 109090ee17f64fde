"""The exceptions a backend adapter raises, mapped at the adapter's edge from its library's own.

    BackendError                 anything a backend did wrong (outcome ``error``)
    ├── BackendUnavailable       connection refused / reset / unreachable, READONLY, LOADING, MASTERDOWN
    ├── BackendRejected          backend full, quota, OOM, ENOSPC
    ├── BackendTimeout           the library's own timeout fired
    ├── CorruptPage              a stored page failed its integrity check
    └── Refused                  hicache-ha's own room for the call (staging memory) is full: our load,
                                 never news about the backend (outcome ``short_circuited``)

The data plane turns each into an outcome kind (``hicache_ha.health.outcomes``); nothing here ever
reaches the engine.
"""

from __future__ import annotations


class BackendError(Exception):
    """A backend operation failed. Carries the backend's name when known."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class BackendUnavailable(BackendError):
    """The backend cannot be reached or cannot serve right now (refused, reset, read-only replica)."""


class BackendRejected(BackendError):
    """The backend refused the request for lack of room or quota (OOM, ENOSPC)."""


class BackendTimeout(BackendError):
    """The backend library's own timeout fired before an answer came."""


class CorruptPage(BackendError):
    """A stored page does not match its integrity envelope (length, checksum or key)."""


class Refused(BackendError):
    """The adapter's own staging room (e.g. a bounce pool) has no space for the call right now."""


class ConfigError(ValueError):
    """A configuration document is invalid; the message names the field and what is allowed."""
