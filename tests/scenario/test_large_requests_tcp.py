"""RFC 3261 18.1.1 through a real `sbc run`: a request too large for UDP goes over TCP.

    caller (UDP) -> SBC realm "outside" ... realm "carrier" -> trunk gateway (UDP)

The carrier realm has `large_requests_over_tcp: true`, UDP and TCP listeners, and
an outbound header rule that pads every request into it past 1300 bytes. The
gateway is configured as UDP. A peer that listens on TCP as well gets the INVITE
over TCP (its Via says so); a peer with nothing on that TCP port (a reset) gets
it over UDP after all, and the call goes on. Loopback only, no privileges.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sbc.sip.message import Request, make_response
from sbc.sip.parser import parse_message
from tests.scenario.sbcproc import Ports, SbcProcess, free_port, stream_messages
from tests.scenario.test_tls_trunk import _CALLS, call

#: Two outbound header rules add this (a rule's value is at most 1024 bytes): the
#: B-leg INVITE is well over 1300 bytes.
PADDING = "p" * 800


@dataclass
class PeerLog:
    """Requests the gateway got, with the transport each came over."""

    requests: list[tuple[str, Request]] = field(default_factory=list)


class Gateway:
    """A SIP peer on one 127.0.0.1 port, over UDP and (when ``tcp``) TCP: every
    INVITE gets 486 back the way it came; ACKs are absorbed."""

    def __init__(self, *, tcp: bool) -> None:
        self.log = PeerLog()
        self.port = free_port(also_udp=True)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.udp.settimeout(0.2)
        self.tcp: socket.socket | None = None
        if tcp:
            self.tcp = socket.create_server(("127.0.0.1", self.port))
            self.tcp.settimeout(0.2)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True)]
        if self.tcp is not None:
            self._threads.append(threading.Thread(target=self._serve_tcp, daemon=True))
        for thread in self._threads:
            thread.start()

    def _answer(self, transport: str, data: bytes) -> bytes | None:
        request = parse_message(data)
        if not isinstance(request, Request):
            return None
        self.log.requests.append((transport, request))
        if request.method != "INVITE":
            return None
        return bytes(make_response(request, 486, to_tag="gw486"))

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self._answer("UDP", data)
            if answer is not None:
                self.udp.sendto(answer, peer)

    def _serve_tcp(self) -> None:
        assert self.tcp is not None
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        for data in stream_messages(conn, self._stop):
            answer = self._answer("TCP", data)
            if answer is not None:
                conn.sendall(answer)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.udp.close()
        if self.tcp is not None:
            self.tcp.close()


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
realms:
  - name: outside
    listen: [{{transport: udp, address: 127.0.0.1, port: {outside}}}]
    media_address: 127.0.0.1
  - name: carrier
    listen:
      - {{transport: udp, address: 127.0.0.1, port: {carrier}}}
      - {{transport: tcp, address: 127.0.0.1, port: {carrier}}}
    media_address: 127.0.0.1
    large_requests_over_tcp: true
    header_rules:
      - {{action: add, header: X-Padding, value: {PADDING}, direction: outbound}}
      - {{action: add, header: X-Padding-2, value: {PADDING}, direction: outbound}}
routes:
  - {{name: to-carrier, from_realm: outside, action: trunk, trunk: carrier}}
trunks:
  - name: carrier
    realm: carrier
    gateways: [{{host: 127.0.0.1, port: {gateway}, transport: udp}}]
    probe: {{enabled: false}}
"""


@dataclass
class Outcome:
    status: int | None
    requests: list[tuple[str, Request]]
    carrier: int
    log: str


def run_call(workdir: Path, *, tcp: bool) -> Outcome:
    workdir.mkdir()
    gateway = Gateway(tcp=tcp)
    ports = Ports(free_port(also_udp=True), 0, free_port())
    outside, carrier = free_port(socket.SOCK_DGRAM), free_port(also_udp=True)
    config = workdir / "sbc.yaml"
    config.write_text(sbc_config(workdir, ports, outside, carrier, gateway.port))
    sbc = SbcProcess(workdir, config, ports)
    try:
        sbc.start()
        status = call(outside, next(_CALLS))
    finally:
        sbc.stop()
        gateway.close()
    return Outcome(status, gateway.log.requests, carrier, sbc.log())


def test_a_large_invite_goes_over_tcp_to_a_peer_that_has_it(tmp_path: Path) -> None:
    outcome = run_call(tmp_path / "tcp", tcp=True)
    assert outcome.status == 486, outcome.log  # the gateway's answer, relayed
    transport, invite = outcome.requests[0]
    assert invite.method == "INVITE" and len(bytes(invite)) > 1300
    assert transport == "TCP"
    assert invite.via.transport == "TCP" and invite.via.port == outcome.carrier
    assert PADDING in bytes(invite).decode()
    # The non-2xx ACK is hop by hop, in the INVITE's transaction: over TCP too.
    assert [(t, r.method) for t, r in outcome.requests] == [("TCP", "INVITE"), ("TCP", "ACK")]


def test_without_tcp_at_the_peer_the_invite_goes_over_udp_after_all(tmp_path: Path) -> None:
    outcome = run_call(tmp_path / "udp", tcp=False)
    assert outcome.status == 486, outcome.log
    assert [(t, r.method) for t, r in outcome.requests] == [("UDP", "INVITE"), ("UDP", "ACK")]
    _, invite = outcome.requests[0]
    assert invite.via.transport == "UDP" and len(bytes(invite)) > 1300
    assert "TCP failed, over UDP" in outcome.log
