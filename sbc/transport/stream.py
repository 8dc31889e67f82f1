"""TCP and TLS: listeners and connections, each connection with its own framer.

A ``StreamConnection`` moves bytes: what arrives goes through the core's
StreamFramer and every item it yields (message, parse error, keepalive) is handed
to the ``StreamOwner`` (the TransportLayer), which decides what to answer and when
to close. TLS is the standard library's, through asyncio, with SSL contexts the
caller supplies.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Protocol, cast

from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import FramingError, Keepalive, StreamFramer
from sbc.transport.base import (
    MAX_WRITE_BUFFER,
    Flow,
    Transport,
    format_hostport,
    normalize_host,
)

logger = logging.getLogger(__name__)

#: What a connection hands its owner: a framing failure arrives as the ParseError
#: it carries, with ``close`` set.
StreamEvent = Request | Response | Keepalive | ParseError


class StreamOwner(Protocol):
    """What a StreamConnection reports to."""

    def connection_made(self, connection: StreamConnection) -> bool:
        """Admit a new connection; False closes it at once."""
        ...

    def stream_event(self, connection: StreamConnection, event: StreamEvent) -> None: ...

    def connection_lost(self, connection: StreamConnection, exc: Exception | None) -> None: ...


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, inbound (``listener`` set) or outbound."""

    def __init__(
        self,
        owner: StreamOwner,
        transport: Transport,
        connection_id: int,
        listener: StreamListener | None = None,
    ) -> None:
        self._owner = owner
        self._kind = transport
        self.id = connection_id
        self.listener = listener
        self._transport: asyncio.Transport | None = None
        self._framer = StreamFramer()
        self._flow: Flow | None = None
        self._closing = False
        self._closed = asyncio.get_running_loop().create_future()
        self.last_activity = asyncio.get_running_loop().time()

    def __repr__(self) -> str:
        return f"<StreamConnection {self._flow or self.id}>"

    @property
    def transport(self) -> Transport:
        return self._kind

    @property
    def outbound(self) -> bool:
        return self.listener is None

    @property
    def flow(self) -> Flow:
        """The connection's flow; only valid once connected."""
        assert self._flow is not None, "connection not made yet"
        return self._flow

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._closing

    def _touch(self) -> None:
        self.last_activity = asyncio.get_running_loop().time()

    # -- writing and closing ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes; raises OSError if closed, or aborts if the peer does not read."""
        transport = self._transport
        if transport is None or self._closing:
            raise OSError(f"connection {self.id} is closed")
        if transport.get_write_buffer_size() + len(data) > MAX_WRITE_BUFFER:
            self.abort()
            raise OSError(f"connection {self.id}: peer is not reading, aborted")
        transport.write(data)
        self._touch()

    def close(self) -> None:
        """Flush what is queued, then close (TLS: with close_notify)."""
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.close()

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if self.listener is not None:
            local = (self.listener.host, self.listener.port)
        else:
            local = transport.get_extra_info("sockname")
        self._flow = Flow(
            self._kind,
            normalize_host(local[0]),
            local[1],
            normalize_host(peer[0]),
            peer[1],
            self.id,
        )
        self._touch()
        if not self._owner.connection_made(self):
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._touch()
        for item in self._framer.feed(data):
            self._owner.stream_event(self, item.error if isinstance(item, FramingError) else item)
            if self._closing:
                break

    def eof_received(self) -> bool | None:
        # The peer half-closed: SIP has no use for a half-open connection.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closing = True
        if not self._closed.done():
            self._closed.set_result(None)
        self._owner.connection_lost(self, exc)


ConnectionFactory = Callable[["StreamListener | None"], StreamConnection]


class StreamListener:
    """A TCP or TLS server socket bound to one address."""

    def __init__(
        self,
        transport: Transport,
        host: str,
        port: int,
        factory: ConnectionFactory,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 5.0,
    ) -> None:
        if (transport is Transport.TLS) != (ssl_context is not None):
            raise ValueError("a TLS listener needs an SSL context, a TCP listener none")
        self._kind = transport
        self._host = host
        self._port = port
        self._factory = factory
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout
        self._server: asyncio.Server | None = None

    @property
    def transport(self) -> Transport:
        return self._kind

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def __repr__(self) -> str:
        return f"<StreamListener {self._kind.value} {format_hostport(self._host, self._port)}>"

    async def start(self) -> None:
        """Bind and listen; raises OSError if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._factory(self),
            self._host,
            self._port,
            ssl=self._ssl,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl else None,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        logger.info(
            "- listening on %s %s", self._kind.value, format_hostport(self._host, self._port)
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()


async def connect(
    factory: ConnectionFactory,
    transport: Transport,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout: float,
) -> StreamConnection:
    """Open an outbound connection, TLS handshake included, within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    if transport is Transport.TLS:
        if ssl_context is None:
            raise OSError("no client SSL context for outgoing TLS")
        coro = loop.create_connection(
            lambda: factory(None),
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
    else:
        coro = loop.create_connection(lambda: factory(None), host, port)
    _, protocol = await asyncio.wait_for(coro, timeout)
    return protocol
