"""Prometheus metrics, built at scrape time from rank statuses: nothing is added to the engine's path
beyond the counters the data plane keeps anyway.

The same collector serves a rank's own process (statuses of its local data planes) and the controller
(statuses every agent heartbeats), so the controller's /metrics covers the whole deployment. Labels are
bounded: rank, backend, op, outcome, state, reason — never keys or free text.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..dataplane.stats import LATENCY_BUCKETS
from ..health.breaker import STATES

# Failover reasons, kept to a fixed set: "failover (asked by rank 3)" is a group failover.
_REASONS = ("failover", "group", "failback")

Statuses = Callable[[], Iterable[tuple[int, dict]]]


def _reason(raw: str) -> str:
    return raw if raw in _REASONS else ("group" if raw.startswith("failover") else "other")


class RankMetrics(Collector):
    """Exports ``hicache_ha_*`` series from (rank, status) pairs, status as ``agent.rank_status`` makes it."""

    def __init__(self, statuses: Statuses) -> None:
        self.statuses = statuses

    def collect(self):
        state = GaugeMetricFamily("hicache_ha_backend_state", "Member state (one-hot over state)",
                                  labels=["rank", "backend", "state"])
        active = GaugeMetricFamily("hicache_ha_backend_active", "1 for the member that serves the rank",
                                   labels=["rank", "backend"])
        ops = CounterMetricFamily("hicache_ha_ops", "Storage operations by outcome",
                                  labels=["rank", "backend", "op", "outcome"])
        latency = HistogramMetricFamily("hicache_ha_op_duration_seconds",
                                        "Engine-visible duration of storage operations", labels=["rank", "backend", "op"])
        transitions = CounterMetricFamily("hicache_ha_circuit_transitions", "Breaker transitions by target state",
                                          labels=["rank", "backend", "to"])
        abandoned = CounterMetricFamily("hicache_ha_abandoned_calls", "Calls abandoned at their deadline or fenced",
                                        labels=["rank", "backend"])
        corrupt = CounterMetricFamily("hicache_ha_corrupt_pages", "Pages that failed their integrity check",
                                      labels=["rank", "backend"])
        probe_age = GaugeMetricFamily("hicache_ha_last_probe_success_age_seconds",
                                      "Seconds since a health ping or probe of the member last succeeded",
                                      labels=["rank", "backend"])
        in_flight = GaugeMetricFamily("hicache_ha_in_flight_calls", "Calls submitted and not finished",
                                      labels=["rank", "backend"])
        epoch = GaugeMetricFamily("hicache_ha_active_epoch", "The rank's epoch", labels=["rank"])
        dropped = CounterMetricFamily("hicache_ha_dropped_writes", "Pages not written: no usable member",
                                      labels=["rank"])
        failovers = CounterMetricFamily("hicache_ha_failovers", "Moves of traffic off a tripped member",
                                        labels=["rank", "reason"])
        for rank, st in self.statuses():
            r = str(rank)
            epoch.add_metric([r], st.get("epoch", 0))
            dropped.add_metric([r], st.get("dropped_writes", 0))
            by_reason: dict[str, int] = {}
            for raw, n in (st.get("failovers_by_reason") or {}).items():
                key = _reason(raw)
                by_reason[key] = by_reason.get(key, 0) + n
            for reason in _REASONS:
                failovers.add_metric([r, reason], by_reason.get(reason, 0))
            for b in st.get("backends", []):
                name = b["name"]
                for s in STATES:
                    state.add_metric([r, name, s], 1.0 if b.get("state") == s else 0.0)
                active.add_metric([r, name], 1.0 if st.get("active") == name else 0.0)
                for op, outcomes in (b.get("ops") or {}).items():
                    for outcome, n in outcomes.items():
                        ops.add_metric([r, name, op, outcome], n)
                for op, hist in (b.get("latency") or {}).items():
                    cumulative, buckets = 0, []
                    for bound, n in zip(list(LATENCY_BUCKETS) + [float("inf")], hist[:-1]):
                        cumulative += n
                        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                    latency.add_metric([r, name, op], buckets, sum_value=hist[-1])
                for to in STATES:
                    transitions.add_metric([r, name, to], (b.get("transitions") or {}).get(to, 0))
                abandoned.add_metric([r, name], b.get("abandoned", 0))
                corrupt.add_metric([r, name], b.get("corrupt_pages", 0))
                in_flight.add_metric([r, name], b.get("in_flight", 0))
                if b.get("probe_ok_age_s") is not None:
                    probe_age.add_metric([r, name], b["probe_ok_age_s"])
        yield from (state, active, ops, latency, transitions, abandoned, corrupt, probe_age, in_flight, epoch,
                    dropped, failovers)


class ControllerMetrics(Collector):
    """What only the controller knows: desired epoch, ranks up, switch results."""

    def __init__(self, controller) -> None:
        self.controller = controller

    def collect(self):
        c = self.controller
        desired = GaugeMetricFamily("hicache_ha_desired_epoch", "The epoch every rank should be on")
        desired.add_metric([], c.desired.epoch)
        expected = GaugeMetricFamily("hicache_ha_ranks_expected", "Ranks the controller expects")
        expected.add_metric([], c.expected_ranks)
        up = GaugeMetricFamily("hicache_ha_rank_up", "1 while the rank's agent heartbeats the controller",
                               labels=["rank"])
        alive = set(c.alive())
        for r in sorted(set(c.ranks) | set(range(c.expected_ranks))):
            up.add_metric([str(r)], 1.0 if r in alive else 0.0)
        switches = CounterMetricFamily("hicache_ha_switch_operations", "Switches and detaches by result",
                                       labels=["kind", "result"])
        for (kind, result), n in sorted(c.switch_results.items()):
            switches.add_metric([kind, result], n)
        yield from (desired, expected, up, switches)


def registry_for(*collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def serve_process_metrics(port: int, statuses: Statuses, host: str = "127.0.0.1") -> Optional[object]:
    """Per-process /metrics for deployments without a controller (prometheus_client's own server)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=registry_for(RankMetrics(statuses)))
