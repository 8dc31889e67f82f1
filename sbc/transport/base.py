"""What the transport layer's parts share: flows, destinations, stats, Via rules.

The values here are small and frozen so they can be logged, compared and handed to
the core. The functions at the bottom are the transport rules of RFC 3261 18.2 and
RFC 3581 that need no socket: stamping ``received``/``rport`` on an inbound
request's top Via, choosing where a response goes, refusing destinations no SBC
should ever send to, and building the stateless answer to an unparsable request.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from sbc.sip.errors import ParseError
from sbc.sip.headers import Via, header_key, split_list
from sbc.sip.message import Headers, Message, Request, Response, make_response, new_tag
from sbc.transport.resolver import Transport

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MESSAGE_TIMEOUT",
    "Destination",
    "Flow",
    "HandshakeLimit",
    "ListenAddress",
    "Listener",
    "MessageHandler",
    "PeerCertificate",
    "Stat",
    "Transport",
    "TransportConfig",
    "TransportError",
    "TransportStats",
    "error_response",
    "format_hostport",
    "ip_literal",
    "is_forbidden_destination",
    "is_reliable",
    "is_stun",
    "normalize_host",
    "response_target",
    "stamp_via",
    "stun_binding_response",
]

#: Seconds a TCP/TLS connection may carry nothing before the sweep closes it.
DEFAULT_IDLE_TIMEOUT: Final = 600.0
#: Seconds a TCP/TLS message may take to arrive, first byte to last: 64*T1, RFC 3261
#: Timer B/F. A request still arriving after that has outlived its client transaction;
#: a peer dribbling one byte at a time (slowloris) is closed then, active or not.
DEFAULT_MESSAGE_TIMEOUT: Final = 32.0
#: TCP/TLS connections at once, accepted, opened and being opened alike (each holds a
#: descriptor); beyond, accepted ones are closed at once and new outbound ones refused.
DEFAULT_MAX_CONNECTIONS: Final = 4096
#: Seconds an outgoing connection (TCP connect plus TLS handshake) may take.
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
#: Seconds ``stop()`` waits for connections to flush and close before aborting them.
DEFAULT_CLOSE_TIMEOUT: Final = 2.0
#: Bytes queued for one peer that does not read before its connection is aborted.
MAX_WRITE_BUFFER: Final = 1 << 20

_RELIABLE: Final = frozenset({Transport.TCP, Transport.TLS})


def is_reliable(transport: Transport) -> bool:
    """RFC 3261 18: TCP and TLS are reliable, UDP is not."""
    return transport in _RELIABLE


class TransportError(Exception):
    """A message could not be sent (RFC 3261 8.1.3.1: the TU treats it as a 503)."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listener to open: transport, local IP address and port (0: ephemeral)."""

    transport: Transport
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport.value} {format_hostport(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class HandshakeLimit:
    """How many TLS handshakes one source address may start, counted in userspace.

    The kernel meters (sbc.firewall) cap new connections per source; this caps the
    expensive part behind them, the handshake: ``concurrent`` in flight at once and a
    token bucket of ``burst`` refilled at ``rate`` per second. 0 switches a limit off.
    """

    concurrent: int = 16
    rate: float = 10.0
    burst: int = 20

    def __post_init__(self) -> None:
        if self.concurrent < 0 or self.rate < 0 or self.burst < 0:
            raise ValueError("handshake limits must not be negative")
        if self.rate > 0 and self.burst < 1:
            raise ValueError("a handshake rate needs a burst of at least 1")


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """The knobs of a TransportLayer."""

    listen: tuple[ListenAddress, ...] = ()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    message_timeout: float = DEFAULT_MESSAGE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    #: Seconds between idle sweeps; None derives it from ``idle_timeout``.
    sweep_interval: float | None = None
    #: Per-source TLS handshake limits of the TLS listeners; None: unlimited.
    handshake_limit: HandshakeLimit | None = HandshakeLimit()

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0 or self.message_timeout <= 0:
            raise ValueError("idle_timeout and message_timeout must be positive")
        if self.max_connections < 0:
            raise ValueError("max_connections must not be negative")
        if self.connect_timeout <= 0 or self.close_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.sweep_interval is not None and self.sweep_interval <= 0:
            raise ValueError("sweep_interval must be positive")

    @property
    def effective_sweep_interval(self) -> float:
        """A quarter of the idle (or message) timeout, at most 5 s: a connection
        outlives it by little."""
        if self.sweep_interval is not None:
            return self.sweep_interval
        return min(self.idle_timeout / 4, self.message_timeout / 4, 5.0)


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The certificate a TLS peer presented: how routing recognises a trunk.

    ``fingerprint`` is the SHA-256 of the DER certificate as ``openssl x509
    -fingerprint -sha256`` prints it (upper-case hex pairs joined by colons);
    ``name`` is the configured trusted client it matched, if any.
    """

    fingerprint: str
    subject: str
    name: str | None = None

    def __str__(self) -> str:
        return self.name or self.subject or self.fingerprint


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a message came from or went out: the core's handle for "reply here".

    ``local_host``/``local_port`` name the listener (or, for an outgoing
    connection, its local end); ``connection_id`` is set for TCP/TLS and lets a
    response go back over the very connection its request arrived on. ``peer`` is
    the certificate a TLS peer presented (inbound: only with mutual TLS).
    """

    transport: Transport
    local_host: str
    local_port: int
    remote_host: str
    remote_port: int
    connection_id: int | None = None
    peer: PeerCertificate | None = None

    def __str__(self) -> str:
        conn = f"#{self.connection_id} " if self.connection_id is not None else ""
        return f"{self.transport.value} {conn}{format_hostport(self.remote_host, self.remote_port)}"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to send a request: what the RFC 3263 resolver hands out (an IP literal).

    ``tls_name`` is the host name a TLS server there must prove it is (RFC 5922 4:
    the domain of the URI the request was routed to, e.g. a trunk gateway's
    configured name); None verifies ``host``, the address itself. It takes part
    in equality: a destination reached under one name is not the same hop as the
    address reached under another (or none).
    """

    transport: Transport
    host: str
    port: int
    tls_name: str | None = None

    def __str__(self) -> str:
        return f"{self.transport.value} {format_hostport(self.host, self.port)}"


class MessageHandler(Protocol):
    """The one consumer of inbound messages: the core's entry point."""

    def __call__(self, message: Request | Response, flow: Flow) -> None: ...


class Listener(Protocol):
    """A bound socket accepting SIP: what ``TransportLayer.listeners`` lists."""

    @property
    def transport(self) -> Transport: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int:
        """The bound port; an ephemeral one once the listener has started."""
        ...

    @property
    def is_serving(self) -> bool: ...


class Stat(enum.Enum):
    """What the transport layer counts; the reasons a message is dropped or refused."""

    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code

    MESSAGES_IN = "messages_in"
    MESSAGES_OUT = "messages_out"
    KEEPALIVES = "keepalives"
    #: Requests that failed to parse (each is answered or counted UNANSWERABLE).
    BAD_REQUESTS = "bad_requests"
    #: Stateless error responses sent to requests that failed to parse.
    ERROR_RESPONSES = "error_responses"
    #: Bad requests with too little to answer (no Via, unreadable start line, ACK).
    UNANSWERABLE = "unanswerable"
    #: Responses that failed to parse: dropped (RFC 3261 18.1.2).
    BAD_RESPONSES = "bad_responses"
    #: Streams closed because they could no longer be framed.
    FRAMING_ERRORS = "framing_errors"
    #: Sends refused: broadcast, multicast, unspecified address or port 0.
    FORBIDDEN_DESTINATIONS = "forbidden_destinations"
    #: Sends that failed: no listener or connection, socket errors, peer not reading.
    SEND_FAILURES = "send_failures"
    HANDLER_ERRORS = "handler_errors"
    CONNECTIONS_ACCEPTED = "connections_accepted"
    CONNECTIONS_OPENED = "connections_opened"
    #: Accepted connections closed at once because max_connections was reached.
    CONNECTIONS_REFUSED = "connections_refused"
    CONNECT_FAILURES = "connect_failures"
    #: Outbound connections not even tried because max_connections was reached: the
    #: send fails as if the connect had (a 503 for a request, RFC 3261 8.1.3.1).
    CONNECTS_REFUSED = "connects_refused"
    IDLE_CLOSED = "idle_closed"
    #: Streams closed because a message took longer than message_timeout to arrive.
    MESSAGE_TIMEOUTS = "message_timeouts"
    #: Closing connections aborted after close_timeout: the peer stopped reading.
    CLOSE_TIMEOUTS = "close_timeouts"
    #: Inbound TLS handshakes refused before they began: per-source limits reached.
    TLS_HANDSHAKES_REFUSED = "tls_handshakes_refused"
    #: Inbound TLS handshakes that failed or timed out (old protocol versions, no
    #: shared cipher, a client certificate that does not verify).
    TLS_HANDSHAKE_FAILURES = "tls_handshake_failures"
    #: Inbound TLS connections closed after the handshake: the client certificate is
    #: not among the trusted ones, or mutual TLS is required and none was sent.
    TLS_PEERS_REJECTED = "tls_peers_rejected"


class TransportStats:
    """Counters by Stat; read by /metrics and the tests."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[Stat, int] = dict.fromkeys(Stat, 0)

    def incr(self, stat: Stat, n: int = 1) -> None:
        self._counts[stat] += n

    def __getitem__(self, stat: Stat) -> int:
        return self._counts[stat]

    def __iter__(self) -> Iterator[tuple[Stat, int]]:
        return iter(self._counts.items())

    def snapshot(self) -> dict[str, int]:
        """The counters by name, a copy."""
        return {stat.value: count for stat, count in self._counts.items()}

    def __repr__(self) -> str:
        nonzero = ", ".join(f"{s.value}={c}" for s, c in self._counts.items() if c)
        return f"<TransportStats {nonzero}>"


# -- addresses ------------------------------------------------------------------------

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Hosts seen recently: a few peers and the SBC's own addresses, asked about dozens of
#: times per call (ipaddress parsing was 8 % of a call's CPU). Bounded, least recent out.
_HOST_CACHE: Final = 4096


@functools.lru_cache(maxsize=_HOST_CACHE)
def ip_literal(host: str) -> _IP | None:
    """The IP address ``host`` spells (brackets allowed, v4-mapped v6 unmapped), or None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=_HOST_CACHE)
def normalize_host(host: str) -> str:
    """Canonical text of a host: IP literals compressed and unbracketed, names lower case."""
    address = ip_literal(host)
    if address is None:
        return host.lower().rstrip(".")
    return str(address)


_LIMITED_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")


def is_forbidden_destination(host: str, port: int) -> bool:
    """True for destinations the SBC never sends to.

    RFC 4475 3.3.10 (bcast): a response must never be sent to 255.255.255.255; the
    SBC does no multicast (RFC 3261 18.2.2 maddr) and nothing goes to an
    unspecified address or to port 0.
    """
    if not 0 < port < 65536:
        return True
    address = ip_literal(host)
    if address is None:
        return False
    return address.is_multicast or address.is_unspecified or address == _LIMITED_BROADCAST


# -- Via rules ------------------------------------------------------------------------


def _replace_top_via(message: Message, via: Via) -> None:
    """Rewrite the first Via value in place, keeping every field where it stood."""
    fields = list(message.headers)
    for index, (name, value) in enumerate(fields):
        if header_key(name) == "via":
            items = split_list(value)
            items[0] = str(via)
            fields[index] = (name, ", ".join(items))
            break
    message.headers = Headers(fields)
    message.invalidate()


def stamp_via(request: Request, source_host: str, source_port: int) -> bool:
    """Record where a request really came from in its top Via; True if it changed.

    RFC 3261 18.2.1: add ``received`` when the sent-by host differs from the source
    address. RFC 3581 4: an ``rport`` without a value gets the source port, and then
    ``received`` is added even when it equals sent-by. A ``received`` the sender
    wrote itself is replaced by the source address: responses go there, and it
    could name anyone. Raises ParseError if the top Via cannot be parsed.
    """
    top = request.via
    source = normalize_host(source_host)
    stamped = top
    force_received = False
    if top.rport == "":
        stamped = stamped.with_param("rport", str(source_port))
        force_received = True
    if force_received or normalize_host(top.received or top.host) != source:
        stamped = stamped.with_param("received", source)
    if stamped == top:
        return False
    _replace_top_via(request, stamped)
    return True


def response_target(response: Response, transport: Transport) -> tuple[str, int]:
    """Where a response goes when no connection carries it (RFC 3261 18.2.2, RFC 3581 4).

    Reliable transports: ``received`` (else the sent-by host) and the sent-by port
    (else the transport's default). Unreliable: a multicast ``maddr`` if present
    (which the send then refuses); else ``received`` (else sent-by) and ``rport`` if
    it has a value, else the sent-by port, else 5060. Raises ParseError if the top
    Via is missing or unparsable.
    """
    via = response.via
    default = transport.default_port
    received = via.received or None
    if is_reliable(transport):
        return normalize_host(received or via.host), via.port or default
    maddr = via.param("maddr")
    # RFC 3261 18.2.2 sends to maddr, an address for multicast, which the SBC does not
    # do. A unicast maddr would let any request aim its responses at a third party.
    if maddr and (address := ip_literal(maddr)) is not None and address.is_multicast:
        return normalize_host(maddr), via.port or default
    rport = via.rport
    port = int(rport) if rport and rport.isdigit() else (via.port or default)
    return normalize_host(received or via.host), port


# -- STUN keepalives ------------------------------------------------------------------

#: RFC 5389 6: the fixed header, its magic cookie, and the messages a keepalive uses.
_STUN_HEADER: Final = 20
_STUN_COOKIE: Final = bytes.fromhex("2112a442")
_STUN_BINDING_REQUEST: Final = bytes.fromhex("0001")
_STUN_BINDING_SUCCESS: Final = bytes.fromhex("0101")
_STUN_XOR_MAPPED_ADDRESS: Final = bytes.fromhex("0020")


def is_stun(data: bytes) -> bool:
    """True for a STUN message (RFC 5389 6): not SIP, whose first byte is a letter.

    The two top bits are zero, the magic cookie follows the length, and the length
    counts the attributes that follow the header exactly.
    """
    return (
        len(data) >= _STUN_HEADER
        and data[0] < 0x40
        and data[4:8] == _STUN_COOKIE
        and int.from_bytes(data[2:4], "big") == len(data) - _STUN_HEADER
    )


def stun_binding_response(data: bytes, host: str, port: int) -> bytes | None:
    """The answer to a STUN Binding request from ``host``:``port``, else None.

    RFC 5626 8: an edge proxy that supports outbound answers the STUN keepalives a UA
    sends to its SIP UDP port; the UA learns from XOR-MAPPED-ADDRESS (RFC 5389 15.2)
    whether its NAT binding changed. Attributes of the request are not looked at.
    """
    if not is_stun(data) or data[:2] != _STUN_BINDING_REQUEST:
        return None
    address = ip_literal(host)
    if address is None:
        return None
    transaction = data[8:_STUN_HEADER]
    # IPv4 is XORed with the cookie, IPv6 with the cookie and the transaction ID.
    mask = _STUN_COOKIE + transaction
    mapped = bytes(a ^ b for a, b in zip(address.packed, mask, strict=False))
    family = b"\x01" if address.version == 4 else b"\x02"
    value = b"\x00" + family + (port ^ 0x2112).to_bytes(2, "big") + mapped
    attribute = _STUN_XOR_MAPPED_ADDRESS + len(value).to_bytes(2, "big") + value
    return (
        _STUN_BINDING_SUCCESS
        + len(attribute).to_bytes(2, "big")
        + _STUN_COOKIE
        + transaction
        + attribute
    )


def error_response(error: ParseError) -> Response | None:
    """The stateless answer to a request that failed to parse, or None to drop it.

    Built from what the parser read (``error.partial``) with the status the error
    carries. Responses are never answered (RFC 3261 18.1.2), nor is ACK (17.2.1),
    nor a request without a Via to send the answer along.
    """
    partial = error.partial
    if error.is_response or not isinstance(partial, Request):
        return None
    if partial.method == "ACK" or not partial.headers.fields("Via"):
        return None
    return make_response(partial, error.status, to_tag=new_tag())
