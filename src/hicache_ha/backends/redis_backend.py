"""Redis / Valkey through redis-py: a URL or a Sentinel set, pipelined batches, bounded sockets.

redis-py's own retries are turned off: a retry inside a worker would only stretch a hang; the data
plane decides what happens after a failure. Socket timeouts are bounded so that a worker stuck on a
frozen server comes back and frees its bulkhead slot.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, ClassVar, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from .base import Backend, BackendConfig, BackendContext, Capabilities, join_parts
from .errors import BackendError, BackendRejected, BackendTimeout, BackendUnavailable

# Error codes that mean "this node cannot serve now" (a pipeline prefixes them with the failing command).
_UNAVAILABLE_CODES = re.compile(r"(^|: )(READONLY|LOADING|MASTERDOWN|CLUSTERDOWN|TRYAGAIN|NOREPLICAS)\b")
_OOM = re.compile(r"(^|: )OOM\b|used memory > 'maxmemory'")


class SentinelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    master: str = Field(description="the master's name as the sentinels know it")
    addresses: list[str] = Field(min_length=1, description="sentinel endpoints, 'host:port'")
    db: int = Field(default=0, ge=0)

    def endpoints(self) -> list[tuple[str, int]]:
        out = []
        for address in self.addresses:
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"sentinel address {address!r}: expected 'host:port'")
            out.append((host.strip("[]"), int(port)))
        return out


class RedisConfig(BackendConfig):
    url: Optional[str] = Field(default=None, description="redis://[:password@]host:port/db or rediss://…")
    urls: Optional[list[str]] = Field(default=None, min_length=1,
                                      description="instances of one cluster in order: on failure the next one that answers as master is used")
    sentinel: Optional[SentinelConfig] = Field(default=None, description="a Sentinel set instead of a URL")
    password_file: Optional[str] = Field(default=None, description="file holding the password (never inline)")
    connect_timeout_ms: int = Field(default=200, ge=1, description="TCP connect timeout")
    socket_timeout_ms: int = Field(default=2000, ge=1, description="read/write timeout; frees a worker stuck on a frozen server")
    max_connections: int = Field(default=32, ge=1, description="connection pool size")
    ttl_s: Optional[int] = Field(default=None, ge=1, description="expire pages after this many seconds")

    @model_validator(mode="after")
    def _one_endpoint(self) -> "RedisConfig":
        if sum(x is not None for x in (self.url, self.urls, self.sentinel)) != 1:
            raise ValueError("give exactly one of 'url', 'urls' or 'sentinel'")
        for url in self.endpoint_urls():
            if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
                raise ValueError(f"url {redact(url)!r}: scheme must be redis://, rediss:// or unix://")
        if self.sentinel is not None:
            self.sentinel.endpoints()
        return self

    def endpoint_urls(self) -> list[str]:
        return [self.url] if self.url else list(self.urls or [])


def redact(url: str) -> str:
    """The URL without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def map_redis_error(exc: Exception, name: str) -> BackendError:
    """One place that turns redis-py's exceptions into ours."""
    if isinstance(exc, redis.exceptions.TimeoutError):
        return BackendTimeout(f"redis {name!r}: timed out: {exc}", backend=name)
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.ReadOnlyError)):
        return BackendUnavailable(f"redis {name!r}: {exc}", backend=name)
    if isinstance(exc, redis.exceptions.ResponseError):
        message = str(exc)
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or _OOM.search(message):
            return BackendRejected(f"redis {name!r}: out of memory: {message}", backend=name)
        if _UNAVAILABLE_CODES.search(message):
            return BackendUnavailable(f"redis {name!r}: {message}", backend=name)
    return BackendError(f"redis {name!r}: {type(exc).__name__}: {exc}", backend=name)


class RedisBackend(Backend):
    Config: ClassVar[type[BackendConfig]] = RedisConfig
    capabilities: ClassVar[Capabilities] = Capabilities(envelope=True)

    def __init__(self, config: RedisConfig, clients: list, sentinel: Optional[Sentinel] = None) -> None:
        super().__init__(config)
        self._clients = clients  # one per URL (or the Sentinel's master client)
        self._current = 0
        self.client: redis.Redis = clients[0]
        self._sentinel = sentinel
        self._px = config.ttl_s * 1000 if config.ttl_s else None
        if sentinel is not None or len(clients) > 1:
            self.capabilities = replace(type(self).capabilities, cluster=True)

    @classmethod
    def from_config(cls, config: RedisConfig, context: BackendContext) -> "RedisBackend":
        password = None
        if config.password_file:
            with open(config.password_file, encoding="utf-8") as f:
                password = f.read().strip()
        common: dict[str, Any] = dict(
            socket_connect_timeout=config.connect_timeout_ms / 1000,
            socket_timeout=config.socket_timeout_ms / 1000,
            retry=Retry(NoBackoff(), 0),
            max_connections=config.max_connections,
        )
        if password is not None:
            common["password"] = password
        if config.sentinel is None:
            return cls(config, [redis.Redis.from_url(url, **common) for url in config.endpoint_urls()])
        s = config.sentinel
        sentinel = Sentinel(
            s.endpoints(),
            sentinel_kwargs={
                "socket_timeout": config.connect_timeout_ms / 1000,
                "socket_connect_timeout": config.connect_timeout_ms / 1000,
                "retry": Retry(NoBackoff(), 0),
            },
            **{k: v for k, v in common.items() if k != "max_connections"},
        )
        client = sentinel.master_for(s.master, db=s.db, max_connections=config.max_connections)
        return cls(config, [client], sentinel)

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.exceptions.RedisError as exc:
            raise map_redis_error(exc, self.name) from exc

    def reconnect(self) -> Optional[str]:
        """Sentinel: ask for the current master and drop connections to the old one. URL list: move to
        the next instance that answers as a master."""
        if self._sentinel is not None:
            try:
                host, port = self._sentinel.discover_master(self.config.sentinel.master)
            except redis.exceptions.RedisError:
                return None
            self.client.connection_pool.disconnect()
            try:
                self.client.ping()
            except redis.exceptions.RedisError:
                return None
            return f"master {host}:{port}"
        n = len(self._clients)
        for step in range(1, n):
            i = (self._current + step) % n
            candidate = self._clients[i]
            try:
                if candidate.execute_command("ROLE")[0] not in (b"master", "master"):
                    continue
            except redis.exceptions.RedisError:
                continue
            self._current, self.client = i, candidate
            return redact(self.config.endpoint_urls()[i])
        return None

    def exists(self, keys: Sequence[str]) -> int:
        found = self.exists_each(keys)
        return found.index(False) if False in found else len(found)

    def exists_each(self, keys: Sequence[str]) -> list[bool]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(hit) for hit in pipe.execute()]
        except redis.exceptions.RedisError as exc:
            raise map_redis_error(exc, self.name) from exc

    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list:
        if not keys:
            return []
        try:
            return self.client.mget(keys)
        except redis.exceptions.RedisError as exc:
            raise map_redis_error(exc, self.name) from exc

    def set(self, keys: Sequence[str], values: Sequence[Any]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in zip(keys, values):
                pipe.set(key, join_parts(value), px=self._px)
            pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise map_redis_error(exc, self.name) from exc

    def clear(self, prefix: str) -> None:
        try:
            for key in self.client.scan_iter(match=prefix + "*", count=1000):
                self.client.delete(key)
        except redis.exceptions.RedisError as exc:
            raise map_redis_error(exc, self.name) from exc

    def close(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:  # closing a broken connection must not fail a switch
                pass

    def describe(self) -> dict:
        c = self.config
        if c.sentinel is not None:
            where = f"sentinel:{c.sentinel.master}@{','.join(c.sentinel.addresses)}"
        else:
            where = redact(c.endpoint_urls()[self._current])
        return {**super().describe(), "endpoint": where}
