"""Prometheus metrics, built at scrape time from rank statuses: nothing is added to the engine's path
beyond the counters the data plane keeps anyway.

The same collector serves a rank's own process (statuses of its local data planes) and the controller
(statuses every agent heartbeats), so the controller's /metrics covers the whole deployment. Every series
names its deployment (``admin.deployment``); rank series also carry ``tp_rank``, ``pp_rank``,
``dp_rank`` and ``cp_rank`` (as SGLang's own series do) beside the flat ``rank``, so they join SGLang's.
Labels are bounded: deployment, ranks, backend, op, outcome, state, reason, receiver — never keys or free
text. The scrape adds its own identity (job, instance, namespace, pod); alert rules keep it.
"""

from __future__ import annotations

import json
import threading
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..dataplane.stats import LATENCY_BUCKETS
from ..health.breaker import STATES

# Failover reasons, kept to a fixed set: "failover (asked by rank 3)" is a group failover.
_REASONS = ("failover", "group", "failback")

# (rank, identity as the agent reports it: tp/pp/dp/cp, status as BackendManager.status() makes it)
Statuses = Callable[[], Iterable[tuple[int, dict, dict]]]
RANK_LABELS = ["deployment", "rank", "tp_rank", "pp_rank", "dp_rank", "cp_rank"]


def _reason(raw: str) -> str:
    return raw if raw in _REASONS else ("group" if raw.startswith("failover") else "other")


class RankMetrics(Collector):
    """Exports ``hicache_ha_*`` series of every rank ``statuses`` yields."""

    def __init__(self, statuses: Statuses, deployment: str = "default") -> None:
        self.statuses = statuses
        self.deployment = deployment

    def collect(self):
        state = GaugeMetricFamily("hicache_ha_backend_state", "Member state (one-hot over state)",
                                  labels=[*RANK_LABELS, "backend", "state"])
        active = GaugeMetricFamily("hicache_ha_backend_active", "1 for the member that serves the rank",
                                   labels=[*RANK_LABELS, "backend"])
        ops = CounterMetricFamily("hicache_ha_ops", "Storage operations by outcome",
                                  labels=[*RANK_LABELS, "backend", "op", "outcome"])
        latency = HistogramMetricFamily("hicache_ha_op_duration_seconds",
                                        "Engine-visible duration of storage operations", labels=[*RANK_LABELS, "backend", "op"])
        transitions = CounterMetricFamily("hicache_ha_circuit_transitions", "Breaker transitions by target state",
                                          labels=[*RANK_LABELS, "backend", "to"])
        abandoned = CounterMetricFamily("hicache_ha_abandoned_calls", "Calls abandoned at their deadline or fenced",
                                        labels=[*RANK_LABELS, "backend"])
        corrupt = CounterMetricFamily("hicache_ha_corrupt_pages", "Pages that failed their integrity check",
                                      labels=[*RANK_LABELS, "backend"])
        probe_age = GaugeMetricFamily("hicache_ha_last_probe_success_age_seconds",
                                      "Seconds since a health ping or probe of the member last succeeded",
                                      labels=[*RANK_LABELS, "backend"])
        in_flight = GaugeMetricFamily("hicache_ha_in_flight_calls", "Calls submitted and not finished",
                                      labels=[*RANK_LABELS, "backend"])
        epoch = GaugeMetricFamily("hicache_ha_active_epoch", "The rank's epoch", labels=RANK_LABELS)
        dropped = CounterMetricFamily("hicache_ha_dropped_writes", "Pages not written: no usable member",
                                      labels=RANK_LABELS)
        failovers = CounterMetricFamily("hicache_ha_failovers", "Moves of traffic off a tripped member",
                                        labels=[*RANK_LABELS, "reason"])
        for rank, identity, st in self.statuses():
            r = [self.deployment, str(rank), *(str(identity.get(k, 0)) for k in ("tp", "pp", "dp", "cp"))]
            epoch.add_metric(r, st.get("epoch", 0))
            dropped.add_metric(r, st.get("dropped_writes", 0))
            by_reason: dict[str, int] = {}
            for raw, n in (st.get("failovers_by_reason") or {}).items():
                key = _reason(raw)
                by_reason[key] = by_reason.get(key, 0) + n
            for reason in _REASONS:
                failovers.add_metric([*r, reason], by_reason.get(reason, 0))
            for b in st.get("backends", []):
                name = b["name"]
                for s in STATES:
                    state.add_metric([*r, name, s], 1.0 if b.get("state") == s else 0.0)
                active.add_metric([*r, name], 1.0 if st.get("active") == name else 0.0)
                for op, outcomes in (b.get("ops") or {}).items():
                    for outcome, n in outcomes.items():
                        ops.add_metric([*r, name, op, outcome], n)
                for op, hist in (b.get("latency") or {}).items():
                    cumulative, buckets = 0, []
                    for bound, n in zip(list(LATENCY_BUCKETS) + [float("inf")], hist[:-1]):
                        cumulative += n
                        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                    latency.add_metric([*r, name, op], buckets, sum_value=hist[-1])
                for to in STATES:
                    transitions.add_metric([*r, name, to], (b.get("transitions") or {}).get(to, 0))
                abandoned.add_metric([*r, name], b.get("abandoned", 0))
                corrupt.add_metric([*r, name], b.get("corrupt_pages", 0))
                in_flight.add_metric([*r, name], b.get("in_flight", 0))
                if b.get("probe_ok_age_s") is not None:
                    probe_age.add_metric([*r, name], b["probe_ok_age_s"])
        yield from (state, active, ops, latency, transitions, abandoned, corrupt, probe_age, in_flight, epoch,
                    dropped, failovers)


class ControllerMetrics(Collector):
    """What only the controller knows: desired epoch, leadership, ranks up, switch results."""

    def __init__(self, controller) -> None:
        self.controller = controller

    def collect(self):
        c = self.controller
        d = [c.keys.deployment]
        desired = GaugeMetricFamily("hicache_ha_desired_epoch", "The epoch every rank should be on", labels=["deployment"])
        desired.add_metric(d, c.desired.epoch)
        leader = GaugeMetricFamily("hicache_ha_controller_leader", "1 while this controller holds the lease",
                                   labels=["deployment"])
        leader.add_metric(d, 1.0 if c.is_leader else 0.0)
        expected = GaugeMetricFamily("hicache_ha_ranks_expected", "Ranks the controller expects", labels=["deployment"])
        expected.add_metric(d, c.expected_ranks)
        up = GaugeMetricFamily("hicache_ha_rank_up", "1 while the rank's agent heartbeats the controller",
                               labels=RANK_LABELS)
        alive = set(c.alive())
        identities = {r: i.identity for r, i in c.ranks.items()}
        for r in sorted(set(c.ranks) | set(range(c.expected_ranks))):
            ident = identities.get(r, {})
            up.add_metric([*d, str(r), *(str(ident.get(k, "")) for k in ("tp", "pp", "dp", "cp"))],
                          1.0 if r in alive else 0.0)
        switches = CounterMetricFamily("hicache_ha_switch_operations", "Switches and detaches by result",
                                       labels=["deployment", "kind", "result"])
        for (kind, result), n in sorted(c.switch_results.items()):
            switches.add_metric([*d, kind, result], n)
        yield from (desired, leader, expected, up, switches)


class WebhookMetrics(Collector):
    """Webhook deliveries per receiver: delivered, failed (after its retries), dropped (queue full)."""

    def __init__(self, sink, deployment: str = "default") -> None:
        self.sink = sink
        self.deployment = deployment

    def collect(self):
        family = CounterMetricFamily("hicache_ha_webhook_deliveries", "Events sent to webhook receivers, by result",
                                     labels=["deployment", "receiver", "result"])
        for d in self.sink.deliveries:
            for result, n in d.counts.items():
                family.add_metric([self.deployment, d.label, result], n)
        yield family


def registry_for(*collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def readiness(statuses: Statuses) -> tuple[bool, list[dict]]:
    """Ready when every rank of this process has an active member and it is healthy (a failed-over rank
    serving from a healthy standby is ready; a detached rank, or one whose active member tripped, is not)."""
    ranks = []
    for rank, _identity, status in statuses():
        states = {b["name"]: b.get("state") for b in status["backends"]}
        active = status["active"]
        ok = active is not None and states.get(active) == "healthy"
        ranks.append({"rank": rank, "ready": ok, "active": active,
                      "state": states.get(active) if active else "detached"})
    return bool(ranks) and all(r["ready"] for r in ranks), ranks


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def serve_process_metrics(port: int, statuses: Statuses, deployment: str = "default", host: str = "127.0.0.1",
                          *extra: Collector) -> tuple[WSGIServer, threading.Thread]:
    """Per-process endpoints for deployments without a controller: ``/metrics`` (prometheus_client's WSGI
    app), ``/healthz`` (the process answers) and ``/readyz`` (see :func:`readiness`; 503 says why)."""
    metrics = make_wsgi_app(registry_for(RankMetrics(statuses, deployment), *extra))

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path not in ("/readyz", "/healthz"):
            return metrics(environ, start_response)
        ok, ranks = readiness(statuses) if path == "/readyz" else (True, None)
        body = json.dumps({"ready" if path == "/readyz" else "ok": ok, "deployment": deployment,
                           **({"ranks": ranks} if ranks is not None else {})}).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="hicache-ha-metrics", daemon=True)
    thread.start()
    return server, thread
