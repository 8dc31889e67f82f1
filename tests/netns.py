"""A small network-namespace lab for scenario tests (needs root).

    with Lab() as lab:
        lab.add("a"); lab.add("sbc")
        lab.link("a", "sbc", ["198.51.100.10/24"], ["198.51.100.1/24"])
        lab.sysctl("sbc", "net.ipv4.ip_forward", 1)
        lab.run("a", "ping", "-c1", "198.51.100.1")
        sock = lab.socket("a", socket.AF_INET, socket.SOCK_DGRAM)   # lives in "a"
        with lab.inside("sbc"):                                     # this thread in "sbc"
            ...

Namespace names get a per-lab prefix, so parallel runs do not collide. Everything
the lab made goes away in `close()` (also on failure): processes it spawned are ended
by PID, namespaces (with their veths and nftables tables) are deleted. Use only the
documentation ranges 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32 inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from types import TracebackType

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def can_run_lab() -> str | None:
    """None when a lab can be built here, else the reason it cannot (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network-namespace lab needs root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Lab:
    """Network namespaces joined by veth pairs; see the module docstring."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"sbct{secrets.token_hex(3)}"
        self.namespaces: dict[str, str] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self._links = 0

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def ns(self, name: str) -> str:
        """The real namespace name of lab namespace ``name``."""
        return self.namespaces[name]

    def add(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        subprocess.run(["ip", "netns", "add", full], check=True)
        self.namespaces[name] = full
        self.run(name, "ip", "link", "set", "lo", "up")
        return full

    def link(
        self,
        left: str,
        right: str,
        left_addresses: Sequence[str] = (),
        right_addresses: Sequence[str] = (),
    ) -> tuple[str, str]:
        """A veth pair between two lab namespaces, addressed and up; the device names."""
        self._links += 1
        lname, rname = f"v{self._links}{left}"[:15], f"v{self._links}{right}"[:15]
        if lname == rname:
            lname, rname = f"v{self._links}l", f"v{self._links}r"
        tmp_l, tmp_r = f"{self.prefix}l{self._links}"[:15], f"{self.prefix}r{self._links}"[:15]
        subprocess.run(
            ["ip", "link", "add", tmp_l, "type", "veth", "peer", "name", tmp_r], check=True
        )
        for tmp, ns, dev, addresses in (
            (tmp_l, left, lname, left_addresses),
            (tmp_r, right, rname, right_addresses),
        ):
            subprocess.run(
                ["ip", "link", "set", tmp, "netns", self.ns(ns), "name", dev], check=True
            )
            for address in addresses:
                extra = ["nodad"] if ":" in address else []
                self.run(ns, "ip", "addr", "add", address, "dev", dev, *extra)
            self.run(ns, "ip", "link", "set", dev, "up")
        return lname, rname

    def sysctl(self, name: str, key: str, value: object) -> None:
        self.run(name, "sysctl", "-qw", f"{key}={value}")

    def run(
        self,
        name: str,
        *argv: str,
        check: bool = True,
        timeout: float = 20,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a lab namespace and wait for it."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(name), *argv],
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            input=input,
        )

    def spawn(self, name: str, argv: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start a process inside a lab namespace; the lab ends it (by PID) on close."""
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.ns(name), *argv], **popen
        )
        self.processes.append(process)
        return process

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """Move the calling thread into a lab namespace for the block.

        Sockets and netlink handles created in the block stay in that namespace after
        it; threads started in the block inherit it.
        """
        with open("/proc/thread-self/ns/net") as here:
            with open(f"/run/netns/{self.ns(name)}") as there:
                _setns(there.fileno())
            try:
                yield
            finally:
                _setns(here.fileno())

    def socket(
        self, name: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM
    ) -> socket.socket:
        """A socket that lives in a lab namespace."""
        with self.inside(name):
            return socket.socket(family, type)

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)
        self.processes.clear()
        for full in reversed(list(self.namespaces.values())):
            subprocess.run(["ip", "netns", "del", full], check=False, capture_output=True)
        self.namespaces.clear()
