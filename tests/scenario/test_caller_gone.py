"""A TCP caller that is gone while its call rings: the callee is cancelled at once.

    caller (TCP) -> SBC realm "outside" ... realm "carrier" -> gateway (UDP)

The caller sends its INVITE over TCP and closes the connection once it has the
100 Trying. The gateway rings (180) only after that: the SBC cannot send the 180
on the closed connection, and RFC 3261 18.2.2 has it try a new connection to the
Via's sent-by, where nothing listens. That failure reaches the INVITE's server
transaction (RFC 3261 17.2.4) and the B2BUA, which cancels the callee instead of
letting it ring until the no-answer timer. Loopback only, no privileges.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from sbc.sip.message import Request, make_response
from sbc.sip.parser import parse_message
from tests.scenario.sbcproc import Ports, SbcProcess, free_port, stream_messages, wait_until

SDP = (
    "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\n"
)


class Gateway:
    """A UDP peer: rings (180) when told to, answers CANCEL 200 and the INVITE 487."""

    def __init__(self) -> None:
        self.port = free_port(socket.SOCK_DGRAM)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.requests: list[tuple[float, Request]] = []
        self.ring = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        invite: tuple[Request, tuple[str, int]] | None = None
        rang = False
        while not self._stop.is_set():
            if invite is not None and not rang and self.ring.is_set():
                self.sock.sendto(bytes(make_response(invite[0], 180, to_tag="gw")), invite[1])
                rang = True
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            request = parse_message(data)
            if not isinstance(request, Request):
                continue
            self.requests.append((time.monotonic(), request))
            if request.method == "INVITE" and invite is None:
                invite = (request, peer)
            elif request.method == "CANCEL" and invite is not None:
                self.sock.sendto(bytes(make_response(request, 200, to_tag="gw")), peer)
                self.sock.sendto(bytes(make_response(invite[0], 487, to_tag="gw")), peer)

    def methods(self) -> list[str]:
        return [request.method for _, request in self.requests]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def sbc_config(workdir: Path, ports: Ports, outside: int, carrier: int, gateway: int) -> str:
    return f"""\
state_dir: {workdir / "state"}
log:
  level: info
sip:
  listen: [{{transport: udp, address: 127.0.0.1, port: {ports.sip}}}]
management:
  listen: {{address: 127.0.0.1, port: {ports.mgmt}}}
media:
  kernel_path: false
calls:
  no_answer_timeout: 120
realms:
  - name: outside
    listen: [{{transport: tcp, address: 127.0.0.1, port: {outside}}}]
    media_address: 127.0.0.1
  - name: carrier
    listen: [{{transport: udp, address: 127.0.0.1, port: {carrier}}}]
    media_address: 127.0.0.1
routes:
  - {{name: to-carrier, from_realm: outside, action: trunk, trunk: carrier}}
trunks:
  - name: carrier
    realm: carrier
    gateways: [{{host: 127.0.0.1, port: {gateway}, transport: udp}}]
    probe: {{enabled: false}}
"""


def invite(outside: int, sent_by: int) -> bytes:
    return (
        f"INVITE sip:1000@127.0.0.1:{outside};transport=tcp SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:{sent_by};branch=z9hG4bKgone1\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:caller@127.0.0.1>;tag=gone\r\n"
        f"To: <sip:1000@127.0.0.1:{outside}>\r\n"
        "Call-ID: caller-gone@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:caller@127.0.0.1:{sent_by};transport=tcp>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}"
    ).encode()


def test_a_gone_tcp_caller_gets_its_ringing_callee_cancelled(tmp_path: Path) -> None:
    gateway = Gateway()
    ports = Ports(free_port(also_udp=True), 0, free_port())
    outside, carrier = free_port(), free_port(socket.SOCK_DGRAM)
    config = tmp_path / "sbc.yaml"
    config.write_text(sbc_config(tmp_path, ports, outside, carrier, gateway.port))
    sbc = SbcProcess(tmp_path, config, ports)
    # The Via's sent-by: a port nothing listens on, so a new connection is refused.
    nobody = free_port()
    try:
        sbc.start()
        with socket.create_connection(("127.0.0.1", outside), timeout=5) as conn:
            conn.sendall(invite(outside, nobody))
            stop = threading.Event()
            first = next(stream_messages(conn, stop, seconds=5), b"")
            assert first.startswith(b"SIP/2.0 100 "), first
        assert wait_until(lambda: "INVITE" in gateway.methods(), 5, interval=0.05), sbc.log()
        gone_at = time.monotonic()
        gateway.ring.set()
        assert wait_until(lambda: "CANCEL" in gateway.methods(), 5, interval=0.05), (
            f"the callee rang on: {gateway.methods()}\n{sbc.log()}"
        )
        cancelled_at = next(t for t, r in gateway.requests if r.method == "CANCEL")
        assert cancelled_at - gone_at < 5
        assert "the caller cannot be reached" in sbc.log()
    finally:
        sbc.stop()
        gateway.close()
