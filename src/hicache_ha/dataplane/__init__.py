"""The per-rank data plane: deadlines, bulkheads, integrity, the active member and its epoch."""

from .layout import Layout
from .manager import BackendManager
from .switch import DrainTimeout, PrepareRefused, Prepared, Superseded, SwitchError, UnknownBackend

__all__ = ["BackendManager", "DrainTimeout", "Layout", "PrepareRefused", "Prepared", "Superseded", "SwitchError",
           "UnknownBackend"]
