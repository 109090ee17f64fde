"""Real redis-server processes on free loopback ports, for the simulator, the demo, benchmarks and tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

import redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_path() -> Optional[str]:
    return shutil.which("redis-server")


class RedisServer:
    """A redis-server child process with no persistence, listening on 127.0.0.1 only.

    ``stop()`` / ``cont()`` freeze and resume it (SIGSTOP / SIGCONT), ``kill()`` SIGKILLs it and
    ``start()`` brings it back on the same port."""

    def __init__(self, port: Optional[int] = None, *, extra_args: tuple[str, ...] = ()) -> None:
        if redis_server_path() is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server (make does it)")
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="hicache-ha-redis-")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        args = [
            redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout} s")
                time.sleep(0.02)
        finally:
            client.close()

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGCONT)  # a stopped process takes SIGKILL too, but be explicit
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
