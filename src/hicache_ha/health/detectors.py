"""Failure detectors: small objects fed one call at a time, combined with ``|``.

Each detector sees ``record(now, failed, slow)`` and answers ``tripped(now)`` with a reason (or None).
Time is passed in, so every detector is a pure function of what it was fed: tests never sleep.
Windows are ring buffers of time buckets, so feeding is O(1) and memory is fixed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional


class Detector(ABC):
    @abstractmethod
    def record(self, now: float, failed: bool, slow: bool) -> None:
        """Feed one finished call."""

    @abstractmethod
    def tripped(self, now: float) -> Optional[str]:
        """Why the member should be taken out of traffic now, or None."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything (after a trip, and when the member comes back)."""

    def __or__(self, other: "Detector") -> "AnyOf":
        return AnyOf(*_parts(self), *_parts(other))


def _parts(d: Detector) -> tuple:
    return d.detectors if isinstance(d, AnyOf) else (d,)


class AnyOf(Detector):
    """Trips when any of its detectors trips."""

    def __init__(self, *detectors: Detector) -> None:
        self.detectors = detectors

    def record(self, now: float, failed: bool, slow: bool) -> None:
        for d in self.detectors:
            d.record(now, failed, slow)

    def tripped(self, now: float) -> Optional[str]:
        for d in self.detectors:
            reason = d.tripped(now)
            if reason:
                return reason
        return None

    def reset(self) -> None:
        for d in self.detectors:
            d.reset()


class ConsecutiveFailures(Detector):
    def __init__(self, threshold: int) -> None:
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        self.threshold = threshold
        self.count = 0

    def record(self, now: float, failed: bool, slow: bool) -> None:
        if failed:
            self.count += 1
        elif not slow:  # a call that ran out of its deadline proves nothing either way
            self.count = 0

    def tripped(self, now: float) -> Optional[str]:
        return f"{self.count} consecutive failures" if self.count >= self.threshold else None

    def reset(self) -> None:
        self.count = 0


class _Window:
    """Counts of (calls, hits) over the last ``window`` seconds, in ``buckets`` slices."""

    def __init__(self, window: float, buckets: int = 10) -> None:
        self.width = window / buckets
        self.calls = [0] * buckets
        self.hits = [0] * buckets
        self.stamp = [-1] * buckets  # which slice of time each bucket currently holds

    def add(self, now: float, hit: bool) -> None:
        slot = int(now // self.width)
        i = slot % len(self.calls)
        # Results arrive a little out of order (several threads finish calls): one whose slice was
        # recycled already counts in the newer slice sharing its bucket, and never wipes that slice.
        if self.stamp[i] < slot:
            self.stamp[i], self.calls[i], self.hits[i] = slot, 0, 0
        self.calls[i] += 1
        self.hits[i] += hit

    def totals(self, now: float) -> tuple[int, int]:
        oldest = int(now // self.width) - len(self.calls) + 1
        calls = hits = 0
        for i, stamp in enumerate(self.stamp):
            if stamp >= oldest:
                calls += self.calls[i]
                hits += self.hits[i]
        return calls, hits

    def clear(self) -> None:
        n = len(self.calls)
        self.calls, self.hits, self.stamp = [0] * n, [0] * n, [-1] * n


class FailureRate(Detector):
    """Trips when at least ``min_calls`` calls in the last ``window`` seconds failed at ``threshold`` or more."""

    what = "failure"

    def __init__(self, threshold: float, window: float, min_calls: int) -> None:
        if not 0 < threshold <= 1 or window <= 0 or min_calls < 1:
            raise ValueError("threshold in (0, 1], window > 0, min_calls >= 1")
        self.threshold, self.window, self.min_calls = threshold, window, min_calls
        self._w = _Window(window)

    def _hit(self, failed: bool, slow: bool) -> bool:
        return failed

    def record(self, now: float, failed: bool, slow: bool) -> None:
        self._w.add(now, self._hit(failed, slow))

    def tripped(self, now: float) -> Optional[str]:
        calls, hits = self._w.totals(now)
        if calls >= self.min_calls and hits >= self.threshold * calls:
            return f"{self.what} rate {hits}/{calls} in {self.window:g} s"
        return None

    def reset(self) -> None:
        self._w.clear()


class SlowCallRate(FailureRate):
    """Trips when too many calls are slow (slowness is judged by the caller, against the op's deadline)."""

    what = "slow-call"

    def _hit(self, failed: bool, slow: bool) -> bool:
        return slow
