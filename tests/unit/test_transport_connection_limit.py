"""max_connections counts every TCP/TLS descriptor the SBC holds, either way.

``max_connections`` bounds the TCP/TLS connections open at once, whichever side
opened them: accepted ones, ones the SBC opened, and connects still under way (each
holds a descriptor). A peer able to make the SBC connect out (3xx Contacts, REFER
targets, responses to a sent-by of its choosing) must not exhaust them.

The SBC is a TransportLayer on 127.0.0.1 (ephemeral ports); the destinations are
plain asyncio servers there that count what they accept. A guard fails any test
whose code tries to connect beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from sbc.sip.message import Request, make_response
from sbc.sip.parser import parse_message
from sbc.transport.base import (
    Destination,
    ListenAddress,
    Stat,
    Transport,
    TransportError,
)
from sbc.transport.certificates import client_context

# Autouse: any connect beyond loopback fails the test.
from tests.unit.test_connection_reuse import loopback_only  # noqa: F401
from tests.unit.test_transport import (
    IO_TIMEOUT,
    V4,
    async_test,
    close_writer,
    port_of,
    read_until_closed,
    running,
    sip_request,
    wait_until,
)

TCP, TLS = Transport.TCP, Transport.TLS


class Sink:
    """A TCP server on loopback that keeps what it accepts and never answers: a
    SIP peer for TCP, a server that never finishes the handshake for TLS."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.accepted: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def destination(self, transport: Transport = TCP) -> Destination:
        return Destination(transport, V4, self.port)

    def drop(self, index: int) -> None:
        self.accepted[index].close()


@contextlib.asynccontextmanager
async def sink() -> AsyncIterator[Sink]:
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _r, w: accepted.append(w), V4, 0)
    found = Sink(server)
    found.accepted = accepted
    try:
        yield found
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), IO_TIMEOUT)


def options(n: int) -> Request:
    message = parse_message(sip_request(f"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKid{n}", cseq=n))
    assert isinstance(message, Request)
    return message


@async_test
async def test_outbound_connections_stop_at_max_connections_and_the_send_fails() -> None:
    async with (
        running(max_connections=2, connect_timeout=IO_TIMEOUT) as (sbc, _),
        sink() as one,
        sink() as two,
        sink() as three,
    ):
        await sbc.send_request(options(1), one.destination())
        await sbc.send_request(options(2), two.destination())
        # Open connections are reused at the limit: no new descriptor is needed.
        await sbc.send_request(options(3), one.destination())

        with pytest.raises(TransportError, match=r"cannot connect to tcp 127\.0\.0\.1:\d+: 2 conn"):
            await sbc.send_request(options(4), three.destination())
        assert sbc.stats[Stat.CONNECTS_REFUSED] == 1
        assert sbc.stats[Stat.CONNECTIONS_OPENED] == 2
        assert sbc.stats[Stat.CONNECT_FAILURES] == 0
        assert sbc.connection_count == 2
        assert three.accepted == []

        # One closes: its place is free again.
        one.drop(0)
        await wait_until(lambda: sbc.connection_count == 1)
        await sbc.send_request(options(5), three.destination())
        await wait_until(lambda: len(three.accepted) == 1)
        assert sbc.stats[Stat.CONNECTIONS_OPENED] == 3


@async_test
async def test_a_connect_under_way_holds_its_place() -> None:
    """A TLS server that never answers keeps a descriptor busy for connect_timeout."""
    async with (
        running(
            max_connections=1, connect_timeout=IO_TIMEOUT, client_ssl=client_context(verify=False)
        ) as (sbc, _),
        sink() as silent,
        sink() as other,
    ):
        stuck = asyncio.create_task(sbc.send_request(options(1), silent.destination(TLS)))
        await wait_until(lambda: len(silent.accepted) == 1)
        assert not stuck.done()

        with pytest.raises(TransportError, match="1 connections"):
            await sbc.send_request(options(2), other.destination())
        assert sbc.stats[Stat.CONNECTS_REFUSED] == 1
        assert other.accepted == []

        # The server hangs up mid-handshake: that connect fails and frees its place.
        silent.drop(0)
        with pytest.raises(TransportError, match="cannot connect"):
            await asyncio.wait_for(stuck, IO_TIMEOUT)
        await sbc.send_request(options(3), other.destination())
        await wait_until(lambda: len(other.accepted) == 1)


@async_test
async def test_concurrent_sends_to_one_destination_share_one_place() -> None:
    async with running(max_connections=1, connect_timeout=IO_TIMEOUT) as (sbc, _), sink() as one:
        flows = await asyncio.gather(
            *(sbc.send_request(options(n), one.destination()) for n in range(3))
        )
        assert len(set(flows)) == 1
        assert sbc.stats[Stat.CONNECTS_REFUSED] == 0
        assert len(one.accepted) == 1


@async_test
async def test_inbound_and_outbound_connections_share_the_limit() -> None:
    async with (
        running(ListenAddress(TCP, V4, 0), max_connections=2, connect_timeout=IO_TIMEOUT) as (
            sbc,
            inbox,
        ),
        sink() as trunk,
        sink() as other,
    ):
        port = port_of(sbc, TCP)
        phone_reader, phone = await asyncio.open_connection(V4, port)
        phone.write(sip_request("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKphone1"))
        request, flow = await inbox.request()
        await sbc.send_request(options(1), trunk.destination())
        assert sbc.connection_count == 2

        # Full: a second phone is turned away, and so is a new outbound connection.
        reader, late = await asyncio.open_connection(V4, port)
        assert await read_until_closed(reader) == b""
        assert sbc.stats[Stat.CONNECTIONS_REFUSED] == 1
        await close_writer(late)
        with pytest.raises(TransportError, match="2 connections"):
            await sbc.send_request(options(2), other.destination())
        assert other.accepted == []

        # What is open keeps working: the phone gets its response on its own flow.
        assert await sbc.send_response(make_response(request, 200), flow)
        head = await asyncio.wait_for(phone_reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        assert head.startswith(b"SIP/2.0 200 ")
        await close_writer(phone)


@async_test
async def test_a_response_that_needs_a_new_connection_at_the_limit_is_reported_failed() -> None:
    """RFC 3261 18.2.2: with the request's connection gone, the response goes to the
    sent-by address over a new connection; the sender chose that address."""
    async with (
        running(ListenAddress(TCP, V4, 0), max_connections=1, connect_timeout=IO_TIMEOUT) as (
            sbc,
            inbox,
        ),
        sink() as target,
    ):
        _, phone = await asyncio.open_connection(V4, port_of(sbc, TCP))
        via = f"SIP/2.0/TCP 127.0.0.1:{target.port};branch=z9hG4bKaway"
        phone.write(sip_request(via))
        request, flow = await inbox.request()

        failed = asyncio.get_running_loop().create_future()
        response = make_response(request, 200)
        away = replace(flow, connection_id=None)
        sbc.send_response_nowait(response, away, on_failure=lambda: failed.set_result(True))
        assert await asyncio.wait_for(failed, IO_TIMEOUT)
        assert sbc.stats[Stat.CONNECTS_REFUSED] == 1
        assert target.accepted == []
        await close_writer(phone)
