"""A logger for engine threads that never blocks them: records go through a queue to one thread.

The host process (SGLang) owns its log handlers; one of them may block (a full stderr pipe, a slow
remote sink). A record made on a prefetch or backup thread is queued here and handed to the
``hicache_ha`` logger (and so to the host's handlers) by a listener thread.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue

ENGINE_LOGGER = "hicache_ha.engine"


class _Forward(logging.Handler):
    """On the listener thread: hand the record to the ``hicache_ha`` logger's handlers and above."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("hicache_ha").handle(record)


def _engine_logger() -> logging.Logger:
    logger = logging.getLogger(ENGINE_LOGGER)
    if not any(isinstance(h, logging.handlers.QueueHandler) for h in logger.handlers):
        records: queue.SimpleQueue = queue.SimpleQueue()
        logger.addHandler(logging.handlers.QueueHandler(records))
        logger.propagate = False
        logging.handlers.QueueListener(records, _Forward()).start()  # a daemon thread
    return logger


engine_log = _engine_logger()
