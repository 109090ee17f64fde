"""A multi-turn, prefix-sharing workload with pages whose bytes derive from their keys.

Keys chain like SGLang's page hashes: a page's key hashes its parent's key and its own tokens, so two
requests that share a prefix share its pages. Every page's content is a function of (rank, key), so
every read is verified byte for byte.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from hashlib import blake2b

_BLOCK = 4096


def chain_key(parent: str, token_block: int) -> str:
    return blake2b(f"{parent}/{token_block}".encode(), digest_size=16).hexdigest()


def page_bytes(rank: int, key: str, size: int) -> bytes:
    """The content of page ``key`` on ``rank``: a key-derived 4 KiB block repeated to ``size`` bytes."""
    seed = blake2b(f"{rank}:{key}".encode(), digest_size=64).digest()
    block = (seed * (_BLOCK // len(seed)))
    reps, rest = divmod(size, _BLOCK)
    return block * reps + block[:rest]


@dataclass
class Request:
    keys: list[str]  # every page of the request, from the start of the sequence


@dataclass
class Conversation:
    keys: list[str] = field(default_factory=list)


class Workload:
    """Conversations that start from one of a few shared system prompts and grow turn by turn."""

    def __init__(self, *, conversations: int = 64, system_prompts: int = 4, system_pages: int = 32,
                 turn_pages: tuple[int, int] = (8, 64), max_pages: int = 512, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.turn_pages = turn_pages
        self.max_pages = max_pages
        self.prompts = []
        for p in range(system_prompts):
            keys, parent = [], f"system-{p}"
            for i in range(system_pages):
                parent = chain_key(parent, i)
                keys.append(parent)
            self.prompts.append(keys)
        self.conversations = [self._fresh() for _ in range(conversations)]
        self._next_block = 1_000_000

    def _fresh(self) -> Conversation:
        return Conversation(list(self.rng.choice(self.prompts)))

    def next_request(self) -> Request:
        i = self.rng.randrange(len(self.conversations))
        conv = self.conversations[i]
        if len(conv.keys) >= self.max_pages:  # the conversation ends; a new one takes its place
            conv = self.conversations[i] = self._fresh()
        parent = conv.keys[-1]
        for _ in range(self.rng.randint(*self.turn_pages)):
            self._next_block += 1
            parent = chain_key(parent, self._next_block)
            conv.keys.append(parent)
        return Request(list(conv.keys))
