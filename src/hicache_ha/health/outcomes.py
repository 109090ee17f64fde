"""Outcome kinds of one data-plane operation, and the mapping from adapter exceptions to them."""

from __future__ import annotations

from enum import Enum

from ..backends.errors import BackendRejected, BackendTimeout, BackendUnavailable, CorruptPage


class Outcome(str, Enum):
    OK = "ok"
    MISS = "miss"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    REJECTED = "rejected"
    CORRUPT = "corrupt"
    ERROR = "error"
    SHORT_CIRCUITED = "short_circuited"
    DROPPED = "dropped"

    def __str__(self) -> str:
        return self.value


# Outcomes that say the backend itself is in trouble (misses and drops say nothing about it).
FAILURES = frozenset({Outcome.TIMEOUT, Outcome.UNAVAILABLE, Outcome.REJECTED, Outcome.CORRUPT, Outcome.ERROR})


def classify(exc: BaseException) -> Outcome:
    """The outcome kind for an exception raised by a backend adapter."""
    if isinstance(exc, BackendTimeout):
        return Outcome.TIMEOUT
    if isinstance(exc, BackendUnavailable):
        return Outcome.UNAVAILABLE
    if isinstance(exc, BackendRejected):
        return Outcome.REJECTED
    if isinstance(exc, CorruptPage):
        return Outcome.CORRUPT
    if isinstance(exc, (ConnectionError, TimeoutError)):  # a plugin that let an OS error through
        return Outcome.TIMEOUT if isinstance(exc, TimeoutError) else Outcome.UNAVAILABLE
    return Outcome.ERROR
