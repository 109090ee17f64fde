"""The controller's desired state, and the lease that makes one controller the leader.

The desired state (epoch, active member, members attached over the API, a switch or detach in flight)
is persisted so that a restarted controller resumes and a rank that was away converges to it. It is
validated when read; a document that does not validate is moved aside (kept for inspection) and the
controller starts from its configuration, it never crashes on it.

Standalone controllers elect one leader through the store: a lease with a fencing token that grows with
every new leader. Only the leader saves (compare-and-set on its lease) and commands ranks, and every
command carries its token: a rank refuses a token older than one it has seen, so a controller that lost
its lease (a pause, a partition) cannot move a rank any more. A store that restarted empty (or came back
from an older copy) counts from 1 again: the leader, told by the ranks of a newer token than its own,
moves the counter past it while it holds the lease (``advance``), so fencing never goes backwards. Only a
counter created afresh may be moved so ("unsettled", until a leader hears every expected rank report a
token not newer than its own): a settled store's leader told of a newer token is fenced out, as it must
be when another store (a split brain) elected a newer leader.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("hicache_ha.control")


class InFlight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str
    kind: Literal["switch", "detach"] = "switch"
    target: Optional[str] = None
    base_epoch: int = Field(ge=1)
    base_active: Optional[str] = None


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(default=1, ge=1)
    active: Optional[str] = None
    specs: dict[str, dict[str, Any]] = Field(default_factory=dict)  # members attached through the API
    switch_in_flight: Optional[InFlight] = None
    # From the configuration, the store having had none (lost with a store that restarted empty, unreadable,
    # or a first start): ranks a controller moved past it know better, and it follows them. Written only
    # while true, so documents stay as they were.
    provisional: bool = False

    def to_json(self) -> str:
        return self.model_dump_json(exclude=None if self.provisional else {"provisional"})


class NotLeader(Exception):
    """This controller's lease is gone: it may not change the desired state or command ranks."""


class StateStore(ABC):
    @abstractmethod
    def load(self) -> Optional[DesiredState]:
        """The persisted state; None when there is none (or it was unreadable and moved aside)."""

    @abstractmethod
    def save(self, state: DesiredState, fence: int) -> None:
        """Persist, only while ``fence`` is the current leader's token (else NotLeader)."""

    @abstractmethod
    def acquire(self, owner: str, ttl_s: float) -> Optional[int]:
        """Become the leader: the new fencing token, or None while another one leads."""

    @abstractmethod
    def renew(self, owner: str, fence: int, ttl_s: float) -> bool:
        """Keep the lease; False when it was lost."""

    @abstractmethod
    def advance(self, owner: str, fence: int, past: int, ttl_s: float) -> Optional[int]:
        """While ``fence`` holds the lease and the counter is unsettled: move the counter past ``past`` (a
        token some rank saw, from a leader this store no longer remembers) and take the new token, in one
        atomic step. ``fence`` unchanged when the counter is settled (the rank saw a real newer leader: we
        are fenced out, as we should be); None when the lease is lost."""

    @abstractmethod
    def unsettled(self) -> bool:
        """The fencing counter was created afresh (a new store, or one that restarted empty) and no leader
        has yet confirmed that every rank's token is behind it: only then may ``advance`` move it."""

    @abstractmethod
    def settle(self, owner: str, fence: int) -> bool:
        """While ``fence`` holds the lease: mark the counter settled (every expected rank reported a token
        not newer than ``fence``). False when the lease is lost."""

    @abstractmethod
    def release(self, owner: str, fence: int) -> None:
        """Give the lease up (on a clean shutdown)."""

    def leader(self) -> Optional[str]:
        """Who leads now, when the store can tell."""
        return None

    @staticmethod
    def parse(raw: str, where: str) -> Optional[DesiredState]:
        try:
            return DesiredState.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            log.error("hicache-ha: the desired state in %s is not valid (%s); starting from the configuration",
                      where, str(exc).splitlines()[0])
            raise


def default_state_dir() -> Path:
    """A private directory (0700) of this user's: $XDG_STATE_HOME/hicache-ha, else ~/.local/state/hicache-ha."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "hicache-ha"


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


class FileStateStore(StateStore):
    """A JSON file replaced atomically (temp file + rename; a crash leaves the old or the new state), in a
    private directory. The lease is an exclusive lock on ``<file>.lock``, which the kernel releases when
    the process dies (a lock on a lock file since deleted or replaced no longer counts); the fencing token
    is a counter beside it (``.fence``, and ``.fence-unsettled`` while created afresh). For controllers on
    one host (or one shared file system that honours locks); fleets use Redis."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._fence_path = self.path.with_name(self.path.name + ".fence")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._unsettled_path = self.path.with_name(self.path.name + ".fence-unsettled")

    def load(self) -> Optional[DesiredState]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return self.parse(raw, str(self.path))
        except (ValueError, ValidationError):
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("hicache-ha: kept the unreadable state as %s", aside)
            return None

    def _fence(self) -> int:
        try:
            return int(self._fence_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _holds(self) -> bool:
        """Our lock is on the lock file the path names now (not on one deleted or replaced since, as when
        the state directory was wiped); if not, the lock is let go."""
        if self._lock_fd is None:
            return False
        try:
            ours, now = os.fstat(self._lock_fd), os.stat(self._lock_path)
            same = (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino)
        except OSError:
            same = False
        if not same:
            self._unlock()
        return same

    def _leads(self, fence: int) -> bool:
        """``fence`` holds the lease: our lock is on the current lock file and the counter is still ours."""
        return self._holds() and self._fence() == fence

    def save(self, state: DesiredState, fence: int) -> None:
        if not self._leads(fence):
            raise NotLeader(f"state file {self.path}: fencing token {fence} is not the leader's")
        self._write(self.path, state.to_json())

    def _write(self, path: Path, text: str) -> None:
        _private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def acquire(self, owner: str, ttl_s: float) -> Optional[int]:
        if self._holds():
            return self._fence()
        _private_dir(self.path.parent)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._lock_fd = fd
        if not self._fence_path.exists():  # a counter created afresh: it may be behind what ranks saw
            self._write(self._unsettled_path, "")
        fence = self._fence() + 1
        self._write(self._fence_path, str(fence))
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
        return fence

    def renew(self, owner: str, fence: int, ttl_s: float) -> bool:
        return self._leads(fence)

    def advance(self, owner: str, fence: int, past: int, ttl_s: float) -> Optional[int]:
        if not self._leads(fence):
            return None
        if not self.unsettled():
            return fence
        token = max(fence, past) + 1
        self._write(self._fence_path, str(token))
        return token

    def unsettled(self) -> bool:
        return self._unsettled_path.exists()

    def settle(self, owner: str, fence: int) -> bool:
        if not self._leads(fence):
            return False
        self._unsettled_path.unlink(missing_ok=True)
        return True

    def release(self, owner: str, fence: int) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def leader(self) -> Optional[str]:
        try:
            return self._lock_path.read_text() or None
        except OSError:
            return None


class RedisStateStore(StateStore):
    """Keys in Redis, for fleets whose controllers run on several hosts: the state, a lease with an expiry
    (SET NX PX), and a fencing counter (INCR). Saves, renewals and advances of the counter are
    compare-and-set on the lease (Lua scripts, atomic in Redis)."""

    _ACQUIRE = """
        if redis.call('EXISTS', KEYS[1]) == 0 then
            if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[3], 1) end
            local token = redis.call('INCR', KEYS[2])
            redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
            return token
        end
        return false"""
    _RENEW = """
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
        return 0"""
    _SAVE = """
        if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[2], ARGV[2]) return 1 end
        return 0"""
    _ADVANCE = """
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
        if redis.call('EXISTS', KEYS[3]) == 0 then return tonumber(redis.call('GET', KEYS[2])) end
        local token = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[3])) + 1
        redis.call('SET', KEYS[2], token)
        redis.call('SET', KEYS[1], ARGV[2] .. '|' .. token, 'PX', ARGV[4])
        return token"""
    _SETTLE = """
        if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[2]) return 1 end
        return 0"""
    _RELEASE = """
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0"""

    def __init__(self, url: str, deployment: str = "default") -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        base = f"hicache-ha:{deployment}"
        self.key, self.lease, self.fence_key = f"{base}:desired-state", f"{base}:leader", f"{base}:fence"
        self.unsettled_key = f"{base}:fence-unsettled"

    def load(self) -> Optional[DesiredState]:
        raw = self.client.get(self.key)
        if not raw:
            return None
        try:
            return self.parse(raw.decode(), f"redis key {self.key}")
        except (ValueError, ValidationError):
            aside = f"{self.key}:corrupt-{int(time.time())}"
            self.client.rename(self.key, aside)
            log.error("hicache-ha: kept the unreadable state as redis key %s", aside)
            return None

    def save(self, state: DesiredState, fence: int) -> None:
        if not self.client.eval(self._SAVE, 2, self.lease, self.key, self._holder(fence), state.to_json()):
            raise NotLeader(f"redis {self.lease}: fencing token {fence} is not the leader's")

    def acquire(self, owner: str, ttl_s: float) -> Optional[int]:
        self._owner = owner
        token = self.client.eval(self._ACQUIRE, 3, self.lease, self.fence_key, self.unsettled_key, owner,
                                 int(ttl_s * 1000))
        return int(token) if token else None

    def renew(self, owner: str, fence: int, ttl_s: float) -> bool:
        return bool(self.client.eval(self._RENEW, 1, self.lease, f"{owner}|{fence}", int(ttl_s * 1000)))

    def advance(self, owner: str, fence: int, past: int, ttl_s: float) -> Optional[int]:
        token = self.client.eval(self._ADVANCE, 3, self.lease, self.fence_key, self.unsettled_key, f"{owner}|{fence}",
                                 owner, int(past), int(ttl_s * 1000))
        return int(token) if token else None

    def unsettled(self) -> bool:
        return bool(self.client.exists(self.unsettled_key))

    def settle(self, owner: str, fence: int) -> bool:
        return bool(self.client.eval(self._SETTLE, 2, self.lease, self.unsettled_key, f"{owner}|{fence}"))

    def release(self, owner: str, fence: int) -> None:
        self.client.eval(self._RELEASE, 1, self.lease, f"{owner}|{fence}")

    def leader(self) -> Optional[str]:
        raw = self.client.get(self.lease)
        return raw.decode().rsplit("|", 1)[0] if raw else None

    def _holder(self, fence: int) -> str:
        return f"{getattr(self, '_owner', '')}|{fence}"
