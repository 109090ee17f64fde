"""hicache-ha: a high-availability layer for SGLang HiCache's L3 storage.

``import hicache_ha`` needs neither sglang nor torch; ``hicache_ha.sglang`` (HAStorage) does.
"""

from .config import HAConfig, load, parse
from .dataplane import BackendManager, Layout

__version__ = "0.1.0"
__all__ = ["BackendManager", "HAConfig", "Layout", "load", "parse", "__version__"]
