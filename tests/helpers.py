"""Test helpers: a backend whose calls block until released (a controllable hang)."""

from __future__ import annotations

import os
import threading
import time
from typing import ClassVar

from hicache_ha.backends.base import BackendConfig, BackendContext
from hicache_ha.backends.memory import MemoryBackend, MemoryConfig


class GateConfig(MemoryConfig):
    pass


class GateBackend(MemoryBackend):
    """An in-memory backend that can be made to hang: ``close_gate()`` and calls block until ``open_gate()``."""

    Config: ClassVar[type[BackendConfig]] = GateConfig
    instances: ClassVar[list] = []

    def __init__(self, config) -> None:
        super().__init__(config)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        GateBackend.instances.append(self)

    @classmethod
    def from_config(cls, config, context: BackendContext):
        return cls(config)

    def close_gate(self) -> None:
        self.gate.clear()

    def open_gate(self) -> None:
        self.gate.set()

    def _pass(self) -> None:
        self.entered.set()
        self.gate.wait(30)

    def exists(self, keys):
        self._pass()
        return super().exists(keys)

    def exists_each(self, keys):
        self._pass()
        return super().exists_each(keys)

    def get(self, keys, nbytes=None):
        self._pass()
        return super().get(keys, nbytes)

    def set(self, keys, values):
        self._pass()
        return super().set(keys, values)


GATE = "tests.helpers:GateBackend"


class FileGateConfig(MemoryConfig):
    gate_dir: str


class FileGateBackend(MemoryBackend):
    """An in-memory backend another process can make hang: while ``<gate_dir>/gate-<tp rank>`` exists,
    its calls (and probes) wait. For tests with rank processes."""

    Config: ClassVar[type[BackendConfig]] = FileGateConfig

    def __init__(self, config, rank: int) -> None:
        super().__init__(config)
        self.gate = os.path.join(config.gate_dir, f"gate-{rank}")

    @classmethod
    def from_config(cls, config, context: BackendContext):
        return cls(config, getattr(context.storage_config, "tp_rank", 0))

    def _pass(self) -> None:
        while os.path.exists(self.gate):
            time.sleep(0.01)

    def exists(self, keys):
        self._pass()
        return super().exists(keys)

    def exists_each(self, keys):
        self._pass()
        return super().exists_each(keys)

    def get(self, keys, nbytes=None):
        self._pass()
        return super().get(keys, nbytes)

    def set(self, keys, values):
        self._pass()
        return super().set(keys, values)


FILE_GATE = "tests.helpers:FileGateBackend"
