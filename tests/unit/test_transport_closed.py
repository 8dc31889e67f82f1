"""The transport layer reports each closed TCP/TLS connection once, with its Flow.

Real sockets on loopback: a phone's connection closed by the phone, by the idle
sweep, by a framing error and by ``stop``; a TLS one; one the SBC opened. What the
registrar needs to drop the bindings registered over it (RFC 5626 5.3, 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.transport.base import Destination, Flow, ListenAddress, Stat, Transport, TransportConfig
from sbc.transport.layer import TransportLayer
from tests.tls_pki import self_signed
from tests.unit.test_transport import (
    V4,
    Recorder,
    async_test,
    close_writer,
    port_of,
    read_message,
    read_until_closed,
    sip_request,
    wait_until,
)

TCP = ListenAddress(Transport.TCP, V4, 0)


class Closed:
    """The ``on_closed`` observer of the tests: every Flow reported, in order."""

    def __init__(self) -> None:
        self.flows: list[Flow] = []

    def __call__(self, flow: Flow) -> None:
        self.flows.append(flow)

    @property
    def ids(self) -> list[int | None]:
        return [flow.connection_id for flow in self.flows]


@contextlib.asynccontextmanager
async def running(
    *listen: ListenAddress, closed: Any = None, **config: Any
) -> AsyncIterator[tuple[TransportLayer, Recorder, Closed]]:
    recorder, observer = Recorder(), Closed()
    server_ssl = config.pop("server_ssl", None)
    client_ssl = config.pop("client_ssl", None)
    layer = TransportLayer(
        TransportConfig(listen=listen, **config),
        recorder,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
        on_closed=closed or observer,
    )
    await layer.start()
    try:
        yield layer, recorder, observer
    finally:
        await layer.stop()


async def phone(
    layer: TransportLayer, recorder: Recorder, branch: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Flow]:
    """A TCP client that sent one request: its streams and the Flow it arrived on."""
    reader, writer = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
    writer.write(sip_request(f"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK{branch}"))
    _, flow = await recorder.request()
    assert flow.connection_id is not None
    return reader, writer, flow


@async_test
async def test_a_connection_the_peer_closes_is_reported_once_with_its_id() -> None:
    async with running(TCP) as (layer, recorder, closed):
        _, writer, flow = await phone(layer, recorder, "peer1")
        # A second phone stays connected: only the closed one is reported.
        _, other_writer, other = await phone(layer, recorder, "peer2")
        assert closed.flows == []
        await close_writer(writer)
        await wait_until(lambda: bool(closed.flows))
        assert closed.flows == [flow]
        assert layer.connection_count == 1
    # stop() closed the other one; the first is not reported again.
    assert closed.ids == [flow.connection_id, other.connection_id]
    await close_writer(other_writer)


@async_test
async def test_a_connection_the_idle_sweep_closes_is_reported_once() -> None:
    loop = asyncio.get_running_loop()
    async with running(TCP, idle_timeout=30) as (layer, recorder, closed):
        reader, writer, flow = await phone(layer, recorder, "idle1")
        assert layer.close_idle(loop.time() + 29) == 0
        assert layer.close_idle(loop.time() + 31) == 1
        assert await read_until_closed(reader) == b""
        await wait_until(lambda: bool(closed.flows))
        assert closed.ids == [flow.connection_id]
        assert layer.stats[Stat.IDLE_CLOSED] == 1
        await close_writer(writer)
    assert closed.ids == [flow.connection_id]


@async_test
async def test_a_connection_closed_for_a_framing_error_is_reported() -> None:
    async with running(TCP) as (layer, recorder, closed):
        reader, writer, flow = await phone(layer, recorder, "frame1")
        writer.write(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: nope\r\n\r\n")
        await read_until_closed(reader)
        await wait_until(lambda: bool(closed.flows))
        assert closed.ids == [flow.connection_id]
        await close_writer(writer)


@async_test
async def test_connections_still_open_at_stop_are_reported() -> None:
    async with running(TCP) as (layer, recorder, closed):
        reader, writer, flow = await phone(layer, recorder, "stop1")
    assert closed.ids == [flow.connection_id]
    assert await read_until_closed(reader) == b""
    await close_writer(writer)


@async_test
async def test_a_refused_connection_is_not_reported() -> None:
    async with running(TCP, max_connections=1) as (layer, recorder, closed):
        _, first, flow = await phone(layer, recorder, "max1")
        reader, second = await asyncio.open_connection(V4, port_of(layer, Transport.TCP))
        assert await read_until_closed(reader) == b""
        await close_writer(second)
        await close_writer(first)
        await wait_until(lambda: bool(closed.flows))
        assert closed.ids == [flow.connection_id]


@async_test
async def test_a_failing_observer_does_not_break_the_layer() -> None:
    def broken(flow: Flow) -> None:
        raise RuntimeError("observer bug")

    async with running(TCP, closed=broken) as (layer, recorder, _):
        _, writer, _flow = await phone(layer, recorder, "bug1")
        await close_writer(writer)
        await wait_until(lambda: layer.connection_count == 0)
        # The layer goes on: a new connection is admitted and its requests delivered.
        _, writer, _flow = await phone(layer, recorder, "bug2")
        await close_writer(writer)


@async_test
async def test_a_connection_the_sbc_opened_is_reported_when_the_server_closes_it() -> None:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_message(reader)
        await accepted.put(writer)

    server = await asyncio.start_server(serve, V4, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running(TCP) as (layer, _, closed):
            request = parse_message(sip_request("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKo1"))
            assert isinstance(request, Request)
            sent = await layer.send_request(request, Destination(Transport.TCP, V4, port))
            peer = await asyncio.wait_for(accepted.get(), 3)
            await close_writer(peer)
            await wait_until(lambda: bool(closed.flows))
            assert closed.flows == [sent]
            assert sent.connection_id is not None and sent.remote_port == port
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def tls_server(tmp_path: Path) -> ssl.SSLContext:
    issued = self_signed(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    return context


@async_test
async def test_a_tls_connection_the_peer_closes_is_reported(tls_server: ssl.SSLContext) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    listen = ListenAddress(Transport.TLS, V4, 0)
    async with running(listen, server_ssl=tls_server) as (layer, recorder, closed):
        port = port_of(layer, Transport.TLS)
        _, writer = await asyncio.open_connection(V4, port, ssl=client)
        writer.write(sip_request("SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKtls1"))
        _, flow = await recorder.request()
        await close_writer(writer)
        await wait_until(lambda: bool(closed.flows))
        assert closed.flows == [flow]
        assert flow.transport is Transport.TLS and flow.connection_id is not None
