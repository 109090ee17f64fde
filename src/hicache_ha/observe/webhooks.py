"""Event webhooks: every transition and switch POSTed to configured URLs, never blocking anyone.

Events go into a bounded queue (a full queue drops and counts); one sender thread delivers them with a
timeout per request and a bounded number of retries with backoff. Two forms: ``generic`` (the event as
JSON) and ``alertmanager`` (a one-alert array for Alertmanager's /api/v2/alerts).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from queue import Empty, Full, Queue
from typing import Any, Optional

import httpx

from ..config import WebhookConfig

log = logging.getLogger("hicache_ha.observe")


SEVERITY = {"circuit_broken": "warning", "detached": "warning", "aborted": "warning", "rolled back": "critical"}


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


class WebhookSink:
    """Call it with an event dict; it returns at once."""

    def __init__(self, hooks: list[WebhookConfig], queue_size: int = 1000,
                 client: Optional[httpx.Client] = None) -> None:
        self.hooks = hooks
        self.queue: Queue = Queue(maxsize=queue_size)
        self.client = client or httpx.Client()
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hicache-ha-webhooks", daemon=True)
        self._thread.start()

    def __call__(self, event: Any) -> None:
        payload = event.to_dict() if hasattr(event, "to_dict") else dict(event)
        try:
            self.queue.put_nowait(payload)
        except Full:
            self.dropped += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=0.2)
            except Empty:
                continue
            for hook in self.hooks:
                if self._deliver(hook, event):
                    self.delivered += 1
                else:
                    self.failed += 1

    def _deliver(self, hook: WebhookConfig, event: dict) -> bool:
        body = alertmanager_form(event) if hook.format == "alertmanager" else event
        delay = hook.backoff_ms / 1000
        for attempt in range(hook.retries + 1):
            try:
                r = self.client.post(hook.url, json=body, timeout=hook.timeout_ms / 1000)
                if r.status_code < 300:
                    return True
                if 400 <= r.status_code < 500 and r.status_code != 429:
                    break  # the receiver rejects this payload; retrying will not help
            except httpx.HTTPError:
                pass
            if attempt < hook.retries and not self._stop.wait(delay):
                delay *= 2
        log.warning("hicache-ha: webhook %s: event not delivered after %d attempt(s)", _host(hook.url),
                    hook.retries + 1)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.client.close()


def _host(url: str) -> str:
    """The URL without path or query (they may carry tokens), for logs."""
    return httpx.URL(url).copy_with(path="/", query=None, fragment=None).__str__()
