"""How long this process is kept from running: the yardstick for timing on a busy machine.

The contract is "deadline + 20 ms"; no code keeps it while the operating system does not run the
process. ``LagProbe`` measures, meanwhile, how late a thread of this process wakes up (the scheduler,
the GIL): the demo and the benchmarks say how much of a missed bound that explains, and tests bound a
single worst case by the contract plus that measured lag, never by a tighter constant.
"""

from __future__ import annotations

import threading
import time
from collections import deque

SLACK_S = 0.020  # the contract: deadline + 20 ms


class LagProbe:
    """A thread that sleeps ``period`` seconds again and again and records how late it woke up."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.samples: deque[tuple[float, float]] = deque(maxlen=1_000_000)  # (time.monotonic(), lag s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hicache-ha-lag-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            time.sleep(self.period)
            t1 = time.monotonic()
            self.samples.append((t1, t1 - t0 - self.period))

    def start(self) -> "LagProbe":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def __enter__(self) -> "LagProbe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def worst(self) -> float:
        return max((lag for _, lag in self.samples), default=0.0)

    def worst_between(self, t0: float, t1: float) -> float:
        """The longest this process was kept from running between two ``time.monotonic()`` times."""
        return max((lag for t, lag in self.samples if t0 <= t <= t1), default=0.0)

    def bound(self, deadline_s: float) -> float:
        """The most a single call may take: its deadline, the contract's slack, and the worst time this
        process was kept from running."""
        return deadline_s + SLACK_S + self.worst
