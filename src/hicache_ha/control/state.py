"""The controller's desired state (epoch, active member, attached specs, a switch in flight), persisted
so that a restarted controller resumes and a rank that was away converges to it."""

from __future__ import annotations

import json
import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class DesiredState:
    epoch: int = 1
    active: Optional[str] = None
    specs: dict = field(default_factory=dict)  # name -> spec of members attached through the API
    switch_in_flight: Optional[dict] = None  # {"token", "target", "base_epoch"} between prepare and the end

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DesiredState":
        return cls(**json.loads(text))


class StateStore(ABC):
    @abstractmethod
    def load(self) -> Optional[DesiredState]: ...

    @abstractmethod
    def save(self, state: DesiredState) -> None: ...


class FileStateStore(StateStore):
    """A JSON file replaced atomically (temp file + rename): a crash leaves the old or the new state."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)

    def load(self) -> Optional[DesiredState]:
        try:
            return DesiredState.from_json(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def save(self, state: DesiredState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class RedisStateStore(StateStore):
    """One key in Redis, for fleets whose controller may restart on another host."""

    def __init__(self, url: str, key: str = "hicache-ha:desired-state") -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.key = key

    def load(self) -> Optional[DesiredState]:
        raw = self.client.get(self.key)
        return DesiredState.from_json(raw.decode()) if raw else None

    def save(self, state: DesiredState) -> None:
        self.client.set(self.key, state.to_json())
