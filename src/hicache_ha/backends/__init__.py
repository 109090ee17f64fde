"""Storage backends behind one small contract (``Backend``), found by type through ``registry``."""

from .base import Backend, BackendConfig, BackendContext, Capabilities
from .errors import BackendError, BackendRejected, BackendTimeout, BackendUnavailable, ConfigError, CorruptPage

__all__ = [
    "Backend",
    "BackendConfig",
    "BackendContext",
    "Capabilities",
    "BackendError",
    "BackendRejected",
    "BackendTimeout",
    "BackendUnavailable",
    "ConfigError",
    "CorruptPage",
]
