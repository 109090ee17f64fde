"""A bounded pool of daemon worker threads per member: the engine never runs backend code itself.

Why not ThreadPoolExecutor: its queue is unbounded, it cannot refuse work when full, and it joins
its threads at interpreter exit, so a worker stuck on a frozen backend would hang shutdown.
"""

from __future__ import annotations

import threading
from queue import SimpleQueue
from typing import Any, Callable, Optional


class Call:
    """One submitted call. The caller waits with its deadline; after that it walks away.

    A bare lock, held until the call finishes, is the cheapest hand-off CPython has (an Event builds a
    Condition and a waiter lock per wait); it matters, as the hop is on every engine call."""

    __slots__ = ("fn", "args", "_done", "_write", "finished", "fenced", "result", "error", "on_done")

    def __init__(self, fn: Callable[..., Any], args: tuple, on_done: Optional[Callable[[], None]] = None) -> None:
        self.fn = fn
        self.args = args
        self.on_done = on_done
        self._write = threading.Lock()  # held while the worker writes into the caller's memory
        self._done = threading.Lock()
        self._done.acquire()
        self.finished = False
        self.fenced = False
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # handed to the caller, who classifies it
            self.error = exc
        self.finished = True
        self._release()
        if self.on_done is not None:
            self.on_done()

    def fence(self) -> None:
        """Let the waiter go now; whatever the call returns later is never looked at, and from the
        moment this returns the worker writes nothing more into the caller's memory (a write in
        progress, one page, is waited for)."""
        with self._write:
            self.fenced = True
        self._release()

    def claim(self) -> bool:
        """Worker side: may I write into the caller's memory now? If True, call ``unclaim`` after."""
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
    def __init__(self, name: str, workers: int, queue: int) -> None:
        self.name = name
        self.limit = workers + queue
        self._in_flight = 0
        self._calls: set[Call] = set()
        self._idle = threading.Condition(threading.Lock())
        self._queue: SimpleQueue[Optional[Call]] = SimpleQueue()
        self._workers = workers
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"hicache-ha-{name}-{i}", daemon=True).start()

    @property
    def in_flight(self) -> int:
        """Calls submitted and not finished yet (queued, running, or abandoned but still running)."""
        return self._in_flight

    def try_submit(self, fn: Callable[..., Any], *args: Any, on_done: Optional[Callable[[], None]] = None,
                   with_call: bool = False) -> Optional[Call]:
        """Queue a call, or return None at once when the member already has ``limit`` calls in flight.
        ``on_done`` runs on the worker when the call finishes (the supervisor's wake-up); with
        ``with_call``, ``fn`` gets the Call first (to claim writes into the caller's memory)."""
        with self._idle:
            if self._in_flight >= self.limit or self._closed:
                return None
            self._in_flight += 1
            call = Call(fn, args, on_done)
            if with_call:
                call.args = (call, *args)
            self._calls.add(call)
        self._queue.put(call)
        return call

    def fence_all(self) -> int:
        """Release every caller waiting on this member (it tripped, or traffic was forced off it).
        The calls go on running on their workers; their results are discarded. Returns how many."""
        with self._idle:
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
            call.run()
            with self._idle:
                self._calls.discard(call)
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.notify_all()

    def close(self) -> None:
        """Stop the workers once they finish what they run; never waits for a stuck one."""
        with self._idle:
            self._closed = True
        for _ in range(self._workers):
            self._queue.put(None)
