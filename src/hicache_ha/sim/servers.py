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

    def __init__(self, port: Optional[int] = None, *, extra_args: tuple[str, ...] = (), host: str = "127.0.0.1",
                 launcher: tuple[str, ...] = ()) -> None:
        if redis_server_path() is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server (make does it)")
        self.host = host
        self.port = port or free_port()
        self.extra_args = extra_args
        self.launcher = launcher  # e.g. ("ip", "netns", "exec", name): run it on another (virtual) host
        self.dir = tempfile.mkdtemp(prefix="hicache-ha-redis-")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=2, socket_connect_timeout=2, **kw)

    def start(self, timeout: float = 10.0) -> "RedisServer":
        args = [
            *self.launcher, redis_server_path(), "--port", str(self.port), "--bind", self.host, "--save", "",
            "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
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


class SentinelCluster:
    """A master, a replica and ``sentinels`` Redis Sentinels on loopback, for failover within a cluster."""

    def __init__(self, master_name: str = "mymaster", sentinels: int = 3, down_after_ms: int = 500,
                 failover_timeout_ms: int = 3000) -> None:
        self.master_name = master_name
        self.master = RedisServer()
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._procs: list[subprocess.Popen] = []
        self.dir = tempfile.mkdtemp(prefix="hicache-ha-sentinel-")

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def start(self) -> "SentinelCluster":
        self.master.start()
        self.replica.start()
        self._wait_replica_synced()
        for port in self.sentinel_ports:
            conf = os.path.join(self.dir, f"sentinel-{port}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {self.master_name} 1\n"
                )
            self._procs.append(subprocess.Popen([redis_server_path(), conf, "--sentinel"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True))
        for port in self.sentinel_ports:
            self._wait_sentinel(port)
        return self

    def _wait_replica_synced(self, timeout: float = 10.0) -> None:
        client = redis.Redis(port=self.replica.port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("replica did not sync with its master")
            time.sleep(0.05)
        client.close()

    def _wait_sentinel(self, port: int, timeout: float = 10.0) -> None:
        client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = client.sentinel_masters()
                if self.master_name in info and info[self.master_name].get("num-other-sentinels", 0) >= 1:
                    break
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel on {port} not ready")
            time.sleep(0.05)
        client.close()

    def current_master_port(self) -> int:
        client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=0.5)
        try:
            return int(client.sentinel_get_master_addr_by_name(self.master_name)[1])
        finally:
            client.close()

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        self.master.close()
        self.replica.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SentinelCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
