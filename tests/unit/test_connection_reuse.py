"""Which open TCP/TLS connection a request may reuse: TLS only under the verified name.

Two TransportLayers talk over real sockets on 127.0.0.1 (ephemeral ports); the
certificates come from a private CA made for the test. A guard fails any test
whose code tries to connect beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import sbc.transport.layer as layer_module
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.transport.base import (
    Destination,
    Flow,
    ListenAddress,
    Stat,
    Transport,
    TransportConfig,
    TransportError,
    ip_literal,
)
from sbc.transport.certificates import CertificatePaths, ClientAuth, client_context, server_context
from sbc.transport.layer import TransportLayer
from tests.tls_pki import Authority, Issued
from tests.unit.test_transport import async_test

IO_TIMEOUT = 3.0
V4 = "127.0.0.1"
TLS, TCP = Transport.TLS, Transport.TCP


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    connect = layer_module.connect

    async def guarded(factory: Any, transport: Transport, host: str, port: int, **kw: Any) -> Any:
        address = ip_literal(host)
        assert address is not None and address.is_loopback, f"connect to {host}"
        return await connect(factory, transport, host, port, **kw)

    monkeypatch.setattr(layer_module, "connect", guarded)


class Pki:
    """A private CA; a server certificate for localhost and 127.0.0.1, one for two
    trunk names, and the CA bundle clients trust."""

    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory / "ca", "reuse-ca")
        self.localhost = self.ca.issue("localhost", "localhost", V4)
        self.trunks = self.ca.issue("trunks", "a.trunk.example", "b.trunk.example")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("reuse-pki"))


def serving(issued: Issued, seen_names: list[str | None]) -> ssl.SSLContext:
    context = server_context(CertificatePaths(issued.cert, issued.key), ClientAuth.OFF)
    context.sni_callback = lambda _obj, name, _ctx: seen_names.append(name)
    return context


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Request, Flow]] = asyncio.Queue()

    def __call__(self, message: object, flow: Flow) -> None:
        if isinstance(message, Request):
            self.queue.put_nowait((message, flow))

    async def request(self) -> tuple[Request, Flow]:
        return await asyncio.wait_for(self.queue.get(), IO_TIMEOUT)


@contextlib.asynccontextmanager
async def layer(
    *listen: ListenAddress,
    server_ssl: ssl.SSLContext | None = None,
    client_ssl: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[TransportLayer, Inbox]]:
    inbox = Inbox()
    config = TransportConfig(listen=listen, connect_timeout=IO_TIMEOUT)
    transport = TransportLayer(config, inbox, server_ssl=server_ssl, client_ssl=client_ssl)
    await transport.start()
    try:
        yield transport, inbox
    finally:
        await transport.stop()


def port_of(transport: TransportLayer, kind: Transport) -> int:
    (listener,) = [x for x in transport.listeners if x.transport is kind]
    return listener.port


def options(n: int) -> Request:
    message = parse_message(
        (
            "OPTIONS sip:probe@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKreuse{n}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:sbc@127.0.0.1>;tag=r\r\n"
            f"To: <sip:probe@127.0.0.1>\r\nCall-ID: reuse-{n}\r\nCSeq: {n} OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(message, Request)
    return message


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 3 s")


@async_test
async def test_same_name_reuses_another_name_gets_its_own_handshake_and_fails(pki: Pki) -> None:
    seen: list[str | None] = []
    async with (
        layer(ListenAddress(TLS, V4, 0), server_ssl=serving(pki.localhost, seen)) as (
            server,
            inbox,
        ),
        layer(client_ssl=client_context(pki.ca.path)) as (client, _),
    ):
        port = port_of(server, TLS)
        named = Destination(TLS, V4, port, "localhost")
        first = await client.send_request(options(1), named)
        again = await client.send_request(options(2), Destination(TLS, V4, port, "LocalHost."))
        assert first == again
        flows = [(await inbox.request())[1] for _ in range(2)]
        assert flows[0] == flows[1] and flows[0].remote_port == first.local_port
        assert client.stats[Stat.CONNECTIONS_OPENED] == 1
        assert server.stats[Stat.CONNECTIONS_ACCEPTED] == 1
        assert seen == ["localhost"]

        # Same address and port, another name: a new handshake, which the certificate
        # (localhost, 127.0.0.1) fails. The old connection must not carry it.
        with pytest.raises(TransportError, match="cannot connect"):
            await client.send_request(options(3), Destination(TLS, V4, port, "other.example"))
        assert seen == ["localhost", "other.example"]
        assert client.stats[Stat.CONNECT_FAILURES] == 1
        assert client.stats[Stat.CONNECTIONS_OPENED] == 1
        await wait_until(lambda: server.stats[Stat.TLS_HANDSHAKE_FAILURES] == 1)
        assert inbox.queue.empty()

        # The named connection is still there for its own name.
        assert await client.send_request(options(4), named) == first
        _, flow = await inbox.request()
        assert server.stats[Stat.CONNECTIONS_ACCEPTED] == 1
        assert flow.remote_port == first.local_port


@async_test
async def test_two_names_on_one_address_get_a_connection_each(pki: Pki) -> None:
    seen: list[str | None] = []
    async with (
        layer(ListenAddress(TLS, V4, 0), server_ssl=serving(pki.trunks, seen)) as (server, inbox),
        layer(client_ssl=client_context(pki.ca.path)) as (client, _),
    ):
        port = port_of(server, TLS)
        a = Destination(TLS, V4, port, "a.trunk.example")
        b = Destination(TLS, V4, port, "b.trunk.example")
        # At once: one connect per name, not one shared by both.
        flow_a, flow_b = await asyncio.gather(
            client.send_request(options(1), a), client.send_request(options(2), b)
        )
        assert flow_a.connection_id != flow_b.connection_id
        assert sorted(n for n in seen if n) == ["a.trunk.example", "b.trunk.example"]
        # And later each name keeps to its own connection.
        assert await client.send_request(options(3), b) == flow_b
        assert await client.send_request(options(4), a) == flow_a
        by_cseq = {}
        for _ in range(4):
            request, flow = await inbox.request()
            by_cseq[request.cseq.seq] = flow.remote_port
        assert by_cseq == {
            1: flow_a.local_port,
            2: flow_b.local_port,
            3: flow_b.local_port,
            4: flow_a.local_port,
        }
        assert client.stats[Stat.CONNECTIONS_OPENED] == 2
        assert server.stats[Stat.CONNECTIONS_ACCEPTED] == 2
        assert len(seen) == 2


@async_test
async def test_a_connection_verified_by_address_and_one_by_name_are_not_swapped(pki: Pki) -> None:
    seen: list[str | None] = []
    async with (
        layer(ListenAddress(TLS, V4, 0), server_ssl=serving(pki.localhost, seen)) as (server, _),
        layer(client_ssl=client_context(pki.ca.path)) as (client, _),
    ):
        port = port_of(server, TLS)
        by_address = await client.send_request(options(1), Destination(TLS, V4, port))
        # An IP literal given as the name is the address again.
        assert await client.send_request(options(2), Destination(TLS, V4, port, V4)) == by_address
        by_name = await client.send_request(options(3), Destination(TLS, V4, port, "localhost"))
        assert by_name.connection_id != by_address.connection_id
        assert await client.send_request(options(4), Destination(TLS, V4, port)) == by_address
        assert client.stats[Stat.CONNECTIONS_OPENED] == 2
        # No SNI for an address (RFC 6066 3), the name for the named one.
        assert seen == [None, "localhost"]


@async_test
async def test_a_peers_connection_carries_requests_without_a_name_only(pki: Pki) -> None:
    """RFC 5923-style reuse of an inbound connection stays for unnamed destinations
    (a registered phone's flow); a destination with a name needs a verified one."""
    async with (
        layer(
            ListenAddress(TLS, V4, 0),
            server_ssl=serving(pki.localhost, []),
            client_ssl=client_context(pki.ca.path),
        ) as (sbc, inbox),
        layer(client_ssl=client_context(pki.ca.path)) as (peer, peer_inbox),
    ):
        sbc_port = port_of(sbc, TLS)
        out = await peer.send_request(options(1), Destination(TLS, V4, sbc_port, "localhost"))
        _, inbound = await inbox.request()
        assert inbound.remote_port == out.local_port

        back = Destination(TLS, inbound.remote_host, inbound.remote_port)
        assert await sbc.send_request(options(2), back) == inbound
        request, flow = await peer_inbox.request()
        assert request.cseq.seq == 2 and flow == out
        assert sbc.stats[Stat.CONNECTIONS_OPENED] == 0

        # The peer's certificate was never checked for a name: no reuse, and its
        # ephemeral port accepts no connection of its own.
        named = Destination(TLS, inbound.remote_host, inbound.remote_port, "localhost")
        with pytest.raises(TransportError, match="cannot connect"):
            await sbc.send_request(options(3), named)
        assert sbc.stats[Stat.CONNECT_FAILURES] == 1
        assert peer_inbox.queue.empty()
        # Responses and unnamed requests still use the peer's connection.
        assert await sbc.send_request(options(4), back) == inbound
        assert (await peer_inbox.request())[0].cseq.seq == 4


@async_test
async def test_without_name_checks_the_names_share_one_connection(pki: Pki) -> None:
    """verify_server: false proves no name, so none is remembered or required."""
    async with (
        layer(ListenAddress(TLS, V4, 0), server_ssl=serving(pki.localhost, [])) as (server, _),
        layer(client_ssl=client_context(verify=False)) as (client, _),
    ):
        port = port_of(server, TLS)
        flows = [
            await client.send_request(options(n), Destination(TLS, V4, port, name))
            for n, name in enumerate(("localhost", "other.example", None, "localhost"))
        ]
        assert len(set(flows)) == 1
        assert client.stats[Stat.CONNECTIONS_OPENED] == 1


@async_test
async def test_plain_tcp_ignores_the_name() -> None:
    async with layer(ListenAddress(TCP, V4, 0)) as (server, inbox), layer() as (client, _):
        port = port_of(server, TCP)
        flows = {
            await client.send_request(options(n), Destination(TCP, V4, port, name))
            for n, name in enumerate(("a.trunk.example", "b.trunk.example", None))
        }
        assert len(flows) == 1
        assert server.stats[Stat.CONNECTIONS_ACCEPTED] == 1
        for _ in range(3):
            await inbox.request()


@async_test
async def test_a_closed_named_connection_is_replaced_under_its_name(pki: Pki) -> None:
    async with (
        layer(ListenAddress(TLS, V4, 0), server_ssl=serving(pki.trunks, [])) as (server, inbox),
        layer(client_ssl=client_context(pki.ca.path)) as (client, _),
    ):
        port = port_of(server, TLS)
        a = Destination(TLS, V4, port, "a.trunk.example")
        first = await client.send_request(options(1), a)
        _, inbound = await inbox.request()
        # The server closes it (idle sweep, restart): the next request reconnects.
        server.close_idle(asyncio.get_running_loop().time() + 10_000)
        await wait_until(lambda: client.connection_count == 0)
        second = await client.send_request(options(2), a)
        assert second.connection_id != first.connection_id
        assert client.stats[Stat.CONNECTIONS_OPENED] == 2
        assert inbound.connection_id is not None


@async_test
async def test_without_a_client_context_a_named_request_never_takes_a_peers_connection(
    pki: Pki,
) -> None:
    async with (
        layer(ListenAddress(TLS, V4, 0), server_ssl=serving(pki.localhost, [])) as (sbc, inbox),
        layer(client_ssl=client_context(pki.ca.path)) as (peer, peer_inbox),
    ):
        await peer.send_request(options(1), Destination(TLS, V4, port_of(sbc, TLS), "localhost"))
        _, inbound = await inbox.request()
        named = Destination(TLS, inbound.remote_host, inbound.remote_port, "localhost")
        with pytest.raises(TransportError, match="cannot connect"):
            await sbc.send_request(options(2), named)
        assert peer_inbox.queue.empty()
