"""A small fault-injecting TCP proxy on loopback, for what a network does that SIGSTOP does not.

Modes, switched at any time:
- ``pass``: forward bytes as they come;
- ``latency``: forward each chunk ``delay`` seconds late (order kept), a slow link;
- ``lossy``: like pass, but each chunk is held for a retransmission timeout (``stall``) with
  probability ``loss``: TCP loses no bytes on a lossy link, it stalls;
- ``reset``: reset every connection (RST) and every new one, as a crashed middlebox or host does.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from typing import Optional


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay = 0.0
        self.loss = 0.0
        self.stall = 0.3
        self.port = 0
        self._rng = random.Random(seed)
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set(self, mode: str, *, delay: float = 0.0, loss: float = 0.0, stall: float = 0.3) -> None:
        if mode not in ("pass", "latency", "lossy", "reset"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        self.mode, self.delay, self.loss, self.stall = mode, delay, loss, stall
        if mode == "reset":
            self._loop.call_soon_threadsafe(self._reset_all)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            self._reset_all()

        if self._server is not None:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- the event loop's side ------------------------------------------------------------------------
    def _reset_all(self) -> None:
        for w in list(self._writers):
            _reset(w)
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction; delays keep the order of the chunks."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    return
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                hold = 0.0
                if self.mode == "latency":
                    hold = self.delay
                elif self.mode == "lossy" and self._rng.random() < self.loss:
                    hold = self.stall
                await queue.put((self._loop.time() + hold, data))
        finally:
            await queue.put((0.0, None))
            try:
                await sender
            finally:
                if writer.can_write_eof():
                    try:
                        writer.write_eof()
                    except OSError:
                        pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (linger 0), not FIN: the peer sees 'connection reset by peer'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
