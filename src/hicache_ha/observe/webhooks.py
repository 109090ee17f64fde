"""Event webhooks: every transition and switch POSTed to configured URLs, never blocking anyone.

Each receiver has its own bounded queue and sender thread, so a dead or slow receiver delays no other
one. A request has a timeout; a failed one is retried a bounded number of times with backoff (a 429 or
503's ``Retry-After`` is honoured, capped); a 4xx other than 429 is not retried. With ``secret_file`` a
request is signed (``X-Hicache-HA-Signature: sha256=<HMAC of "<timestamp>.<body>">``, the timestamp in
``X-Hicache-HA-Timestamp``), so a receiver can check who sent it and refuse a replay; ``auth_header_file``
holds an ``Authorization`` value to send. Two forms: ``generic`` (the event as JSON) and
``alertmanager`` (a one-alert array for Alertmanager's /api/v2/alerts). Deliveries are counted per
receiver, for the metrics.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Any, Optional

import httpx

from ..config import WebhookConfig

log = logging.getLogger("hicache_ha.observe")

SEVERITY = {"circuit_broken": "warning", "detached": "warning", "aborted": "warning", "rolled back": "critical"}
MAX_RETRY_AFTER_S = 60.0


def alertmanager_form(event: dict) -> list[dict]:
    when = datetime.datetime.fromtimestamp(event.get("time", time.time()), datetime.timezone.utc).isoformat()
    labels = {"alertname": "HicacheHATransition", "severity": SEVERITY.get(event.get("to"), "info"),
              "to": str(event.get("to")), "from": str(event.get("from"))}
    if event.get("rank") is not None:
        labels["rank"] = str(event["rank"])
    if event.get("backend"):
        labels["backend"] = str(event["backend"])
    return [{"labels": labels, "startsAt": when,
             "annotations": {"summary": f"hicache-ha: {event.get('backend') or 'storage'} {event.get('from')} → "
                                        f"{event.get('to')}", "reason": str(event.get("reason", ""))}}]


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped; None if absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


@dataclass
class Delivery:
    """One receiver: its queue, its thread, its counts."""

    hook: WebhookConfig
    label: str
    queue: Queue
    secret: Optional[bytes] = None
    authorization: Optional[str] = None
    counts: dict = field(default_factory=lambda: {"delivered": 0, "failed": 0, "dropped": 0})


class WebhookSink:
    """Call it with an event dict; it returns at once."""

    def __init__(self, hooks: list[WebhookConfig], queue_size: int = 1000,
                 client: Optional[httpx.Client] = None) -> None:
        self.client = client or httpx.Client()
        self._stop = threading.Event()
        self.deliveries = [self._delivery(i, h, queue_size) for i, h in enumerate(hooks)]
        self._threads = [threading.Thread(target=self._run, args=(d,), name=f"hicache-ha-webhook-{i}", daemon=True)
                         for i, d in enumerate(self.deliveries)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _delivery(i: int, hook: WebhookConfig, queue_size: int) -> Delivery:
        def read(path: Optional[Path]) -> Optional[str]:
            return Path(path).read_text(encoding="utf-8").strip() if path else None

        secret = read(hook.secret_file)
        return Delivery(hook, f"{i}:{httpx.URL(hook.url).host}", Queue(maxsize=queue_size),
                        secret=secret.encode() if secret else None, authorization=read(hook.auth_header_file))

    @property
    def delivered(self) -> int:
        return sum(d.counts["delivered"] for d in self.deliveries)

    @property
    def failed(self) -> int:
        return sum(d.counts["failed"] for d in self.deliveries)

    @property
    def dropped(self) -> int:
        return sum(d.counts["dropped"] for d in self.deliveries)

    def __call__(self, event: Any) -> None:
        payload = event.to_dict() if hasattr(event, "to_dict") else dict(event)
        for d in self.deliveries:
            try:
                d.queue.put_nowait(payload)
            except Full:
                d.counts["dropped"] += 1

    def _run(self, d: Delivery) -> None:
        while not self._stop.is_set():
            try:
                event = d.queue.get(timeout=0.2)
            except Empty:
                continue
            d.counts["delivered" if self._deliver(d, event) else "failed"] += 1

    def _deliver(self, d: Delivery, event: dict) -> bool:
        hook = d.hook
        body = json.dumps(alertmanager_form(event) if hook.format == "alertmanager" else event).encode()
        delay = hook.backoff_ms / 1000
        for attempt in range(hook.retries + 1):
            headers = {"Content-Type": "application/json"}
            if d.authorization:
                headers["Authorization"] = d.authorization
            if d.secret:
                stamp = str(int(time.time()))
                headers["X-Hicache-HA-Timestamp"] = stamp
                headers["X-Hicache-HA-Signature"] = sign(d.secret, stamp, body)
            wait = delay
            try:
                r = self.client.post(hook.url, content=body, headers=headers, timeout=hook.timeout_ms / 1000)
                if r.status_code < 300:
                    return True
                if 400 <= r.status_code < 500 and r.status_code != 429:
                    break  # the receiver rejects this payload; retrying will not help
                asked = retry_after(r.headers.get("Retry-After")) if r.status_code in (429, 503) else None
                if asked is not None:
                    wait = asked
            except httpx.HTTPError:
                pass
            if attempt < hook.retries:
                if self._stop.wait(wait):
                    break
                delay *= 2
        log.warning("hicache-ha: webhook %s: event not delivered after %d attempt(s)", _host(hook.url),
                    hook.retries + 1)
        return False

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.client.close()


def _host(url: str) -> str:
    """The URL without path or query (they may carry tokens), for logs."""
    return httpx.URL(url).copy_with(path="/", query=None, fragment=None).__str__()
