"""Log format: plain lines by default, or one JSON object per line (``--log-format json`` or
``$HICACHE_HA_LOG_FORMAT=json``). Transitions are logged one line each, with their reason; secrets
(admin key, passwords) are never passed to a logger in the first place."""

from __future__ import annotations

import json
import logging
import os
import time

ENV_FORMAT = "HICACHE_HA_LOG_FORMAT"


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
        return json.dumps(doc, ensure_ascii=False)


def use_json_if_asked(logger_name: str = "hicache_ha") -> None:
    """In a host process (SGLang) whose logging we do not own: honour $HICACHE_HA_LOG_FORMAT=json for
    our own logger only."""
    if os.environ.get(ENV_FORMAT, "").lower() != "json":
        return
    logger = logging.getLogger(logger_name)
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
