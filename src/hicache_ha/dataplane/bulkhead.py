"""A bounded pool of daemon worker threads per member: the engine never runs backend code itself.

Why not ThreadPoolExecutor: its queue is unbounded, it cannot refuse work when full, and it joins
its threads at interpreter exit, so a worker stuck on a frozen backend would hang shutdown.
"""

from __future__ import annotations

import threading
import time
from queue import SimpleQueue
from typing import Any, Callable, Optional

Job = Callable[..., Any]  # called on a worker as job(call, *args)


class Call:
    """One submitted call. The caller waits with its deadline; after that it walks away (``fence``).

    A bare lock, held until the call finishes, is the cheapest hand-off CPython has (an Event builds a
    Condition and a waiter lock per wait); it matters, as the hop is on every engine call. A second
    lock, ``_write``, makes "start" and "fence" exclusive: a call fenced while still queued is never
    run (cancelled), and a running call claims it around every write into the caller's memory."""

    __slots__ = ("job", "args", "generation", "on_done", "_done", "_write", "started", "ended", "finished",
                 "fenced", "result", "error")

    def __init__(self, job: Job, args: tuple, generation: int = 0,
                 on_done: Optional[Callable[["Call"], None]] = None) -> None:
        self.job = job
        self.args = args
        self.generation = generation  # the breaker generation that admitted it
        self.on_done = on_done
        self._write = threading.Lock()
        self._done = threading.Lock()
        self._done.acquire()
        self.started: Optional[float] = None  # clock time a worker began it (None: never ran)
        self.ended: Optional[float] = None
        self.finished = False
        self.fenced = False
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self, clock: Callable[[], float]) -> None:
        with self._write:
            if self.fenced:  # the caller gave up while it was queued: cancelled, never sent
                return
            self.started = clock()
        try:
            self.result = self.job(self, *self.args)
        except BaseException as exc:  # handed to the caller, who classifies it
            self.error = exc
        self.ended = clock()
        self.finished = True
        self._release()

    def fence(self) -> bool:
        """Let the waiter go now; whatever the call returns later is never looked at, and from the
        moment this returns the worker writes nothing more into the caller's memory (a write in
        progress, one page, is waited for). Returns whether the call had reached its worker."""
        self.fenced = True  # first, so that the worker's next claim backs off (locks are not fair)
        with self._write:  # then wait out a write in progress
            started = self.started is not None
        self._release()
        return started

    def claim(self) -> bool:
        """Worker side: may I write into the caller's memory now? If True, call ``unclaim`` after."""
        if self.fenced:
            return False
        self._write.acquire()
        if self.fenced:
            self._write.release()
            return False
        return True

    def unclaim(self) -> None:
        self._write.release()

    def _release(self) -> None:
        try:
            self._done.release()
        except RuntimeError:  # already released by the other of run() / fence()
            pass

    def wait(self, timeout: float) -> bool:
        """True once the call has finished or was fenced; False if ``timeout`` seconds passed first."""
        if self.finished or self.fenced:
            return True
        if self._done.acquire(timeout=max(timeout, 0.0)):
            self._release()  # let any other waiter through too
            return True
        return self.finished or self.fenced


class Bulkhead:
    """``workers`` threads and room for ``queue`` more calls; beyond that, calls are refused at once.

    It shares its owner's lock, so that admission by the breaker and by the bulkhead is one critical
    section (``submit_locked``)."""

    def __init__(self, name: str, workers: int, queue: int, lock: Optional[threading.Lock] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limit = workers + queue
        self.lock = lock or threading.Lock()
        self._idle = threading.Condition(self.lock)
        self._clock = clock
        self._in_flight = 0
        self._calls: set[Call] = set()
        self._queue: SimpleQueue[Optional[Call]] = SimpleQueue()
        self._workers = workers
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"hicache-ha-{name}-{i}", daemon=True).start()

    @property
    def in_flight(self) -> int:
        """Calls submitted and not finished yet (queued, running, or abandoned but still running)."""
        return self._in_flight

    def submit_locked(self, job: Job, args: tuple, generation: int = 0,
                      on_done: Optional[Callable[[Call], None]] = None) -> Optional[Call]:
        """Queue a call; None when ``limit`` calls are already in flight. The caller holds ``lock``."""
        if self._in_flight >= self.limit or self._closed:
            return None
        self._in_flight += 1
        call = Call(job, args, generation, on_done)
        self._calls.add(call)
        self._queue.put(call)
        return call

    def oldest_running_before(self, t: float) -> Optional[float]:
        """When the oldest call its caller still waits for (within its deadline) that was running before
        ``t`` started (None: there is none)."""
        with self.lock:
            return min((c.started for c in self._calls if c.started is not None and c.started < t
                        and not c.finished and not c.fenced), default=None)

    def held_by_backend_locked(self) -> bool:
        """Is every worker held by a call its caller already gave up on? Then a call refused or left in
        the queue was kept from the backend by the backend itself (it holds our workers past their
        deadlines), not by our own load. The caller holds ``lock``."""
        stuck = sum(1 for c in self._calls if c.fenced and c.started is not None and not c.finished)
        return stuck >= self._workers

    def try_submit(self, job: Job, *args: Any, on_done: Optional[Callable[[Call], None]] = None) -> Optional[Call]:
        with self.lock:
            return self.submit_locked(job, args, 0, on_done)

    def fence_all(self) -> int:
        """Release every caller waiting on this member (it tripped, or traffic was forced off it).
        Running calls go on on their workers, their results discarded; queued ones never run."""
        with self.lock:
            calls = [c for c in self._calls if not c.finished]
        for c in calls:
            c.fence()
        return len(calls)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False if that did not happen within ``timeout`` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            call.run(self._clock)
            with self._idle:
                self._calls.discard(call)
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.notify_all()
            if call.on_done is not None:
                call.on_done(call)

    def close(self) -> None:
        """Stop the workers once they finish what they run; never waits for a stuck one."""
        with self.lock:
            self._closed = True
            calls = list(self._calls)
        for c in calls:
            c.fence()  # queued calls are cancelled; nobody waits on a closed member
        for _ in range(self._workers):
            self._queue.put(None)
