"""A call to a TLS trunk given by name, with mutual TLS, through a real `sbc run`.

    caller (UDP) -> SBC realm "outside" ... realm "carrier" -> trunk (TLS, mutual)

The trunk is a Python TLS server on 127.0.0.1 whose certificate, from a private CA,
names DNS ``localhost`` only (no IP address), and which requires a client
certificate from that CA. It answers the INVITE 486. The SBC finds the gateway
``host: localhost`` by RFC 3263 (an explicit port: A/AAAA only) and must verify
the certificate against ``sip.tls.server_ca`` by that name (RFC 5922 4), while
presenting its own certificate.

The SBC's resolver is a DNS stub that reads /etc/resolv.conf and never /etc/hosts,
and the system's nameserver is not on loopback; so ``sbc run`` runs in a mount
namespace of its own where /etc/resolv.conf names a DNS responder of this test on
a 127/8 address (network namespace shared: every socket stays on loopback). That
needs root; without it the module is skipped.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sbc.sip.message import Request, make_response
from sbc.sip.parser import parse_message
from tests.scenario.sbcproc import Ports, SbcProcess, free_port, lenient_response
from tests.tls_pki import Authority, Issued, write_pair

UNSHARE = shutil.which("unshare")
#: Seconds the caller waits for the SBC's final answer (a TLS failure is one connect).
ANSWER_WAIT = 15.0


def _namespaces_usable() -> str | None:
    """Why ``sbc run`` cannot get a resolv.conf of its own here, or None."""
    if os.geteuid() != 0:
        return "needs root (a mount namespace for the SBC's resolv.conf)"
    if UNSHARE is None:
        return "unshare is not installed"
    probe = subprocess.run(
        [UNSHARE, "--mount", "--propagation", "private", "true"],
        capture_output=True,
        timeout=10,
    )
    if probe.returncode != 0:
        return f"unshare --mount fails: {probe.stderr.decode(errors='replace').strip()}"
    return None


_WHY = _namespaces_usable()
if _WHY is not None:
    pytest.skip(_WHY, allow_module_level=True)


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


# -- the SBC's DNS ----------------------------------------------------------------------------


class LoopbackDns:
    """Answers A ``localhost`` with 127.0.0.1 (RFC 6761 6.3), everything else empty,
    on port 53 of a random 127/8 address; records every question."""

    def __init__(self) -> None:
        self.questions: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            address = (
                f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
            )
            try:
                self.sock.bind((address, 53))
                break
            except OSError:
                continue
        else:
            self.sock.close()
            raise RuntimeError("no free 127/8 address for port 53")
        self.address = address
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
                question = query.question[0]
            except (dns.exception.DNSException, IndexError):
                continue
            name = question.name.to_text().rstrip(".").lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.questions.append((name, rdtype))
            response = dns.message.make_response(query)
            if name == "localhost" and rdtype == "A":
                response.answer.append(
                    dns.rrset.from_text(question.name, 60, "IN", "A", "127.0.0.1")
                )
            self.sock.sendto(response.to_wire(), peer)

    def answered(self, since: int, name: str, *rdtypes: str) -> bool:
        """Whether each of ``rdtypes`` for ``name`` was asked after question ``since``."""
        asked = self.questions[since:]
        return all((name, rdtype) in asked for rdtype in rdtypes)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# -- the trunk --------------------------------------------------------------------------------


@dataclass
class TrunkLog:
    """What the trunk saw: SNI names, failed handshakes, client certificates, requests."""

    server_names: list[str | None] = field(default_factory=list)
    failed_handshakes: list[str] = field(default_factory=list)
    client_certificates: list[bytes] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


_LENGTH = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)")


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
        tls.settimeout(0.2)
        buffer = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                chunk = tls.recv(65535)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return
            if not chunk:
                return
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, _, rest = buffer.partition(b"\r\n\r\n")
                found = _LENGTH.search(head)
                size = int(found.group(1)) if found else 0
                if len(rest) < size:
                    break
                buffer = rest[size:]
                request = parse_message(head + b"\r\n\r\n" + rest[:size])
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


# -- the SBC, in its own mount namespace ------------------------------------------------------


class NamespacedSbc(SbcProcess):
    """`sbc run` with /etc/resolv.conf bind-mounted from ``resolv`` in a private mount
    namespace (the network namespace is the test's own)."""

    def __init__(self, workdir: Path, config: Path, ports: Ports, resolv: Path) -> None:
        super().__init__(workdir, config, ports)
        self.resolv = resolv

    def command(self) -> list[str]:
        assert UNSHARE is not None
        script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        return [
            UNSHARE, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(self.resolv), *super().command(),
        ]  # fmt: skip


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
    dns: LoopbackDns
    resolv: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("tls-trunk")
    ca = Authority(workdir / "pki", "carrier-ca")
    sbc_cert = sbc_identity(ca, "sbc.test")
    trunk_cert = ca.issue("localhost")  # DNS:localhost only: no IP address SAN
    dns_server = LoopbackDns()
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {dns_server.address}\n")
    try:
        yield Lab(workdir, ca, sbc_cert, trunk_cert, dns_server, resolv)
    finally:
        dns_server.close()


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
    sbc = NamespacedSbc(workdir, config, ports, lab.resolv)
    asked_before = len(lab.dns.questions)
    try:
        sbc.start()
        if gateway_host == "localhost":
            # RFC 3263 4.2, a port given: A and AAAA, no NAPTR or SRV. The gateway is
            # usable once both are answered (the SBC resolves at start).
            deadline = time.monotonic() + 10
            while not lab.dns.answered(asked_before, "localhost", "A", "AAAA"):
                assert time.monotonic() < deadline, f"no DNS questions: {lab.dns.questions}"
                time.sleep(0.05)
            time.sleep(0.3)
            asked = {t for n, t in lab.dns.questions[asked_before:] if n == "localhost"}
            assert asked == {"A", "AAAA"}
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
