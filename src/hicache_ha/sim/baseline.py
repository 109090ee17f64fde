"""The unprotected baseline: the engine calling a backend directly, as SGLang does today.

A default redis-py client (no socket timeout, its default retries), called on the engine's own thread;
its exceptions reach the engine. Used side by side with the data plane in the failover benchmark.
"""

from __future__ import annotations

from typing import Optional, Sequence

import redis


class DirectRedis:
    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix

    def exists(self, keys: Sequence[str]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self.prefix + k)
        found = pipe.execute()
        return next((i for i, f in enumerate(found) if not f), len(keys))

    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list:
        return self.client.mget([self.prefix + k for k in keys])

    def set(self, keys: Sequence[str], values: Sequence) -> list:
        pipe = self.client.pipeline(transaction=False)
        for k, v in zip(keys, values):
            pipe.set(self.prefix + k, v)
        pipe.execute()
        return [True] * len(keys)

    def close(self) -> None:
        self.client.close()
