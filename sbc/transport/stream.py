"""TCP and TLS: listeners and connections, each connection with its own framer.

A ``StreamConnection`` moves bytes: what arrives goes through the core's
StreamFramer and every item it yields (message, parse error, keepalive) is handed
to the ``StreamOwner`` (the TransportLayer), which decides what to answer and when
to close. TLS is the standard library's, through asyncio, with SSL contexts the
caller supplies.

A TLS listener accepts TCP connections itself and starts each handshake only once
its ``HandshakeGate`` admits the source address: asyncio's own TLS server starts
the handshake before the application learns who is calling.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Final, Protocol, cast

from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import FramingError, Keepalive, StreamFramer
from sbc.transport.base import (
    MAX_WRITE_BUFFER,
    Flow,
    PeerCertificate,
    Transport,
    format_hostport,
    normalize_host,
)
from sbc.transport.certificates import ServerTls, peer_certificate

logger = logging.getLogger(__name__)

#: Pending TCP connections a TLS listener's kernel queue holds (as asyncio's default).
LISTEN_BACKLOG: Final = 100
#: Seconds a TLS listener pauses after accept() fails (out of file descriptors).
ACCEPT_RETRY_DELAY: Final = 0.1
#: Bytes the framer may hold between messages: the start of a CRLFCRLF ping (RFC 5626
#: 3.5.1). More than that is the start of a message, and its deadline runs.
_PING_PREFIX: Final = len(b"\r\n\r\n") - 1

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


class HandshakeGate(Protocol):
    """What a TLS listener asks before it spends a handshake on a source address."""

    def admit_handshake(self, host: str) -> bool:
        """Whether a handshake from ``host`` may start; True obliges ``handshake_done``."""
        ...

    def handshake_done(self, host: str, ok: bool) -> None: ...


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, inbound (``listener`` set) or outbound.

    ``tls_name`` is the host name an outbound TLS connection's server certificate
    was verified against (RFC 5922 4); None for TCP, for inbound connections and
    when the address itself (or nothing) was verified.
    """

    def __init__(
        self,
        owner: StreamOwner,
        transport: Transport,
        connection_id: int,
        listener: StreamListener | None = None,
        *,
        tls_name: str | None = None,
    ) -> None:
        if tls_name is not None and (transport is not Transport.TLS or listener is not None):
            raise ValueError("only an outbound TLS connection verifies a name")
        self._owner = owner
        self._kind = transport
        self.id = connection_id
        self.listener = listener
        self.tls_name = tls_name
        self._transport: asyncio.Transport | None = None
        self._framer = StreamFramer()
        self._flow: Flow | None = None
        self.peer: PeerCertificate | None = None
        self._closing = False
        self._closed = asyncio.get_running_loop().create_future()
        self.last_activity = asyncio.get_running_loop().time()
        #: Loop time the message now in the framer began to arrive; None between
        #: messages. Activity alone does not keep a connection whose message never ends.
        self.message_started: float | None = None
        #: Loop time close() or abort() was called: a peer that does not read keeps a
        #: plain close() flushing forever, so the owner aborts it after a while.
        self.closing_since: float | None = None
        #: Loop time until which the idle sweep leaves the connection open, however
        #: quiet: a phone registered over it is reached over it (``hold_open``).
        self.held_until = 0.0

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
            self._start_closing()
            self._transport.close()

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        if self._transport is not None:
            self._start_closing()
            self._transport.abort()

    def _start_closing(self) -> None:
        self._closing = True
        if self.closing_since is None:
            self.closing_since = asyncio.get_running_loop().time()

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
        if not peer or not local:
            # uvloop has no peername for a connection reset before it was accepted:
            # nobody is left to talk to, and the socket must not leak.
            logger.debug("x connection %d gone before it was made", self.id)
            self.abort()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            tls = self.listener.tls if self.listener is not None else None
            if tls is not None:
                self.peer = tls.identify(der)
            elif der:
                self.peer = peer_certificate(der)
        self._flow = Flow(
            self._kind,
            normalize_host(local[0]),
            local[1],
            normalize_host(peer[0]),
            peer[1],
            self.id,
            self.peer,
        )
        self._touch()
        if not self._owner.connection_made(self):
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._touch()
        framed = False
        for item in self._framer.feed(data):
            framed = True
            self._owner.stream_event(self, item.error if isinstance(item, FramingError) else item)
            if self._closing:
                break
        if self._framer.buffered <= _PING_PREFIX:
            self.message_started = None
        elif framed or self.message_started is None:
            self.message_started = self.last_activity

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
    """A TCP or TLS server socket bound to one address.

    A TLS listener serves ``ssl_context`` (a ServerTls follows its reloads) and
    asks ``gate`` before each handshake.
    """

    def __init__(
        self,
        transport: Transport,
        host: str,
        port: int,
        factory: ConnectionFactory,
        ssl_context: ssl.SSLContext | ServerTls | None = None,
        handshake_timeout: float = 5.0,
        gate: HandshakeGate | None = None,
    ) -> None:
        if (transport is Transport.TLS) != (ssl_context is not None):
            raise ValueError("a TLS listener needs an SSL context, a TCP listener none")
        self._kind = transport
        self._host = host
        self._port = port
        self._factory = factory
        if isinstance(ssl_context, ssl.SSLContext):
            ssl_context = ServerTls.fixed(ssl_context)
        self.tls: ServerTls | None = ssl_context
        self._handshake_timeout = handshake_timeout
        self._gate = gate
        self._server: asyncio.Server | None = None
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[bool]] = set()
        #: Accepted sockets whose handshake task has not run yet: closed here if the
        #: task is cancelled before it takes them.
        self._unstarted: set[socket.socket] = set()

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
        if self._accepting is not None:
            return not self._accepting.done()
        return self._server is not None and self._server.is_serving()

    def __repr__(self) -> str:
        return f"<StreamListener {self._kind.value} {format_hostport(self._host, self._port)}>"

    async def start(self) -> None:
        """Bind and listen; raises OSError if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        if self.tls is not None:
            self._socket = await self._bind(loop)
            self._port = self._socket.getsockname()[1]
            self._accepting = loop.create_task(
                self._accept(self._socket), name=f"sbc-tls-accept-{self._port}"
            )
        else:
            self._server = await loop.create_server(
                lambda: self._factory(self), self._host, self._port
            )
            self._port = self._server.sockets[0].getsockname()[1]
        logger.info(
            "- listening on %s %s", self._kind.value, format_hostport(self._host, self._port)
        )

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        # As asyncio's create_server: SO_REUSEADDR, and an IPv6 socket is IPv6 only.
        infos = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as exc:
                logger.warning("x accept on %r: %s", self, exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            host = normalize_host(address[0])
            if self._gate is not None and not self._gate.admit_handshake(host):
                conn.close()
                continue
            self._unstarted.add(conn)
            task = loop.create_task(self._handshake(conn, host))
            self._handshakes.add(task)
            task.add_done_callback(functools.partial(self._handshake_ended, conn=conn, host=host))

    async def _handshake(self, conn: socket.socket, host: str) -> bool:
        """Run the handshake; on success the connection's protocol takes over."""
        assert self.tls is not None
        # From here on the transport owns the socket, and closes it on failure.
        self._unstarted.discard(conn)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self._factory(self),
                conn,
                ssl=self.tls.context,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except (OSError, ssl.SSLError, EOFError, ValueError) as exc:
            logger.debug("x TLS handshake from %s on %r: %r", host, self, exc)
            return False
        return True

    def _handshake_ended(self, task: asyncio.Task[bool], *, conn: socket.socket, host: str) -> None:
        self._handshakes.discard(task)
        if conn in self._unstarted:
            self._unstarted.discard(conn)
            conn.close()
        ok = not task.cancelled() and task.exception() is None and task.result()
        if self._gate is not None:
            self._gate.handshake_done(host, ok)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._accepting is not None:
            self._accepting.cancel()
        for task in self._handshakes:
            task.cancel()
        if self._socket is not None:
            self._socket.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        if tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)


async def connect(
    factory: ConnectionFactory,
    transport: Transport,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout: float,
    local_host: str | None = None,
) -> StreamConnection:
    """Open an outbound connection, TLS handshake included, within ``timeout`` seconds.

    ``local_host`` binds the source address (a realm's listener address): without it
    the kernel picks one from its routes, which may belong to another realm.
    """
    loop = asyncio.get_running_loop()
    local_addr = None if local_host is None else (local_host, 0)
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
            local_addr=local_addr,
        )
    else:
        coro = loop.create_connection(lambda: factory(None), host, port, local_addr=local_addr)
    _, protocol = await asyncio.wait_for(coro, timeout)
    return protocol
