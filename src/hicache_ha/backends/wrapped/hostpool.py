"""SGLang's host pools, as hicache-ha reads and writes their pages.

A stored page is always the pool's flat page (``get_data_page(flat=True)``, in the pool's own byte
order), so pages written by the legacy, v1 and v2 paths are one format. Where the pool allows it
(``page_first`` and ``page_first_direct``: a page is one or two contiguous pieces of ``kv_buffer``,
located by SGLang's own ``get_page_buffer_meta``), pages are read from and written into host memory in
place, with no copy of their own; otherwise through the pool's flat-page methods, with the page bytes
viewed in the page's dtype (the pool reshapes what it is given in that dtype).

A page handed around is one buffer, or a tuple of buffers whose concatenation is the page (its pieces
in host memory, never joined unless a consumer needs one buffer).
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..base import join_parts

IN_PLACE_LAYOUTS = ("page_first", "page_first_direct")
MAX_PIECES = 2  # K and V: more pieces per page (layer_first) cost more in Python than the pool's one copy


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A flat byte view of a CPU tensor (a copy only when the tensor is not contiguous)."""
    return tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()


def clone_pool(pool: Any, pages: int) -> Any:
    """A host pool of the engine pool's own class, layout and dtype with room for ``pages`` pages, laid
    out by SGLang's own ``init_kv_buffer``: its pages have the engine's byte format and piece geometry,
    and its ``get_page_buffer_meta`` points into its own memory."""
    twin = copy.copy(pool)
    twin.page_num = pages
    twin.size = pages * pool.page_size
    twin.kv_buffer = twin.init_kv_buffer()
    twin.lock = threading.RLock()
    twin.clear()
    return twin


class PagePool:
    """One registered host pool: its page geometry and how to move its pages."""

    def __init__(self, name: Any, pool: Any) -> None:
        self.name = str(getattr(name, "value", name))
        self.pool = pool
        self.page_size = int(getattr(pool, "page_size", 1) or 1)
        dummy = pool.get_dummy_flat_data_page()
        self.dtype = dummy.dtype
        self.page_bytes = dummy.numel() * dummy.element_size()
        self._memory, self._base = self._in_place_memory()

    @property
    def in_place(self) -> bool:
        return self._memory is not None

    def _in_place_memory(self) -> tuple[Optional[np.ndarray], int]:
        """A byte view of the pool's memory, if its pages are at most MAX_PIECES contiguous pieces of it
        whose concatenation is the flat page (SGLang documents this for the page_first layouts)."""
        buffer = getattr(self.pool, "kv_buffer", None)
        meta = getattr(self.pool, "get_page_buffer_meta", None)
        if (getattr(self.pool, "layout", None) not in IN_PLACE_LAYOUTS or not isinstance(buffer, torch.Tensor)
                or buffer.device.type != "cpu" or not buffer.is_contiguous() or meta is None):
            return None, 0
        try:
            first_page = torch.arange(0, self.page_size * max(1, int(getattr(self.pool, "dcp_size", 1))))
            ptrs, sizes = meta(first_page)
        except Exception:  # a pool without zero-copy metadata: use its flat-page methods
            return None, 0
        base = buffer.data_ptr()
        end = base + buffer.numel() * buffer.element_size()
        if (not 0 < len(ptrs) <= MAX_PIECES or sum(sizes) != self.page_bytes
                or any(not base <= p and p + n <= end for p, n in zip(ptrs, sizes))):
            return None, 0
        return as_bytes(buffer), base

    def slots(self, host_indices: torch.Tensor, pages: int) -> Optional[list[int]]:
        """The host slot where each page starts, or None if ``host_indices`` does not hold ``pages`` pages."""
        if host_indices is None or host_indices.numel() != pages * self.page_size:
            return None
        return host_indices[:: self.page_size].tolist()

    def _pieces_of(self, host_indices: torch.Tensor, pages: int) -> list[list[tuple[int, int]]]:
        """Per page, its pieces as (offset into the pool's memory, length)."""
        ptrs, sizes = self.pool.get_page_buffer_meta(host_indices)
        per_page = len(ptrs) // pages
        base = self._base
        return [[(ptrs[j] - base, sizes[j]) for j in range(i * per_page, (i + 1) * per_page)] for i in range(pages)]

    def pages(self, host_indices: torch.Tensor, slots: Sequence[int]) -> list:
        """The pages at ``slots`` as buffers to store: pieces of host memory (a tuple), or one flat copy."""
        if self._memory is not None:
            memory = self._memory
            return [tuple(memory[o:o + n] for o, n in page)
                    for page in self._pieces_of(host_indices, len(slots))]
        return [as_bytes(self.pool.get_data_page(slot, flat=True)) for slot in slots]

    def writer(self, host_indices: torch.Tensor, slots: Sequence[int]) -> Callable[[int, Any], None]:
        """``sink(i, page)``: copy verified page ``i`` into the pool at its slot (called on a worker,
        under the call's fence)."""
        if self._memory is not None:
            memory = self._memory
            pieces = self._pieces_of(host_indices, len(slots))

            def in_place(i: int, page: Any) -> None:
                dest = pieces[i]
                if isinstance(page, tuple) and len(page) == len(dest) and all(
                        memoryview(p).nbytes == n for p, (_o, n) in zip(page, dest)):
                    for part, (offset, n) in zip(page, dest):  # the same geometry: piece by piece
                        memory[offset:offset + n] = np.frombuffer(part, dtype=np.uint8)
                    return
                src = np.frombuffer(join_parts(page), dtype=np.uint8)
                at = 0
                for offset, n in dest:
                    memory[offset:offset + n] = src[at:at + n]
                    at += n

            return in_place
        pool, dtype = self.pool, self.dtype

        def through_pool(i: int, page: Any) -> None:
            flat = torch.frombuffer(join_parts(page), dtype=torch.uint8).view(dtype)
            pool.set_from_flat_data_page(slots[i], flat)

        return through_pool
