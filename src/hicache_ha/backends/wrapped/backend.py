"""Any backend SGLang's own StorageBackendFactory builds (mooncake, hf3fs, nixl, seaweedfs, aibrix, file, …),
driven the way SGLang drives it, with HA on top.

- **Built off the engine's start-up path.** The backend is built on a thread of its own once what it needs
  is there (SGLang's host pool, for most), and start-up waits for it at most ``start_wait_ms``. A backend
  that cannot be built leaves its member ``circuit_broken`` with the reason; each recovery probe, paced by
  the breaker's backoff, tries the build again. A backend whose constructor can freeze the process
  (Mooncake's holds the GIL while it retries) is first checked from a child process.
- **Zero-copy as SGLang does it, into memory the member owns.** Backends SGLang drives through v1 get
  ``batch_get_v1`` / ``batch_set_v1`` with host indices into a bounce pool (``bounce.py``), a twin of the
  engine's pool registered with the backend; the data plane copies pages into the engine's pool under
  the call's fence. The others get the legacy calls with tensors this member allocates.
- **Verified pages.** Where a backend can keep one (``profiles.py``), a checksum record is stored beside
  every page and every page read is checked against it; a page without its record is a miss.
- **Scoped clear and repair** where the backend allows: only this deployment's and model's pages are
  removed, and a backend that cannot recover alone (3FS's metadata registration, the S3 bucket) is
  re-initialised by the member.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Optional, Sequence

from ..base import Backend, BackendContext, Capabilities, join_parts, page_nbytes
from ..envelope import checksum
from ..errors import BackendError, BackendUnavailable, ConfigError, CorruptPage
from .built import RECORD, Built, Staged, construct
from .config import SGLangConfig
from .profiles import Profile, profile_for
from .v1pages import (NotStored, last_unit_key, prefix, read_kv, read_units, unit_count, write_kv,
                      write_units)

log = logging.getLogger("hicache_ha.backends")


def _sizes(nbytes: Any, n: int) -> list:
    return list(nbytes) if isinstance(nbytes, (list, tuple)) else [nbytes] * n


def _runs(sizes: list) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal sizes: the host asks about one pool after another."""
    runs, start = [], 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[start]:
            runs.append((start, i))
            start = i
    return runs

_INSTALL_HINT = "type 'sglang' needs the sglang package: pip install sglang (with its storage backend's client)"
PROBE_KEY = "__hicache_ha_probe__"
PING_KEY = "__hicache_ha_ping__"


class SGLangBackend(Backend):
    Config: ClassVar[type] = SGLangConfig
    capabilities: ClassVar[Capabilities] = Capabilities(envelope=False, borrowed=True)

    def __init__(self, config: SGLangConfig, context: BackendContext) -> None:
        super().__init__(config)
        self.config: SGLangConfig = config
        self.context = context
        self.profile: Profile = profile_for(config.backend)
        self._built: Optional[Built] = None
        self._builder: Optional[threading.Thread] = None
        self._failure: Optional[str] = None
        self._attempts = 0
        self._lock = threading.Lock()
        self._closed = False
        self._unverified = 0  # pages read without a checksum record (served as misses)
        self._kv_page_bytes: Optional[int] = None  # legacy backends: the engine pool's page size, once asked
        self._canary: Optional[bytes] = None

    @classmethod
    def from_config(cls, config: SGLangConfig, context: BackendContext) -> "SGLangBackend":
        try:
            from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"{_INSTALL_HINT} ({exc})") from exc
        if context.storage_config is None:
            raise ConfigError(
                f"backend {config.name!r}: type 'sglang' runs inside SGLang (HAStorage), where the rank's "
                "storage config is known"
            )
        backend = cls(config, context)
        backend.host_ready()
        return backend

    # -- building -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._built is not None

    @property
    def pending(self) -> bool:
        return self._built is None and self._failure is None and not self._closed

    def not_ready_reason(self) -> str:
        if self._failure:
            return f"not built: {self._failure}"
        if self.profile.needs_pool and self.context.mem_pool_host is None:
            return "not built yet: waiting for SGLang's host pool"
        return "being built"

    def host_ready(self) -> None:
        """Build now if what the backend needs is there; start-up waits ``start_wait_ms`` at most."""
        if self.profile.needs_pool and self.context.mem_pool_host is None:
            return
        builder = self._start_build()
        if builder is not None:
            builder.join(self.config.start_wait_ms / 1000)
            if builder.is_alive():
                self._failure = self._failure or (
                    f"still being built after {self.config.start_wait_ms} ms; the engine goes on without it")
                log.warning("hicache-ha: %r (%s) is still being built after %d ms; the engine starts without it",
                            self.name, self.config.backend, self.config.start_wait_ms)

    def _start_build(self) -> Optional[threading.Thread]:
        with self._lock:
            if self._built is not None or self._closed:
                return None
            if self._builder is None or not self._builder.is_alive():
                self._attempts += 1
                self._builder = threading.Thread(target=self._build, name=f"hicache-ha-build-{self.name}",
                                                 daemon=True)
                self._builder.start()
            return self._builder

    def _build(self) -> None:
        t0 = time.monotonic()
        try:
            built = construct(self.config, self.profile, self.context)
            built.seconds = time.monotonic() - t0
        except Exception as exc:  # anything SGLang's constructor raises: the member stays out of traffic
            self._failure = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("hicache-ha: %r: SGLang's %s backend could not be built (attempt %d, %.1f s): %s",
                        self.name, self.config.backend, self._attempts, time.monotonic() - t0, self._failure)
            return
        with self._lock:
            if self._closed:
                built.close()
                return
            self._built, self._failure = built, None
        log.info("hicache-ha: %r: SGLang's %s backend built in %.2f s%s", self.name, self.config.backend,
                 built.seconds, f" (bounce pool: {built.bounce.pages} pages, {built.bounce.nbytes / 2**20:.1f} MiB)"
                 if built.bounce is not None else "")
        self.on_ready()

    def _require(self) -> Built:
        built = self._built
        if built is None:  # a probe starts the next attempt (paced by the breaker's backoff)
            raise BackendUnavailable(f"{self.name!r} ({self.config.backend}): {self.not_ready_reason()}",
                                     backend=self.name)
        return built

    # -- calls (on the member's workers) ------------------------------------------------------------
    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except BackendError:
            raise
        except Exception as exc:  # SGLang's backends raise anything; map it here
            if self._built is not None:
                self._repair(self._built, exc)
            raise BackendError(f"{self.config.backend} {what}: {type(exc).__name__}: {exc}",
                               backend=self.name) from exc

    def _repair(self, built: Built, why: Any) -> None:
        """Let the backend's profile re-initialise what it cannot bring back by itself (3FS's registration,
        the S3 bucket, NIXL's directories) after a failure; the failed call still counts as one."""
        if self.profile.repair is None:
            return
        try:
            if self.profile.repair(built.storage, why if isinstance(why, BaseException) else BackendError(str(why))):
                log.info("hicache-ha: %r: re-initialised %s after: %s", self.name, self.config.backend, why)
        except Exception as exc:  # the repair failed too: the breaker keeps the member out; probes retry
            log.debug("hicache-ha: %r: re-initialising %s failed: %s", self.name, self.config.backend, exc)

    def exists(self, keys: Sequence[str]) -> int:
        built = self._require()
        return int(self._call("batch_exists", built.storage.batch_exists, list(keys)) or 0)

    # -- which pages, under which keys ---------------------------------------------------------------
    def _takes(self, built: Built, size: Optional[int]) -> bool:
        """Does this backend store a page of ``size``? (AIBrix only takes pages shaped like the KV pool's.)"""
        return not self.profile.kv_only or size is None or size == self._kv_bytes(built)

    def _kv_bytes(self, built: Built) -> int:
        """Bytes of a KV page: the bounce pool's, else the engine pool's (asked once: SGLang makes a
        zeroed page to answer)."""
        if built.bounce is not None:
            return built.bounce.page_bytes
        if self._kv_page_bytes is None:
            pool = self.context.mem_pool_host
            if pool is None:
                raise BackendError(f"backend {self.name!r}: page size unknown (no host pool registered)",
                                   backend=self.name)
            page = pool.get_dummy_flat_data_page()
            self._kv_page_bytes = page.numel() * page.element_size()
        return self._kv_page_bytes

    def _is_unitized(self, built: Built, size: Optional[int]) -> bool:
        """A page another pool's size, through a bounce pool: stored as slot-sized units."""
        return built.bounce is not None and size is not None and size != built.bounce.page_bytes

    def _cut(self, flags: list[bool]) -> list[bool]:
        """Answers past a miss, where the backend's reads after one cannot be trusted (3FS)."""
        return flags if self.profile.reads_past_a_miss else prefix(flags)

    def exists_pages(self, keys: Sequence[str], nbytes=None) -> list[bool]:
        """Per page: from the checksum records where they are kept (a record is stored after its page, so
        it says the whole page is there: one round trip); else from the backend's own per-key lookup
        (3FS, NIXL: one round trip); else one ``batch_exists`` per pool, whose prefix count is all such a
        backend tells. A page stored as units is there when its last unit is."""
        built = self._require()
        keys, sizes = list(keys), _sizes(nbytes, len(keys))
        asked = [i for i, size in enumerate(sizes) if self._takes(built, size)]
        if built.sums is not None:
            found = self._call("checksum records", built.sums.exists, [keys[i] for i in asked])
        elif self.profile.exists_each is not None:
            names = self._names(built, keys, sizes, asked)
            found = self._call("batch_exists", self.profile.exists_each, built.storage, names)
        else:
            names, found = self._names(built, keys, sizes, asked), []
            for start, stop in _runs([sizes[i] for i in asked]):
                hits = int(self._call("batch_exists", built.storage.batch_exists, names[start:stop]) or 0)
                found += [j < hits for j in range(stop - start)]
        out = [False] * len(keys)
        for i, ok in zip(asked, found):
            out[i] = bool(ok)
        return out

    def _names(self, built: Built, keys: list, sizes: list, asked: list[int]) -> list[str]:
        """The key the backend holds for each asked page: a page stored as units, its last unit's."""
        return [last_unit_key(keys[i], sizes[i], built.bounce.page_bytes) if self._is_unitized(built, sizes[i])
                else keys[i] for i in asked]

    # -- reads (on the member's workers) -------------------------------------------------------------
    def get(self, keys: Sequence[str], nbytes=None) -> list:
        with self.fetch(keys, nbytes) as pages:
            return [None if p is None or isinstance(p, CorruptPage) else bytes(join_parts(p)) for p in pages]

    @contextmanager
    def fetch(self, keys: Sequence[str], nbytes=None) -> Iterator[list]:
        built = self._require()
        keys, sizes = list(keys), _sizes(nbytes, len(keys))
        if built.bounce is None:
            yield self._verified(built, keys, self._legacy_get(built, keys, sizes))
            return
        bounce, step = built.bounce, self.config.batch_pages
        out: list = [None] * len(keys)
        kv = [i for i, size in enumerate(sizes) if not self._is_unitized(built, size)]
        other = [i for i, size in enumerate(sizes) if self._is_unitized(built, size)]
        get = self._v1_call("batch_get_v1", built)
        if other:  # copied out of the slots first, so that the KV pages can stay in theirs
            pages = read_units(get, bounce, [keys[i] for i in other], [sizes[i] for i in other], step, self._cut)
            for i, page in zip(other, pages):
                out[i] = page
        slots = bounce.acquire(len(kv)) if kv else None
        try:
            if slots is not None:
                for i, page in zip(kv, read_kv(get, slots, [keys[i] for i in kv], step, self._cut)):
                    out[i] = page
            yield self._verified(built, keys, out)
        finally:
            if slots is not None:
                slots.release()

    def _v1_call(self, name: str, built: Built):
        method = getattr(built.storage, name)
        return lambda keys, indices: self._call(name, method, keys, indices)

    def _legacy_get(self, built: Built, keys: list[str], sizes: list) -> list:
        import torch

        out: list = [None] * len(keys)
        asked = [i for i, size in enumerate(sizes) if self._takes(built, size)]
        if self.profile.exists_before_get:  # a partial hit fails its whole batch_get: ask for the prefix
            asked = asked[:int(self._call("batch_exists", built.storage.batch_exists, [keys[i] for i in asked]) or 0)]
        if not asked:
            return out
        targets = [self._tensor(torch.empty(sizes[i] or self._kv_bytes(built), dtype=torch.uint8)) for i in asked]
        got = self._call("batch_get", built.storage.batch_get, [keys[i] for i in asked], targets)
        if isinstance(got, list):
            flags = self._cut([t is not None for t in got[:len(asked)]])
            for i, t, ok in zip(asked, got, flags):
                out[i] = t.contiguous().view(torch.uint8).reshape(-1).numpy() if ok else None
        return out

    def _tensor(self, raw: Any) -> Any:
        """A page's bytes as the legacy calls want them: in the pool's dtype where it is known (AIBrix
        checks it), else bytes."""
        pool = self.context.mem_pool_host
        dtype = getattr(pool, "dtype", None)
        if dtype is None or raw.numel() % dtype.itemsize:
            return raw
        return raw.view(dtype)

    def _verified(self, built: Built, keys: list[str], pages: list) -> list:
        """Each page checked against its record; a page without one is a miss, a mismatch is corrupt."""
        if built.sums is None:
            return pages
        present = [i for i, p in enumerate(pages) if p is not None]
        if not present:
            return pages
        records = self._call("checksum records", built.sums.get, [keys[i] for i in present])
        for i, record in zip(present, records):
            if record is None or len(record) != RECORD.size:
                pages[i] = None
                self._unverified += 1
                continue
            if RECORD.unpack(record) != checksum(keys[i], pages[i]):
                pages[i] = CorruptPage(f"page {keys[i]!r}: does not match its checksum record")
        return pages

    # -- writes: copied on the engine thread, stored (and checksummed) on a worker -------------------
    def stage(self, keys: Sequence[str], values: Sequence[Any]) -> Any:
        built = self._built
        if built is None:  # the worker's set will say why it cannot store
            return super().stage(keys, values)
        keys = list(keys)
        sizes = [page_nbytes(v) for v in values]
        stored = None  # it takes every page, but AIBrix only those shaped like the KV pool's
        if self.profile.kv_only:
            flags = [self._takes(built, size) for size in sizes]
            stored = None if all(flags) else flags
        taken = range(len(keys)) if stored is None else [i for i, ok in enumerate(stored) if ok]
        if built.bounce is None:
            pages = super().stage([keys[i] for i in taken], [values[i] for i in taken])
            return Staged(built, None, [keys[i] for i in taken], pages, [], [], stored)
        bounce = built.bounce
        kv = [i for i in taken if not self._is_unitized(built, sizes[i])]
        other = [i for i in taken if self._is_unitized(built, sizes[i])]
        # Copied now: a late worker must never read engine memory the engine reused.
        foreign = [bytes(join_parts(values[i])) for i in other]
        # The KV pages' slots, which also pass the other pools' pages through once the KV pages are stored
        # (a batch of them at most, whatever their size).
        units = sum(unit_count(len(p), bounce.page_bytes) for p in foreign)
        slots = bounce.acquire(max(len(kv), min(units, self.config.batch_pages)))  # Refused: our own load
        try:
            slots.write([values[i] for i in kv])
        except BaseException:
            slots.release()
            raise
        return Staged(built, slots, [keys[i] for i in kv], None, [keys[i] for i in other], foreign, stored)

    def unstage(self, staged: Any) -> None:
        if isinstance(staged, Staged):
            staged.release()

    def set(self, keys: Sequence[str], values: Any) -> Optional[list[bool]]:
        if not isinstance(values, Staged):  # staged before the backend was built
            self._require()
            raise BackendUnavailable(f"{self.name!r}: built while this write was queued; it is dropped",
                                     backend=self.name)
        staged = values
        try:
            built = staged.built
            if built is not self._built:
                raise BackendUnavailable(f"{self.name!r} was rebuilt while this write was queued", backend=self.name)
            records = None
            if built.sums is not None:  # from the member's own copy, before the slots pass other pools' pages
                kv_pages = staged.pages if staged.pages is not None else staged.slots.read(0, len(staged.keys))
                records = built.records(staged.keys + staged.foreign_keys, list(kv_pages) + staged.foreign_pages)
            try:
                if built.bounce is None:
                    self._legacy_set(built, staged)
                else:
                    put, what = self._v1_call("batch_set_v1", built), f"{self.config.backend} batch_set_v1"
                    write_kv(put, staged.slots, staged.keys, self.config.batch_pages, what)
                    if staged.foreign_keys:  # through the same slots, now that the KV pages are stored
                        write_units(put, staged.slots, staged.foreign_keys, staged.foreign_pages, what)
            except NotStored as exc:  # it answered, but did not store: it may need re-initialising
                exc.backend = self.name
                self._repair(built, exc)
                raise
            if records is not None and records[0]:
                self._call("checksum records", built.sums.put, *records)
            return staged.stored
        finally:
            staged.release()

    def _legacy_set(self, built: Built, staged: Staged) -> None:
        import torch

        if not staged.keys:
            return
        ok = self._call("batch_set", built.storage.batch_set, staged.keys,
                        [self._tensor(torch.frombuffer(p, dtype=torch.uint8)) for p in staged.pages])
        if not ok:
            raise NotStored(f"{self.config.backend} batch_set returned {ok!r}", backend=self.name)

    # -- health -------------------------------------------------------------------------------------
    def ping(self) -> None:
        built = self._require()
        self._call("batch_exists", built.storage.batch_exists, [PING_KEY])

    def probe(self) -> None:
        """Build if not built (each probe, paced by the backoff, is an attempt); then a canary page round
        trip through the same path engine calls take (bounce pool, v1, checksum record)."""
        if self._built is None:
            if not (self.profile.needs_pool and self.context.mem_pool_host is None):
                self._start_build()
            raise BackendUnavailable(f"{self.name!r} ({self.config.backend}): {self.not_ready_reason()}",
                                     backend=self.name)
        built = self._built
        page = self._canary_page(built)
        sc = self.context.storage_config  # one canary per rank and page format: deployments may share a store
        key = (f"{PROBE_KEY}-{self.name}-{str(sc.model_name or '').replace('/', '-')}-tp{sc.tp_rank}-pp{sc.pp_rank}"
               f"-{len(page)}")
        staged = self.stage([key], [page])
        self.set([key], staged)
        got = self.get([key], len(page))[0]
        if got is None:  # NIXL's POSIX plugin now and then fails to open a file it just wrote
            got = self.get([key], len(page))[0]  # (NIXL_ERR_BACKEND, seen in CI): one more read, not a rewrite
        if got is None or bytes(got) != page:
            raise BackendError(f"probe of {self.name!r}: canary read back {'nothing' if got is None else 'wrong'}",
                               backend=self.name)

    def _canary_page(self, built: Built) -> bytes:
        """A page whose content follows from its key, so a backend that keeps the first copy of a key
        (Mooncake skips keys it has) still reads back what the probe expects."""
        if self._canary is None:
            size = self._kv_bytes(built)
            pattern = f"hicache-ha canary {self.name} ".encode()
            self._canary = (pattern * (size // len(pattern) + 1))[:size]
        return self._canary

    # -- housekeeping -------------------------------------------------------------------------------
    def clear(self, prefix: str) -> None:
        built = self._require()
        if self.profile.clear is None:
            raise BackendError(f"{self.config.backend} cannot remove only this deployment's pages "
                               "(SGLang's clear() would remove every model's): nothing removed", backend=self.name)
        self._call("clear", self.profile.clear, built.storage, prefix)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            built, self._built = self._built, None
        if built is not None:
            built.close()

    def describe(self) -> dict:
        built = self._built
        out = {**super().describe(), "backend": self.config.backend,
               "built": built is not None, "verified": bool(built and built.sums is not None),
               "unverified_reads": self._unverified}
        if built is None:
            out["reason"] = self.not_ready_reason()
        elif built.bounce is not None:
            out["bounce_pages"] = built.bounce.pages
            out["bounce_bytes"] = built.bounce.nbytes
        return out
