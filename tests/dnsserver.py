"""A tiny authoritative DNS server on 127.0.0.1 for resolver tests.

Serves one zone given as master-file text over UDP on an ephemeral port, records
every question it is asked, and can answer SERVFAIL, stay silent, or answer late
for chosen (name, type) pairs. SRV answers carry the targets' A/AAAA records in
the additional section unless `srv_additional` is false. Never use it for anything
but tests: there is no TCP, no CNAME chasing, no delegation.
"""

from __future__ import annotations

import asyncio
import enum
from types import TracebackType
from typing import cast

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone


class Misbehaviour(enum.Enum):
    """How to fail a question instead of answering it from the zone."""

    SERVFAIL = "servfail"
    DROP = "drop"


def _key(name: str, rdtype: str) -> tuple[str, str]:
    return name.rstrip(".").lower(), rdtype.upper()


class DnsTestServer(asyncio.DatagramProtocol):
    """`async with DnsTestServer(zone_text) as server:` then ask 127.0.0.1:server.port."""

    def __init__(
        self, zone_text: str, origin: str = "example.com.", *, srv_additional: bool = True
    ) -> None:
        self.zone = dns.zone.from_text(
            zone_text, origin=origin, relativize=False, check_origin=False
        )
        self.srv_additional = srv_additional
        self.queries: list[tuple[str, str]] = []
        self._misbehaviour: dict[tuple[str, str], Misbehaviour] = {}
        self._delay: dict[tuple[str, str], float] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self.port = 0

    def servfail(self, name: str, rdtype: str) -> None:
        """Answer SERVFAIL to `name`/`rdtype`."""
        self._misbehaviour[_key(name, rdtype)] = Misbehaviour.SERVFAIL

    def drop(self, name: str, rdtype: str) -> None:
        """Never answer `name`/`rdtype`."""
        self._misbehaviour[_key(name, rdtype)] = Misbehaviour.DROP

    def delay(self, name: str, rdtype: str, seconds: float) -> None:
        """Answer `name`/`rdtype` only after `seconds`."""
        self._delay[_key(name, rdtype)] = seconds

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """Questions received, optionally only for one name and/or type."""
        return sum(
            1
            for qname, qtype in self.queries
            if (name is None or qname == _key(name, "")[0])
            and (rdtype is None or qtype == rdtype.upper())
        )

    async def __aenter__(self) -> DnsTestServer:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return
        key = _key(question.name.to_text(), dns.rdatatype.to_text(question.rdtype))
        self.queries.append(key)
        misbehaviour = self._misbehaviour.get(key)
        if misbehaviour is Misbehaviour.DROP:
            return
        response = dns.message.make_response(query)
        if misbehaviour is Misbehaviour.SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            self._answer(response, question.name, question.rdtype)
        wire = response.to_wire()
        delay = self._delay.get(key)
        assert self._transport is not None
        if delay is None:
            self._transport.sendto(wire, addr)
        else:
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(delay, self._transport.sendto, wire, addr))

    def _answer(
        self, response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        node = self.zone.get_node(name)
        if node is None:
            # An empty non-terminal (a name with only names below it) exists: NODATA.
            if not any(owner.is_subdomain(name) for owner in self.zone.nodes):
                response.set_rcode(dns.rcode.NXDOMAIN)
            return
        rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
        if rdataset is None:
            return
        response.answer.append(dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset)))
        if rdtype != dns.rdatatype.SRV or not self.srv_additional:
            return
        for srv in rdataset:
            target = self.zone.get_node(srv.target)
            for address_type in (dns.rdatatype.A, dns.rdatatype.AAAA):
                found = target and target.get_rdataset(dns.rdataclass.IN, address_type)
                if found:
                    response.additional.append(
                        dns.rrset.from_rdata_list(srv.target, found.ttl, list(found))
                    )
