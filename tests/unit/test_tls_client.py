"""Outgoing TLS to trunks: the name verified (RFC 5922 4), the CA trusted, the SBC's
certificate presented (mutual TLS), and the ``sip.tls`` keys that configure them.

TLS handshakes here run between two in-memory ``ssl.MemoryBIO`` pairs, and the
transport layer's connect() is faked; the trunk's name travels from the configuration
through a faked RFC 3263 lookup, the Directory and the CallController to the hop the
INVITE is sent on. Only the app's start binds sockets (ephemeral, on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sbc import app
from sbc.app import SbcNode
from sbc.b2bua.call import CallLeg
from sbc.b2bua.realm import Hop
from sbc.config.loader import ConfigError, check_config, load_config_text
from sbc.config.schema import Config
from sbc.media.session import LegState, MediaSession, MediaStream
from sbc.media.values import Endpoint
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.sip.uri import parse_uri
from sbc.transport import layer as layer_module
from sbc.transport.base import Destination, Flow, ListenAddress, Transport, TransportConfig
from sbc.transport.certificates import (
    CertificatePaths,
    ClientAuth,
    client_context,
    server_context,
)
from sbc.transport.layer import TransportLayer
from sbc.transport.resolver import DnsAnswer, RecordType, SipResolver, SrvRecord
from tests.tls_pki import Authority, Issued

TRUNK = "sip.carrier.example"


# -- in-memory handshakes -----------------------------------------------------------------


def _paths(issued: Issued) -> CertificatePaths:
    return CertificatePaths(issued.cert, issued.key)


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two contexts over memory BIOs; raises its SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if client_done and server_done:
            return client, server
    raise AssertionError("the handshake did not finish")


class Pki:
    """A private CA, a trunk's server certificate for TRUNK only, the SBC's own."""

    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory / "ca", "carrier-ca")
        self.trunk = self.ca.issue(TRUNK)
        self.sbc = self.ca.issue("sbc.example", client=True)
        self.seen_names: list[str | None] = []

    def trunk_context(self, client_auth: ClientAuth = ClientAuth.REQUIRE) -> ssl.SSLContext:
        """The trunk's side: its certificate, and the SBC's required (mutual TLS)."""
        context = server_context(_paths(self.trunk), client_auth, self.ca.path)
        context.sni_callback = lambda _obj, name, _ctx: self.seen_names.append(name)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_client_context_trusts_server_ca_and_checks_the_name(pki: Pki) -> None:
    client = client_context(pki.ca.path, certificate=_paths(pki.sbc))
    tls, trunk = handshake(client, pki.trunk_context(), TRUNK)
    assert pki.seen_names[-1] == TRUNK  # SNI names the SIP domain
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert tls.getpeercert(binary_form=True) == pki.trunk.der
    # The trunk saw the SBC's certificate (mutual TLS).
    assert trunk.getpeercert(binary_form=True) == pki.sbc.der


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("198.51.100.7", "IP address mismatch"),  # what verifying the address gave
        ("other.example", "Hostname mismatch"),
    ],
)
def test_a_certificate_for_another_name_is_refused(pki: Pki, name: str, reason: str) -> None:
    client = client_context(pki.ca.path, certificate=_paths(pki.sbc))
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        handshake(client, pki.trunk_context(), name)


def test_without_server_ca_the_system_cas_do_not_know_a_private_ca(pki: Pki) -> None:
    client = client_context(certificate=_paths(pki.sbc))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(client, pki.trunk_context(), TRUNK)


def test_server_ca_replaces_the_system_cas(pki: Pki) -> None:
    client = client_context(pki.ca.path)
    ca_der = pki.ca.cert.public_bytes(serialization.Encoding.DER)
    assert client.get_ca_certs(binary_form=True) == [ca_der]
    assert client.verify_mode is ssl.CERT_REQUIRED and client.check_hostname


def test_a_pinned_trunk_certificate_is_a_trust_anchor_by_itself(pki: Pki) -> None:
    # Only the trunk's own (CA-issued) certificate in the bundle, not its CA.
    client = client_context(pki.trunk.cert, certificate=_paths(pki.sbc))
    handshake(client, pki.trunk_context(), TRUNK)


def test_verify_off_accepts_any_certificate_and_name(pki: Pki) -> None:
    client = client_context(verify=False, certificate=_paths(pki.sbc))
    assert client.verify_mode is ssl.CERT_NONE and not client.check_hostname
    tls, _ = handshake(client, pki.trunk_context(), "198.51.100.7")
    assert tls.getpeercert(binary_form=True) == pki.trunk.der


def test_without_a_certificate_a_mutual_tls_trunk_refuses(pki: Pki) -> None:
    client = client_context(pki.ca.path)
    with pytest.raises(ssl.SSLError, match=r"PEER_DID_NOT_RETURN_A_CERTIFICATE|peer did not"):
        handshake(client, pki.trunk_context(), TRUNK)
    # A trunk that does not ask is content without one.
    handshake(client, pki.trunk_context(ClientAuth.OFF), TRUNK)


def test_a_certificate_file_that_cannot_be_loaded_raises(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        client_context(tmp_path / "missing-ca.pem")
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(ssl.SSLError):
        client_context(certificate=CertificatePaths(pki.sbc.cert, bad))


# -- Destination ----------------------------------------------------------------------------


def test_destination_name_defaults_to_none_and_takes_part_in_equality() -> None:
    plain = Destination(Transport.TLS, "192.0.2.10", 5061)
    named = Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK)
    assert plain.tls_name is None and str(named) == str(plain) == "tls 192.0.2.10:5061"
    # A hop cached for the address must not stand in for the named one, or back.
    assert named != plain and len({named, plain}) == 2
    assert named == Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK)


def test_call_leg_keeps_the_name_through_to_dict_and_reads_old_dicts() -> None:
    leg = CallLeg(
        "carrier",
        "cid",
        "tag",
        ListenAddress(Transport.TLS, "203.0.113.1", 5061),
        Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK),
    )
    data = leg.to_dict()
    assert data["peer"] == {
        "transport": "tls",
        "host": "192.0.2.10",
        "port": 5061,
        "tls_name": TRUNK,
    }
    assert CallLeg.from_dict(data) == leg
    # A dict from before tls_name existed (or of a leg without one) loads as None.
    del data["peer"]["tls_name"]
    old = CallLeg.from_dict(data)
    assert old.peer.tls_name is None and old.peer.host == "192.0.2.10"
    unnamed = CallLeg(
        "x", "c", "t", leg.local, Destination(Transport.UDP, "192.0.2.9", 5060)
    ).to_dict()
    assert "tls_name" not in unnamed["peer"]


# -- TransportLayer.send_request --------------------------------------------------------------


class _Connection:
    """What the layer needs of an open StreamConnection."""

    def __init__(self, host: str, port: int) -> None:
        self.is_open = True
        self.flow = Flow(Transport.TLS, "127.0.0.1", 40000, host, port, connection_id=1)
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


OPTIONS = (
    "OPTIONS sip:sip.carrier.example SIP/2.0\r\n"
    "Via: SIP/2.0/TLS 203.0.113.1:5061;branch=z9hG4bKprobe1\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:sbc@203.0.113.1>;tag=t1\r\n"
    "To: <sip:sip.carrier.example>\r\nCall-ID: probe-1\r\nCSeq: 1 OPTIONS\r\n"
    "Content-Length: 0\r\n\r\n"
)


#: Client contexts told apart by identity: the first, and one after a reload.
FIRST = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
SECOND = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _send_all(
    monkeypatch: pytest.MonkeyPatch,
    sends: list[tuple[Destination, str | None]],
    between: Callable[[TransportLayer, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Send OPTIONS to each (destination, server_hostname); what connect() was asked."""
    calls: list[dict[str, Any]] = []

    async def fake_connect(
        factory: object, transport: Transport, host: str, port: int, **kwargs: Any
    ) -> _Connection:
        calls.append({"host": host, "port": port, **kwargs})
        return _Connection(host, port)

    monkeypatch.setattr(layer_module, "connect", fake_connect)
    request = parse_message(OPTIONS.encode())
    assert isinstance(request, Request)

    async def main() -> None:
        layer = TransportLayer(TransportConfig(), lambda m, f: None, client_ssl=FIRST)
        await layer.start()
        try:
            for index, (destination, name) in enumerate(sends):
                if between is not None:
                    between(layer, index)
                await layer.send_request(request, destination, server_hostname=name)
        finally:
            await layer.stop()

    asyncio.run(main())
    return calls


def test_send_request_verifies_the_destinations_name_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _send_all(
        monkeypatch,
        [
            (Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK), None),
            (Destination(Transport.TLS, "192.0.2.11", 5061), None),
            (Destination(Transport.TLS, "192.0.2.12", 5061, TRUNK), "explicit.example"),
        ],
    )
    assert [(c["host"], c["server_hostname"]) for c in calls] == [
        ("192.0.2.10", TRUNK),
        ("192.0.2.11", None),  # asyncio then verifies the address, as before
        ("192.0.2.12", "explicit.example"),
    ]


def test_set_client_ssl_applies_to_connections_opened_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def renew(layer: TransportLayer, index: int) -> None:
        if index == 1:
            layer.set_client_ssl(SECOND)

    gateway = Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK)
    other = Destination(Transport.TLS, "192.0.2.20", 5061, "other.example")
    calls = _send_all(monkeypatch, [(gateway, None), (other, None)], renew)
    assert [(c["host"], c["ssl_context"]) for c in calls] == [
        ("192.0.2.10", FIRST),
        ("192.0.2.20", SECOND),
    ]


# -- configuration --------------------------------------------------------------------------


def _tls_yaml(body: str) -> str:
    return "sip:\n  tls:\n" + "".join(f"    {line}\n" for line in body.splitlines())


def test_tls_client_keys_default_and_resolve_relative_paths(tmp_path: Path) -> None:
    defaults = load_config_text("{}", "t.yaml", tmp_path).sip.tls
    assert (defaults.server_ca, defaults.present_certificate, defaults.verify_server) == (
        None,
        True,
        True,
    )
    # The name the Authority writes its certificate under: pki/carrier-ca.pem.
    Authority(tmp_path / "pki", "carrier")
    tls = load_config_text(
        _tls_yaml(
            "server_ca: pki/carrier-ca.pem\npresent_certificate: false\nverify_server: false"
        ),
        "t.yaml",
        tmp_path,
    ).sip.tls
    assert tls.server_ca == tmp_path / "pki" / "carrier-ca.pem"
    assert not tls.present_certificate and not tls.verify_server


def test_check_config_refuses_a_missing_server_ca(tmp_path: Path) -> None:
    config = tmp_path / "sbc.yaml"
    config.write_text("state_dir: ./state\n" + _tls_yaml("mtls: none\nserver_ca: nowhere.pem"))
    result = check_config(config)
    assert result.status == 1
    assert result.messages == [
        f"{config}:5: sip.tls.server_ca: no such file: {tmp_path / 'nowhere.pem'}"
    ]
    with pytest.raises(ConfigError, match="server_ca: no such file"):
        load_config_text(_tls_yaml("server_ca: /nonexistent/ca.pem"), "t.yaml", tmp_path)


@pytest.mark.parametrize(
    ("key", "value"), [("verify_server", "no-thanks"), ("present_certificate", "1")]
)
def test_tls_client_switches_must_be_booleans(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"sip.tls.{key}: expected"):
        load_config_text(_tls_yaml(f"{key}: {value}"), "t.yaml", tmp_path)


# -- from the configuration to the hop ------------------------------------------------------


class FakeDns:
    """A DnsLookup answering from a table: (name, type) -> records."""

    def __init__(self, records: dict[tuple[str, RecordType], tuple[Any, ...]]) -> None:
        self.records = records
        self.asked: list[tuple[str, RecordType]] = []

    async def query(self, name: str, rdtype: RecordType) -> DnsAnswer:
        self.asked.append((name, rdtype))
        return DnsAnswer(name, rdtype, self.records.get((name, rdtype), ()), 300.0)


DNS = FakeDns(
    {
        (TRUNK, RecordType.A): ("192.0.2.10",),
        # No port: RFC 3263 4.2 SRV; the certificate still names the domain.
        ("_sips._tcp.srv.carrier.example", RecordType.SRV): (
            SrvRecord(10, 1, 5061, "edge1.carrier.example"),
        ),
        ("edge1.carrier.example", RecordType.A): ("192.0.2.11",),
        ("udp.carrier.example", RecordType.A): ("192.0.2.12",),
    }
)

CONFIG = """\
state_dir: STATE
sip:
  listen: [{transport: udp, address: 127.0.0.1, port: 0}]
realms:
  - name: outside
    listen: [{transport: udp, address: 198.51.100.1, port: 5060}]
    media_address: 198.51.100.1
  - name: carrier
    listen:
      - {transport: tls, address: 203.0.113.1, port: 5061}
      - {transport: udp, address: 203.0.113.1, port: 5060}
    media_address: 203.0.113.1
routes:
  - {name: by-ip, user_prefix: "9", action: trunk, realm: carrier, host: 192.0.2.10,
     port: 5061, transport: tls}
  - {name: srv, user_prefix: "8", action: trunk, trunk: srv}
  - {name: carrier, action: trunk, trunk: carrier}
trunks:
  - name: carrier
    realm: carrier
    # Written as an operator might: the name checked is the normalized one.
    gateways: [{host: SIP.Carrier.Example., port: 5061, transport: tls}]
  - name: srv
    realm: carrier
    gateways: [{host: srv.carrier.example, transport: tls}]
  - name: plain
    realm: carrier
    gateways:
      - {host: udp.carrier.example, port: 5060}
      - {host: 192.0.2.13, port: 5061, transport: tls}
"""


def _node(tmp_path: Path) -> SbcNode:
    text = CONFIG.replace("STATE", str(tmp_path / "state"))
    return SbcNode(load_config_text(text, "sbc.yaml", tmp_path))


def _resolve(node: SbcNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the app's RFC 3263 task (DNS faked) until every named gateway resolved."""
    monkeypatch.setattr(app, "SipResolver", lambda: SipResolver(lookup=DNS))

    async def main() -> None:
        task = asyncio.create_task(node._run_resolver())
        for _ in range(200):
            if len(node.directory.resolved) == 3:
                break
            await asyncio.sleep(0)
        task.cancel()
        assert len(node.directory.resolved) == 3, node.directory.resolved

    asyncio.run(main())


def _targets(node: SbcNode, trunk: str) -> list[Destination]:
    plan = node.directory.trunk(trunk, parse_uri("sip:100@198.51.100.1"), 0.0)
    assert plan is not None
    return [target.destination for target in plan.targets]


def test_a_tls_gateway_named_by_host_is_verified_by_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _node(tmp_path)
    _resolve(node, monkeypatch)
    assert _targets(node, "carrier") == [Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK)]
    # Found by SRV: the name checked is still the configured domain (RFC 5922 4).
    assert _targets(node, "srv") == [
        Destination(Transport.TLS, "192.0.2.11", 5061, "srv.carrier.example")
    ]
    # UDP has nothing to verify; an IP literal gateway is verified by its address.
    assert {d.tls_name for d in _targets(node, "plain")} == {None}
    # OPTIONS probes go to the same named destinations.
    probed = {d for _, _, d in node.directory.due_probes(0.0)}
    assert Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK) in probed


def _invite(user: str, n: int) -> bytes:
    sdp = (
        "v=0\r\no=a 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\n"
        "t=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"
    )
    return (
        f"INVITE sip:{user}@198.51.100.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKcall{n};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:alice@198.51.100.9>;tag=a{n}\r\n"
        f"To: <sip:{user}@198.51.100.1>\r\n"
        f"Call-ID: call-{n}@198.51.100.9\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:alice@198.51.100.9:5099>\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
    ).encode()


def _invite_hop(node: SbcNode, user: str, n: int) -> Hop:
    """Where the B2BUA sends the INVITE of a call from outside to ``user``."""
    calls = node.calls
    caller = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.9", 5099)
    message = parse_message(_invite(user, n))
    step = calls.handle(calls.transactions.receive(message, caller, 0.0, reliable=False), 0.0)
    (allocate,) = step.media
    session = MediaSession(
        f"s{n}",
        f"call-{n}@198.51.100.9",
        (
            MediaStream(
                0,
                LegState("outside", Endpoint.of("198.51.100.1", 20000 + 2 * n)),
                LegState("carrier", Endpoint.of("203.0.113.1", 30000 + 2 * n)),
            ),
        ),
        0.0,
    )
    step = calls.media_allocated(allocate.call_ref, session, 0.1)
    (outgoing,) = step.output.messages
    assert isinstance(outgoing.message, Request) and outgoing.message.method == "INVITE"
    assert isinstance(outgoing.destination, Hop)
    return outgoing.destination


def test_the_invite_to_the_trunk_leaves_on_a_hop_carrying_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _node(tmp_path)
    _resolve(node, monkeypatch)
    # First a call to the same address by a static route (no name): its hop is cached.
    by_ip = _invite_hop(node, "900", 1)
    assert by_ip.destination == Destination(Transport.TLS, "192.0.2.10", 5061)
    assert by_ip.destination.tls_name is None
    # The trunk's call must not be handed that cached hop: it verifies the name.
    hop = _invite_hop(node, "100", 2)
    assert hop.destination == Destination(Transport.TLS, "192.0.2.10", 5061, TRUNK)
    assert hop.destination.tls_name == TRUNK
    assert hop.local == ListenAddress(Transport.TLS, "203.0.113.1", 5061)


# -- the app's client context ---------------------------------------------------------------


def _listening(tmp_path: Path, tls_listener: bool, tls: str = "") -> Config:
    tls_line = "\n    - {transport: tls, address: 127.0.0.1, port: 0}" if tls_listener else ""
    text = (
        f"state_dir: {tmp_path / 'state'}\n"
        "sip:\n  listen:\n    - {transport: udp, address: 127.0.0.1, port: 0}"
        f"{tls_line}\n  tls:\n"
        + "".join(f"    {line}\n" for line in (tls or "mtls: none").splitlines())
    )
    return load_config_text(text, "sbc.yaml", tmp_path)


def _start_and_reload(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[dict[str, Any]], list[ssl.SSLContext], ssl.SSLContext | None]:
    """Start the node's transport, reload its certificates; client_context calls."""
    made: list[dict[str, Any]] = []
    contexts: list[ssl.SSLContext] = []

    def recording(cafile: Path | None = None, **kwargs: Any) -> ssl.SSLContext:
        made.append({"cafile": cafile, **kwargs})
        contexts.append(client_context(cafile, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(app, "client_context", recording)

    async def main() -> ssl.SSLContext | None:
        node = SbcNode(config)
        await node._start_transport(config)
        try:
            node._reload_certificates()
            assert node.transport is not None
            return node.transport._client_ssl
        finally:
            assert node.transport is not None
            await node.transport.stop()

    return made, contexts, asyncio.run(main())


def test_the_app_presents_its_served_certificate_and_renews_it_on_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    tls = f"certificate: {pki.sbc.cert}\nprivate_key: {pki.sbc.key}\nserver_ca: {pki.ca.path}"
    made, contexts, live = _start_and_reload(_listening(tmp_path, True, tls), monkeypatch)
    expected = {"cafile": pki.ca.path, "verify": True, "certificate": _paths(pki.sbc)}
    assert made == [expected, expected]
    assert live is contexts[1]  # the reload's context is the one new connections use


def test_without_a_tls_listener_no_certificate_is_generated_for_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    made, _, _ = _start_and_reload(_listening(tmp_path, False, "verify_server: false"), monkeypatch)
    assert made[0] == {"cafile": None, "verify": False, "certificate": None}
    assert not (tmp_path / "state" / "tls").exists()
    assert "x sip.tls.verify_server is off" in caplog.text


def test_the_generated_self_signed_certificate_is_never_presented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    """A trunk asking for a client certificate optionally would refuse one it cannot
    verify; the self-signed one serves the TLS listener only."""
    made, _, _ = _start_and_reload(_listening(tmp_path, True), monkeypatch)
    assert (tmp_path / "state" / "tls").exists()  # generated for the listener
    assert made[0]["certificate"] is None
    tls = f"certificate: {pki.sbc.cert}\nprivate_key: {pki.sbc.key}\npresent_certificate: false"
    made, _, _ = _start_and_reload(_listening(tmp_path, True, tls), monkeypatch)
    assert made[0]["certificate"] is None
