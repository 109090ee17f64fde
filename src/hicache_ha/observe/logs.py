"""Log format and delivery.

Format: plain lines by default, or one JSON object per line (``--log-format json`` or
``$HICACHE_HA_LOG_FORMAT=json``). Transitions are logged one line each, with their reason; secrets
(admin key, passwords) are never passed to a logger in the first place.

Delivery inside a host process (SGLang): the host owns its handlers, and one of them may block (a full
stderr pipe, a slow remote sink). ``queue_logging`` sends every ``hicache_ha`` record through a queue
to one listener thread, so neither an engine thread nor the supervisor ever waits on a handler.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import time
from typing import Optional

ENV_FORMAT = "HICACHE_HA_LOG_FORMAT"
LOGGER = "hicache_ha"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


class _Forward(logging.Handler):
    """On the listener thread: hand a record to ``target`` (our JSON handler), else to the host's
    root handlers, as if it had propagated."""

    def __init__(self, target: Optional[logging.Handler]) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is not None:
            self.target.handle(record)
        else:
            logging.getLogger().handle(record)


class _Queued(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Keep the record as it is (args, exc_info) for the real handler's formatter; only make sure
        # the traceback text exists now, while the exception is alive.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        return record


def queue_logging(json_format: Optional[bool] = None) -> None:
    """Route every ``hicache_ha`` record through a queue and a listener thread (once per process).
    ``json_format`` defaults to ``$HICACHE_HA_LOG_FORMAT == json``."""
    logger = logging.getLogger(LOGGER)
    if any(isinstance(h, _Queued) for h in logger.handlers):
        return
    if json_format is None:
        json_format = os.environ.get(ENV_FORMAT, "").lower() == "json"
    target = None
    if json_format:
        target = logging.StreamHandler()
        target.setFormatter(JsonFormatter())
    records: queue.SimpleQueue = queue.SimpleQueue()
    logger.addHandler(_Queued(records))
    logger.propagate = False
    logging.handlers.QueueListener(records, _Forward(target), respect_handler_level=False).start()
