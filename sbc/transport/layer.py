"""The TransportLayer: owns the listeners and connections, and speaks RFC 3261 18.

Inbound, it parses every datagram and framed stream message with the core, stamps
``received``/``rport`` on requests (RFC 3261 18.2.1, RFC 3581 4), answers requests
that fail to parse with a stateless error response, drops responses that fail to
parse, and hands everything else to the one MessageHandler with the Flow it came
on. Outbound, it sends responses the way RFC 3261 18.2.2 says (back over the
request's connection when there is one), telling the caller of one that cannot be
sent (17.2.4), and requests to a Destination, reusing an open TCP/TLS connection to
it when there is one. A TLS connection is reused only under the name its server
certificate was verified against (RFC 5922 4): two trunks by different names on one
address get a connection, and a check, each. It counts every drop.

``max_connections`` bounds every TCP/TLS connection at once, whichever side opened
it, connects under way included: each holds a descriptor, and a peer that can make
the SBC connect out (3xx Contacts, REFER targets, a Via sent-by for a response)
must not exhaust them. Beyond it, accepted connections are closed at once and a
send that needs a new one fails as a failed connect does.

TLS listeners admit each handshake by source address (HandshakeLimiter), and with
mutual TLS close a connection whose client certificate is not a trusted one; the
certificate a peer presented rides on its Flow.

The end of every TCP/TLS connection the layer admitted is reported once to
``on_closed`` with the connection's Flow, whatever ended it (the peer, an error, the
idle sweep, a framing error, ``stop``): what was registered over it (RFC 5626 flows)
can no longer be reached that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Callable, Mapping

from sbc.burst import BurstLog
from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import Keepalive, parse_message
from sbc.transport.admission import Admission, HandshakeLimiter
from sbc.transport.base import (
    Destination,
    Flow,
    ListenAddress,
    Listener,
    MessageHandler,
    Stat,
    Transport,
    TransportConfig,
    TransportError,
    TransportStats,
    error_response,
    format_hostport,
    ip_literal,
    is_forbidden_destination,
    is_reliable,
    is_stun,
    normalize_host,
    response_target,
    stamp_via,
    stun_binding_response,
)
from sbc.transport.certificates import ServerTls
from sbc.transport.stream import StreamConnection, StreamEvent, StreamListener, connect
from sbc.transport.udp import UdpListener

logger = logging.getLogger(__name__)

#: Transport, remote address, remote port, and the name a TLS server there was
#: verified against (None: TCP, inbound, or the address itself was verified).
_ConnectionKey = tuple[Transport, str, int, str | None]

#: Longest Request-URI or reason shown in a log line.
_LOG_TEXT = 96
#: Seconds between the log lines of UDP sends the kernel refused (one per burst).
SEND_FAILURE_LOG_INTERVAL = 10.0


def _summary(message: Request | Response) -> str:
    if isinstance(message, Request):
        return f"{message.method} {message.raw_uri[:_LOG_TEXT]}"
    return f"{message.status} {message.reason[:_LOG_TEXT]}"


class TransportLayer:
    """UDP, TCP and TLS listeners and connections around one MessageHandler.

    ``server_ssl`` is required when a TLS listener is configured (a ServerTls
    follows its reloads); ``listener_tls`` gives single TLS listeners their own (a
    realm's certificate and mutual TLS policy). ``client_ssl`` is used for outgoing
    TLS connections (``set_client_ssl`` replaces it). The handler is called
    synchronously from the event loop; it must not block. ``on_error``, when given,
    is told of every message that failed to parse (the edge firewall counts them
    per source); it must not block either. ``on_closed``, when given, is told once of
    each admitted TCP/TLS connection that closed, with its Flow (``connection_id``
    set); it is called synchronously from ``connection_lost`` and must not block.
    """

    def __init__(
        self,
        config: TransportConfig,
        handler: MessageHandler,
        *,
        server_ssl: ssl.SSLContext | ServerTls | None = None,
        client_ssl: ssl.SSLContext | None = None,
        listener_tls: Mapping[ListenAddress, ServerTls] | None = None,
        on_error: Callable[[ParseError, Flow], None] | None = None,
        on_closed: Callable[[Flow], None] | None = None,
    ) -> None:
        self._config = config
        self._handler = handler
        self._on_error = on_error
        self._on_closed = on_closed
        if isinstance(server_ssl, ssl.SSLContext):
            server_ssl = ServerTls.fixed(server_ssl)
        self._server_ssl = server_ssl
        self._listener_tls = dict(listener_tls or {})
        self._client_ssl = client_ssl
        limit = config.handshake_limit
        self.handshakes = HandshakeLimiter(limit) if limit is not None else None
        self.stats = TransportStats()
        self._send_failure_log = BurstLog(SEND_FAILURE_LOG_INTERVAL)
        self._listeners: list[UdpListener | StreamListener] = []
        self._connections: dict[int, StreamConnection] = {}
        self._by_remote: dict[_ConnectionKey, StreamConnection] = {}
        self._connecting: dict[_ConnectionKey, asyncio.Task[StreamConnection]] = {}
        self._ids = itertools.count(1)
        self._inbound = 0
        #: Outbound connections made (registered); those still connecting are the
        #: tasks in ``_connecting``.
        self._outbound = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[bool]] = set()
        self._running = False
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """Every listener, in configuration order, with its real port once started."""
        return tuple(self._listeners)

    @property
    def bound(self) -> bool:
        """True while the layer runs and every listener is up: the health check."""
        return self._running and all(listener.is_serving for listener in self._listeners)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _connections_held(self) -> int:
        """Descriptors held against ``max_connections``: connections made either way
        and connects under way. A connect's task outlives its connection's
        ``connection_made`` by a loop turn or two, when it counts twice: never less."""
        return self._inbound + self._outbound + len(self._connecting)

    async def start(self) -> None:
        """Bind every listener and start the idle sweep.

        Raises OSError (nothing left bound) if any address cannot be bound, and
        ValueError if a TLS listener is configured without ``server_ssl``.
        """
        if self._running:
            raise RuntimeError("transport layer already started")
        listen = self._config.listen
        if any(self._tls_for(a) is None for a in listen if a.transport is Transport.TLS):
            raise ValueError("a TLS listener needs server_ssl")
        self._stopping = False
        try:
            for address in listen:
                listener: UdpListener | StreamListener
                if address.transport is Transport.UDP:
                    listener = UdpListener(address.host, address.port, self)
                else:
                    listener = StreamListener(
                        address.transport,
                        address.host,
                        address.port,
                        self._new_connection(address.transport),
                        self._tls_for(address),
                        self._config.connect_timeout,
                        gate=self,
                    )
                self._listeners.append(listener)
                await listener.start()
        except OSError as exc:
            logger.error("x cannot bind %s: %s", address, exc)
            for opened in self._listeners:
                opened.close()
            self._listeners.clear()
            raise
        self._running = True
        self._sweeper = asyncio.create_task(self._sweep(), name="sbc-transport-idle-sweep")

    async def stop(self) -> None:
        """Close listeners and connections; connections get ``close_timeout`` to flush."""
        if not self._running:
            return
        self._running = False
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for listener in self._listeners:
            listener.close()
        for task in list(self._connecting.values()):
            task.cancel()
        connections = list(self._connections.values())
        for connection in connections:
            connection.close()
        timeout = self._config.close_timeout
        if connections:
            waits = [asyncio.create_task(c.wait_closed()) for c in connections]
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for waiter in pending:
                waiter.cancel()
            for connection in connections:
                if connection.is_open or connection.id in self._connections:
                    connection.abort()
        for listener in self._listeners:
            if isinstance(listener, StreamListener):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.wait_closed(), timeout)
        # Let the datagram transports run connection_lost before we return.
        await asyncio.sleep(0)
        logger.info("- transport layer stopped")

    def set_client_ssl(self, context: ssl.SSLContext) -> None:
        """Use ``context`` for outgoing TLS connections opened from now on (renewed
        files after a reload); established connections keep their own."""
        self._client_ssl = context

    def _new_connection(self, transport: Transport, tls_name: str | None = None) -> _Factory:
        return _Factory(self, transport, tls_name)

    def _tls_for(self, address: ListenAddress) -> ServerTls | None:
        if address.transport is not Transport.TLS:
            return None
        return self._listener_tls.get(address, self._server_ssl)

    # -- choosing a socket ------------------------------------------------------------

    def listener_for(self, destination: Destination) -> Listener | None:
        """The listener whose address belongs in the Via of a request to ``destination``.

        The first one of the destination's transport and address family, else a
        dual-stack one (bound to ``::``) for an IPv4 destination.
        """
        address = ip_literal(destination.host)
        version = 4 if address is None else address.version
        fallback: Listener | None = None
        for listener in self._listeners:
            if listener.transport is not destination.transport:
                continue
            local = ip_literal(listener.host)
            if local is None or local.version == version:
                return listener
            if fallback is None and version == 4 and local.is_unspecified:
                fallback = listener
        return fallback

    def _udp_listener(self, flow: Flow | None, host: str) -> UdpListener | None:
        if flow is not None:
            for listener in self._listeners:
                if (
                    isinstance(listener, UdpListener)
                    and listener.port == flow.local_port
                    and normalize_host(listener.host) == flow.local_host
                ):
                    return listener
        found = self.listener_for(Destination(Transport.UDP, host, 0))
        return found if isinstance(found, UdpListener) else None

    # -- sending ----------------------------------------------------------------------

    async def send_response(self, response: Response, flow: Flow) -> bool:
        """Send a response to a request that arrived on ``flow``; False if it was dropped.

        RFC 3261 18.2.2: over TCP/TLS, back over the request's connection while it
        is open, else over a connection to ``received`` (or sent-by) and the sent-by
        port. Over UDP, to ``received`` and ``rport`` (RFC 3581 4), else sent-by.
        Never to a broadcast, multicast or unspecified address or port 0.
        """
        sent = self._send_response_now(response, flow)
        if sent is not None:
            return sent
        host, port = response_target(response, flow.transport)
        try:
            connection = await self._connection_to(flow.transport, host, port, None)
        except TransportError:
            return False
        return self._write(connection, bytes(response), response)

    def send_response_nowait(
        self,
        response: Response,
        flow: Flow,
        on_failure: Callable[[], object] | None = None,
    ) -> None:
        """Send at once when the route is open (UDP, or the request's connection);
        only a response that needs a new connection waits for it, in a task.

        Sending at once keeps order with whatever the caller does next, such as a
        framing error closing the connection the response must go out on.

        ``on_failure`` is called if the response cannot be sent (RFC 3261 17.2.4: the
        TU is told of a transport error): before this returns when that is known at
        once, else when the new connection fails. What goes wrong once the bytes are
        the kernel's (a UDP ICMP error, a reset connection) is not known here.
        """
        sent = self._send_response_now(response, flow)
        if sent is None:
            coroutine = self._send_response_later(response, flow, on_failure)
            task = asyncio.get_running_loop().create_task(coroutine)
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        elif not sent and on_failure is not None:
            on_failure()

    async def _send_response_later(
        self, response: Response, flow: Flow, on_failure: Callable[[], object] | None
    ) -> bool:
        if await self.send_response(response, flow):
            return True
        if on_failure is not None:
            try:
                on_failure()
            except Exception:
                logger.exception("x failure handler failed on %s to %s", _summary(response), flow)
        return False

    def _send_response_now(self, response: Response, flow: Flow) -> bool | None:
        """Send without waiting: True/False once sent/dropped, None if a new
        connection is needed first."""
        transport = flow.transport
        if is_reliable(transport) and flow.connection_id is not None:
            connection = self._connections.get(flow.connection_id)
            if connection is not None and connection.is_open:
                return self._write(connection, bytes(response), response)
        try:
            host, port = response_target(response, transport)
        except ParseError as exc:
            logger.warning("x no route for %s: %s", _summary(response), exc)
            self.stats.incr(Stat.SEND_FAILURES)
            return False
        if is_forbidden_destination(host, port):
            where = format_hostport(host, port)
            logger.warning("x dropped %s to forbidden %s", _summary(response), where)
            self.stats.incr(Stat.FORBIDDEN_DESTINATIONS)
            return False
        if ip_literal(host) is None:
            # Always an IP here after stamp_via; a name would need RFC 3263 5.
            logger.warning("x dropped %s: %r is not an IP address", _summary(response), host)
            self.stats.incr(Stat.SEND_FAILURES)
            return False
        if is_reliable(transport):
            return None
        data = bytes(response)
        return self._send_datagram(self._udp_listener(flow, host), data, host, port, response)

    async def send_request(
        self,
        request: Request,
        destination: Destination | tuple[Transport, str, int],
        *,
        server_hostname: str | None = None,
        local_host: str | None = None,
    ) -> Flow:
        """Send a request to an IP destination; returns the Flow it went out on.

        Over TCP/TLS an open connection to the same address and port is reused,
        else one is opened within ``connect_timeout`` from ``local_host`` (a realm's
        address; default: the kernel's choice); ``server_hostname`` is what TLS
        verifies and asks for by SNI (default: the destination's ``tls_name``, RFC
        5922 4, else the address). Over TLS with a name to verify, only a
        connection the SBC opened and verified under that same name is reused;
        without one (the address is verified), any open connection verified under
        no name is, whichever side opened it (RFC 5923-style reuse of a peer's
        connection). Raises TransportError if it cannot be sent (RFC 3261 8.1.3.1:
        the TU sees a 503).
        """
        if not isinstance(destination, Destination):
            destination = Destination(*destination)
        if server_hostname is None:
            server_hostname = destination.tls_name
        host, port = normalize_host(destination.host), destination.port
        transport = destination.transport
        if ip_literal(host) is None:
            raise TransportError(f"{destination}: not an IP address; resolve it first")
        if is_forbidden_destination(host, port):
            self.stats.incr(Stat.FORBIDDEN_DESTINATIONS)
            raise TransportError(f"{destination}: forbidden destination")
        data = bytes(request)
        if is_reliable(transport):
            connection = await self._connection_to(
                transport, host, port, server_hostname, local_host
            )
            if not self._write(connection, data, request):
                raise TransportError(f"{destination}: write failed")
            return connection.flow
        listener = self._udp_listener(None, host)
        if not self._send_datagram(listener, data, host, port, request):
            raise TransportError(f"{destination}: no usable UDP listener")
        assert listener is not None
        return Flow(Transport.UDP, normalize_host(listener.host), listener.port, host, port)

    def _write(
        self, connection: StreamConnection, data: bytes, message: Request | Response
    ) -> bool:
        try:
            connection.write(data)
        except OSError as exc:
            logger.warning("x %s to %s: %s", _summary(message), connection.flow, exc)
            self.stats.incr(Stat.SEND_FAILURES)
            return False
        self.stats.incr(Stat.MESSAGES_OUT)
        logger.debug("> %s to %s (%d bytes)", _summary(message), connection.flow, len(data))
        return True

    def _send_datagram(
        self,
        listener: UdpListener | None,
        data: bytes,
        host: str,
        port: int,
        message: Request | Response,
    ) -> bool:
        if listener is None:
            logger.warning("x %s to udp %s:%s: no UDP listener", _summary(message), host, port)
            self.stats.incr(Stat.SEND_FAILURES)
            return False
        try:
            listener.send(data, host, port)
        except OSError as exc:
            logger.warning("x %s to udp %s:%s: %s", _summary(message), host, port, exc)
            self.stats.incr(Stat.SEND_FAILURES)
            return False
        self.stats.incr(Stat.MESSAGES_OUT)
        logger.debug("> %s to udp %s:%s (%d bytes)", _summary(message), host, port, len(data))
        return True

    async def _connection_to(
        self,
        transport: Transport,
        host: str,
        port: int,
        server_hostname: str | None,
        local_host: str | None = None,
    ) -> StreamConnection:
        """An open connection to host:port, reused if there is one, else a new one.

        Reuse needs the same verified TLS name (see ``_verified_name``) as well.
        """
        key = (transport, host, port, self._verified_name(transport, server_hostname))
        existing = self._by_remote.get(key)
        if existing is not None and existing.is_open:
            return existing
        if not self._running:
            raise TransportError("transport layer is not running")
        task = self._connecting.get(key)
        if task is None:
            held = self._connections_held()
            if held >= self._config.max_connections:
                self.stats.incr(Stat.CONNECTS_REFUSED)
                logger.info(
                    "x not connecting %s %s:%s: %d connections", transport.value, host, port, held
                )
                raise TransportError(
                    f"cannot connect to {transport.value} {format_hostport(host, port)}:"
                    f" {held} connections open"
                )
            # One connect per destination at a time: concurrent sends share it.
            task = asyncio.create_task(
                self._connect(transport, host, port, server_hostname, key[3], local_host)
            )
            self._connecting[key] = task
            task.add_done_callback(lambda done: self._connect_done(key, done))
        return await asyncio.shield(task)

    def _verified_name(self, transport: Transport, server_hostname: str | None) -> str | None:
        """The name a TLS connection opened now verifies the server against.

        None for TCP, when the address itself is verified (no name, or an IP
        literal given as one), and when the client context checks no names at
        all (``verify_server: false``): nothing is proven then, and destinations
        that differ only in name may share a connection as before.
        """
        if transport is not Transport.TLS or server_hostname is None:
            return None
        if ip_literal(server_hostname) is not None:
            return None
        if self._client_ssl is not None and not self._client_ssl.check_hostname:
            return None
        return normalize_host(server_hostname)

    def _connect_done(self, key: _ConnectionKey, task: asyncio.Task[StreamConnection]) -> None:
        if self._connecting.get(key) is task:
            del self._connecting[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so no "never retrieved" warning

    async def _connect(
        self,
        transport: Transport,
        host: str,
        port: int,
        server_hostname: str | None,
        tls_name: str | None,
        local_host: str | None = None,
    ) -> StreamConnection:
        try:
            connection = await connect(
                self._new_connection(transport, tls_name),
                transport,
                host,
                port,
                ssl_context=self._client_ssl,
                server_hostname=server_hostname,
                timeout=self._config.connect_timeout,
                local_host=local_host,
            )
        except OSError as exc:
            self.stats.incr(Stat.CONNECT_FAILURES)
            logger.warning("x connect %s %s:%s: %s", transport.value, host, port, exc or "timeout")
            raise TransportError(f"cannot connect to {transport.value} {host}:{port}") from exc
        if not connection.is_open:
            raise TransportError(f"connection to {transport.value} {host}:{port} closed")
        return connection

    # -- idle sweep -------------------------------------------------------------------

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.effective_sweep_interval
        while self._running:
            await asyncio.sleep(interval)
            self.close_idle(loop.time())

    def hold_open(self, connection_id: int, seconds: float) -> None:
        """Keep connection ``connection_id`` from the idle sweep for ``seconds`` more
        (the longest hold asked wins): a phone registered over it can be reached
        only over it (RFC 5626 3.3, RFC 3261 18.2.2), and many send nothing between
        registrations. Idle time counts again once the hold is over. No-op for a
        connection that is gone."""
        connection = self._connections.get(connection_id)
        if connection is None:
            return
        until = asyncio.get_running_loop().time() + seconds
        connection.held_until = max(connection.held_until, until)

    def close_idle(self, now: float) -> int:
        """Close connections idle for longer than ``idle_timeout``, or whose message has
        been arriving for longer than ``message_timeout``, at loop time ``now``; abort
        those still closing ``close_timeout`` after they were closed. Returns how many
        it closed."""
        config = self._config
        closed = 0
        for connection in list(self._connections.values()):
            if connection.closing_since is not None:
                # A peer that does not read keeps close() flushing forever.
                if now - connection.closing_since > config.close_timeout:
                    logger.debug("x aborting %s: still closing", connection.flow)
                    connection.abort()
                    self.stats.incr(Stat.CLOSE_TIMEOUTS)
                continue
            started = connection.message_started
            idle = now - connection.last_activity
            if idle > config.idle_timeout and now >= connection.held_until:
                logger.debug("- closing idle %s", connection.flow)
                self.stats.incr(Stat.IDLE_CLOSED)
            elif started is not None and now - started > config.message_timeout:
                logger.debug("x closing %s: a message still arriving", connection.flow)
                self.stats.incr(Stat.MESSAGE_TIMEOUTS)
            else:
                continue
            connection.close()
            closed += 1
        return closed

    # -- inbound ----------------------------------------------------------------------

    def _deliver(self, message: Request | Response, flow: Flow) -> None:
        if isinstance(message, Request):
            stamp_via(message, flow.remote_host, flow.remote_port)
        self.stats.incr(Stat.MESSAGES_IN)
        logger.debug("< %s from %s", _summary(message), flow)
        try:
            self._handler(message, flow)
        except Exception:
            self.stats.incr(Stat.HANDLER_ERRORS)
            logger.exception("x handler failed on %s from %s", _summary(message), flow)

    def _reject(self, error: ParseError, flow: Flow, connection: StreamConnection | None) -> None:
        """Answer a request that failed to parse, statelessly; drop a response."""
        if self._on_error is not None:
            try:
                self._on_error(error, flow)
            except Exception:
                logger.exception("x parse error observer failed on %s", flow)
        if error.is_response:
            self.stats.incr(Stat.BAD_RESPONSES)
            logger.debug("x dropped unparsable response from %s: %s", flow, error)
            return
        self.stats.incr(Stat.BAD_REQUESTS)
        partial = error.partial
        if isinstance(partial, Request):
            # The answer carries received/rport like any other (RFC 3581 4).
            with contextlib.suppress(ParseError):
                stamp_via(partial, flow.remote_host, flow.remote_port)
        response = error_response(error)
        if response is None:
            self.stats.incr(Stat.UNANSWERABLE)
            logger.debug("x dropped unanswerable request from %s: %s", flow, error)
            return
        logger.debug("x bad request from %s: %s; answering %d", flow, error, response.status)
        if connection is not None:
            sent = self._write(connection, bytes(response), response)
        else:
            try:
                host, port = response_target(response, flow.transport)
            except ParseError:
                host, port = flow.remote_host, flow.remote_port
            if is_forbidden_destination(host, port) or ip_literal(host) is None:
                host, port = flow.remote_host, flow.remote_port
            listener = self._udp_listener(flow, host)
            sent = self._send_datagram(listener, bytes(response), host, port, response)
        if sent:
            self.stats.incr(Stat.ERROR_RESPONSES)

    # -- DatagramSink -----------------------------------------------------------------

    def datagram_received(self, listener: UdpListener, data: bytes, host: str, port: int) -> None:
        flow = Flow(
            Transport.UDP, normalize_host(listener.host), listener.port, normalize_host(host), port
        )
        if not data.strip(b"\r\n"):
            # RFC 5626 4.4.1 is STUN over UDP; a bare CRLF datagram is a NAT keepalive.
            self.stats.incr(Stat.KEEPALIVES)
            return
        if data[0] < 0x40 and is_stun(data):
            # RFC 5626 8: STUN keepalives share the SIP port; Binding requests are answered.
            self.stats.incr(Stat.KEEPALIVES)
            answer = stun_binding_response(data, flow.remote_host, port)
            if answer is not None:
                with contextlib.suppress(OSError):
                    listener.send(answer, flow.remote_host, port)
            return
        try:
            message = parse_message(data)
        except ParseError as exc:
            self._reject(exc, flow, None)
            return
        self._deliver(message, flow)

    def listener_lost(self, listener: UdpListener, exc: Exception | None) -> None:
        if self._running:
            logger.error("x %r lost: %s", listener, exc)

    def send_failed(self, listener: UdpListener, exc: Exception) -> None:
        """A datagram the kernel would not send (no route, a firewall rule, too
        large): counted, and logged once per burst. The transaction that sent it
        learns nothing (UDP) and times out as if the peer were silent."""
        self.stats.incr(Stat.SEND_FAILURES)
        quiet = self._send_failure_log.hit(asyncio.get_running_loop().time())
        if quiet is not None:
            logger.warning(
                "x udp %s: a send failed: %s%s",
                format_hostport(listener.host, listener.port),
                exc,
                f" ({quiet} more since the last report)" if quiet else "",
            )

    # -- HandshakeGate ----------------------------------------------------------------

    def admit_handshake(self, host: str) -> bool:
        if self._stopping:
            return False
        if self.handshakes is None:
            return True
        verdict = self.handshakes.admit(host, asyncio.get_running_loop().time())
        if verdict is Admission.ADMITTED:
            return True
        self.stats.incr(Stat.TLS_HANDSHAKES_REFUSED)
        logger.debug("x refusing a TLS handshake from %s: %s", host, verdict.value)
        return False

    def handshake_done(self, host: str, ok: bool) -> None:
        if self.handshakes is not None:
            self.handshakes.finish(host, asyncio.get_running_loop().time())
        if not ok:
            self.stats.incr(Stat.TLS_HANDSHAKE_FAILURES)

    # -- StreamOwner ------------------------------------------------------------------

    def connection_made(self, connection: StreamConnection) -> bool:
        if self._stopping:
            return False
        if connection.outbound:
            # Its place was taken when the connect began (_connection_to).
            self._outbound += 1
            self.stats.incr(Stat.CONNECTIONS_OPENED)
        else:
            tls = connection.listener.tls if connection.listener is not None else None
            if tls is not None and not tls.admits(connection.peer):
                self.stats.incr(Stat.TLS_PEERS_REJECTED)
                logger.info(
                    "x refusing %s: client certificate %s is not trusted",
                    connection.flow,
                    connection.peer.fingerprint if connection.peer else "missing",
                )
                return False
            held = self._connections_held()
            if held >= self._config.max_connections:
                self.stats.incr(Stat.CONNECTIONS_REFUSED)
                logger.info("x refusing %s: %d connections", connection.flow, held)
                return False
            self._inbound += 1
            self.stats.incr(Stat.CONNECTIONS_ACCEPTED)
        self._connections[connection.id] = connection
        self._by_remote[self._key(connection)] = connection
        name = connection.tls_name
        logger.debug("- connection %s%s", connection.flow, f" verified as {name}" if name else "")
        return True

    def stream_event(self, connection: StreamConnection, event: StreamEvent) -> None:
        flow = connection.flow
        if isinstance(event, Keepalive):
            # RFC 5626 3.5.1: answer a CRLFCRLF ping with a CRLF pong.
            self.stats.incr(Stat.KEEPALIVES)
            with contextlib.suppress(OSError):
                connection.write(b"\r\n")
        elif isinstance(event, ParseError):
            self._reject(event, flow, connection)
            if event.close:
                # RFC 3261 18.3: the stream can no longer be framed.
                self.stats.incr(Stat.FRAMING_ERRORS)
                logger.debug("x closing %s: %s", flow, event)
                connection.close()
        else:
            self._deliver(event, flow)

    @staticmethod
    def _key(connection: StreamConnection) -> _ConnectionKey:
        flow = connection.flow
        return (flow.transport, flow.remote_host, flow.remote_port, connection.tls_name)

    def connection_lost(self, connection: StreamConnection, exc: Exception | None) -> None:
        if self._connections.pop(connection.id, None) is None:
            return  # refused: never counted
        flow = connection.flow
        key = self._key(connection)
        if self._by_remote.get(key) is connection:
            del self._by_remote[key]
        if connection.outbound:
            self._outbound -= 1
        else:
            self._inbound -= 1
        logger.debug("- closed %s%s", flow, f": {exc}" if exc else "")
        # Once per connection: it left _connections above. Refused connections never
        # delivered a message, so nothing can refer to them and they are not reported.
        if self._on_closed is not None:
            try:
                self._on_closed(flow)
            except Exception:
                logger.exception("x close observer failed on %s", flow)


class _Factory:
    """Makes StreamConnections for one transport, numbered by the layer; outbound
    TLS ones know the name they verify before they are made, so the layer files
    them under it."""

    __slots__ = ("_layer", "_tls_name", "_transport")

    def __init__(
        self, layer: TransportLayer, transport: Transport, tls_name: str | None = None
    ) -> None:
        self._layer = layer
        self._transport = transport
        self._tls_name = tls_name

    def __call__(self, listener: StreamListener | None) -> StreamConnection:
        return StreamConnection(
            self._layer,
            self._transport,
            next(self._layer._ids),
            listener,
            tls_name=self._tls_name,
        )
