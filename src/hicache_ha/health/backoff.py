"""How long a broken member waits before it is tried again: base × 2^n, capped, with equal jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backoff:
    base: float  # seconds
    cap: float
    jitter: float = 0.5  # the fraction of each wait that is random: 0 = none, 1 = full jitter

    def bounds(self, failures: int) -> tuple[float, float]:
        """The range the wait after the n-th consecutive trip (n >= 1) falls in."""
        full = min(self.cap, self.base * (2 ** max(0, failures - 1)))
        return full * (1 - self.jitter), full

    def compute(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        low, high = self.bounds(failures)
        return low + (high - low) * rand()
