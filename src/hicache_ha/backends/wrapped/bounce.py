"""Host memory a wrapped member owns: the pages SGLang's zero-copy backends read into and write from.

A zero-copy (v1) backend moves pages between storage and host memory it was given, by pointer, on its
own threads. Given the engine's host pool, a call the engine already gave up on could still write into
engine memory, or read engine memory the engine reused. So the backend gets a pool of its own: a twin of
the engine's pool (same class, layout, dtype, so the same page format), registered with the backend, and
the data plane copies pages between the two: into the engine's pool on the worker under the call's
fence, out of it on the engine thread before the call is queued.

Slots are handed out per call and given back when the call is over. A call whose backend never returns
keeps its slots, since the backend may still write into them. The pool is sized so that every worker
can hold one full batch at once, plus a page per health check; beyond that a call is refused
(``Refused``: our own load, never held against the backend).
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import torch

from ..errors import Refused
from .hostpool import PagePool, clone_pool

CHECK_PAGES = 4  # one canary page per health-check worker


class BouncePool:
    def __init__(self, engine_pool: Any, pages: int, name: str = "bounce") -> None:
        self.pool = clone_pool(engine_pool, pages)
        self.view = PagePool(name, self.pool)
        self.page_size = self.view.page_size
        self.page_bytes = self.view.page_bytes
        self.pages = pages
        buffer = self.pool.kv_buffer
        self.nbytes = int(buffer.numel() * buffer.element_size())
        self._free = list(range(pages - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self, n: int) -> "Slots":
        """``n`` pages of room now, or ``Refused``."""
        with self._lock:
            if n > len(self._free):
                raise Refused(f"bounce pool: {n} pages asked, {len(self._free)} of {self.pages} free")
            taken = [self._free.pop() for _ in range(n)]
        return Slots(self, taken)

    def _give_back(self, slots: "Slots") -> None:
        with self._lock:
            if not slots._released:
                slots._released = True
                self._free.extend(slots.pages)


class Slots:
    """Pages of a bounce pool held by one call; ``release`` (idempotent) gives them back."""

    __slots__ = ("bounce", "pages", "indices", "slots", "_released")

    def __init__(self, bounce: BouncePool, pages: list[int]) -> None:
        self.bounce = bounce
        self.pages = pages
        size = bounce.page_size
        self.indices = (torch.tensor(pages, dtype=torch.int64).repeat_interleave(size) * size
                        + torch.arange(size, dtype=torch.int64).repeat(len(pages)))  # host token indices
        self.slots = [p * size for p in pages]
        self._released = False

    def part(self, start: int, stop: int) -> torch.Tensor:
        """Host indices of pages ``start:stop`` (one backend call of a larger batch)."""
        size = self.bounce.page_size
        return self.indices[start * size:stop * size]

    def read(self, start: int, stop: int) -> list:
        """Pages ``start:stop``, as the backend left them (pieces of bounce memory, or flat copies)."""
        return self.bounce.view.pages(self.part(start, stop), self.slots[start:stop])

    def write(self, values: Sequence[Any]) -> None:
        """Copy pages (buffers or tuples of pieces) in, page ``i`` into the ``i``-th slot."""
        put = self.bounce.view.writer(self.indices, self.slots)
        for i, value in enumerate(values):
            put(i, value)

    def release(self) -> None:
        self.bounce._give_back(self)


def default_pages(workers: int, batch_pages: int, configured: Optional[int]) -> int:
    return configured or workers * batch_pages + CHECK_PAGES
