"""The chaos report: one row per scenario (what the engine saw), what breaks the promises, and the rows as a
Markdown table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from .lag import SLACK_S


@dataclass
class Row:
    """What one scenario did to the engine. Times in ms from the fault; None: it did not happen."""

    fault: str
    expect: str
    detect_ms: Optional[float]
    served_ms: Optional[float]
    healthy_tripped: list[str]
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    bound_ms: float
    lag_ms: float  # the longest this process was kept from running while the scenario ran
    over_own_deadline: int  # calls over their own op's deadline + slack + the measured lag
    errors: int
    bad_pages: int
    dropped_writes: int
    calls: int
    stress: bool
    served_within_s: float = 2.0
    engine: str = "sim"  # sim: the simulator's ranks; sglang: SGLang's own HiCacheController
    calls_during_fault: Optional[int] = None  # storage calls the engine made while the fault lasted

    def problems(self) -> list[str]:
        """What breaks the promises: errors, wrong pages, healthy members tripped, a rank not served
        again in time, calls slower than the bound beyond what the machine's own lag explains."""
        served_within_s = self.served_within_s
        out = []
        if self.errors:
            out.append(f"{self.errors} errors reached the engine")
        if self.bad_pages:
            out.append(f"{self.bad_pages} pages failed verification")
        if self.healthy_tripped:
            out.append(f"healthy members tripped: {self.healthy_tripped}")
        if self.expect in ("failover", "cluster") and (self.served_ms is None or self.served_ms > served_within_s * 1000):
            out.append(f"not served again within {served_within_s} s (served_ms={self.served_ms})")
        if self.p99_ms > self.bound_ms:
            out.append(f"p99 {self.p99_ms:.1f} ms over the bound {self.bound_ms:.0f} ms")
        if self.over_own_deadline:
            out.append(f"{self.over_own_deadline} calls over their own deadline + {SLACK_S * 1000:.0f} ms + the "
                       f"measured lag ({self.lag_ms:.0f} ms)")
        if self.max_ms > self.bound_ms + self.lag_ms:
            out.append(f"max {self.max_ms:.1f} ms over the bound plus the measured lag ({self.lag_ms:.0f} ms)")
        return out


def markdown(rows: list[Row]) -> str:
    def ms(v: Optional[float]) -> str:
        return "—" if v is None else f"{v:.0f}"

    lines = ["| fault | expected | detect ms | served again ms | healthy tripped | p50 / p99 / p99.9 / max ms "
             "| errors | bad pages | writes dropped |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        fault = r.fault + (" (SGLang's HiCacheController)" if r.engine == "sglang" else "")
        lines.append(f"| {fault} | {r.expect} | {ms(r.detect_ms)} | {ms(r.served_ms)} | {len(r.healthy_tripped)} | "
                     f"{r.p50_ms:.1f} / {r.p99_ms:.1f} / {r.p999_ms:.1f} / {r.max_ms:.1f} | {r.errors} | "
                     f"{r.bad_pages} | {r.dropped_writes} |")
    return "\n".join(lines)


def to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
