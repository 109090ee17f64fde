"""Outcome kinds of one data-plane operation, and the mapping from adapter exceptions to them."""

from __future__ import annotations

from enum import Enum
from typing import Iterable

from ..backends.errors import BackendRejected, BackendTimeout, BackendUnavailable, CorruptPage, Refused
from .breaker import Verdict


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


# Outcomes that may say the backend itself is in trouble. Misses and drops say nothing about it, and
# ``short_circuited`` (our own breaker or bulkhead refused it, or a trip or switch fenced it) is news
# about hicache-ha, never about the backend.
FAILURES = frozenset({Outcome.TIMEOUT, Outcome.UNAVAILABLE, Outcome.REJECTED, Outcome.CORRUPT, Outcome.ERROR})


def verdicts(failure_outcomes: Iterable[Outcome]) -> dict[Outcome, Verdict]:
    """How each outcome counts for the breaker: ok and miss succeed, the configured failure outcomes
    fail; a timeout not configured as a failure is a slow call (judged by the slow-call rate); the
    rest (short_circuited, and failure kinds the operator chose not to count) is ignored."""
    failing = frozenset(failure_outcomes)

    def verdict(o: Outcome) -> Verdict:
        if o in (Outcome.OK, Outcome.MISS):
            return Verdict.SUCCESS
        if o in failing:
            return Verdict.FAILURE
        return Verdict.SLOW if o is Outcome.TIMEOUT else Verdict.IGNORED

    return {o: verdict(o) for o in Outcome}


def classify(exc: BaseException) -> Outcome:
    """The outcome kind for an exception raised by a backend adapter."""
    if isinstance(exc, Refused):
        return Outcome.SHORT_CIRCUITED
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
