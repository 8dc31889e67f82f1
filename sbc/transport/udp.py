"""The UDP listener: one bound datagram socket, datagrams in and out, nothing else.

Every datagram is handed as bytes, with its source, to a ``DatagramSink`` (the
TransportLayer), which parses it with the core; sends go out of the same socket so
that a response leaves from the address and port its request was sent to
(RFC 3581 4: the NAT binding only lets that pair back in).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import Any, Protocol, cast

from sbc.transport.base import Transport, format_hostport, ip_literal

logger = logging.getLogger(__name__)


class DatagramSink(Protocol):
    """What a UdpListener reports to."""

    def datagram_received(
        self, listener: UdpListener, data: bytes, host: str, port: int
    ) -> None: ...

    def listener_lost(self, listener: UdpListener, exc: Exception | None) -> None: ...

    def send_failed(self, listener: UdpListener, exc: Exception) -> None: ...


@functools.lru_cache(maxsize=4096)
def _send_target(host: str, family: int) -> str:
    """The address text sendto() gets for ``host`` on a socket of ``family``."""
    address = ip_literal(host)
    if address is None:
        return host
    if family == socket.AF_INET6 and address.version == 4:
        # A dual-stack socket bound to "::" reaches IPv4 peers as v4-mapped.
        return f"::ffff:{address}"
    return str(address)


class UdpListener(asyncio.DatagramProtocol):
    """A UDP socket bound to one address; ``port`` is the real one once started."""

    def __init__(self, host: str, port: int, sink: DatagramSink) -> None:
        self._host = host
        self._port = port
        self._sink = sink
        self._transport: asyncio.DatagramTransport | None = None
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._closing = False

    # -- Listener ---------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        return Transport.UDP

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def family(self) -> socket.AddressFamily:
        return self._family

    @property
    def is_serving(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def __repr__(self) -> str:
        return f"<UdpListener {format_hostport(self._host, self._port)}>"

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket; raises OSError if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self._host, self._port), family=self._family
        )
        logger.info("- listening on udp %s", format_hostport(self._host, self._port))

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # -- sending ----------------------------------------------------------------------

    def send(self, data: bytes, host: str, port: int) -> None:
        """Send one datagram; raises OSError if the listener is closed or the send fails."""
        if self._transport is None or self._transport.is_closing():
            raise OSError(f"udp listener {self!r} is closed")
        self._transport.sendto(data, (_send_target(host, self._family), port))

    # -- asyncio.DatagramProtocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Selector loops' datagram transports do not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._sink.datagram_received(self, data, addr[0], addr[1])

    def error_received(self, exc: Exception) -> None:
        # A send the kernel refused (no route, a firewall's EPERM, too large): asyncio
        # reports it here, not to the sender. The sink counts and logs it.
        logger.debug("x udp %s: %s", format_hostport(self._host, self._port), exc)
        self._sink.send_failed(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._closing:
            logger.error("x udp listener %s lost: %s", format_hostport(self._host, self._port), exc)
        self._sink.listener_lost(self, exc)
