"""Pages through a v1 backend's bounce pool, on the member's workers.

SGLang's zero-copy backends move pages by host index into the pool registered with them, one KV page per
slot. Hybrid models have other pools too (Mamba and SWA states, the DSA indexer, draft pools), whose
pages have sizes of their own. A v1 backend is given the bounce pool only, so such a page is stored as
*units*: slot-sized pieces under keys of their own (``<key>@u<j>``, the last one padded), copied through
bounce slots in steps. Only a whole page counts: a page whose units are not all there is a miss.

KV pages are read into slots and handed on in place (the caller copies them into the engine's pool under
the call's fence); pages of other pools are copied out of the slots into buffers of their own, so a call
needs at most one batch of slots for them, whatever their size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..errors import BackendError

if TYPE_CHECKING:  # (no torch at import: the profiles' config checks use fold)
    from .bounce import BouncePool, Slots

UNIT = "@u"
BackendCall = Callable[[list, Any], Any]  # (keys, host indices) -> the backend's answer


class NotStored(BackendError):
    """The backend answered, but did not store every page."""


def unit_count(size: int, page_bytes: int) -> int:
    return max(1, -(-size // page_bytes))


def _unit_key(key: str, j: int) -> str:
    return f"{key}{UNIT}{j}"


def unit_keys(key: str, size: int, page_bytes: int) -> list[str]:
    return [_unit_key(key, j) for j in range(unit_count(size, page_bytes))]


def last_unit_key(key: str, size: int, page_bytes: int) -> str:
    return _unit_key(key, unit_count(size, page_bytes) - 1)


def fold(flags: Any, n: int) -> list[bool]:
    """One bool per key from a backend's answer (3FS answers per K and V half: 2 per key, or a bare True
    on an MLA rank that does not write; a short answer fails every key)."""
    if flags is True:
        return [True] * n
    if not isinstance(flags, (list, tuple)) or not flags or len(flags) % n:
        return [False] * n
    per = len(flags) // n
    return [all(flags[i * per:(i + 1) * per]) for i in range(n)]


def prefix(flags: list[bool]) -> list[bool]:
    """Only the pages before the first miss: past a miss, SGLang 0.5.23's 3FS client writes the next key's
    bytes into the wrong page and reports stale ones as read, and SGLang loads only a prefix anyway."""
    out, ok = [], True
    for flag in flags:
        ok = ok and bool(flag)
        out.append(ok)
    return out


Cut = Callable[[list[bool]], list[bool]]  # what a backend's per-key answers can be trusted for


def read_kv(get: BackendCall, slots: Slots, keys: list[str], step: int, cut: Cut) -> list:
    """KV pages into ``slots`` (one per key), in steps of ``step``: each page as the slots hold it, or None."""
    out: list = [None] * len(keys)
    for start in range(0, len(keys), step):
        part = keys[start:start + step]
        flags = cut(fold(get(part, slots.part(start, start + len(part))), len(part)))
        for j, page in enumerate(slots.read(start, start + len(part))):
            if flags[j]:
                out[start + j] = page
    return out


def write_kv(put: BackendCall, slots: Slots, keys: list[str], step: int, what: str) -> None:
    """KV pages already in ``slots`` (one per key) stored in steps; raise unless every page was stored."""
    for start in range(0, len(keys), step):
        part = keys[start:start + step]
        _all_stored(fold(put(part, slots.part(start, start + len(part))), len(part)), what)


def read_units(get: BackendCall, bounce: BouncePool, keys: list[str], sizes: list[int], step: int, cut: Cut) -> list:
    """Pages of other pools, unit by unit through at most ``step`` slots: a buffer of its own per page
    whose units all came back, else None."""
    pb = bounce.page_bytes
    plan = [(i, j, key) for i, (k, size) in enumerate(zip(keys, sizes)) for j, key in enumerate(unit_keys(k, size, pb))]
    pages: list[Optional[bytearray]] = [bytearray(size) for size in sizes]
    slots = bounce.acquire(min(step, len(plan)))
    try:
        for start in range(0, len(plan), len(slots.pages)):
            part = plan[start:start + len(slots.pages)]
            flags = cut(fold(get([key for _i, _j, key in part], slots.part(0, len(part))), len(part)))
            for (i, j, _key), ok, unit in zip(part, flags, slots.read(0, len(part))):
                page = pages[i]
                if page is None:
                    continue
                if not ok:
                    pages[i] = None
                    continue
                _copy_into(page, j * pb, unit)
    finally:
        slots.release()
    return pages


def _copy_into(page: bytearray, at: int, unit: Any) -> None:
    """A unit's bytes (one buffer, or its pieces of slot memory) into ``page`` from ``at``, cut at its end."""
    for piece in unit if isinstance(unit, tuple) else (unit,):
        view = memoryview(piece).cast("B")
        n = min(view.nbytes, len(page) - at)
        if n <= 0:
            return
        page[at:at + n] = view[:n]
        at += n


def write_units(put: BackendCall, slots: Slots, keys: list[str], pages: Sequence[Any], what: str) -> None:
    """Pages of other pools stored unit by unit through ``slots`` (the call's own: whatever it held for
    its KV pages, which are stored by then); raise unless every unit was stored."""
    pb = slots.bounce.page_bytes
    plan = []
    for key, page in zip(keys, pages):
        view = memoryview(page)
        for j, unit_key in enumerate(unit_keys(key, view.nbytes, pb)):
            piece = view[j * pb:(j + 1) * pb]
            plan.append((unit_key, piece if piece.nbytes == pb else bytes(piece) + bytes(pb - piece.nbytes)))
    width = len(slots.pages)
    for start in range(0, len(plan), width):
        part = plan[start:start + width]
        slots.write([piece for _key, piece in part])
        _all_stored(fold(put([key for key, _piece in part], slots.part(0, len(part))), len(part)), what)


def _all_stored(flags: list[bool], what: str) -> None:
    if not all(flags):
        raise NotStored(f"{what} stored {sum(flags)} of {len(flags)} pages")
