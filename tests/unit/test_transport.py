"""The transport layer over real sockets on loopback: UDP, TCP and TLS, IPv4 and IPv6.

Every socket is bound to 127.0.0.1 or ::1 on an ephemeral port, every wait has a
timeout, and a guard makes any attempt to send elsewhere fail the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ipaddress
import re
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import sbc.transport.layer as layer_module
from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.transport.base import (
    Destination,
    Flow,
    ListenAddress,
    Stat,
    Transport,
    TransportConfig,
    TransportError,
    error_response,
    ip_literal,
    is_forbidden_destination,
    response_target,
    stamp_via,
)
from sbc.transport.layer import TransportLayer
from sbc.transport.udp import UdpListener
from tests.torture import VECTORS

IO_TIMEOUT = 3.0
TEST_TIMEOUT = 20.0
V4 = "127.0.0.1"
V6 = "::1"


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run a coroutine test in a fresh event loop, bounded by TEST_TIMEOUT."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    return wrapper


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test whose code under test tries to reach beyond loopback."""
    send = UdpListener.send
    connect = layer_module.connect

    def guarded_send(self: UdpListener, data: bytes, host: str, port: int) -> None:
        address = ip_literal(host)
        assert address is not None and address.is_loopback, f"UDP send to {host}"
        send(self, data, host, port)

    async def guarded_connect(
        factory: Any, transport: Transport, host: str, port: int, **kwargs: Any
    ) -> Any:
        address = ip_literal(host)
        assert address is not None and address.is_loopback, f"connect to {host}"
        return await connect(factory, transport, host, port, **kwargs)

    monkeypatch.setattr(UdpListener, "send", guarded_send)
    monkeypatch.setattr(layer_module, "connect", guarded_connect)


# -- helpers ----------------------------------------------------------------------------


class Recorder:
    """The MessageHandler of the tests: queues what the layer delivers."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Request | Response, Flow]] = asyncio.Queue()

    def __call__(self, message: Request | Response, flow: Flow) -> None:
        self.queue.put_nowait((message, flow))

    async def next(self) -> tuple[Request | Response, Flow]:
        return await asyncio.wait_for(self.queue.get(), IO_TIMEOUT)

    async def request(self) -> tuple[Request, Flow]:
        message, flow = await self.next()
        assert isinstance(message, Request)
        return message, flow


@contextlib.asynccontextmanager
async def running(
    *listen: ListenAddress,
    server_ssl: ssl.SSLContext | None = None,
    client_ssl: ssl.SSLContext | None = None,
    **config: Any,
) -> AsyncIterator[tuple[TransportLayer, Recorder]]:
    recorder = Recorder()
    layer = TransportLayer(
        TransportConfig(listen=listen, **config),
        recorder,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
    )
    await layer.start()
    try:
        yield layer, recorder
    finally:
        await layer.stop()


def port_of(layer: TransportLayer, transport: Transport, host: str = V4) -> int:
    for listener in layer.listeners:
        if listener.transport is transport and listener.host == host:
            return listener.port
    raise AssertionError(f"no {transport} listener on {host}")


class UdpPeer(asyncio.DatagramProtocol):
    """A plain UDP socket on loopback standing in for a phone."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, host: str) -> UdpPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(cls, local_addr=(host, 0))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))

    @property
    def port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.get_extra_info("sockname")[1]
        return port

    def send(self, data: bytes, host: str, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (host, port))

    async def recv(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), IO_TIMEOUT)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


def sip_request(
    via: str,
    *,
    method: str = "OPTIONS",
    call_id: str = "c1@test",
    cseq: int = 1,
    extra: str = "",
    body: bytes = b"",
    content_length: str | None = None,
) -> bytes:
    length = str(len(body)) if content_length is None else content_length
    head = (
        f"{method} sip:sbc@example.com SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:sbc@example.com>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"{extra}"
        f"Content-Length: {length}\r\n"
        "\r\n"
    )
    return head.encode() + body


async def read_message(reader: asyncio.StreamReader) -> Request | Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    body = await asyncio.wait_for(reader.readexactly(length), IO_TIMEOUT) if length else b""
    return parse_message(head + body)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What arrives before the peer closes (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    except ConnectionResetError:
        return b""


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 3 s")


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT)


# -- listeners --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, ::1 and localhost."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address(V4)),
            x509.IPAddress(ipaddress.ip_address(V6)),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def server_ssl(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture
def client_ssl(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[0]))


@async_test
async def test_listeners_on_ipv4_and_ipv6_report_real_ports(server_ssl: ssl.SSLContext) -> None:
    listen = [ListenAddress(t, h, 0) for h in (V4, V6) for t in Transport]
    async with running(*listen, server_ssl=server_ssl) as (layer, _):
        assert layer.bound
        assert [(x.transport, x.host) for x in layer.listeners] == [
            (a.transport, a.host) for a in listen
        ]
        assert all(0 < x.port < 65536 for x in layer.listeners)
        listeners = layer.listeners
    assert not layer.bound
    assert not any(x.is_serving for x in listeners)


@async_test
async def test_start_fails_cleanly_when_a_port_is_taken() -> None:
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (first, _):
        taken = port_of(first, Transport.TCP)
        second = TransportLayer(
            TransportConfig(
                listen=(
                    ListenAddress(Transport.UDP, V4, 0),
                    ListenAddress(Transport.TCP, V4, taken),
                )
            ),
            Recorder(),
        )
        with pytest.raises(OSError):
            await second.start()
        assert not second.bound
        assert second.listeners == ()


def test_tls_listener_needs_a_server_context() -> None:
    layer = TransportLayer(
        TransportConfig(listen=(ListenAddress(Transport.TLS, V4, 0),)), Recorder()
    )
    with pytest.raises(ValueError, match="server_ssl"):
        asyncio.run(layer.start())


# -- UDP --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "sent_by"), [(V4, "203.0.113.5:5099"), (V6, "[2001:db8::5]:5099")], ids=["v4", "v6"]
)
@async_test
async def test_udp_request_gets_received_and_rport_and_response_uses_them(
    host: str, sent_by: str
) -> None:
    async with running(ListenAddress(Transport.UDP, host, 0)) as (layer, recorder):
        port = port_of(layer, Transport.UDP, host)
        phone = await UdpPeer.open(host)
        via = f"SIP/2.0/UDP {sent_by};branch=z9hG4bKudp1;rport"
        phone.send(sip_request(via), host, port)

        request, flow = await recorder.request()
        assert flow == Flow(Transport.UDP, host, port, host, phone.port)
        assert request.method == "OPTIONS"
        assert request.via.received == host
        assert request.via.rport == str(phone.port)
        stamped = (
            f"Via: SIP/2.0/UDP {sent_by};branch=z9hG4bKudp1;rport={phone.port};received={host}"
        )
        assert stamped.encode() + b"\r\n" in bytes(request)

        # RFC 3581 4: the answer goes to received:rport, not to sent-by 203.0.113.5:5099.
        assert await layer.send_response(make_response(request, 200, to_tag="t1"), flow)
        data, source = await phone.recv()
        assert source[1] == port  # from the socket the request was sent to
        response = parse_message(data)
        assert isinstance(response, Response)
        assert response.status == 200
        assert response.call_id == "c1@test"
        assert str(response.via) == stamped.removeprefix("Via: ")
        assert layer.stats[Stat.MESSAGES_IN] == 1
        assert layer.stats[Stat.MESSAGES_OUT] == 1
        phone.close()


@async_test
async def test_udp_response_without_rport_goes_to_the_sent_by_port() -> None:
    async with running(ListenAddress(Transport.UDP, V4, 0)) as (layer, recorder):
        port = port_of(layer, Transport.UDP)
        sender = await UdpPeer.open(V4)
        listener = await UdpPeer.open(V4)
        via = f"SIP/2.0/UDP {V4}:{listener.port};branch=z9hG4bKudp2"
        sender.send(sip_request(via), V4, port)

        request, flow = await recorder.request()
        # RFC 3261 18.2.1: sent-by is the source address, so nothing is added.
        assert request.headers.fields("Via") == [via]
        assert flow.remote_port == sender.port

        assert await layer.send_response(make_response(request, 200, to_tag="t2"), flow)
        data, _ = await listener.recv()
        response = parse_message(data)
        assert isinstance(response, Response) and response.status == 200
        assert sender.queue.empty()
        sender.close()
        listener.close()


@async_test
async def test_udp_malformed_request_gets_a_stateless_400() -> None:
    async with running(ListenAddress(Transport.UDP, V4, 0)) as (layer, recorder):
        port = port_of(layer, Transport.UDP)
        phone = await UdpPeer.open(V4)
        via = "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKbad1;rport"
        phone.send(
            sip_request(via, call_id="bad-mf@test", extra="Max-Forwards: many\r\n"), V4, port
        )

        data, _ = await phone.recv()
        response = parse_message(data)
        assert isinstance(response, Response)
        assert response.status == 400
        assert response.call_id == "bad-mf@test"
        assert response.headers.fields("Via") == [f"{via}={phone.port};received={V4}"]
        assert str(response.cseq) == "1 OPTIONS"
        assert response.to.tag
        assert recorder.queue.empty()
        assert layer.stats[Stat.BAD_REQUESTS] == 1
        assert layer.stats[Stat.ERROR_RESPONSES] == 1
        phone.close()


@async_test
async def test_parse_errors_are_told_to_the_observer_with_their_flow() -> None:
    seen: list[tuple[str, Flow]] = []
    layer = TransportLayer(
        TransportConfig(listen=(ListenAddress(Transport.UDP, V4, 0),)),
        Recorder(),
        on_error=lambda error, flow: seen.append((str(error), flow)),
    )
    await layer.start()
    try:
        port = port_of(layer, Transport.UDP)
        phone = await UdpPeer.open(V4)
        via = "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKbad2;rport"
        phone.send(
            sip_request(via, call_id="bad-mf2@test", extra="Max-Forwards: many\r\n"), V4, port
        )
        data, _ = await phone.recv()
        assert parse_message(data).status == 400  # type: ignore[union-attr]
        assert len(seen) == 1
        reason, flow = seen[0]
        assert "Max-Forwards" in reason
        assert (flow.transport, flow.remote_host, flow.remote_port) == (
            Transport.UDP,
            V4,
            phone.port,
        )
        phone.close()
    finally:
        await layer.stop()


@async_test
async def test_udp_unanswerable_messages_are_dropped_and_counted() -> None:
    async with running(ListenAddress(Transport.UDP, V4, 0)) as (layer, recorder):
        port = port_of(layer, Transport.UDP)
        phone = await UdpPeer.open(V4)
        via = "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx1;rport"
        # A response missing From/To/Call-ID/CSeq: dropped, never answered.
        phone.send(f"SIP/2.0 200 OK\r\nVia: {via}\r\n\r\n".encode(), V4, port)
        # Garbage: nothing to answer with.
        phone.send(b"\x00\xffnot sip at all\r\n\r\n", V4, port)
        # An ACK is never answered (RFC 3261 17.2.1), even when malformed.
        phone.send(sip_request(via, method="ACK", extra="Max-Forwards: x\r\n"), V4, port)
        # A good request last: once it is delivered, the others have been handled.
        phone.send(sip_request(via, call_id="good@test"), V4, port)

        request, _ = await recorder.request()
        assert request.call_id == "good@test"
        assert recorder.queue.empty()
        assert phone.queue.empty()
        stats = layer.stats
        assert stats[Stat.BAD_RESPONSES] == 1
        assert stats[Stat.BAD_REQUESTS] == 2
        assert stats[Stat.UNANSWERABLE] == 2
        assert stats[Stat.ERROR_RESPONSES] == 0
        assert stats[Stat.MESSAGES_IN] == 1
        phone.close()


def _bcast_response() -> Response:
    """RFC 4475 3.3.10 after a proxy popped its own Via: the next hop is 255.255.255.255."""
    message = parse_message((VECTORS / "rfc4475" / "bcast.dat").read_bytes())
    assert isinstance(message, Response)
    message.headers.pop_first_value("Via")
    message.invalidate()
    assert message.via.host == "255.255.255.255"
    return message


def _response_with_via(via: str) -> Response:
    request = parse_message(sip_request(via))
    assert isinstance(request, Request)
    return make_response(request, 200, to_tag="t")


@pytest.mark.parametrize(
    "make",
    [
        _bcast_response,
        lambda: _response_with_via("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKp0;rport=0"),
        lambda: _response_with_via("SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKm;maddr=239.1.1.1"),
        lambda: _response_with_via("SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKm6;received=ff02::1"),
        lambda: _response_with_via("SIP/2.0/UDP 0.0.0.0:5060;branch=z9hG4bKu"),
    ],
    ids=["bcast", "port0", "maddr-multicast", "received-multicast", "unspecified"],
)
@async_test
async def test_response_to_forbidden_destination_is_dropped(make: Callable[[], Response]) -> None:
    async with running(ListenAddress(Transport.UDP, V4, 0)) as (layer, _):
        flow = Flow(Transport.UDP, V4, port_of(layer, Transport.UDP), V4, 5060)
        assert not await layer.send_response(make(), flow)
        assert layer.stats[Stat.FORBIDDEN_DESTINATIONS] == 1
        assert layer.stats[Stat.MESSAGES_OUT] == 0
        with pytest.raises(TransportError, match="forbidden"):
            await layer.send_request(
                parse_message(sip_request("SIP/2.0/UDP 127.0.0.1")),  # type: ignore[arg-type]
                Destination(Transport.UDP, "255.255.255.255", 5060),
            )


@async_test
async def test_udp_send_request_and_handler_errors() -> None:
    calls = 0

    def failing(message: Request | Response, flow: Flow) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    layer = TransportLayer(TransportConfig(listen=(ListenAddress(Transport.UDP, V4, 0),)), failing)
    await layer.start()
    try:
        phone = await UdpPeer.open(V4)
        request = parse_message(sip_request("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKo1"))
        assert isinstance(request, Request)
        flow = await layer.send_request(request, (Transport.UDP, V4, phone.port))
        assert flow == Flow(Transport.UDP, V4, port_of(layer, Transport.UDP), V4, phone.port)
        data, _ = await phone.recv()
        assert data == bytes(request)

        phone.send(sip_request("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKo2"), V4, flow.local_port)
        phone.send(sip_request("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKo3"), V4, flow.local_port)
        await wait_until(lambda: calls == 2)
        assert layer.stats[Stat.HANDLER_ERRORS] == 2
        assert layer.bound
        phone.close()
    finally:
        await layer.stop()


# -- TCP --------------------------------------------------------------------------------


@async_test
async def test_tcp_framing_two_in_one_write_and_one_split_across_writes() -> None:
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
        _, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        via = "SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKt"
        writer.write(sip_request(via + "1", cseq=1) + sip_request(via + "2", cseq=2))
        first, flow1 = await recorder.request()
        second, flow2 = await recorder.request()
        assert (first.cseq.seq, second.cseq.seq) == (1, 2)
        assert flow1 == flow2
        assert flow1.transport is Transport.TCP and flow1.connection_id is not None

        data = sip_request(
            via + "3",
            method="MESSAGE",
            cseq=3,
            extra="Content-Type: text/plain\r\n",
            body=b"hello over a stream",
        )
        for part in (data[:30], data[30:-10], data[-10:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)  # let each part arrive on its own
        third, flow3 = await recorder.request()
        assert third.method == "MESSAGE"
        assert third.body == b"hello over a stream"
        assert flow3 == flow1
        assert recorder.queue.empty()
        await close_writer(writer)


@async_test
async def test_tcp_response_goes_back_over_the_same_connection() -> None:
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        # sent-by names a port nobody listens on: only the connection can carry the answer.
        writer.write(sip_request("SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKsame"))
        request, flow = await recorder.request()
        assert await layer.send_response(make_response(request, 200, to_tag="t"), flow)
        response = await read_message(reader)
        assert isinstance(response, Response) and response.status == 200
        assert layer.stats[Stat.CONNECTIONS_ACCEPTED] == 1
        assert layer.stats[Stat.CONNECTIONS_OPENED] == 0
        await close_writer(writer)


@async_test
async def test_tcp_response_opens_a_connection_to_sent_by_when_the_old_one_closed() -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def phone_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.put_nowait(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    phone = await asyncio.start_server(phone_server, V4, 0)
    phone_port = phone.sockets[0].getsockname()[1]
    try:
        async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
            _, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
            writer.write(sip_request(f"SIP/2.0/TCP 127.0.0.1:{phone_port};branch=z9hG4bKre"))
            request, flow = await recorder.request()
            await close_writer(writer)
            await wait_until(lambda: layer.connection_count == 0)

            assert await layer.send_response(make_response(request, 200, to_tag="t"), flow)
            head = await asyncio.wait_for(received.get(), IO_TIMEOUT)
            assert head.startswith(b"SIP/2.0 200 OK\r\n")
            assert layer.stats[Stat.CONNECTIONS_OPENED] == 1
    finally:
        phone.close()


@async_test
async def test_tcp_keepalive_ping_gets_a_pong() -> None:
    async with running(ListenAddress(Transport.TCP, V6, 0)) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V6, port_of(layer, Transport.TCP, V6))
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT) == b"\r\n"
        writer.write(sip_request("SIP/2.0/TCP [::1]:5060;branch=z9hG4bKka"))
        _, flow = await recorder.request()
        assert flow.remote_host == V6
        assert layer.stats[Stat.KEEPALIVES] == 1
        await close_writer(writer)


@async_test
async def test_tcp_bad_content_length_gets_400_then_close() -> None:
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        via = "SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKcl"
        writer.write(
            sip_request(via + "1", call_id="good@test")
            + b"\r\n\r\n"
            + sip_request(via + "2", call_id="bad-cl@test", content_length="ten")
        )
        request, _ = await recorder.request()
        assert request.call_id == "good@test"
        assert await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT) == b"\r\n"
        response = await read_message(reader)
        assert isinstance(response, Response)
        assert response.status == 400
        assert response.call_id == "bad-cl@test"
        assert response.via.branch == "z9hG4bKcl2"
        assert await read_until_closed(reader) == b""
        assert recorder.queue.empty()
        assert layer.stats[Stat.FRAMING_ERRORS] == 1
        assert layer.stats[Stat.ERROR_RESPONSES] == 1
        await wait_until(lambda: layer.connection_count == 0)
        await close_writer(writer)


@async_test
async def test_tcp_garbage_closes_the_connection() -> None:
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        writer.write(b"\x16\x03\x01\x02\x00 this is not SIP\r\n\r\n")
        assert await read_until_closed(reader) == b""
        assert recorder.queue.empty()
        assert layer.stats[Stat.FRAMING_ERRORS] == 1
        assert layer.stats[Stat.UNANSWERABLE] == 1
        await close_writer(writer)


@async_test
async def test_tcp_idle_connection_is_closed() -> None:
    loop = asyncio.get_running_loop()
    async with running(ListenAddress(Transport.TCP, V4, 0), idle_timeout=0.2) as (layer, _):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        opened = loop.time()
        assert await read_until_closed(reader) == b""
        assert loop.time() - opened >= 0.2
        assert layer.stats[Stat.IDLE_CLOSED] == 1
        await close_writer(writer)


@async_test
async def test_close_idle_uses_the_clock_it_is_given() -> None:
    loop = asyncio.get_running_loop()
    async with running(ListenAddress(Transport.TCP, V4, 0), idle_timeout=30) as (layer, _):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        writer.write(b"\r\n\r\n")
        await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT)
        assert layer.close_idle(loop.time() + 29) == 0
        assert layer.close_idle(loop.time() + 31) == 1
        assert await read_until_closed(reader) == b""
        await close_writer(writer)


@async_test
async def test_tcp_connections_beyond_the_maximum_are_refused() -> None:
    async with running(ListenAddress(Transport.TCP, V4, 0), max_connections=1) as (
        layer,
        recorder,
    ):
        port = port_of(layer, Transport.TCP)
        _, first = await asyncio.open_connection(V4, port)
        first.write(sip_request("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKmax1"))
        await recorder.request()

        reader, second = await asyncio.open_connection(V4, port)
        assert await read_until_closed(reader) == b""
        assert layer.stats[Stat.CONNECTIONS_REFUSED] == 1
        await close_writer(second)

        await close_writer(first)
        await wait_until(lambda: layer.connection_count == 0)
        _, third = await asyncio.open_connection(V4, port)
        third.write(sip_request("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKmax3"))
        await recorder.request()
        assert layer.stats[Stat.CONNECTIONS_ACCEPTED] == 2
        await close_writer(third)


@async_test
async def test_send_request_reuses_one_tcp_connection() -> None:
    async with (
        running(ListenAddress(Transport.TCP, V4, 0)) as (server, inbox),
        running() as (client, client_inbox),
    ):
        port = port_of(server, Transport.TCP)

        def request(n: int) -> Request:
            message = parse_message(
                sip_request(f"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKreuse{n}", cseq=n)
            )
            assert isinstance(message, Request)
            return message

        flow1 = await client.send_request(request(1), (Transport.TCP, V4, port))
        flow2 = await client.send_request(request(2), Destination(Transport.TCP, V4, port))
        flows = await asyncio.gather(
            *(client.send_request(request(n), (Transport.TCP, V4, port)) for n in (3, 4))
        )
        assert flow1 == flow2 == flows[0] == flows[1]
        got = [await inbox.request() for _ in range(4)]
        assert sorted(r.cseq.seq for r, _ in got) == [1, 2, 3, 4]
        assert len({f.connection_id for _, f in got}) == 1
        assert server.stats[Stat.CONNECTIONS_ACCEPTED] == 1
        assert client.stats[Stat.CONNECTIONS_OPENED] == 1

        # The answer comes back over that connection to the client's handler.
        first, server_flow = got[0]
        assert await server.send_response(make_response(first, 200, to_tag="t"), server_flow)
        response, response_flow = await client_inbox.next()
        assert isinstance(response, Response) and response.status == 200
        assert response_flow == flow1


@async_test
async def test_send_request_to_a_closed_port_raises() -> None:
    probe = await asyncio.start_server(lambda r, w: None, V4, 0)
    closed_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with running() as (client, _):
        request = parse_message(sip_request("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKno"))
        assert isinstance(request, Request)
        with pytest.raises(TransportError, match="cannot connect"):
            await client.send_request(request, (Transport.TCP, V4, closed_port))
        assert client.stats[Stat.CONNECT_FAILURES] == 1


# -- TLS --------------------------------------------------------------------------------


@async_test
async def test_tls_request_delivered_and_answered_over_the_same_connection(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with running(ListenAddress(Transport.TLS, V4, 0), server_ssl=server_ssl) as (
        layer,
        recorder,
    ):
        port = port_of(layer, Transport.TLS)
        reader, writer = await asyncio.open_connection(V4, port, ssl=client_ssl)
        writer.write(sip_request("SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKtls1"))
        request, flow = await recorder.request()
        assert flow.transport is Transport.TLS
        assert flow.local_port == port
        assert await layer.send_response(make_response(request, 200, to_tag="t"), flow)
        response = await read_message(reader)
        assert isinstance(response, Response)
        assert response.status == 200
        assert response.call_id == "c1@test"
        await close_writer(writer)


@async_test
async def test_tls_send_request_between_layers_verifies_the_server(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with (
        running(ListenAddress(Transport.TLS, V6, 0), server_ssl=server_ssl) as (server, inbox),
        running(client_ssl=client_ssl) as (client, _),
        running(client_ssl=ssl.create_default_context()) as (untrusting, _),
    ):
        port = port_of(server, Transport.TLS, V6)
        for n in (1, 2):
            request = parse_message(
                sip_request(f"SIP/2.0/TLS [::1]:5061;branch=z9hG4bKtls{n}", cseq=n)
            )
            assert isinstance(request, Request)
            await client.send_request(request, (Transport.TLS, V6, port))
        (first, flow1), (second, flow2) = [await inbox.request() for _ in range(2)]
        assert (first.cseq.seq, second.cseq.seq) == (1, 2)
        assert flow1 == flow2 and flow1.transport is Transport.TLS
        assert server.stats[Stat.CONNECTIONS_ACCEPTED] == 1

        # A client that does not trust the self-signed certificate cannot connect.
        with pytest.raises(TransportError):
            await untrusting.send_request(first, (Transport.TLS, V6, port))
        assert untrusting.stats[Stat.CONNECT_FAILURES] == 1


# -- the Via rules, without sockets -----------------------------------------------------


def _parsed(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


def test_stamp_via_rewrites_only_the_top_value_in_place() -> None:
    data = (
        b"OPTIONS sip:sbc@example.com SIP/2.0\r\n"
        b"v: SIP/2.0/UDP pc.example.com;branch=z9hG4bKa, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKb\r\n"
        b"f: <sip:a@example.com>;tag=1\r\nt: <sip:b@example.com>\r\ni: x@y\r\n"
        b"CSeq: 1 OPTIONS\r\nl: 0\r\n\r\n"
    )
    request = _parsed(data)
    assert stamp_via(request, "::ffff:192.0.2.99", 5070)
    assert bytes(request) == data.replace(b"z9hG4bKa,", b"z9hG4bKa;received=192.0.2.99,")
    assert request.via.received == "192.0.2.99"
    assert len(request.vias) == 2


def test_stamp_via_leaves_a_matching_sent_by_alone() -> None:
    data = sip_request("SIP/2.0/UDP [2001:DB8::1]:5060;branch=z9hG4bKc")
    request = _parsed(data)
    assert not stamp_via(request, "2001:db8::1", 5060)
    assert bytes(request) == data


@pytest.mark.parametrize(
    ("via", "transport", "target"),
    [
        (
            "SIP/2.0/UDP 203.0.113.5:5099;rport=40000;received=127.0.0.1",
            Transport.UDP,
            ("127.0.0.1", 40000),
        ),
        ("SIP/2.0/UDP 203.0.113.5:5099;received=127.0.0.1", Transport.UDP, ("127.0.0.1", 5099)),
        ("SIP/2.0/UDP 203.0.113.5", Transport.UDP, ("203.0.113.5", 5060)),
        ("SIP/2.0/UDP [2001:db8::5];received=2001:db8::9", Transport.UDP, ("2001:db8::9", 5060)),
        (
            "SIP/2.0/TCP 203.0.113.5:5099;rport=40000;received=127.0.0.1",
            Transport.TCP,
            ("127.0.0.1", 5099),
        ),
        ("SIP/2.0/TLS 203.0.113.5;received=127.0.0.1", Transport.TLS, ("127.0.0.1", 5061)),
    ],
)
def test_response_target(via: str, transport: Transport, target: tuple[str, int]) -> None:
    response = make_response(_parsed(sip_request(via)), 200)
    assert response_target(response, transport) == target


@pytest.mark.parametrize(
    ("host", "port", "forbidden"),
    [
        ("255.255.255.255", 5060, True),
        ("224.0.1.75", 5060, True),
        ("[ff05::1]", 5060, True),
        ("0.0.0.0", 5060, True),
        ("127.0.0.1", 0, True),
        ("127.0.0.1", 65536, True),
        ("127.0.0.1", 5060, False),
        ("[::1]", 5061, False),
    ],
)
def test_is_forbidden_destination(host: str, port: int, forbidden: bool) -> None:
    assert is_forbidden_destination(host, port) is forbidden


def test_error_response_needs_a_request_with_a_via() -> None:
    with pytest.raises(ParseError) as info:
        parse_message(sip_request("SIP/2.0/UDP 127.0.0.1", extra="Max-Forwards: x\r\n"))
    response = error_response(info.value)
    assert response is not None and response.status == 400

    no_via = b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: x\r\n\r\n"
    with pytest.raises(ParseError) as info:
        parse_message(no_via)
    assert error_response(info.value) is None
