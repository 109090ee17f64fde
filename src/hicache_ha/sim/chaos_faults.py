"""The chaos scenarios: one real fault each on the primary member (a process killed or frozen, a slow,
lossy or reset link, a network blackhole, errors, a full or read-only disk, a Sentinel promotion,
flapping), started on servers of their own and healed afterwards."""

from __future__ import annotations

import os
import subprocess
import threading

from .netns import NetnsHost
from .proxy import FaultProxy
from .servers import RedisServer, SentinelCluster


class Scenario:
    """One fault on the primary. ``expect``: ``failover`` (the standby serves), ``cluster`` (another
    instance of the primary's cluster serves), or ``any`` (a partial fault, after which staying or
    moving are both right; only the engine's view is judged)."""

    name = "scenario"
    expect = "failover"
    faulty = "primary"  # the member the fault is made on; any other member tripping is a false trip
    served_within_s = 2.0  # every rank served again (by the standby, or its cluster) this soon

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def members(self) -> list[dict]:
        """Start what the scenario needs; return the backend sections (primary first)."""
        raise NotImplementedError

    def config(self) -> dict:
        return {}

    def inject(self) -> None:
        raise NotImplementedError

    def heal(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def file_standby(self) -> dict:
        return {"name": "standby", "type": "file", "path": os.path.join(self.workdir, "standby")}


class _RedisPrimary(Scenario):
    def members(self) -> list[dict]:
        self.server = RedisServer().start()
        return [{"name": "primary", "type": "redis", "url": self.server.url, "socket_timeout_ms": 1000},
                self.file_standby()]

    def close(self) -> None:
        self.server.close()


class SigKill(_RedisPrimary):
    name = "SIGKILL"

    def inject(self) -> None:
        self.server.kill()

    def heal(self) -> None:
        self.server.start()


class SigStop(_RedisPrimary):
    name = "SIGSTOP"

    def inject(self) -> None:
        self.server.freeze()

    def heal(self) -> None:
        self.server.thaw()


class ErrorBurst(_RedisPrimary):
    """Every command refused (the server starts asking for a password it was never given)."""

    name = "error burst (NOAUTH)"

    def inject(self) -> None:
        with self.server.client() as c:
            c.config_set("requirepass", "chaos")
            c.client_kill_filter(_type="normal", skipme=True)  # open connections would stay authenticated

    def heal(self) -> None:
        with self.server.client(password="chaos") as c:
            c.config_set("requirepass", "")


class Flapping(_RedisPrimary):
    """The primary goes down and comes back every ``period`` seconds while the fault lasts."""

    name = "flapping (down/up every 1 s)"
    period = 1.0

    def inject(self) -> None:
        self._stop = threading.Event()

        def flap() -> None:
            while not self._stop.is_set():
                self.server.kill()
                if self._stop.wait(self.period):
                    break
                self.server.start()
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=flap, name="chaos-flap", daemon=True)
        self._thread.start()

    def heal(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.server.proc is None or self.server.proc.poll() is not None:
            self.server.start()


class _ProxiedPrimary(Scenario):
    def members(self) -> list[dict]:
        self.server = RedisServer().start()
        self.proxy = FaultProxy("127.0.0.1", self.server.port).start()
        return [{"name": "primary", "type": "redis", "url": f"redis://{self.proxy.address}/0",
                 "socket_timeout_ms": 1000}, self.file_standby()]

    def heal(self) -> None:
        self.proxy.set("pass")

    def close(self) -> None:
        self.proxy.close()
        self.server.close()


class SlowLink(_ProxiedPrimary):
    name = "slow link (+300 ms each way)"

    def inject(self) -> None:
        self.proxy.set("latency", delay=0.3)


class LossyLink(_ProxiedPrimary):
    """Packet loss as TCP shows it: 20 % of the chunks stall for a 400 ms retransmission timeout."""

    name = "lossy link (20 % stalls of 400 ms)"
    expect = "any"

    def inject(self) -> None:
        self.proxy.set("lossy", loss=0.2, stall=0.4)


class ConnectionResets(_ProxiedPrimary):
    name = "connection resets"

    def inject(self) -> None:
        self.proxy.set("reset")


class Blackhole(Scenario):
    """The primary on another (virtual) host; a firewall there drops every packet to it."""

    name = "network blackhole (iptables DROP)"

    def members(self) -> list[dict]:
        self.host = NetnsHost().start()
        self.server = RedisServer(host=self.host.host, launcher=self.host.launcher).start()
        return [{"name": "primary", "type": "redis", "url": self.server.url, "socket_timeout_ms": 1000,
                 "connect_timeout_ms": 200}, self.file_standby()]

    def inject(self) -> None:
        self.host.blackhole(self.server.port)

    def heal(self) -> None:
        self.host.restore(self.server.port)

    def close(self) -> None:
        self.server.close()
        self.host.close()


class _TmpfsPrimary(Scenario):
    """A file primary on a small tmpfs of its own (its capacity set below the disk's size, as an operator
    would); the standby is a redis-server. Whether the primary trips depends on how much of the traffic
    fails: reads are still served, so either way is right, as long as nothing reaches the engine."""

    expect = "any"
    size = 64 << 20

    def members(self) -> list[dict]:
        self.mount = os.path.join(self.workdir, "disk")
        os.makedirs(self.mount)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", self.mount], check=True,
                       capture_output=True)
        self.server = RedisServer().start()
        return [{"name": "primary", "type": "file", "path": os.path.join(self.mount, "pages"),
                 "capacity_bytes": self.size * 3 // 4},
                {"name": "standby", "type": "redis", "url": self.server.url}]

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.mount], capture_output=True)
        self.server.close()


class DiskFull(_TmpfsPrimary):
    """Every byte of the disk taken: writes fail (ENOSPC), pages already there are still read."""

    name = "disk full (ENOSPC)"

    def inject(self) -> None:
        self.filler = os.path.join(self.mount, "filler")
        with open(self.filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass

    def heal(self) -> None:
        os.unlink(self.filler)


class DiskReadOnly(_TmpfsPrimary):
    name = "disk turns read-only (EROFS)"

    def inject(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", self.mount], check=True, capture_output=True)

    def heal(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", self.mount], check=True, capture_output=True)


class SentinelPromotion(Scenario):
    """The master dies; the Sentinels promote its replica; the rank stays in its cluster."""

    name = "Sentinel promotion"
    expect = "cluster"
    served_within_s = 6.0  # Sentinel's own down-after (500 ms here) and election come first

    def members(self) -> list[dict]:
        self.cluster = SentinelCluster(down_after_ms=500, failover_timeout_ms=3000).start()
        return [{"name": "primary", "type": "redis", "sentinel": {"master": self.cluster.master_name,
                                                                  "addresses": self.cluster.addresses}},
                self.file_standby()]

    def config(self) -> dict:
        return {"failover": {"cluster_patience_ms": 10_000}}

    def inject(self) -> None:
        self.cluster.master.kill()

    def heal(self) -> None:
        pass  # the old master stays dead; the cluster carries on with the promoted replica

    def close(self) -> None:
        self.cluster.close()


SCENARIOS: list[type[Scenario]] = [SigKill, SigStop, Blackhole, SlowLink, LossyLink, ConnectionResets, ErrorBurst,
                                   DiskFull, DiskReadOnly, SentinelPromotion, Flapping]
