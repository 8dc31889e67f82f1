"""A call to a TLS trunk given by name, with mutual TLS, through a real `sbc run`.

    caller (UDP) -> SBC realm "outside" ... realm "carrier" -> trunk (TLS, mutual)

The trunk is a Python TLS server on 127.0.0.1 whose certificate, from a private CA,
names DNS ``localhost`` only (no IP address), and which requires a client
certificate from that CA. It answers the INVITE 486. The SBC finds the gateway
``host: localhost`` by RFC 3263 (an explicit port: A/AAAA only) and must verify
the certificate against ``sip.tls.server_ca`` by that name (RFC 5922 4), while
presenting its own certificate.

The SBC's own resolver answers ``localhost`` itself (RFC 6761 6.3): no DNS server
is asked, every socket stays on loopback, and no privileges are needed.
"""

from __future__ import annotations

import datetime
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sbc.sip.message import Request, make_response
from sbc.sip.parser import parse_message
from tests.scenario.sbcproc import (
    Ports,
    SbcProcess,
    free_port,
    lenient_response,
    stream_messages,
)
from tests.tls_pki import Authority, Issued, write_pair

#: Seconds the caller waits for the SBC's final answer (a TLS failure is one connect).
ANSWER_WAIT = 15.0


# -- PKI --------------------------------------------------------------------------------------


def sbc_identity(ca: Authority, name: str) -> Issued:
    """The SBC's certificate: served to clients and presented to trunks, so it carries
    both serverAuth and clientAuth (as the certificates Teams or carriers ask for)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return write_pair(ca.directory, name, cert, key)


# -- the trunk --------------------------------------------------------------------------------


@dataclass
class TrunkLog:
    """What the trunk saw: SNI names, failed handshakes, client certificates, requests."""

    server_names: list[str | None] = field(default_factory=list)
    failed_handshakes: list[str] = field(default_factory=list)
    client_certificates: list[bytes] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


class TlsTrunk:
    """A TLS SIP server on 127.0.0.1 requiring a client certificate; INVITE -> 486."""

    def __init__(self, certificate: Issued, client_ca: Path) -> None:
        self.log = TrunkLog()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate.cert, certificate.key)
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = lambda _obj, name, _ctx: self.log.server_names.append(name)
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(5)
            try:
                tls = self.context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.log.failed_handshakes.append(str(exc))
                raw.close()
                continue
            with tls:
                der = tls.getpeercert(binary_form=True)
                if der is not None:
                    self.log.client_certificates.append(der)
                self._serve(tls)

    def _serve(self, tls: ssl.SSLSocket) -> None:
        """Answer requests until the ACK, the peer closing, or 10 s."""
        for data in stream_messages(tls, self._stop):
            request = parse_message(data)
            if not isinstance(request, Request):
                continue
            self.log.requests.append(request)
            if request.method == "ACK":
                return
            tls.sendall(bytes(make_response(request, 486, to_tag="trunk486")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self.sock.close()


def sbc_config(
    workdir: Path, ports: Ports, outside: int, carrier: int, tls: str, gateway: str
) -> str:
    return f"""\
state_dir: {workdir / "state"}
log:
  level: info
sip:
  listen: [{{transport: udp, address: 127.0.0.1, port: {ports.sip}}}]
  tls:
{tls}
management:
  listen: {{address: 127.0.0.1, port: {ports.mgmt}}}
media:
  kernel_path: false
realms:
  - name: outside
    listen: [{{transport: udp, address: 127.0.0.1, port: {outside}}}]
    media_address: 127.0.0.1
  - name: carrier
    listen: [{{transport: tls, address: 127.0.0.1, port: {carrier}}}]
    media_address: 127.0.0.1
routes:
  - {{name: to-carrier, from_realm: outside, action: trunk, trunk: carrier}}
trunks:
  - name: carrier
    realm: carrier
    gateways: [{gateway}]
    probe: {{enabled: false}}
"""


# -- the caller -------------------------------------------------------------------------------

_CALLS = itertools.count(1)


def call(port: int, n: int) -> int | None:
    """An INVITE over UDP to the SBC; the final status (ACKed), None if none came."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        local = int(s.getsockname()[1])
        media = free_port(socket.SOCK_DGRAM)
        sdp = (
            f"v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
            f"t=0 0\r\nm=audio {media} RTP/AVP 0\r\n"
        )
        via = f"SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bKtlstrunk{n};rport"
        common = (
            f"From: <sip:alice@127.0.0.1>;tag=caller{n}\r\nCall-ID: tls-trunk-{n}@127.0.0.1\r\n"
        )
        invite = (
            f"INVITE sip:4930123@127.0.0.1:{port} SIP/2.0\r\nVia: {via}\r\n"
            f"Max-Forwards: 70\r\n{common}To: <sip:4930123@127.0.0.1>\r\n"
            f"CSeq: 1 INVITE\r\nContact: <sip:alice@127.0.0.1:{local}>\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}"
        )
        s.sendto(invite.encode(), ("127.0.0.1", port))
        s.settimeout(0.5)
        deadline = time.monotonic() + ANSWER_WAIT
        while time.monotonic() < deadline:
            try:
                data = s.recv(65535)
            except TimeoutError:
                continue
            response = lenient_response(data)
            if response.status < 200:
                continue
            # RFC 3261 17.1.1.3: a non-2xx final answer is acknowledged hop by hop.
            ack = (
                f"ACK sip:4930123@127.0.0.1:{port} SIP/2.0\r\nVia: {via}\r\n"
                f"Max-Forwards: 70\r\n{common}To: {response.headers.get('To')}\r\n"
                f"CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
            )
            s.sendto(ack.encode(), ("127.0.0.1", port))
            return response.status
    return None


# -- the scenarios ----------------------------------------------------------------------------


@dataclass
class Lab:
    workdir: Path
    ca: Authority
    sbc_cert: Issued
    trunk_cert: Issued


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("tls-trunk")
    ca = Authority(workdir / "pki", "carrier-ca")
    sbc_cert = sbc_identity(ca, "sbc.test")
    trunk_cert = ca.issue("localhost")  # DNS:localhost only: no IP address SAN
    yield Lab(workdir, ca, sbc_cert, trunk_cert)


@dataclass
class Outcome:
    status: int | None
    trunk: TrunkLog
    log: str


def run_call(lab: Lab, name: str, *, server_ca: bool, gateway_host: str) -> Outcome:
    workdir = lab.workdir / name
    workdir.mkdir()
    trunk = TlsTrunk(lab.trunk_cert, lab.ca.path)
    ports = Ports(free_port(also_udp=True), 0, free_port())
    outside, carrier = free_port(socket.SOCK_DGRAM), free_port()
    tls = f"    certificate: {lab.sbc_cert.cert}\n    private_key: {lab.sbc_cert.key}\n"
    if server_ca:
        tls += f"    server_ca: {lab.ca.path}\n"
    gateway = f"{{host: {gateway_host}, port: {trunk.port}, transport: tls}}"
    config = workdir / "sbc.yaml"
    config.write_text(sbc_config(workdir, ports, outside, carrier, tls.rstrip("\n"), gateway))
    sbc = SbcProcess(workdir, config, ports)
    try:
        sbc.start()
        if gateway_host == "localhost":
            # RFC 3263 4.2, a port given: A/AAAA only, answered by the resolver itself.
            # The gateway is usable once resolved (at start, in the background).
            deadline = time.monotonic() + 10
            while "trunk gateway localhost resolved to 127.0.0.1" not in sbc.log():
                assert time.monotonic() < deadline, sbc.log()
                time.sleep(0.05)
        status = call(outside, next(_CALLS))
    finally:
        sbc.stop()
        trunk.close()
    return Outcome(status, trunk.log, sbc.log())


def test_the_trunk_gets_the_invite_over_verified_mutual_tls(lab: Lab) -> None:
    outcome = run_call(lab, "verified", server_ca=True, gateway_host="localhost")
    trunk = outcome.trunk
    assert outcome.status == 486, outcome.log  # the trunk's own answer, relayed
    # The SBC asked for, and so verified, the gateway's name (SNI).
    assert trunk.server_names == ["localhost"]
    assert trunk.failed_handshakes == []
    # It presented its own certificate, the one it serves.
    assert trunk.client_certificates == [lab.sbc_cert.der]
    invite = trunk.requests[0]
    assert invite.method == "INVITE"
    assert invite.raw_uri.startswith("sips:4930123@localhost:")
    assert invite.via.transport.upper() == "TLS"
    assert [r.method for r in trunk.requests] == ["INVITE", "ACK"]
    assert "certificate verify failed" not in outcome.log


def test_without_server_ca_the_private_ca_is_refused(lab: Lab) -> None:
    outcome = run_call(lab, "no-server-ca", server_ca=False, gateway_host="localhost")
    trunk = outcome.trunk
    assert trunk.requests == []  # no INVITE ever reached the trunk
    assert trunk.server_names == ["localhost"] and trunk.failed_handshakes
    assert outcome.status is not None and (outcome.status >= 500 or outcome.status == 408)
    assert "certificate verify failed" in outcome.log


def test_an_address_gateway_is_verified_by_its_address(lab: Lab) -> None:
    # The same trunk configured by IP: its certificate names no address, so it fails.
    outcome = run_call(lab, "by-address", server_ca=True, gateway_host="127.0.0.1")
    assert outcome.trunk.requests == []
    assert outcome.trunk.server_names == [None]  # no SNI for an address
    assert outcome.status is not None and (outcome.status >= 500 or outcome.status == 408)
    assert "IP address mismatch" in outcome.log
