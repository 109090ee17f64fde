"""The integrity envelope around every page our own adapters store.

A page is stored as a 24-byte header followed by the payload::

    magic "HCHA" | version u8 | flags u8 | reserved u16 | length u64 | checksum u64

The checksum is xxh3-64 of the payload seeded with a hash of the storage key, so a page that was
truncated, altered, or filed under another key fails the check and is read as a miss.
"""

from __future__ import annotations

import struct

import xxhash

from .errors import CorruptPage

MAGIC = b"HCHA"
VERSION = 1
_HEADER = struct.Struct("<4sBBHQQ")
HEADER_SIZE = _HEADER.size
_xxh3 = xxhash.xxh3_64_intdigest


def _seed(storage_key: str) -> int:
    return _xxh3(storage_key.encode())


def checksum(storage_key: str, payload) -> tuple[int, int]:
    """(length, xxh3-64 seeded by the key) of ``payload``: one buffer, or a tuple of buffers whose
    concatenation is the page (pieces of host memory, never copied into one)."""
    if not isinstance(payload, tuple):
        view = memoryview(payload)
        return view.nbytes, _xxh3(view, _seed(storage_key))
    digest = xxhash.xxh3_64(seed=_seed(storage_key))
    length = 0
    for part in payload:
        view = memoryview(part)
        digest.update(view)
        length += view.nbytes
    return length, digest.intdigest()


def seal(storage_key: str, payload) -> bytes:
    """Return the header for ``payload`` stored under ``storage_key`` (see ``checksum``)."""
    return _HEADER.pack(MAGIC, VERSION, 0, 0, *checksum(storage_key, payload))


def open_page(storage_key: str, blob) -> memoryview:
    """Check a stored blob and return a view of its payload; raise CorruptPage if it does not match."""
    view = memoryview(blob)
    if view.nbytes < HEADER_SIZE:
        raise CorruptPage(f"page {storage_key!r}: {view.nbytes} bytes, shorter than its header")
    magic, version, _flags, _res, length, checksum = _HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise CorruptPage(f"page {storage_key!r}: not written by hicache-ha (bad magic or version)")
    payload = view[HEADER_SIZE:]
    if payload.nbytes != length:
        raise CorruptPage(f"page {storage_key!r}: {payload.nbytes} bytes stored, header says {length}")
    if _xxh3(payload, _seed(storage_key)) != checksum:
        raise CorruptPage(f"page {storage_key!r}: checksum mismatch")
    return payload
