"""Another host on this machine: a network namespace joined to ours by a veth pair.

A server started in it (``launcher``) is reached over a real network path, so a firewall rule there is a
realistic blackhole: packets vanish, connects and reads hang until their timeouts (unlike SIGSTOP,
where the kernel still answers TCP). Needs root and iproute2 / iptables (Debian); the namespace, the
links and the rules are removed by ``close``.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_SEQ = itertools.count()


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10)


class NetnsHost:
    def __init__(self) -> None:
        n = (os.getpid() * 7 + next(_SEQ)) % 250 + 1
        self.name = f"hcha{os.getpid() % 100000}x{n}"
        self.ours, self.theirs = f"hha{n}a{os.getpid() % 1000}", f"hha{n}b{os.getpid() % 1000}"
        self.our_ip, self.host = f"10.201.{n}.1", f"10.201.{n}.2"
        self.blocked: set[int] = set()

    @property
    def launcher(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def start(self) -> "NetnsHost":
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "link", "add", self.ours, "type", "veth", "peer", "name", self.theirs)
            _run("ip", "link", "set", self.theirs, "netns", self.name)
            _run("ip", "addr", "add", f"{self.our_ip}/24", "dev", self.ours)
            _run("ip", "link", "set", self.ours, "up")
            _run(*self.launcher, "ip", "addr", "add", f"{self.host}/24", "dev", self.theirs)
            _run(*self.launcher, "ip", "link", "set", self.theirs, "up")
            _run(*self.launcher, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def blackhole(self, port: int) -> None:
        """Drop every packet to ``port`` on this host: established connections and new ones hang."""
        _run(*self.launcher, "iptables", "-I", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP")
        self.blocked.add(port)

    def restore(self, port: int) -> None:
        _run(*self.launcher, "iptables", "-D", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP")
        self.blocked.discard(port)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.ours], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def __enter__(self) -> "NetnsHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def netns_available() -> bool:
    """Root with iproute2 and iptables: what a blackhole needs."""
    from shutil import which

    return os.geteuid() == 0 and which("ip") is not None and which("iptables") is not None
