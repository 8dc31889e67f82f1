"""A real `sbc run` process for scenario tests, and small SIP clients to talk to it.

Everything here binds and sends on loopback only, with bounded timeouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from sbc.sip.errors import ParseError
from sbc.sip.message import Headers, Response
from sbc.sip.parser import parse_message

#: Ports ``free_port`` handed out in this process: the kernel may give a port just
#: closed to the next bind at once, so two realms of one config could get the same
#: port (seen: "udp 127.0.0.1:48539 is already used by another listener").
_HANDED_OUT: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM, also_udp: bool = False) -> int:
    """A port free for TCP (and UDP when asked) on 127.0.0.1 right now, and not
    handed out before by this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port in _HANDED_OUT:
            continue
        if also_udp:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port")


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Whether ``check`` came true within ``timeout`` seconds (asked every ``interval``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


SIPP = shutil.which("sipp")
SIPP_SCENARIOS = Path(__file__).parent / "sipp"


def sipp_popen(workdir: Path, scenario: str, name: str, *args: str) -> subprocess.Popen[bytes]:
    """SIPp running ``scenario`` (from ``sipp/``) on 127.0.0.1 in ``workdir``.

    Errors go to ``<name>.err`` there and stderr is piped; ``args`` add the
    ports, rate, limits and target. Without keyboard input, so it ends by itself.
    """
    assert SIPP is not None, "sipp (Debian package sip-tester) is not installed"
    command = [
        SIPP, "-sf", str(SIPP_SCENARIOS / scenario), "-i", "127.0.0.1", "-nostdin",
        "-trace_err", "-error_file", str(workdir / f"{name}.err"), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@dataclass
class Ports:
    sip: int
    tls: int
    mgmt: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(free_port(also_udp=True), free_port(), free_port())


def config_text(ports: Ports, state_dir: Path, user_agent: str = "sbc-test") -> str:
    return f"""\
state_dir: {state_dir}
log:
  level: info
sip:
  listen:
    - {{transport: udp, address: 127.0.0.1, port: {ports.sip}}}
    - {{transport: tcp, address: 127.0.0.1, port: {ports.sip}}}
    - {{transport: tls, address: 127.0.0.1, port: {ports.tls}}}
  user_agent: {user_agent}
management:
  listen: {{address: 127.0.0.1, port: {ports.mgmt}}}
"""


def routed_config(
    workdir: Path,
    plain: int,
    outside: int,
    inside: int,
    mgmt: int,
    callees: dict[str, int],
    transport: str = "udp",
    *,
    media: str = "",
    extra: str = "",
) -> str:
    """Realms outside and inside on loopback (``transport``), calls from outside to
    the callee of their Request-URI user (route ``flow-<user>``), the userspace relay
    (``media`` adds keys to its section, e.g. ``"timeout: 300"``); ``extra`` is YAML
    appended (e.g. a ``calls:`` section)."""
    routes = "".join(
        f"  - {{name: flow-{user}, from_realm: outside, user_prefix: '{user}', action: trunk,"
        f" realm: inside, host: 127.0.0.1, port: {port}, transport: {transport}}}\n"
        for user, port in callees.items()
    )
    return f"""\
state_dir: {workdir / "state"}
log:
  level: info
sip:
  listen:
    - {{transport: udp, address: 127.0.0.1, port: {plain}}}
management:
  listen: {{address: 127.0.0.1, port: {mgmt}}}
# The userspace relay: no nftables in the host's namespace from a loopback test.
media: {{kernel_path: false{", " + media if media else ""}}}
realms:
  - name: outside
    listen: [{{transport: {transport}, address: 127.0.0.1, port: {outside}}}]
    media_address: 127.0.0.1
  - name: inside
    listen: [{{transport: {transport}, address: 127.0.0.1, port: {inside}}}]
    media_address: 127.0.0.1
routes:
{routes}{extra}"""


def start_routed(
    workdir: Path,
    callees: dict[str, int],
    transport: str = "udp",
    *,
    media: str = "",
    extra: str = "",
) -> tuple[SbcProcess, int]:
    """`sbc run` on a `routed_config` in ``workdir``, healthy; it and its outside port."""
    plain, outside, inside = (free_port(also_udp=True) for _ in range(3))
    mgmt = free_port()
    config = workdir / "sbc.yaml"
    config.write_text(
        routed_config(
            workdir, plain, outside, inside, mgmt, callees, transport, media=media, extra=extra
        )
    )
    return SbcProcess(workdir, config, Ports(plain, 0, mgmt)).start(), outside


class SbcProcess:
    """`python -m sbc run` in a subprocess; stopped (and reaped) by ``stop``."""

    def __init__(
        self, workdir: Path, config: Path | None, ports: Ports, log_name: str = "sbc.log"
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.ports = ports
        self.log_path = workdir / log_name
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that runs the SBC (subclasses wrap it)."""
        args = [sys.executable, "-m", "sbc", "run"]
        if self.config is not None:
            args += ["--config", str(self.config)]
        return args

    def start(self, timeout: float = 20.0) -> Self:
        args = self.command()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sbc exited with {self.proc.returncode}:\n{self.log()}")
            if self.health()[0] == 200:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sbc did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def health(self) -> tuple[int, dict[str, object]]:
        url = f"http://127.0.0.1:{self.ports.mgmt}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}


def lenient_response(data: bytes) -> Response:
    """A response as received; one that echoes a malformed request's headers (as a
    400 must) is kept with its header fields unparsed."""
    try:
        message = parse_message(data)
    except ParseError:
        head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
        _, code, reason = head[0].split(" ", 2)
        fields = [tuple(line.split(":", 1)) for line in head[1:] if ":" in line]
        return Response(int(code), reason, Headers((n, v.strip()) for n, v in fields))
    assert isinstance(message, Response)
    return message


_counter = iter(range(1, 10**9))
_CALL_ID = re.compile(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*(\S+)")
_BRANCH = re.compile(rb"branch[ \t]*=[ \t]*([^;,\s]+)")


def options(method: str = "OPTIONS", transport: str = "UDP", port: int = 9) -> bytes:
    n = next(_counter)
    return (
        f"{method} sip:sbc@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{port};branch=z9hG4bKscn{n};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:probe@127.0.0.1>;tag=p{n}\r\n"
        f"To: <sip:sbc@127.0.0.1>\r\n"
        f"Call-ID: scenario-{n}@127.0.0.1\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def udp_exchange(
    port: int, data: bytes, timeout: float = 2.0, bind_port: int = 0
) -> Response | None:
    """Send one datagram, return the first final response (None on timeout).

    ``bind_port`` sends from that port: a request without ``rport`` is answered
    at the port its Via names (RFC 3261 18.2.2), so a client must listen there.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", bind_port))
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        # What ties an answer to this request: its Call-ID, or without one (RFC 4475
        # insuf) its branch. Another request's final response may still be
        # retransmitted to this port (an unacknowledged INVITE answer, Timer G).
        mark = _CALL_ID.search(data) or _BRANCH.search(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = s.recv(65535)
            except TimeoutError:
                return None
            if mark is not None and mark.group(1) not in reply:
                continue  # a late answer to someone else's request
            message = lenient_response(reply)
            if message.status >= 200:
                return message
    return None


@contextlib.contextmanager
def stream_socket(port: int, tls: bool = False, timeout: float = 2.0) -> Iterator[socket.socket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if not tls:
        with raw:
            yield raw
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(raw) as wrapped:
        yield wrapped


def stream_exchange(
    sock: socket.socket, data: bytes, timeout: float = 2.0, half_close: bool = False
) -> tuple[Response | None, bool]:
    """Send on a stream; return (first final response or None, whether the peer closed)."""
    sock.sendall(data)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    buffer = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65535)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLError):
            return None, True
        if not chunk:
            return None, True
        buffer += chunk
        while b"\r\n\r\n" in buffer:
            head, _, rest = buffer.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
            size = int(length.group(1)) if length else 0
            if len(rest) < size:
                break
            buffer = rest[size:]
            response = lenient_response(head + b"\r\n\r\n" + rest[:size])
            if response.status >= 200:
                return response, False
    return None, False


_CONTENT_LENGTH = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)")


def stream_messages(
    conn: socket.socket, stop: threading.Event, seconds: float = 10.0
) -> Iterator[bytes]:
    """Each SIP message a peer sends on a TCP or TLS connection, framed by its
    Content-Length, until the peer closes, ``stop`` is set or ``seconds`` pass."""
    conn.settimeout(0.2)
    buffer = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        try:
            chunk = conn.recv(65535)
        except TimeoutError:
            continue
        except OSError:  # ssl.SSLError included
            return
        if not chunk:
            return
        buffer += chunk
        while b"\r\n\r\n" in buffer:
            head, _, rest = buffer.partition(b"\r\n\r\n")
            found = _CONTENT_LENGTH.search(head)
            size = int(found.group(1)) if found else 0
            if len(rest) < size:
                break
            buffer = rest[size:]
            yield head + b"\r\n\r\n" + rest[:size]
