"""SGLang integration: ``HAStorage``, built by SGLang's ``dynamic`` storage backend hook."""

from .storage import HAStorage, resolve_config

__all__ = ["HAStorage", "resolve_config"]
