"""Find a backend class by its ``type``: a built-in, an entry point, or ``module:Class``.

Plugins register under the entry-point group ``hicache_ha.backends`` (name = the ``type`` users write).
Each class builds itself from its own config section (``Backend.from_config``): no factory chain here.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Literal

from pydantic import create_model

from .base import Backend
from .errors import ConfigError

ENTRY_POINT_GROUP = "hicache_ha.backends"

_BUILTINS = {
    "redis": "hicache_ha.backends.redis_backend:RedisBackend",
    "valkey": "hicache_ha.backends.redis_backend:RedisBackend",  # Valkey speaks Redis' protocol
    "file": "hicache_ha.backends.file_backend:FileBackend",
    "memory": "hicache_ha.backends.memory:MemoryBackend",
    "sglang": "hicache_ha.backends.wrapped:SGLangBackend",
}


def builtin_types() -> list[str]:
    return sorted(_BUILTINS)


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_types() -> list[str]:
    """Every type name users may write (module:Class types aside)."""
    return sorted({**_plugins(), **_BUILTINS})


def _import(target: str, type_name: str) -> type[Backend]:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ConfigError(f"backend type {type_name!r}: expected 'module:Class', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"backend type {type_name!r}: cannot import module {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(
            f"backend type {type_name!r}: {target!r} is not a hicache_ha.backends.Backend subclass"
        )
    return cls


@lru_cache(maxsize=None)
def resolve(type_name: str) -> type[Backend]:
    """Return the backend class for ``type_name``, or raise ConfigError listing what is known."""
    target = _BUILTINS.get(type_name) or _plugins().get(type_name)
    if target is None and ":" in type_name:
        target = type_name
    if target is None:
        raise ConfigError(
            f"unknown backend type {type_name!r}; known types: {', '.join(known_types())} "
            "(or 'module:Class' naming a Backend subclass)"
        )
    return _import(target, type_name)


@lru_cache(maxsize=None)
@lru_cache(maxsize=256)  # one model per type name, not one per parse
def config_model(type_name: str):
    """The config model for ``type_name``: the class's own Config, with ``type`` pinned to that name."""
    cls = resolve(type_name)
    return create_model(
        f"{cls.__name__}Spec", __base__=cls.Config, type=(Literal[type_name], ...)  # type: ignore[valid-type]
    )
