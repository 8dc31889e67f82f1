"""Realms: named groups of listen sockets, each with its own media address and policy.

A request belongs to the realm of the listener it arrived on; a request the B2BUA
sends into a realm leaves from that realm's listener and names it in Via and Contact.
Values only: the asyncio side maps a ``Hop`` to a socket.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from sbc.sip.headers import header_key
from sbc.transport.base import Destination, Flow, ListenAddress, Transport, normalize_host

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Realm:
    """One realm: its listeners, its media address, the headers it lets in."""

    name: str
    listen: tuple[ListenAddress, ...]
    media_address: IPAddress
    keep_headers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(
        cls,
        name: str,
        listen: Iterable[ListenAddress],
        media_address: str | IPAddress,
        keep_headers: Iterable[str] = (),
    ) -> Realm:
        address = ip_address(media_address) if isinstance(media_address, str) else media_address
        return cls(name, tuple(listen), address, frozenset(header_key(h) for h in keep_headers))

    def keeps(self, header_name: str) -> bool:
        """True when ``header_name`` may cross into this realm (case-insensitive)."""
        return header_key(header_name) in self.keep_headers

    def listener(self, transport: Transport, host: str | None = None) -> ListenAddress | None:
        """The realm's listener for ``transport`` (of ``host``'s address family)."""
        family = None
        if host is not None:
            try:
                family = ip_address(normalize_host(host)).version
            except ValueError:
                family = None
        fallback = None
        for listen in self.listen:
            if listen.transport is not transport:
                continue
            if family is None or ip_address(listen.host).version == family:
                return listen
            fallback = fallback or listen
        return fallback


@dataclass(frozen=True, slots=True)
class Hop:
    """Where a request of the B2BUA goes, and the realm listener it leaves from.

    The transaction layer carries it as the client transaction's destination; the
    asyncio side sends from ``local`` (UDP) to ``destination``.
    """

    realm: str
    local: ListenAddress
    destination: Destination

    def __str__(self) -> str:
        return f"{self.realm}: {self.local} -> {self.destination}"


class RealmTable:
    """The configured realms, by name and by listener."""

    def __init__(self, realms: Iterable[Realm] = ()) -> None:
        self._realms = {realm.name: realm for realm in realms}
        #: The media relay's addresses in every realm: never a peer's media address.
        self.media_addresses = frozenset(realm.media_address for realm in self._realms.values())
        #: Every listener's (host, port), whatever its transport: where a request the
        #: SBC sends would come back to the SBC itself.
        self._own = frozenset(
            (normalize_host(listen.host), listen.port)
            for realm in self._realms.values()
            for listen in realm.listen
        )

    def __len__(self) -> int:
        return len(self._realms)

    def __iter__(self) -> Iterator[Realm]:
        return iter(self._realms.values())

    def get(self, name: str) -> Realm | None:
        return self._realms.get(name)

    def of_flow(self, flow: Flow) -> Realm | None:
        """The realm whose listener received on ``flow`` (None: a realm-less listener).

        An inbound TCP/TLS connection's local end is the listener's address and
        port; an outbound one's is ephemeral, so it matches no realm here and the
        B2BUA recognises its messages by dialog instead.
        """
        for realm in self._realms.values():
            for listen in realm.listen:
                if (
                    listen.transport is flow.transport
                    and normalize_host(listen.host) == flow.local_host
                    and listen.port == flow.local_port
                ):
                    return realm
        return None

    def is_own(self, destination: Destination) -> bool:
        """True when ``destination`` is one of the SBC's own listeners."""
        return (normalize_host(destination.host), destination.port) in self._own

    def hop(self, realm: Realm, destination: Destination) -> Hop | None:
        """The hop to ``destination`` from ``realm``'s listener of that transport."""
        local = realm.listener(destination.transport, destination.host)
        return None if local is None else Hop(realm.name, local, destination)
