"""The servers behind SGLang's own storage backends, as real processes on free loopback ports, for tests,
benchmarks and chaos runs: a Mooncake master, SGLang's 3FS metadata server, an S3 server (for SGLang's
SeaweedFS backend). Each can be frozen (SIGSTOP), thawed, killed (SIGKILL) and started again on the same
port, as ``RedisServer`` can."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .servers import free_port


def venv_tool(name: str) -> Optional[str]:
    """A console script installed beside this Python (the venv's bin), or on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


class ServerProcess:
    """One server child process in a session of its own, listening on ``port`` of 127.0.0.1."""

    name = "server"

    def __init__(self, port: Optional[int] = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix=f"hicache-ha-{self.name}-")
        self.proc: Optional[subprocess.Popen] = None
        self.log = Path(self.dir) / "server.log"
        self._log_start = 0  # where the current process's output begins in the log (restarts append)

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        with open(self.log, "ab") as out:
            self._log_start = out.tell()
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                         cwd=self.dir, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def output(self) -> str:
        """What the current process wrote (the log also holds the earlier runs')."""
        with open(self.log, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def ready(self) -> bool:
        """The server answers (by default: it accepts TCP connections on its port)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} on port {self.port} exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} on port {self.port} not ready after {timeout} s")
            time.sleep(0.05)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGCONT)  # a stopped process group dies only once it runs again
            self._signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class MooncakeMaster(ServerProcess):
    """``mooncake_master`` from PyPI's ``mooncake-transfer-engine-non-cuda`` (its index lives in memory:
    a restart forgets every object)."""

    name = "mooncake-master"

    def __init__(self, port: Optional[int] = None, lease_ms: Optional[int] = None,
                 etcd: Optional["Etcd"] = None) -> None:
        super().__init__(port)
        self.metrics_port = free_port()
        self.lease_ms = lease_ms  # how long an object read or written stays undeletable (Mooncake: 5 s)
        self.etcd = etcd  # HA mode: masters elect a leader through etcd; clients find it there
        if venv_tool("mooncake_master") is None:
            raise RuntimeError("mooncake_master is missing: pip install mooncake-transfer-engine-non-cuda "
                               "(make test installs it)")

    def command(self) -> list[str]:
        ha = ["--enable_ha=true", "--ha_backend_type=etcd", f"--etcd_endpoints={self.etcd.endpoint}",
              "--client_ttl=2"] if self.etcd is not None else []
        return [venv_tool("mooncake_master"), "--rpc_address=127.0.0.1", f"--rpc_port={self.port}",
                "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}", *ha,
                *([f"--default_kv_lease_ttl={self.lease_ms}"] if self.lease_ms is not None else [])]

    def ready(self) -> bool:
        """In HA mode a master opens its RPC port only once it leads: it is up once it joined the election."""
        return bool(self.state) if self.etcd is not None else super().ready()

    @property
    def state(self) -> str:
        """HA mode: the runtime state the master last logged (``serving`` once it leads)."""
        states = re.findall(r"Master runtime state -> (\w+)", self.output())
        return states[-1] if states else ""

    @property
    def address(self) -> str:
        """Where clients find the master: its RPC port, or (HA mode) the etcd cluster holding the leader."""
        return f"etcd://{self.etcd.endpoint}" if self.etcd is not None else f"{self.host}:{self.port}"

    def extra_config(self, segment_mib: int = 64) -> dict:
        """SGLang's MooncakeStore settings for this master on a CPU host (TCP, no RDMA device)."""
        return {"master_server_address": self.address, "metadata_server": "P2PHANDSHAKE", "protocol": "tcp",
                "device_name": "", "local_hostname": "127.0.0.1", "global_segment_size": segment_mib * 2**20,
                "check_server": False}


class Etcd(ServerProcess):
    """A one-member etcd (Debian's ``etcd-server``) on loopback: where Mooncake masters in HA mode elect
    their leader and publish it to clients."""

    name = "etcd"

    def __init__(self, port: Optional[int] = None) -> None:
        super().__init__(port)
        self.peer_port = free_port()
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is missing: apt-get install etcd-server (make test installs it)")

    def command(self) -> list[str]:
        client, peer = f"http://{self.host}:{self.port}", f"http://{self.host}:{self.peer_port}"
        return ["etcd", "--data-dir", str(Path(self.dir) / "data"), "--listen-client-urls", client,
                "--advertise-client-urls", client, "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"]

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class Hf3fsMetadataServer(ServerProcess):
    """SGLang's own 3FS metadata server (FastAPI; ~5-12 s to start: it imports SGLang), with
    ``config_file()`` writing the JSON SGLang's ``HiCacheHF3FS`` reads (named by
    ``$SGLANG_HICACHE_HF3FS_CONFIG_PATH``) for a data file in this server's directory."""

    name = "hf3fs-metadata"

    def __init__(self, port: Optional[int] = None, persistence: bool = False) -> None:
        super().__init__(port)
        self.persistence = persistence

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "sglang.srt.mem_cache.storage.hf3fs.mini_3fs_metadata_server",
                "--host", self.host, "--port", str(self.port)]
        if self.persistence:
            args += ["--persistence-path", str(Path(self.dir) / "metadata.json"), "--save-interval", "1"]
        return args

    def start(self, timeout: float = 90.0) -> "Hf3fsMetadataServer":
        return super().start(timeout)  # type: ignore[return-value]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config_file(self, data_dir: str, file_size: int = 4 << 20) -> str:
        """The 3FS client settings SGLang reads, for a (sparse) data file under ``data_dir``."""
        import json

        path = Path(data_dir) / "hf3fs.json"
        path.write_text(json.dumps({"file_path_prefix": str(Path(data_dir) / "hicache"), "file_size": file_size,
                                    "numjobs": 2, "entries": 8, "metadata_server_url": self.url}))
        return str(path)


class S3Server(ServerProcess):
    """``moto_server`` (moto[server] on PyPI): an S3 API in memory, for SGLang's SeaweedFS backend, which
    speaks S3 through boto3. A restart loses every bucket."""

    name = "s3"

    def command(self) -> list[str]:
        tool = venv_tool("moto_server")
        if tool is None:
            raise RuntimeError("moto_server is missing: pip install 'moto[server]' (make test installs it)")
        return [tool, "-H", self.host, "-p", str(self.port)]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def extra_config(self, bucket: str = "hicache") -> dict:
        return {"endpoint": self.endpoint, "bucket": bucket, "access_key": "test", "secret_key": "test"}
