"""Webhooks against real local HTTP receivers: delivery, both forms, retries, a receiver that hangs."""

import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hicache_ha.observe.webhooks import WebhookConfig, WebhookSink
from tests.control.conftest import AUTH, wait_for
from tests.observe.conftest import scrape


class Receiver:
    def __init__(self, status=200, hang_s=0.0, headers=None):
        self.bodies, self.status, self.hang_s, self.reply_headers = [], status, hang_s, headers or {}
        self.requests = []  # (time, headers, raw body)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), dict(self.headers), raw))
                outer.bodies.append(json.loads(raw))
                time.sleep(outer.hang_s)
                self.send_response(outer.status)
                for k, v in outer.reply_headers.items():
                    self.send_header(k, v)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receivers():
    made = []

    def make(**kw):
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


EVENT = {"time": 1700000000.0, "rank": 3, "backend": "primary", "from": "healthy", "to": "circuit_broken",
         "reason": "3 consecutive failures"}


def test_generic_and_alertmanager_forms_are_delivered(receivers):
    generic, am = receivers(), receivers()
    sink = WebhookSink([WebhookConfig(url=generic.url), WebhookConfig(url=am.url, format="alertmanager")])
    sink(EVENT)
    wait_for(lambda: generic.bodies and am.bodies, timeout=5, what="delivery")
    assert generic.bodies == [EVENT]
    [alert] = am.bodies[0]
    assert alert["labels"] == {"alertname": "HicacheHATransition", "severity": "warning", "to": "circuit_broken",
                               "from": "healthy", "rank": "3", "backend": "primary"}
    assert alert["annotations"]["reason"] == "3 consecutive failures" and alert["startsAt"].startswith("2023-11-14")
    sink.close()


def test_failures_are_retried_a_bounded_number_of_times(receivers):
    broken = receivers(status=503)
    sink = WebhookSink([WebhookConfig(url=broken.url, retries=2, backoff_ms=10)])
    sink(EVENT)
    wait_for(lambda: sink.failed == 1, timeout=5, what="the delivery to give up")
    assert len(broken.bodies) == 3  # the first try and two retries, no more
    sink.close()


def test_a_hanging_receiver_never_blocks_the_emitter_and_the_queue_stays_bounded(receivers):
    hung = receivers(hang_s=3.0)
    sink = WebhookSink([WebhookConfig(url=hung.url, timeout_ms=100, retries=0)], queue_size=5)
    took = []
    for _ in range(50):
        t0 = time.perf_counter()
        sink(EVENT)
        took.append(time.perf_counter() - t0)
    # Emitting is a queue put (microseconds), never a delivery: waiting for the receiver would cost each
    # event its 100 ms timeout (5 s in all). One put can be preempted on a busy machine: judge the median.
    assert statistics.median(took) < 0.001 and sum(took) < 1.0, f"ms: {[round(t * 1000, 2) for t in took]}"
    assert sink.dropped >= 40 and sink.deliveries[0].queue.qsize() <= 5
    wait_for(lambda: sink.failed >= 1, timeout=5, what="a timeout")
    sink.close()


def test_a_hanging_receiver_delays_no_other_receiver(receivers):
    hung, fine = receivers(hang_s=5.0), receivers()
    sink = WebhookSink([WebhookConfig(url=hung.url, timeout_ms=2000, retries=3), WebhookConfig(url=fine.url)])
    t0 = time.monotonic()
    for i in range(5):
        sink({**EVENT, "rank": i})
    wait_for(lambda: len(fine.bodies) == 5, timeout=5, what="the healthy receiver's deliveries")
    assert max(t for t, _h, _b in fine.requests) - t0 < 1.0  # not held behind the hung one's timeouts
    sink.close()


def test_requests_are_signed_and_carry_the_configured_authorization(receivers, tmp_path):
    import hashlib
    import hmac

    hook = receivers()
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "auth").write_text("Bearer receiver-token\n")
    sink = WebhookSink([WebhookConfig(url=hook.url, secret_file=tmp_path / "secret", auth_header_file=tmp_path / "auth")])
    sink(EVENT)
    wait_for(lambda: hook.requests, timeout=5, what="delivery")
    _t, headers, raw = hook.requests[0]
    stamp = headers["X-Hicache-HA-Timestamp"]
    expected = "sha256=" + hmac.new(b"s3cret", stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
    assert headers["X-Hicache-HA-Signature"] == expected
    assert abs(int(stamp) - time.time()) < 60
    assert headers["Authorization"] == "Bearer receiver-token"
    sink.close()


def test_retry_after_is_honoured(receivers):
    busy = receivers(status=503, headers={"Retry-After": "1"})
    sink = WebhookSink([WebhookConfig(url=busy.url, retries=1, backoff_ms=10)])
    sink(EVENT)
    wait_for(lambda: sink.failed == 1, timeout=5, what="the delivery to give up")
    (t1, _h, _b), (t2, _h2, _b2) = busy.requests
    assert t2 - t1 >= 0.95  # the receiver's 1 s, not our 10 ms backoff
    sink.close()


def test_the_controller_posts_rank_transitions_and_switches(cluster_factory, receivers):
    hook = receivers()
    c = cluster_factory({"backends": [{"name": "primary", "type": "memory"}, {"name": "standby", "type": "memory"}],
                         "observe": {"webhooks": [{"url": hook.url}]}}, ranks=2)
    sink = WebhookSink(c.config.observe.webhooks)
    c.controller.listeners.append(sink)
    c.client.put("/hicache/storage-backend", json={"backend": "standby"}, headers=AUTH)
    wait_for(lambda: any(b.get("to") == "standby" and b.get("rank") == 1 for b in hook.bodies), timeout=5,
             what="rank 1's move to reach the webhook")
    assert any(b.get("rank") is None and b.get("to") == "standby" for b in hook.bodies)  # the switch itself
    sink.close()


def test_invalid_webhook_config_is_refused():
    from hicache_ha.backends.errors import ConfigError
    from hicache_ha.config import parse

    with pytest.raises(ConfigError, match="url"):
        parse({"backends": [{"name": "m", "type": "memory"}], "observe": {"webhooks": [{"url": "ftp://x"}]}},
              environ={})


def deliveries(exposition: str, deployment: str) -> dict:
    """(receiver, result) -> value of hicache_ha_webhook_deliveries_total in a Prometheus exposition."""
    return {(labels["receiver"], labels["result"]): value
            for labels, value in scrape(exposition).get("hicache_ha_webhook_deliveries_total", [])
            if labels["deployment"] == deployment}


def test_the_delivery_counters_count_each_receivers_results(receivers):
    """delivered, failed after its retries, failed at once on a 4xx: one series per receiver and result."""
    from hicache_ha.observe.metrics import WebhookMetrics, registry_for, render

    fine, busy, refusing = receivers(), receivers(status=503), receivers(status=400)
    sink = WebhookSink([WebhookConfig(url=fine.url), WebhookConfig(url=busy.url, retries=1, backoff_ms=10),
                        WebhookConfig(url=refusing.url, retries=3, backoff_ms=10)])
    registry = registry_for(WebhookMetrics(sink, "fleet-a"))
    try:
        receivers_ = ("0:127.0.0.1", "1:127.0.0.1", "2:127.0.0.1")
        zero = {(r, result): 0.0 for r in receivers_ for result in ("delivered", "failed", "dropped")}
        assert deliveries(render(registry).decode(), "fleet-a") == zero  # every series exists from the start
        for i in range(3):
            sink({**EVENT, "rank": i})
        wait_for(lambda: sum(d.counts["delivered"] + d.counts["failed"] for d in sink.deliveries) == 9, timeout=10,
                 what="every event to be delivered or given up")
        assert deliveries(render(registry).decode(), "fleet-a") == {
            **zero, ("0:127.0.0.1", "delivered"): 3.0, ("1:127.0.0.1", "failed"): 3.0, ("2:127.0.0.1", "failed"): 3.0}
        assert (len(fine.requests), len(busy.requests), len(refusing.requests)) == (3, 6, 3)  # a 400 is not retried
    finally:
        sink.close()


def test_events_dropped_on_a_full_queue_are_counted_for_that_receiver_only(receivers):
    from hicache_ha.observe.metrics import WebhookMetrics, registry_for, render

    hung, fine = receivers(hang_s=6.0), receivers()
    # The hung request's timeout (4 s) outlasts the test's emitting by far: its queue stays full meanwhile.
    sink = WebhookSink([WebhookConfig(url=hung.url, timeout_ms=4000, retries=0), WebhookConfig(url=fine.url)],
                       queue_size=1)
    registry = registry_for(WebhookMetrics(sink, "fleet-a"))
    try:
        sink(EVENT)
        wait_for(lambda: hung.requests and len(fine.bodies) == 1, timeout=5, what="the first event to be in flight")
        for i in range(4):  # the hung receiver's queue holds one more; three are dropped
            sink({**EVENT, "rank": i})
            wait_for(lambda: len(fine.bodies) == i + 2, timeout=5, what="the healthy receiver's delivery")
        assert deliveries(render(registry).decode(), "fleet-a") == {
            ("0:127.0.0.1", "delivered"): 0.0, ("0:127.0.0.1", "failed"): 0.0, ("0:127.0.0.1", "dropped"): 3.0,
            ("1:127.0.0.1", "delivered"): 5.0, ("1:127.0.0.1", "failed"): 0.0, ("1:127.0.0.1", "dropped"): 0.0}
    finally:
        sink.close()


def test_the_controllers_metrics_serve_the_delivery_counters(receivers, tmp_path):
    """The standalone controller built from a config with webhooks: its /metrics (no key) carries them."""
    import httpx

    from hicache_ha.config import parse
    from hicache_ha.control.service import start_controller
    from hicache_ha.sim.servers import free_port
    from tests.control.conftest import KEY

    fine, busy = receivers(), receivers(status=503)
    cfg = parse({"backends": [{"name": "primary", "type": "memory"}],
                 "admin": {"mode": "remote", "deployment": "fleet-b", "port": free_port(), "agent_port": free_port(),
                           "state_file": str(tmp_path / "state.json")},
                 "observe": {"webhooks": [{"url": fine.url}, {"url": busy.url, "retries": 0}]}}, environ={})
    service = start_controller(cfg, expected_ranks=1, api_key=KEY)
    try:
        for _ in range(2):
            service.webhooks(EVENT)
        wait_for(lambda: len(fine.bodies) == 2 and service.webhooks.failed == 2, timeout=10, what="deliveries")
        got = deliveries(httpx.get(f"{service.url}/metrics", timeout=5).text, "fleet-b")
        assert got == {("0:127.0.0.1", "delivered"): 2.0, ("0:127.0.0.1", "failed"): 0.0,
                       ("0:127.0.0.1", "dropped"): 0.0, ("1:127.0.0.1", "delivered"): 0.0,
                       ("1:127.0.0.1", "failed"): 2.0, ("1:127.0.0.1", "dropped"): 0.0}
    finally:
        service.close()
