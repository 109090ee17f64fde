"""The one small contract every storage backend implements.

A backend is built from its own config section (``from_config``); the data plane calls it from its
worker threads only, never from an engine thread, and handles deadlines, fencing and integrity itself.
A backend maps its library's exceptions to ``hicache_ha.backends.errors`` at its edge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field


class BackendConfig(BaseModel):
    """Fields common to every backend section. Each backend subclasses it with its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="unique member name")
    type: str = Field(description="backend type: a built-in, a registered plugin or module:Class")
    max_concurrent: Optional[int] = Field(
        default=None, ge=1, le=256, description="bulkhead size for this member (default: bulkhead.max_concurrent)"
    )


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so the data plane picks the right path."""

    # Pages are stored as opaque bytes, so the data plane wraps them in the integrity envelope.
    envelope: bool = True
    # The backend knows other instances of its own cluster and can move to one (``reconnect``).
    cluster: bool = False
    # Pages ``fetch`` yields live in the backend's own memory and are valid only inside it: a caller that
    # keeps one copies it there.
    borrowed: bool = False


@dataclass
class BackendContext:
    """What a backend may need from its host: the SGLang storage config and the host memory pool."""

    storage_config: Any = None
    host: Any = None  # an object with a ``mem_pool_host`` attribute, filled in when SGLang registers it
    extra: dict = field(default_factory=dict)
    default_workers: int = 4  # bulkhead.max_concurrent: a member's workers unless it sets its own

    @property
    def mem_pool_host(self) -> Any:
        return getattr(self.host, "mem_pool_host", None)


class Backend(ABC):
    """A storage backend: batch exists / get / set of opaque pages under string keys."""

    Config: ClassVar[type[BackendConfig]] = BackendConfig
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        # Set by the data plane: call when the backend became ready to serve on its own (built late).
        self.on_ready: Callable[[], None] = lambda: None

    @property
    def ready(self) -> bool:
        """False while the backend is not built yet (it waits for the host, or its build failed): its
        member starts ``circuit_broken`` with ``not_ready_reason`` and recovers through probes."""
        return True

    @property
    def pending(self) -> bool:
        """True while a first build is under way and has not failed: traffic waits for it rather than
        failing over (it is start-up, not a failure)."""
        return False

    def not_ready_reason(self) -> str:
        return ""

    def host_ready(self) -> None:
        """The host registered what the backend may need to be built (SGLang's host pool)."""

    @classmethod
    def from_config(cls, config: BackendConfig, context: BackendContext) -> "Backend":
        """Build the backend from its validated config section. Must not block on the network."""
        return cls(config)  # type: ignore[call-arg]

    @abstractmethod
    def exists(self, keys: Sequence[str]) -> int:
        """Return how many of the leading ``keys`` are present (stop at the first missing one)."""

    def exists_each(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored (hybrid models ask about every page of every pool)."""
        return [self.exists([k]) == 1 for k in keys]

    def exists_pages(self, keys: Sequence[str], nbytes: Any = None) -> list[bool]:
        """``exists_each``, told each page's size (one for all keys, or one per key) where the host knows
        it, for a backend that keeps pages of some sizes apart. What the data plane calls."""
        return self.exists_each(keys)

    @abstractmethod
    def get(self, keys: Sequence[str], nbytes: Optional[int] = None) -> list:
        """Return one buffer per key (bytes-like, owned by the caller from now on), ``None`` for a miss.

        ``nbytes`` is the expected payload size when the host knows it (backends that read into
        preallocated buffers need it; the others ignore it)."""

    def fetch(self, keys: Sequence[str], nbytes: Optional[int] = None) -> AbstractContextManager[list]:
        """``get`` as a context: the pages (buffers, tuples of buffers, None for a miss, or a CorruptPage
        for a page that failed the backend's own check) are used inside it. With ``borrowed``, they
        are valid only there."""
        return nullcontext(self.get(keys, nbytes))

    @abstractmethod
    def set(self, keys: Sequence[str], values: Sequence[Any]) -> Optional[list[bool]]:
        """Store every page; raise on failure. ``values`` are buffers, or tuples of buffers (the
        envelope's header, then the page's pieces) to be stored as their concatenation; for a backend
        without the envelope, whatever its ``stage`` returned. Return None, or one bool per key when the
        backend does not take some pages by their nature (not a failure: they are dropped and counted)."""

    def stage(self, keys: Sequence[str], values: Sequence[Any]) -> Any:
        """On the engine thread, before the call is queued (backends without the envelope): make the
        pages independent of engine memory, so a late worker never reads memory the engine reused.
        Raise ``Refused`` when there is no room now."""
        return [bytearray(join_parts(v)) for v in values]

    def unstage(self, staged: Any) -> None:
        """Give back what ``stage`` took, for a call that never reached ``set`` (refused, cancelled)."""

    def probe(self) -> None:
        """One round trip that proves the backend serves: write, read back and verify a canary."""
        key = f"__hicache_ha_probe__/{self.name}"
        payload = b"hicache-ha probe"
        self.set([key], [payload])
        got = self.get([key], len(payload))[0]
        if got is None or bytes(got) != payload:
            from .errors import BackendError

            raise BackendError(f"probe of {self.name!r}: canary read back wrong", backend=self.name)

    def ping(self) -> None:
        """The cheapest round trip that shows the backend answers (health pings, every few ms)."""
        self.exists(["__hicache_ha_ping__"])

    def reconnect(self) -> Optional[str]:
        """Move to another instance of the same cluster that answers now (a Sentinel's current master,
        the next URL of a list). Return a description of where it now points, or None if none is ready."""
        return None

    def clear(self, prefix: str) -> None:
        """Remove the pages whose storage key starts with ``prefix`` (best effort)."""

    def close(self) -> None:
        """Release connections and threads."""

    def describe(self) -> dict:
        """A short, secret-free description for status output."""
        return {"name": self.name, "type": self.config.type}


def page_nbytes(page: Any) -> int:
    """The size of a page: one buffer, or a tuple of pieces."""
    if isinstance(page, tuple):
        return sum(memoryview(p).nbytes for p in page)
    return memoryview(page).nbytes


def join_parts(value: Any) -> Any:
    """Flatten a tuple of buffers (header, pieces...) into one bytes object; pass plain buffers through."""
    if isinstance(value, tuple):
        return b"".join(value)
    return value
