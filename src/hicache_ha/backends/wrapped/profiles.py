"""What hicache-ha knows about each of SGLang's storage backends, where knowing pays: how SGLang drives it
(zero-copy v1 or the legacy calls), whether it needs the host pool to be built, the extra_config keys it
reads, a check that must pass before its constructor may run, where a checksum record can be kept beside
each page, how to clear only some pages, and how to bring it back when it cannot recover alone.

Nothing here imports SGLang or the backends' clients at import time: config checks run anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ..errors import BackendError, BackendRejected, BackendUnavailable
from .v1pages import fold

log = logging.getLogger("hicache_ha.backends")

# The backends SGLang's cache controller drives through batch_get_v1 / batch_set_v1 (zero-copy, by host
# index into the registered pool); the others get the legacy batch_get / batch_set with tensors.
V1 = frozenset({"hf3fs", "mooncake", "npu_memcache", "eic", "nixl", "simm", "mori", "tensorcast", "seaweedfs"})
# Built with the host pool (SGLang's factory passes it to the constructor).
NEEDS_POOL = frozenset({"mooncake", "npu_memcache", "aibrix", "hf3fs", "eic", "simm", "mori", "shm", "seaweedfs"})
# Keys SGLang's hierarchical cache takes out of extra_config before any backend sees it, and the dynamic
# hook's own: harmless in a member's extra_config.
SGLANG_KEYS = frozenset({"prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
                         "hicache_storage_pass_prefix_keys", "tp_lcm_size", "backend_name", "module_path",
                         "class_name", "interface_v1", "interface_v2", "allocator"})


@dataclass(frozen=True)
class Profile:
    name: str
    known_keys: Optional[frozenset] = None  # None: not checked (the backend reads a free-form dict)
    check: Callable[[dict], Optional[str]] = lambda extra: None
    preflight: Optional[Callable[[Any, float], None]] = None  # (storage_config, timeout_s); raise if not ready
    sums: Optional[Callable[[Any], "SumStore"]] = None  # where checksum records live, given the built backend
    clear: Optional[Callable[[Any, str], None]] = None  # remove the pages under a key prefix
    repair: Optional[Callable[[Any, BaseException], bool]] = None  # re-initialise in place; True if it did
    tune: Optional[Callable[[Any], None]] = None  # adjust the built backend (e.g. its client's timeouts)
    signal_modules: tuple = ()  # modules whose ``signal.signal`` calls are kept from the host process
    exists_before_get: bool = False  # its batch_get fails as a whole on a partial hit: get the prefix only
    exists_each: Optional[Callable[[Any, list], list]] = None  # (built backend, keys) -> stored, per key
    reads_past_a_miss: bool = True  # False: a read's answers after a miss cannot be trusted (3FS)
    kv_only: bool = False  # stores only pages shaped like the KV pool's (other pools' pages are not taken)
    # Its client's teardown holds the GIL for tens of seconds with this extra_config: never torn down in-process.
    park_on_close: Callable[[dict], bool] = lambda extra: False
    unverified_because: str = ""

    @property
    def v1(self) -> bool:
        return self.name in V1

    @property
    def needs_pool(self) -> bool:
        """Built only once SGLang's host pool is there: its constructor reads it, or it moves pages by host
        index (the member's bounce pool is a twin of the host pool)."""
        return self.name in NEEDS_POOL or self.v1

    def check_extra(self, extra: dict) -> Optional[str]:
        if self.known_keys is not None:
            unknown = sorted(set(extra) - self.known_keys - SGLANG_KEYS)
            if unknown:
                return (f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"{self.name} reads: {', '.join(sorted(self.known_keys))}")
        return self.check(extra)


class SumStore:
    """Checksum records beside pages: 16 bytes per page (length, xxh3-64 seeded by the key), batched."""

    def put(self, keys: list[str], records: list[bytes]) -> None:
        raise NotImplementedError

    def get(self, keys: list[str]) -> list[Optional[bytes]]:
        raise NotImplementedError

    def exists(self, keys: list[str]) -> list[bool]:
        """Whose records are stored (a record is stored after its page: the page is whole)."""
        return [r is not None for r in self.get(keys)]


# -- Mooncake -----------------------------------------------------------------------------------------
MOONCAKE_KEYS = frozenset({
    "local_hostname", "metadata_server", "global_segment_size", "protocol", "device_name",
    "master_server_address", "master_metrics_port", "check_server", "standalone_storage",
    "client_server_address", "enable_ssd_offload", "ssd_offload_path", "tenant_id", "extra_backend_tag",
    "enable_group_semantics"})


def _host_port(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[^\s:;/]+:\d{1,5}", value) is not None


def _master_entry(value: Any) -> Optional[list[str]]:
    """The endpoints a Mooncake client first reaches for this master entry: the master itself
    (``host:port``), or in HA mode the cluster that holds the leader (``etcd://h:p;h:p``,
    ``redis://h:p``); None if it is neither."""
    if _host_port(value):
        return [value]
    m = re.fullmatch(r"(etcd|redis)://([^\s]+)", value) if isinstance(value, str) else None
    endpoints = m.group(2).split(";") if m else []
    return endpoints if endpoints and all(_host_port(e) for e in endpoints) else None


def _mooncake_ha(extra: dict) -> bool:
    """Masters in HA mode: the client's teardown holds the GIL ~30 s (measured; ~2 s otherwise)."""
    return str(extra.get("master_server_address", "")).startswith(("etcd://", "redis://"))


def _check_mooncake(extra: dict) -> Optional[str]:
    if "master_server_address" in extra and _master_entry(extra["master_server_address"]) is None:
        return ("master_server_address must be 'host:port', or a master cluster in HA mode "
                f"('etcd://host:port[;host:port...]', 'redis://host:port'), got {extra['master_server_address']!r}")
    if _mooncake_ha(extra) and extra.get("check_server"):
        return "check_server must be false with masters in HA mode (SGLang's check reads a host:port address)"
    if "client_server_address" in extra and not _host_port(extra["client_server_address"]):
        return f"client_server_address must be 'host:port', got {extra['client_server_address']!r}"
    size = extra.get("global_segment_size")
    if size is not None and not (isinstance(size, int) or (isinstance(size, str)
                                                          and re.fullmatch(r"\s*\d+\s*(gb)?\s*", size.lower()))):
        return f"global_segment_size must be bytes or '<n>gb', got {size!r}"
    return None


# os._exit: in HA mode the client's destructor waits on its etcd watch for ever; the answer is all we need.
_PREFLIGHT = r"""
import json, os, sys
from mooncake.store import MooncakeDistributedStore
c = json.loads(sys.argv[1])
store = MooncakeDistributedStore()
rc = store.setup(c["local_hostname"], c["metadata_server"], 0, 16 * 2**20, c["protocol"], c["device_name"],
                 c["master_server_address"])
print("setup", rc, flush=True)
os._exit(0 if rc == 0 else 3)
"""


def mooncake_config(storage_config: Any) -> Any:
    """Mooncake's settings resolved as SGLang resolves them (extra_config, then its config file, then env)."""
    from sglang.srt.mem_cache.storage.mooncake_store.mooncake_store import MooncakeStoreConfig

    extra = storage_config.extra_config or {}
    if extra.get("master_server_address") is not None or extra.get("client_server_address") is not None:
        return MooncakeStoreConfig.load_from_extra_config(extra)
    if os.environ.get("SGLANG_HICACHE_MOONCAKE_CONFIG_PATH"):
        return MooncakeStoreConfig.from_file()
    return MooncakeStoreConfig.load_from_env()


def _preflight_mooncake(storage_config: Any, timeout_s: float) -> None:
    """Mooncake's ``setup`` holds the GIL through its whole retry loop (91 s with the master down): run in
    this process, it would freeze the engine. So a child process makes the same setup first (a client
    without a segment) and the member is built only once that succeeded."""
    cfg = mooncake_config(storage_config)
    if cfg.standalone_storage:
        return  # talks to a local client process, not to the master
    errors = []
    for endpoint in _master_entry(str(cfg.master_server_address)) or [str(cfg.master_server_address)]:
        host, _, port = endpoint.rpartition(":")
        try:  # a master that is not there fails at once; one that accepts but never answers needs the child
            socket.create_connection((host, int(port)), timeout=min(1.0, timeout_s)).close()
            break
        except (OSError, ValueError) as exc:
            errors.append(f"{endpoint}: {exc}")
    else:
        raise BackendUnavailable(f"mooncake: the master at {cfg.master_server_address} is unreachable "
                                 f"({'; '.join(errors)})") from None
    args = json.dumps({"local_hostname": cfg.local_hostname, "metadata_server": cfg.metadata_server,
                       "protocol": cfg.protocol, "device_name": cfg.device_name if not
                       str(cfg.device_name).strip().startswith("{") else "",
                       "master_server_address": cfg.master_server_address})
    try:
        child = subprocess.run([sys.executable, "-c", _PREFLIGHT, args], capture_output=True, text=True,
                               timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"mooncake: the master at {cfg.master_server_address} did not answer a setup "
                                 f"within {timeout_s:g} s") from None
    if child.returncode != 0:
        tail = (child.stdout + child.stderr).strip().splitlines()[-1:] or ["no output"]
        raise BackendUnavailable(f"mooncake: setup against the master at {cfg.master_server_address} failed "
                                 f"(exit {child.returncode}: {tail[0][:200]})")


class MooncakeSums(SumStore):
    """Records as small objects of their own in the Mooncake store (put_batch / get_batch)."""

    def __init__(self, storage: Any) -> None:
        self.store = storage.store
        self.tag = (storage.config_prefix + "_") if getattr(storage, "config_prefix", None) else ""

    def _keys(self, keys: list[str]) -> list[str]:
        return [f"{self.tag}{k}@hcha-sum" for k in keys]

    def put(self, keys: list[str], records: list[bytes]) -> None:
        rc = self.store.put_batch(self._keys(keys), records)
        if rc != 0:
            raise BackendError(f"mooncake: storing {len(keys)} checksum records failed (code {rc})")

    def get(self, keys: list[str]) -> list[Optional[bytes]]:
        return [r if r else None for r in self.store.get_batch(self._keys(keys))]

    def exists(self, keys: list[str]) -> list[bool]:
        return [code == 1 for code in _mooncake_checked("exists", self.store.batch_is_exist)(self._keys(keys))]


# Mooncake's per-key result codes (measured with mooncake-transfer-engine-non-cuda 0.3.13.post1): exists
# 1 / 0, a get's byte count, a put's 0; OBJECT_NOT_FOUND -704 is a plain miss (OBJECT_ALREADY_EXISTS
# -705 a put another writer made first); -900 (RPC_FAIL: the master
# is gone) and -901 (its RPC timed out: the master is frozen) mean the cluster cannot answer;
# NO_AVAILABLE_HANDLE -200 means no segment has room. SGLang folds them all into False, so a dead master
# would look like a store that holds nothing, and a health ping would pass.
MOONCAKE_NOT_FOUND, MOONCAKE_EXISTS, MOONCAKE_FULL = -704, -705, -200


def _mooncake_checked(what: str, call: Callable[..., list]) -> Callable[..., list]:
    def checked(*args: Any) -> list:
        codes = call(*args)
        bad = [c for c in codes if c < 0 and c not in (MOONCAKE_NOT_FOUND, MOONCAKE_EXISTS)]
        if bad:
            rpc = [c for c in bad if -999 <= c <= -900]
            if rpc:
                raise BackendUnavailable(f"mooncake {what}: the master did not answer (code {rpc[0]}, "
                                         f"{len(bad)} of {len(codes)} keys)")
            if MOONCAKE_FULL in bad:
                raise BackendRejected(f"mooncake {what}: no segment has room (code {MOONCAKE_FULL})")
            raise BackendError(f"mooncake {what}: failed with code {bad[0]} ({len(bad)} of {len(codes)} keys)")
        return codes

    return checked


def _tune_mooncake(storage: Any) -> None:
    """Keep SGLang's MooncakeStore, but let the store's own result codes through to the outcome: the three
    calls its batch methods make are wrapped so that a code saying "the cluster cannot answer" raises."""
    storage._batch_exist = _mooncake_checked("exists", storage._batch_exist)
    storage._get_batch_zero_copy_impl = _mooncake_checked("get", storage._get_batch_zero_copy_impl)
    storage._put_batch_zero_copy_impl = _mooncake_checked("put", storage._put_batch_zero_copy_impl)


def _clear_mooncake(storage: Any, prefix: str) -> None:
    tag = (storage.config_prefix + "_") if getattr(storage, "config_prefix", None) else ""
    removed = storage.store.remove_by_regex("^" + re.escape(tag + prefix))
    if removed < 0:
        raise BackendError(f"mooncake: remove_by_regex failed (code {removed})")


# -- SGLang's HiCacheFile -----------------------------------------------------------------------------
def _clear_file(storage: Any, prefix: str) -> None:
    """HiCacheFile names a page ``<key><config suffix>.bin`` in its directory; remove ours only."""
    with os.scandir(storage.file_path) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name.endswith(".bin"):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
    cache = getattr(storage, "metadata_cache", None)
    if cache is not None:
        cache.clear()


class LegacySums(SumStore):
    """Records stored through the backend's own legacy set/get as 16-byte pages of their own."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage

    def put(self, keys: list[str], records: list[bytes]) -> None:
        import torch

        if not self.storage.batch_set([f"{k}@hcha-sum" for k in keys],
                                      [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in records]):
            raise BackendError(f"storing {len(keys)} checksum records failed")

    def get(self, keys: list[str]) -> list[Optional[bytes]]:
        import torch

        targets = [torch.zeros(16, dtype=torch.uint8) for _ in keys]
        got = self.storage.batch_get([f"{k}@hcha-sum" for k in keys], targets)
        return [None if g is None else bytes(t.numpy()) for g, t in zip(got or [None] * len(keys), targets)]


# -- 3FS (SGLang's HiCacheHF3FS) ------------------------------------------------------------------------
def _repair_hf3fs(storage: Any, exc: BaseException) -> bool:
    """A metadata server restarted without persistence answers 404 until the rank registers again
    (SGLang's client does that only in its constructor)."""
    if "404" not in str(exc):
        return False
    storage.metadata_client.initialize(storage.rank, storage.num_pages)
    return True


def _exists_each_hf3fs(storage: Any, keys: list) -> list[bool]:
    """One metadata request for every key (SGLang's batch_exists asks the same, and keeps the prefix)."""
    query = storage._get_mha_zero_copy_keys(keys) if storage.mha_zero_copy else keys  # K and V halves
    return fold(storage.metadata_client.exists(storage.rank, query), len(keys))


# -- NIXL ---------------------------------------------------------------------------------------------
def _exists_each_nixl(storage: Any, keys: list) -> list[bool]:
    """One query for every key's files (SGLang's batch_exists asks the same, and keeps the prefix)."""
    query = (storage._get_key_list_from_meta(keys) if storage.is_zero_copy  # (_k, and _v but for MLA)
             else [storage._get_suffixed_key(k) for k in keys])
    return fold(storage._query_keys_exist(query), len(keys))


def _clear_nixl(storage: Any, prefix: str) -> None:
    """Pages are files ``<base>/<bucket>/<key><suffix>``: remove the ones under our key prefix (SGLang's
    clear() removes every file under the base directories: every rank's and model's)."""
    import glob

    for base in storage.file_manager.base_dirs:
        for path in glob.glob(os.path.join(glob.escape(base), "*", glob.escape(prefix) + "*")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _repair_nixl(storage: Any, exc: BaseException) -> bool:
    """A storage directory that was recreated (an unmounted and remounted volume) needs its bucket dirs."""
    manager = storage.file_manager
    if all(os.path.isdir(os.path.join(base, "00")) for base in manager.base_dirs):
        return False
    manager.ensure_all_bucket_dirs()
    return True


# -- SeaweedFS (S3) -------------------------------------------------------------------------------------
SEAWEEDFS_KEYS = frozenset({"endpoint", "bucket", "prefix", "region", "access_key", "secret_key", "max_workers"})
S3_CONNECT_TIMEOUT_S, S3_READ_TIMEOUT_S = 2.0, 10.0


def _check_seaweedfs(extra: dict) -> Optional[str]:
    endpoint = extra.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        return "endpoint is required: the S3 endpoint's URL (http://host:port)"
    return None


def _tune_seaweedfs(storage: Any) -> None:
    """SGLang's client keeps botocore's defaults: 60 s read timeout, 4 attempts, so a frozen server holds a
    call for 240 s, and a worker with it. Same client, short timeouts, no retries (hicache-ha retries)."""
    from botocore.config import Config

    import boto3

    old = storage._s3.meta.config
    cfg = storage.config
    storage._s3 = boto3.session.Session().client(
        "s3", endpoint_url=cfg.endpoint, region_name=cfg.region, aws_access_key_id=cfg.access_key,
        aws_secret_access_key=cfg.secret_key,
        config=old.merge(Config(connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                                retries={"total_max_attempts": 1, "mode": "standard"})))


def _repair_seaweedfs(storage: Any, exc: BaseException) -> bool:
    """A server that came back without its data has no bucket, and SGLang's backend creates it only at
    construction: every set fails from then on."""
    try:
        storage._s3.head_bucket(Bucket=storage.config.bucket)
        return False
    except Exception:
        storage._ensure_bucket()  # creates it, or raises what is wrong
        return True


def _clear_seaweedfs(storage: Any, prefix: str) -> None:
    scope = storage._object_key(prefix)
    paginator = storage._s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=storage.config.bucket, Prefix=scope):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            storage._s3.delete_objects(Bucket=storage.config.bucket, Delete={"Objects": objects, "Quiet": True})


# -- signal handlers a backend installs ---------------------------------------------------------------
class _KeptSignals:
    """Stands in for the ``signal`` module inside a backend's module while it is built: its handlers are
    recorded, never installed (they would replace the host's, and ``signal.signal`` raises outside the
    main thread)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.kept: dict = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def signal(self, signum: int, handler: Any) -> Any:
        self.kept[signum] = handler
        return self._real.getsignal(signum)


_signals_lock = threading.Lock()


@contextmanager
def kept_signals(module_names: tuple) -> Iterator[None]:
    if not module_names:
        yield
        return
    import importlib

    modules = [importlib.import_module(m) for m in module_names]
    with _signals_lock:
        saved = [(m, m.__dict__.get("signal")) for m in modules]
        shim = _KeptSignals(signal)
        for m in modules:
            m.signal = shim
        try:
            yield
        finally:
            for m, original in saved:
                m.signal = original
    if shim.kept:
        log.info("hicache-ha: kept %s's signal handlers (%s) from the host process",
                 ", ".join(module_names), ", ".join(signal.Signals(s).name for s in shim.kept))


# -- the table ----------------------------------------------------------------------------------------
PROFILES = {
    "mooncake": Profile("mooncake", known_keys=MOONCAKE_KEYS, check=_check_mooncake, preflight=_preflight_mooncake,
                        sums=MooncakeSums, clear=_clear_mooncake, tune=_tune_mooncake, park_on_close=_mooncake_ha),
    "hf3fs": Profile("hf3fs", known_keys=frozenset({"use_mock_hf3fs_client"}), repair=_repair_hf3fs,
                     exists_each=_exists_each_hf3fs, reads_past_a_miss=False,
                     signal_modules=("sglang.srt.mem_cache.storage.hf3fs.storage_hf3fs",),
                     unverified_because="every 3FS key takes one page-sized slot: a checksum record would cost a "
                                        "page; pages after a missing one are never served (SGLang 0.5.23's "
                                        "_batch_get shifts them)"),
    "nixl": Profile("nixl", clear=_clear_nixl, repair=_repair_nixl, exists_each=_exists_each_nixl,
                    unverified_because="NIXL keeps nothing but pages through its API; a failed read returns "
                                       "False for the whole batch (measured: truncated or empty files are misses)"),
    "seaweedfs": Profile("seaweedfs", known_keys=SEAWEEDFS_KEYS, check=_check_seaweedfs, sums=LegacySums,
                         clear=_clear_seaweedfs, repair=_repair_seaweedfs, tune=_tune_seaweedfs),
    "aibrix": Profile("aibrix", exists_before_get=True, kv_only=True,
                      unverified_because="AIBrix stores only whole cache blocks shaped like the pool's pages"),
    "file": Profile("file", known_keys=frozenset({"file_storage_path", "enable_metadata_cache", "metadata_ttl",
                                                  "max_size", "min_free_space", "eviction_ratio"}),
                    sums=LegacySums, clear=_clear_file),
}


def profile_for(name: str) -> Profile:
    return PROFILES.get(name) or Profile(name, unverified_because="no place for a checksum record is known")
