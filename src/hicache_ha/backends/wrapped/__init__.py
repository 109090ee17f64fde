"""SGLang's own storage backends as hicache-ha members (``type: sglang``)."""

from .backend import SGLangBackend
from .config import SGLANG_BACKENDS, SGLangConfig, sglang_backends

__all__ = ["SGLangBackend", "SGLangConfig", "SGLANG_BACKENDS", "sglang_backends"]
