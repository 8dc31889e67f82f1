"""TLS hardening: handshake admission (fake clock), fingerprints, and real TLS
listeners on loopback: versions, mutual TLS, SNI, reload, per-source limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from sbc.config.loader import ConfigError, load_config_text
from sbc.config.schema import MutualTls
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.transport.admission import Admission, HandshakeLimiter
from sbc.transport.base import (
    Flow,
    HandshakeLimit,
    ListenAddress,
    PeerCertificate,
    Stat,
    Transport,
    TransportConfig,
)
from sbc.transport.certificates import (
    CertificatePaths,
    ClientAuth,
    ServerTls,
    ServerTlsSettings,
    SniCertificate,
    fingerprint,
    normalize_fingerprint,
    server_context,
)
from sbc.transport.layer import TransportLayer
from tests.scenario.sbcproc import options
from tests.tls_pki import Authority, Issued, self_signed

V4 = "127.0.0.1"
IO_TIMEOUT = 3.0
TEST_TIMEOUT = 20.0
UNLIMITED = HandshakeLimit(concurrent=0, rate=0.0, burst=0)


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    return wrapper


# -- HandshakeLimiter, with a fake clock -------------------------------------------------


def test_limiter_caps_concurrent_handshakes_per_source() -> None:
    limiter = HandshakeLimiter(HandshakeLimit(concurrent=2, rate=0, burst=0))
    assert limiter.admit("198.51.100.1", 0.0) is Admission.ADMITTED
    assert limiter.admit("198.51.100.1", 0.0) is Admission.ADMITTED
    assert limiter.admit("198.51.100.1", 0.0) is Admission.TOO_MANY_CONCURRENT
    # Another source is not affected.
    assert limiter.admit("198.51.100.2", 0.0) is Admission.ADMITTED
    limiter.finish("198.51.100.1", 1.0)
    assert limiter.in_flight("198.51.100.1") == 1
    assert limiter.admit("198.51.100.1", 1.0) is Admission.ADMITTED


def test_limiter_token_bucket_refills_at_the_rate() -> None:
    limiter = HandshakeLimiter(HandshakeLimit(concurrent=0, rate=2.0, burst=3))
    source = "203.0.113.7"
    for _ in range(3):
        assert limiter.admit(source, 10.0) is Admission.ADMITTED
        limiter.finish(source, 10.0)
    assert limiter.admit(source, 10.0) is Admission.TOO_FAST
    assert limiter.admit(source, 10.25) is Admission.TOO_FAST  # half a token
    assert limiter.admit(source, 10.5) is Admission.ADMITTED  # one token back
    assert limiter.admit(source, 10.5) is Admission.TOO_FAST
    # Refills to the burst, never beyond.
    results = [limiter.admit(source, 100.0) for _ in range(4)]
    assert results == [Admission.ADMITTED] * 3 + [Admission.TOO_FAST]


def test_limiter_forgets_idle_sources_and_caps_the_table() -> None:
    limiter = HandshakeLimiter(HandshakeLimit(concurrent=1, rate=1.0, burst=1), max_sources=2)
    assert limiter.admit("a", 0.0) is Admission.ADMITTED
    assert limiter.admit("b", 0.0) is Admission.ADMITTED
    assert limiter.admit("c", 0.0) is Admission.TOO_MANY_SOURCES
    limiter.finish("a", 0.5)  # bucket not full yet: still tracked
    assert len(limiter) == 2
    assert limiter.admit("c", 2.0) is Admission.ADMITTED  # "a" refilled and forgotten
    assert limiter.in_flight("a") == 0 and limiter.in_flight("c") == 1
    limiter.finish("unknown", 3.0)  # harmless


def test_handshake_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        HandshakeLimit(concurrent=-1)
    with pytest.raises(ValueError, match="burst of at least 1"):
        HandshakeLimit(rate=1.0, burst=0)


# -- fingerprints and settings -------------------------------------------------------------


def test_fingerprint_is_openssls_sha256_spelling() -> None:
    der = b"not really a certificate"
    digest = hashlib.sha256(der).hexdigest().upper()
    expected = ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert fingerprint(der) == expected
    assert normalize_fingerprint(digest.lower()) == expected
    assert normalize_fingerprint(f"  sha256:{expected.lower()} ") == expected
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint: 'AB:CD'"):
        normalize_fingerprint("AB:CD")


def test_mutual_tls_needs_a_client_ca(tmp_path: Path) -> None:
    identity = CertificatePaths(tmp_path / "c", tmp_path / "k")
    with pytest.raises(ValueError, match="needs a client CA bundle"):
        ServerTlsSettings(identity, ClientAuth.REQUIRE)


# -- real TLS listeners -----------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Request | Response, Flow]] = asyncio.Queue()

    def __call__(self, message: Request | Response, flow: Flow) -> None:
        self.queue.put_nowait((message, flow))

    async def request(self) -> tuple[Request, Flow]:
        message, flow = await asyncio.wait_for(self.queue.get(), IO_TIMEOUT)
        assert isinstance(message, Request)
        return message, flow


@contextlib.asynccontextmanager
async def tls_layer(
    tls: ServerTls | ssl.SSLContext, limit: HandshakeLimit | None = UNLIMITED
) -> AsyncIterator[tuple[TransportLayer, Recorder, int]]:
    recorder = Recorder()
    config = TransportConfig(listen=(ListenAddress(Transport.TLS, V4, 0),), handshake_limit=limit)
    layer = TransportLayer(config, recorder, server_ssl=tls)
    await layer.start()
    try:
        yield layer, recorder, layer.listeners[0].port
    finally:
        await layer.stop()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    trusted = Authority(tmp_path / "trusted", "trusted-ca")
    rogue = Authority(tmp_path / "rogue", "rogue-ca")
    return {
        "ca": trusted,
        "server": trusted.issue("sbc.test", "sbc.test", V4),
        "alt": trusted.issue("voice.example", "voice.example"),
        "known": trusted.issue("carrier-a", client=True),
        "listed_not": trusted.issue("carrier-b", client=True),
        "rogue": rogue.issue("intruder", client=True),
        "pinned": self_signed(tmp_path / "pinned", "carrier-c"),
    }


def paths(issued: Issued) -> CertificatePaths:
    return CertificatePaths(issued.cert, issued.key)


def client(
    ca: Path | None = None,
    cert: Issued | None = None,
    *,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    if version is not None:
        # Let the client offer what the server must refuse.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = version
        context.maximum_version = version
    return context


async def served_fingerprint(port: int, server_name: str | None = None) -> str:
    _, writer = await asyncio.open_connection(
        V4, port, ssl=client(), server_hostname=server_name or ""
    )
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return fingerprint(der)


async def options_exchange(
    port: int, context: ssl.SSLContext, recorder: Recorder, layer: TransportLayer
) -> Flow:
    """Send OPTIONS over a new connection; answer it from the layer; return its Flow."""
    reader, writer = await asyncio.open_connection(
        V4, port, ssl=context, server_hostname="sbc.test"
    )
    try:
        flow = await exchange_on(reader, writer, recorder, layer)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return flow


async def exchange_on(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    recorder: Recorder,
    layer: TransportLayer,
) -> Flow:
    writer.write(options(transport="TLS"))
    await writer.drain()
    request, flow = await recorder.request()
    assert await layer.send_response(make_response(request, 200, to_tag="t"), flow)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    assert head.startswith(b"SIP/2.0 200 OK\r\n")
    return flow


async def refused(port: int, context: ssl.SSLContext, recorder: Recorder) -> bool:
    """True if the server ends the connection without taking a request."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(V4, port, ssl=context, server_hostname="sbc.test"),
            IO_TIMEOUT,
        )
    except (OSError, ssl.SSLError):
        return True
    try:
        # TLS 1.3: the client finishes first and learns of the refusal on reading.
        writer.write(options(transport="TLS"))
        data = await asyncio.wait_for(reader.read(1), IO_TIMEOUT)
    except (OSError, ssl.SSLError):
        data = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return data == b"" and recorder.queue.empty()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        (ssl.TLSVersion.TLSv1, False),
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_3, True),
    ],
)
@async_test
async def test_only_tls_1_2_and_1_3_are_accepted(
    pki: dict[str, Any], version: ssl.TLSVersion, accepted: bool
) -> None:
    tls = ServerTls(ServerTlsSettings(paths(pki["server"])))
    async with tls_layer(tls) as (layer, recorder, port):
        if accepted:
            flow = await options_exchange(port, client(version=version), recorder, layer)
            assert flow.transport is Transport.TLS and flow.peer is None
        else:
            assert await refused(port, client(version=version), recorder)
            assert layer.stats[Stat.TLS_HANDSHAKE_FAILURES] == 1
            assert layer.stats[Stat.CONNECTIONS_ACCEPTED] == 0


def test_server_context_offers_only_forward_secret_aead_suites(pki: dict[str, Any]) -> None:
    context = server_context(paths(pki["server"]))
    names = {cipher["name"] for cipher in context.get_ciphers()}
    tls12 = {n for n in names if not n.startswith("TLS_")}
    assert tls12 and all(n.startswith("ECDHE-") for n in tls12)
    assert all("GCM" in n or "CHACHA20" in n for n in tls12)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION


@async_test
async def test_mutual_tls_accepts_a_known_client_and_names_it_on_the_flow(
    pki: dict[str, Any],
) -> None:
    known: Issued = pki["known"]
    settings = ServerTlsSettings(
        paths(pki["server"]),
        ClientAuth.REQUIRE,
        pki["ca"].path,
        trusted_clients={known.fingerprint.replace(":", "").lower(): "carrier-a"},
    )
    async with tls_layer(ServerTls(settings)) as (layer, recorder, port):
        flow = await options_exchange(port, client(pki["ca"].path, known), recorder, layer)
        assert flow.peer == PeerCertificate(known.fingerprint, known.subject, "carrier-a")
        assert str(flow.peer) == "carrier-a"
        assert layer.stats[Stat.TLS_PEERS_REJECTED] == 0


@async_test
async def test_mutual_tls_rejects_unknown_missing_and_unlisted_certificates(
    pki: dict[str, Any],
) -> None:
    settings = ServerTlsSettings(
        paths(pki["server"]),
        ClientAuth.REQUIRE,
        pki["ca"].path,
        trusted_clients={pki["known"].fingerprint: "carrier-a"},
    )
    ca = pki["ca"].path
    async with tls_layer(ServerTls(settings)) as (layer, recorder, port):
        # Signed by a CA the SBC does not trust: OpenSSL fails the handshake.
        assert await refused(port, client(ca, pki["rogue"]), recorder)
        # No certificate at all.
        assert await refused(port, client(ca), recorder)
        assert layer.stats[Stat.TLS_HANDSHAKE_FAILURES] == 2
        # Chains to the trusted CA but its fingerprint is not listed.
        assert await refused(port, client(ca, pki["listed_not"]), recorder)
        assert layer.stats[Stat.TLS_PEERS_REJECTED] == 1
        assert layer.connection_count == 0


@async_test
async def test_optional_mutual_tls_admits_anonymous_clients_and_pinned_self_signed(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    pinned: Issued = pki["pinned"]
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(pki["ca"].path.read_bytes() + pinned.cert.read_bytes())
    settings = ServerTlsSettings(paths(pki["server"]), ClientAuth.OPTIONAL, bundle)
    async with tls_layer(ServerTls(settings)) as (layer, recorder, port):
        anonymous = await options_exchange(port, client(pki["ca"].path), recorder, layer)
        assert anonymous.peer is None
        flow = await options_exchange(port, client(pki["ca"].path, pinned), recorder, layer)
        assert flow.peer == PeerCertificate(pinned.fingerprint, "CN=carrier-c", None)
        assert await refused(port, client(pki["ca"].path, pki["rogue"]), recorder)


@async_test
async def test_sni_selects_the_certificate_for_a_configured_name(pki: dict[str, Any]) -> None:
    settings = ServerTlsSettings(
        paths(pki["server"]),
        sni=(SniCertificate("Voice.Example", paths(pki["alt"])),),
    )
    async with tls_layer(ServerTls(settings)) as (_, _, port):
        assert await served_fingerprint(port, "voice.example") == pki["alt"].fingerprint
        assert await served_fingerprint(port, "other.example") == pki["server"].fingerprint
        assert await served_fingerprint(port) == pki["server"].fingerprint
        # A verifying client that asked for the name accepts what it got.
        _, writer = await asyncio.open_connection(
            V4, port, ssl=client(pki["ca"].path), server_hostname="voice.example"
        )
        writer.close()


@async_test
async def test_sni_wildcard_matches_one_label(pki: dict[str, Any]) -> None:
    settings = ServerTlsSettings(
        paths(pki["server"]), sni=(SniCertificate("*.example", paths(pki["alt"])),)
    )
    async with tls_layer(ServerTls(settings)) as (_, _, port):
        assert await served_fingerprint(port, "voice.example") == pki["alt"].fingerprint
        assert await served_fingerprint(port, "a.voice.example") == pki["server"].fingerprint


@async_test
async def test_reload_serves_new_certificate_while_old_connection_keeps_working(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    live = CertificatePaths(tmp_path / "live.crt", tmp_path / "live.key")
    live.certificate.write_bytes(pki["server"].cert.read_bytes())
    live.private_key.write_bytes(pki["server"].key.read_bytes())
    tls = ServerTls(ServerTlsSettings(live))
    async with tls_layer(tls) as (layer, recorder, port):
        before = await served_fingerprint(port)
        assert before == pki["server"].fingerprint
        reader, writer = await asyncio.open_connection(V4, port, ssl=client())
        await exchange_on(reader, writer, recorder, layer)
        # The renewed pair is installed, then the reload (SIGHUP) happens.
        live.certificate.write_bytes(pki["alt"].cert.read_bytes())
        live.private_key.write_bytes(pki["alt"].key.read_bytes())
        tls.reload()
        assert await served_fingerprint(port) == pki["alt"].fingerprint
        # The connection made before the reload still carries requests.
        flow = await exchange_on(reader, writer, recorder, layer)
        assert flow.connection_id is not None
        assert fingerprint(writer.get_extra_info("ssl_object").getpeercert(True)) == before
        writer.close()
        # A broken file is refused and the current certificate stays.
        live.private_key.write_text("garbage")
        with pytest.raises(ssl.SSLError):
            tls.reload()
        assert await served_fingerprint(port) == pki["alt"].fingerprint


@async_test
async def test_a_fixed_context_is_served_as_given(pki: dict[str, Any]) -> None:
    context = server_context(paths(pki["server"]))
    async with tls_layer(context) as (_, _, port):
        assert await served_fingerprint(port) == pki["server"].fingerprint


@async_test
async def test_concurrent_handshakes_per_source_are_limited(pki: dict[str, Any]) -> None:
    tls = ServerTls(ServerTlsSettings(paths(pki["server"])))
    limit = HandshakeLimit(concurrent=3, rate=0, burst=0)
    async with tls_layer(tls, limit) as (layer, recorder, port):
        loop = asyncio.get_running_loop()
        # Three connections that never send a ClientHello hold three handshakes open.
        stalled = [socket.create_connection((V4, port)) for _ in range(3)]
        try:
            for s in stalled:
                s.setblocking(False)
            await _until(
                lambda: layer.handshakes is not None and layer.handshakes.in_flight(V4) == 3
            )
            # The fourth is closed before any handshake: the client reads EOF at once.
            extra = socket.create_connection((V4, port))
            extra.setblocking(False)
            try:
                assert await asyncio.wait_for(loop.sock_recv(extra, 1), IO_TIMEOUT) == b""
            finally:
                extra.close()
            assert layer.stats[Stat.TLS_HANDSHAKES_REFUSED] == 1
        finally:
            for s in stalled:
                s.close()
        # Their handshakes end (failed), and the source may handshake again.
        await _until(lambda: in_flight(layer) == 0)
        assert layer.stats[Stat.TLS_HANDSHAKE_FAILURES] == 3
        await options_exchange(port, client(), recorder, layer)


@async_test
async def test_rapid_handshakes_beyond_the_burst_are_refused(pki: dict[str, Any]) -> None:
    tls = ServerTls(ServerTlsSettings(paths(pki["server"])))
    limit = HandshakeLimit(concurrent=0, rate=0.01, burst=3)
    async with tls_layer(tls, limit) as (layer, recorder, port):
        for _ in range(3):
            await options_exchange(port, client(), recorder, layer)
        assert await refused(port, client(), recorder)
        assert await refused(port, client(), recorder)
        assert layer.stats[Stat.TLS_HANDSHAKES_REFUSED] == 2
        assert layer.stats[Stat.CONNECTIONS_ACCEPTED] == 3


@async_test
async def test_outbound_flow_carries_the_servers_certificate(pki: dict[str, Any]) -> None:
    tls = ServerTls(ServerTlsSettings(paths(pki["server"])))
    async with tls_layer(tls) as (_, server_inbox, port):
        config = TransportConfig()
        outbound = TransportLayer(
            config, Recorder(), client_ssl=ssl.create_default_context(cafile=pki["ca"].path)
        )
        await outbound.start()
        try:
            message = parse_message(options(transport="TLS"))
            assert isinstance(message, Request)
            flow = await outbound.send_request(
                message, (Transport.TLS, V4, port), server_hostname="sbc.test"
            )
            assert flow.peer is not None
            assert flow.peer.fingerprint == pki["server"].fingerprint
            assert "CN=sbc.test" in flow.peer.subject
            await server_inbox.request()
        finally:
            await outbound.stop()


def in_flight(layer: TransportLayer) -> int:
    assert layer.handshakes is not None
    return layer.handshakes.in_flight(V4)


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(int(IO_TIMEOUT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


# -- configuration ------------------------------------------------------------------------


def _tls_yaml(body: str) -> str:
    return "sip:\n  tls:\n" + "".join(f"    {line}\n" for line in body.splitlines())


def test_config_tls_knobs_load(tmp_path: Path) -> None:
    digest = "ab" * 32
    from tests.tls_pki import Authority

    ca = Authority(tmp_path / "pki", "lab")
    issued = ca.issue("a.example")
    (tmp_path / "ca.pem").write_bytes(ca.path.read_bytes())
    (tmp_path / "a.crt").write_bytes(issued.cert.read_bytes())
    (tmp_path / "a.key").write_bytes(issued.key.read_bytes())
    config = load_config_text(
        _tls_yaml(
            f"mtls: require\nclient_ca: ca.pem\n"
            f'trusted_clients: [{{name: carrier-a, fingerprint: "{digest}"}}]\n'
            "sni: [{server_name: '*.example', certificate: a.crt, private_key: a.key}]\n"
            "handshakes_per_source: 4\nhandshake_rate: 2.5\nhandshake_burst: 5"
        ),
        "t.yaml",
        tmp_path,
    )
    tls = config.sip.tls
    assert tls.mtls is MutualTls.REQUIRE and tls.client_ca == tmp_path / "ca.pem"
    assert tls.trusted_clients[0].name == "carrier-a"
    assert tls.sni[0].certificate == tmp_path / "a.crt"
    assert (tls.handshakes_per_source, tls.handshake_rate, tls.handshake_burst) == (4, 2.5, 5)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("mtls: optional", "sip.tls.client_ca: mtls optional needs client_ca"),
        (
            'trusted_clients: [{name: a, fingerprint: "' + "00" * 32 + '"}]',
            "sip.tls.trusted_clients: trusted_clients need mtls optional or require",
        ),
        ("mtls: off", "sip.tls.mtls: expected one of none, optional, require"),
        ('trusted_clients: [{name: a, fingerprint: "AB:CD"}]', "64 hex digits, colons allowed"),
    ],
)
def test_config_tls_knobs_are_checked(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(_tls_yaml(body), "t.yaml", tmp_path)
    assert problem in str(caught.value)
