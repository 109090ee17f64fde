"""What a member counts: operations by outcome, a latency histogram per op, transitions, pages."""

from __future__ import annotations

from bisect import bisect_left

from ..health.outcomes import Outcome

# Latency histogram bounds (seconds): 100 µs to 10 s, as Prometheus buckets.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class OpStats:
    """Counters per (op, outcome), a latency histogram per op, transitions per target state.
    Not locked: its Member serialises access. Recording is a dict update and a bisect."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, Outcome], int] = {}
        self.latency: dict[str, list] = {}  # op -> [count per bucket..., +Inf count, sum]
        self.transitions: dict[str, int] = {}
        self.abandoned = 0
        self.corrupt_pages = 0
        self.dropped_pages = 0  # pages of writes that failed or were refused

    def record(self, op: str, outcome: Outcome, seconds: float) -> None:
        key = (op, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        hist = self.latency.get(op)
        if hist is None:
            hist = self.latency[op] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        hist[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist[-1] += seconds

    def snapshot(self) -> dict:
        ops: dict[str, dict[str, int]] = {}
        for (op, outcome), n in self.counts.items():
            ops.setdefault(op, {})[outcome.value] = n
        return {"ops": ops, "abandoned": self.abandoned, "corrupt_pages": self.corrupt_pages,
                "dropped_pages": self.dropped_pages,
                "latency": {op: list(h) for op, h in self.latency.items()}, "transitions": dict(self.transitions)}
