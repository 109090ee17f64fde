"""A bounded ring of transitions: every state change, switch and detach is one event."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Event:
    time: float  # wall clock, seconds since the epoch
    rank: int
    backend: Optional[str]
    from_state: str
    to_state: str
    reason: str
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["from"] = d.pop("from_state")
        d["to"] = d.pop("to_state")
        return d


Listener = Callable[[Event], None]


class EventLog:
    def __init__(self, rank: int = 0, maxlen: int = 1000, wall_clock: Callable[[], float] = time.time) -> None:
        self.rank = rank
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._wall = wall_clock

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, backend: Optional[str], from_state: str, to_state: str, reason: str, **detail) -> Event:
        event = Event(self._wall(), self.rank, backend, from_state, to_state, reason, detail)
        with self._lock:
            self._events.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break a transition
                pass
        return event

    def recent(self, limit: int = 100) -> list[Event]:
        with self._lock:
            return list(self._events)[-limit:]
