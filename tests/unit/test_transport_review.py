"""The transport layer under abuse, over real sockets on loopback.

What an Internet-facing SBC meets first: requests that aim their responses at a
third party (a spoofed ``received``, a unicast ``maddr``), connections that dribble
a message byte by byte, peers that stop reading, connections reset before they are
accepted, STUN keepalives on the SIP UDP port, and streams that cannot be framed.

Every socket is bound to 127.0.0.1 or ::1 on an ephemeral port, every wait has a
timeout, every loop a bound, and a guard fails any send beyond loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.transport.base import (
    DEFAULT_MESSAGE_TIMEOUT,
    ListenAddress,
    Stat,
    Transport,
    TransportConfig,
    response_target,
    stamp_via,
    stun_binding_response,
)
from sbc.transport.layer import TransportLayer
from sbc.transport.stream import StreamConnection
from tests.tls_pki import Authority
from tests.unit.test_transport import (
    IO_TIMEOUT,
    TEST_TIMEOUT,
    V4,
    V6,
    Recorder,
    UdpPeer,
    async_test,
    close_writer,
    loopback_only,  # noqa: F401  (autouse: fails any send beyond loopback)
    port_of,
    read_message,
    read_until_closed,
    running,
    sip_request,
    wait_until,
)

#: An address no test may send to: TEST-NET-2 (RFC 5737), never loopback.
THIRD_PARTY = "198.51.100.7"


def _parsed(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


# -- Via: where responses go (RFC 3261 18.2.1/18.2.2, RFC 3581 4) -----------------------


@pytest.mark.parametrize(
    ("via", "source", "stamped"),
    [
        # The sender wrote a received of its own: responses would go to a third party.
        (
            f"SIP/2.0/UDP 127.0.0.1:5060;received={THIRD_PARTY};branch=z9hG4bKs1",
            "127.0.0.1",
            "SIP/2.0/UDP 127.0.0.1:5060;received=127.0.0.1;branch=z9hG4bKs1",
        ),
        (
            "SIP/2.0/UDP [::1]:5060;received=2001:db8::9;branch=z9hG4bKs2",
            "::1",
            "SIP/2.0/UDP [::1]:5060;received=::1;branch=z9hG4bKs2",
        ),
        # IPv6: rport and received are stamped, received without brackets (RFC 3261 25.1).
        (
            "SIP/2.0/UDP [::1]:5060;rport;branch=z9hG4bKs3",
            "::1",
            "SIP/2.0/UDP [::1]:5060;rport=40000;branch=z9hG4bKs3;received=::1",
        ),
        (
            "SIP/2.0/UDP phone.example.com;rport;branch=z9hG4bKs4",
            "::ffff:192.0.2.99",
            "SIP/2.0/UDP phone.example.com;rport=40000;branch=z9hG4bKs4;received=192.0.2.99",
        ),
    ],
    ids=["spoofed-received-v4", "spoofed-received-v6", "v6-rport", "name-from-v4-mapped"],
)
def test_stamp_via_records_the_real_source(via: str, source: str, stamped: str) -> None:
    request = _parsed(sip_request(via))
    assert stamp_via(request, source, 40000)
    assert request.headers.fields("Via") == [stamped]


def test_a_received_equal_to_the_source_is_left_alone() -> None:
    data = sip_request("SIP/2.0/UDP 203.0.113.5:5060;received=127.0.0.1;branch=z9hG4bKs5")
    request = _parsed(data)
    assert not stamp_via(request, "127.0.0.1", 5060)
    assert bytes(request) == data


@pytest.mark.parametrize(
    ("via", "target"),
    [
        (f"SIP/2.0/UDP 127.0.0.1:5070;maddr={THIRD_PARTY};rport=5080", ("127.0.0.1", 5080)),
        (f"SIP/2.0/UDP 127.0.0.1:5070;maddr={THIRD_PARTY}", ("127.0.0.1", 5070)),
        ("SIP/2.0/UDP 127.0.0.1:5070;maddr=gw.example.com", ("127.0.0.1", 5070)),
        # Multicast maddr is still named, so the send refuses it as forbidden.
        ("SIP/2.0/UDP 127.0.0.1:5070;maddr=239.1.1.1", ("239.1.1.1", 5070)),
    ],
    ids=["unicast-with-rport", "unicast", "name", "multicast"],
)
def test_response_target_ignores_a_unicast_maddr(via: str, target: tuple[str, int]) -> None:
    response = make_response(_parsed(sip_request(via)), 200)
    assert response_target(response, Transport.UDP) == target


@pytest.mark.parametrize("param", [f"received={THIRD_PARTY}", f"maddr={THIRD_PARTY}"])
@pytest.mark.parametrize("malformed", [False, True], ids=["answered", "stateless-400"])
@async_test
async def test_udp_responses_go_back_to_the_source_not_a_named_third_party(
    param: str, malformed: bool
) -> None:
    async with running(ListenAddress(Transport.UDP, V4, 0)) as (layer, recorder):
        port = port_of(layer, Transport.UDP)
        phone = await UdpPeer.open(V4)
        via = f"SIP/2.0/UDP {V4}:{phone.port};{param};branch=z9hG4bKrefl"
        extra = "Max-Forwards: many\r\n" if malformed else ""
        phone.send(sip_request(via, extra=extra), V4, port)
        if not malformed:
            request, flow = await recorder.request()
            # The loopback guard fails the test if this goes to THIRD_PARTY.
            assert await layer.send_response(make_response(request, 200, to_tag="t"), flow)
        data, _ = await phone.recv()
        response = parse_message(data)
        assert isinstance(response, Response)
        assert response.status == (400 if malformed else 200)
        assert layer.stats[Stat.SEND_FAILURES] == 0
        phone.close()


# -- STUN keepalives on the SIP UDP port (RFC 5626 8, RFC 5389) -------------------------

#: RFC 5769 2.2 and 2.3: the transaction ID and mapped address of the sample responses.
_TRANSACTION = bytes.fromhex("b7e7a701bc34d686fa87dfae")
_BINDING_REQUEST = bytes.fromhex("000100002112a442") + _TRANSACTION


@pytest.mark.parametrize(
    ("host", "attribute"),
    [
        ("192.0.2.1", "0020000800 01a147e112a643"),
        (
            "2001:db8:1234:5678:11:2233:4455:6677",
            "0020001400 02a1470113a9faa5d3f179bc25f4b5bed2b9d9",
        ),
    ],
    ids=["v4", "v6"],
)
def test_stun_binding_response_matches_rfc5769(host: str, attribute: str) -> None:
    value = bytes.fromhex(attribute.replace(" ", ""))
    expected = bytes.fromhex("0101") + struct.pack("!H", len(value)) + _BINDING_REQUEST[4:] + value
    assert stun_binding_response(_BINDING_REQUEST, host, 32853) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"OPTIONS sip:a@b SIP/2.0\r\n\r\n",
        _BINDING_REQUEST[:19],  # too short
        _BINDING_REQUEST[:4] + b"\x21\x12\xa4\x43" + _TRANSACTION,  # no magic cookie
        bytes.fromhex("00010004") + _BINDING_REQUEST[4:],  # length beyond the datagram
        bytes.fromhex("0011") + _BINDING_REQUEST[2:],  # a Binding indication: no answer
    ],
    ids=["sip", "short", "cookie", "length", "indication"],
)
def test_stun_binding_response_only_answers_binding_requests(data: bytes) -> None:
    assert stun_binding_response(data, "192.0.2.1", 5060) is None


@pytest.mark.parametrize("host", [V4, V6])
@async_test
async def test_udp_stun_binding_request_is_answered_not_reported_as_malformed(host: str) -> None:
    errors: list[ParseError] = []
    layer = TransportLayer(
        TransportConfig(listen=(ListenAddress(Transport.UDP, host, 0),)),
        Recorder(),
        on_error=lambda error, _flow: errors.append(error),
    )
    await layer.start()
    try:
        phone = await UdpPeer.open(host)
        phone.send(_BINDING_REQUEST, host, port_of(layer, Transport.UDP, host))
        data, _ = await phone.recv()
        assert data == stun_binding_response(_BINDING_REQUEST, host, phone.port)
        assert data[:2] == b"\x01\x01" and data[8:20] == _TRANSACTION
        assert errors == []
        assert layer.stats[Stat.BAD_REQUESTS] == 0
        assert layer.stats[Stat.KEEPALIVES] == 1
        phone.close()
    finally:
        await layer.stop()


@async_test
async def test_udp_crlf_and_empty_datagrams_are_ignored_keepalives() -> None:
    async with running(ListenAddress(Transport.UDP, V6, 0)) as (layer, recorder):
        port = port_of(layer, Transport.UDP, V6)
        phone = await UdpPeer.open(V6)
        for keepalive in (b"\r\n", b"\r\n\r\n", b"\n"):
            phone.send(keepalive, V6, port)
        # asyncio does not send an empty datagram; a plain socket does.
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"", (V6, port))
        phone.send(sip_request("SIP/2.0/UDP [::1]:5060;branch=z9hG4bKka"), V6, port)
        await recorder.request()
        assert phone.queue.empty()  # RFC 5626 3.5.1 pongs are for streams only
        assert layer.stats[Stat.KEEPALIVES] == 4
        assert layer.stats[Stat.BAD_REQUESTS] == 0
        phone.close()


# -- slowloris: a message must arrive within message_timeout ----------------------------


@async_test
async def test_tcp_message_dribbled_in_is_closed_after_message_timeout() -> None:
    """Activity alone keeps a connection open; an unfinished message does not."""
    loop = asyncio.get_running_loop()
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
        port = port_of(layer, Transport.TCP)
        via = "SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKslow"
        # Each connection sends a ping first: its pong says the server has read the
        # segment, and so whatever followed the ping in it.
        connections = {}
        for name, tail in (
            ("between messages", sip_request(via + "1")),
            ("half a ping", b"\r\n"),
            ("unfinished", sip_request(via + "2")[:-30]),
        ):
            reader, writer = await asyncio.open_connection(V4, port)
            writer.write(b"\r\n\r\n" + tail)
            assert await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT) == b"\r\n"
            connections[name] = reader, writer
        await recorder.request()

        # Long after each started, but well within idle_timeout.
        assert layer.close_idle(loop.time() + DEFAULT_MESSAGE_TIMEOUT + 1) == 1
        reader, _ = connections["unfinished"]
        assert await read_until_closed(reader) == b""
        await wait_until(lambda: layer.connection_count == 2)
        assert layer.stats[Stat.MESSAGE_TIMEOUTS] == 1
        assert layer.stats[Stat.IDLE_CLOSED] == 0
        for _, writer in connections.values():
            await close_writer(writer)


@async_test
async def test_tcp_slowloris_is_closed_by_the_sweep() -> None:
    loop = asyncio.get_running_loop()
    async with running(
        ListenAddress(Transport.TCP, V4, 0), idle_timeout=30, message_timeout=0.3
    ) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        data = sip_request("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKloris")
        started = loop.time()
        for index in range(len(data) - 1):  # never the last byte
            if reader.at_eof() or writer.is_closing():
                break
            writer.write(data[index : index + 1])
            await asyncio.sleep(0.05)
            if loop.time() - started > IO_TIMEOUT:
                break
        assert await read_until_closed(reader) == b""
        assert 0.3 <= loop.time() - started < IO_TIMEOUT
        assert layer.stats[Stat.MESSAGE_TIMEOUTS] == 1
        assert recorder.queue.empty()
        await close_writer(writer)


@async_test
async def test_tcp_pipelined_traffic_is_not_a_slow_message() -> None:
    """Messages straddling reads keep completing: each starts its own deadline."""
    async with running(
        ListenAddress(Transport.TCP, V4, 0), idle_timeout=30, message_timeout=0.5
    ) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        messages = [
            sip_request(f"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKp{n}", cseq=n) for n in range(10)
        ]
        # Every write ends a message and begins the next: the buffer is never empty,
        # for 0.9 s in all, longer than message_timeout.
        writer.write(messages[0][:100])
        for previous, message in itertools.pairwise(messages):
            await asyncio.sleep(0.1)
            writer.write(previous[100:] + message[:100])
            await recorder.request()
        assert layer.connection_count == 1
        assert layer.stats[Stat.MESSAGE_TIMEOUTS] == 0
        assert not reader.at_eof()
        await close_writer(writer)


# -- a peer that never reads ------------------------------------------------------------


@pytest.fixture
def small_send_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the kernel's send buffer of every accepted connection, so what a peer
    does not read piles up in the transport instead of vanishing into the kernel."""
    made = StreamConnection.connection_made

    def connection_made(self: StreamConnection, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        made(self, transport)

    monkeypatch.setattr(StreamConnection, "connection_made", connection_made)


PINGS = 20_000


@pytest.mark.parametrize("reason", ["idle", "framing error"])
@async_test
async def test_closing_connection_of_a_peer_that_never_reads_is_aborted(
    small_send_buffers: None, reason: str
) -> None:
    loop = asyncio.get_running_loop()
    async with running(ListenAddress(Transport.TCP, V4, 0), idle_timeout=30, close_timeout=1) as (
        layer,
        _,
    ):
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.setblocking(False)
        try:
            await asyncio.wait_for(
                loop.sock_connect(peer, (V4, port_of(layer, Transport.TCP))), IO_TIMEOUT
            )
            # Pings it never reads the pongs of: more than the kernel can take. Sent
            # in small writes, as the framer takes time quadratic in a read's pings.
            for _ in range(PINGS // 100):
                await asyncio.wait_for(loop.sock_sendall(peer, b"\r\n\r\n" * 100), IO_TIMEOUT)
            await wait_until(lambda: layer.stats[Stat.KEEPALIVES] == PINGS)
            now = loop.time()
            if reason == "idle":
                assert layer.close_idle(now + 31) == 1
            else:
                await asyncio.wait_for(loop.sock_sendall(peer, b"not sip\r\n\r\n"), IO_TIMEOUT)
                await wait_until(lambda: layer.stats[Stat.FRAMING_ERRORS] == 1)
            await asyncio.sleep(0.05)
            assert layer.connection_count == 1, "close() should be stuck flushing"
            # Closed once, not again; aborted once close_timeout (1 s) has passed.
            closed = loop.time()
            assert layer.close_idle(closed + 0.5) == 0
            assert layer.connection_count == 1
            layer.close_idle(closed + 1.5)
            await wait_until(lambda: layer.connection_count == 0)
            assert layer.stats[Stat.CLOSE_TIMEOUTS] == 1
            assert layer.stats[Stat.IDLE_CLOSED] == (1 if reason == "idle" else 0)
        finally:
            peer.close()


# -- connections reset before they are accepted -----------------------------------------


def _loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is the optional "fast" extra
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


def run_on(
    factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, None]
) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(coro, TEST_TIMEOUT))


@pytest.mark.parametrize("factory", _loop_factories())
def test_connections_reset_before_accept_leak_nothing(
    factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """uvloop has no peername for a connection reset in the accept queue (the app
    runs on uvloop): such a connection must be closed, not crash connection_made."""

    async def scenario() -> None:
        failures: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: failures.append(ctx))
        async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
            port = port_of(layer, Transport.TCP)
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(20):
                # Connected and reset before the loop gets to accept it.
                with socket.create_connection((V4, port), timeout=IO_TIMEOUT) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _, writer = await asyncio.open_connection(V4, port)
            writer.write(sip_request("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKafter"))
            await recorder.request()
            await close_writer(writer)
            await wait_until(lambda: layer.connection_count == 0)
            await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before)
        assert failures == []

    run_on(factory, scenario())


# -- TLS handshakes that never finish ----------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> ssl.SSLContext:
    leaf = Authority(tmp_path, "review-ca").issue("localhost", V4)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.cert, leaf.key)
    return context


@pytest.mark.parametrize("hello", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "partial"])
@async_test
async def test_tls_handshake_that_never_finishes_is_timed_out(
    tls_server: ssl.SSLContext, hello: bytes
) -> None:
    loop = asyncio.get_running_loop()
    async with running(
        ListenAddress(Transport.TLS, V4, 0), server_ssl=tls_server, connect_timeout=0.3
    ) as (layer, _):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TLS))
        started = loop.time()
        writer.write(hello)
        assert await read_until_closed(reader) == b""
        assert loop.time() - started >= 0.3
        await wait_until(lambda: layer.stats[Stat.TLS_HANDSHAKE_FAILURES] == 1)
        assert layer.handshakes is not None and layer.handshakes.in_flight(V4) == 0
        assert layer.connection_count == 0
        await close_writer(writer)


# -- stream framing: answer what can be answered, then close; never raise ---------------

_VIA = "SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKframe"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (sip_request(_VIA).replace(b"Content-Length: 0\r\n", b""), 400),
        (sip_request(_VIA, content_length="-1"), 400),
        (sip_request(_VIA, content_length="9" * 30), 400),
        (sip_request(_VIA, content_length="40000"), 413),
        (b"OPTIONS sip:a@b SIP/2.0\r\nVia: " + _VIA.encode() + b"\r\n" + b"X: y\r\n" * 6000, None),
        (b"\n" * 3000 + sip_request(_VIA), None),
    ],
    ids=["missing", "negative", "huge", "body-too-large", "endless-header", "many-lfs"],
)
@async_test
async def test_tcp_framing_errors_answer_then_close(data: bytes, status: int | None) -> None:
    failures: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: failures.append(ctx))
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        writer.write(data)
        if status is not None:
            response = await read_message(reader)
            assert isinstance(response, Response) and response.status == status
        assert await read_until_closed(reader) == b""
        assert layer.stats[Stat.FRAMING_ERRORS] == 1
        assert recorder.queue.empty()
        await close_writer(writer)
    assert failures == []


@async_test
async def test_tcp_byte_by_byte_pipeline_with_pings_between() -> None:
    async with running(ListenAddress(Transport.TCP, V4, 0)) as (layer, recorder):
        reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        data = (
            b"\r\n\r\n"
            + sip_request(_VIA + "1", cseq=1)
            + b"\r\n\r\n"
            + sip_request(_VIA + "2", method="MESSAGE", cseq=2, body=b"hello")
        )
        for index in range(len(data)):
            writer.write(data[index : index + 1])
            await writer.drain()
        first, flow = await recorder.request()
        second, _ = await recorder.request()
        assert (first.cseq.seq, second.cseq.seq, second.body) == (1, 2, b"hello")
        assert await asyncio.wait_for(reader.readexactly(4), IO_TIMEOUT) == b"\r\n\r\n"
        assert layer.stats[Stat.KEEPALIVES] == 2
        assert flow.remote_host == V4
        await close_writer(writer)
