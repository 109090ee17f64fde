"""Timing bounds that hold on a loaded 2-core machine.

The contract is "deadline + 20 ms"; no code can keep it while the operating system does not run the
process. ``LagProbe`` measures, while a test runs, how late a thread of the test's own process wakes up
(scheduler and GIL): a bound on a single worst case is the contract plus that measured lag, never a
tighter constant. Percentile bounds hold the contract itself.
"""

from __future__ import annotations

import threading
import time

SLACK_S = 0.020  # the contract: deadline + 20 ms


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class LagProbe:
    """A thread that sleeps ``period`` seconds again and again and records how late it woke up."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.lags: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-lag-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.period)
            self.lags.append(time.perf_counter() - t0 - self.period)

    def __enter__(self) -> "LagProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)

    @property
    def worst(self) -> float:
        return max(self.lags, default=0.0)

    def bound(self, deadline_s: float) -> float:
        """The most a single call may take: its deadline, the contract's slack, and the worst time this
        process was kept from running."""
        return deadline_s + SLACK_S + self.worst
