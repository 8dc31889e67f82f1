"""RFC 3263 server location: turn a SIP target into an ordered list of hops.

The procedure (RFC 3263 section 4):

* numeric IP target: no DNS at all (4.2);
* domain with an explicit port: A/AAAA only (4.2);
* domain with a transport parameter but no port: SRV for that transport (4.2);
* domain with neither: NAPTR (4.1), following "s" records to SRV; without usable
  NAPTR records, SRV for each supported transport; without those, A/AAAA on the
  default port with UDP (TLS for sips URIs).

SRV records are ordered by priority and then by the RFC 2782 weighted random
selection. Every address of every SRV target becomes one `ResolvedTarget`;
`FailoverTargets` hands them out one at a time so the transaction layer can move
on after a timeout or a 503 (RFC 3263 4.3), resolving SRV targets' addresses only
when it gets to them.

DNS answers are cached for their TTL (measured on an injectable clock), in a
bounded LRU; NXDOMAIN and empty answers are cached briefly (RFC 2308).

Some names never reach DNS. `localhost` and every name under it are the loopback
addresses (RFC 6761 6.3) and have no other records. Address lookups for a name in
the hosts file (/etc/hosts) are answered from it, as glibc does with nsswitch
`hosts: files dns`; SRV and NAPTR still go to DNS, and for such a name a DNS
failure or NXDOMAIN there means "no records", so RFC 3263 4.2 falls back to the
file's addresses on the default port.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import itertools
import logging
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

logger = logging.getLogger(__name__)

# RFC 3261 19.1.2 / RFC 3263 4.2: default ports when neither URI nor SRV gives one.
DEFAULT_SIP_PORT = 5060
DEFAULT_SIPS_PORT = 5061

DEFAULT_LIFETIME = 3.0
"""Seconds a single DNS lookup may take, retries included."""
DEFAULT_CACHE_SIZE = 1024
"""Cached DNS answers (name, type) before the least recently used is evicted."""
DEFAULT_NEGATIVE_TTL = 30.0
"""Seconds NXDOMAIN and empty answers are cached (RFC 2308: keep it short)."""
MAX_TTL = 86400.0
"""TTLs above one day are clamped (RFC 2181 8 suggests bounding them)."""
MAX_RECORDS_PER_ANSWER = 32
"""Records taken from one DNS answer; the rest are ignored to bound the work."""
DEFAULT_HOSTS_FILE = "/etc/hosts"
"""Where address lookups look before DNS (hosts(5))."""
HOSTS_CHECK_INTERVAL = 1.0
"""Seconds between checks whether the hosts file changed."""
MAX_HOSTS_FILE_BYTES = 16 << 20
"""Bytes of the hosts file read; the rest (and a line cut short by it) is ignored."""


class Transport(enum.Enum):
    """Transports a SIP target can resolve to."""

    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"

    @property
    def default_port(self) -> int:
        """RFC 3263 4.2: 5061 for TLS, 5060 for everything else."""
        return DEFAULT_SIPS_PORT if self is Transport.TLS else DEFAULT_SIP_PORT

    @classmethod
    def from_param(cls, value: str) -> Transport:
        """Map a URI `transport=` parameter (RFC 3261 19.1.1) to a `Transport`.

        Raises `ValueError` for transports this resolver does not handle (sctp, ws).
        """
        try:
            return cls(value.lower())
        except ValueError:
            raise ValueError(f"unsupported SIP transport {value!r}") from None


class AddressFamilyPolicy(enum.Enum):
    """Which address records to look up, and in which order to try them."""

    BOTH_IPV4_FIRST = "both-ipv4-first"
    BOTH_IPV6_FIRST = "both-ipv6-first"
    IPV4_ONLY = "ipv4-only"
    IPV6_ONLY = "ipv6-only"


class RecordType(enum.Enum):
    """DNS record types used by RFC 3263."""

    A = "A"
    AAAA = "AAAA"
    SRV = "SRV"
    NAPTR = "NAPTR"


_ADDRESS_TYPES: dict[AddressFamilyPolicy, tuple[RecordType, ...]] = {
    AddressFamilyPolicy.BOTH_IPV4_FIRST: (RecordType.A, RecordType.AAAA),
    AddressFamilyPolicy.BOTH_IPV6_FIRST: (RecordType.AAAA, RecordType.A),
    AddressFamilyPolicy.IPV4_ONLY: (RecordType.A,),
    AddressFamilyPolicy.IPV6_ONLY: (RecordType.AAAA,),
}

# RFC 3263 4.1: NAPTR services for SIP, and the transport each one means.
_NAPTR_SERVICES: dict[str, Transport] = {
    "SIPS+D2T": Transport.TLS,
    "SIP+D2T": Transport.TCP,
    "SIP+D2U": Transport.UDP,
}


@dataclass(frozen=True)
class SipTarget:
    """What RFC 3263 needs from a SIP or SIPS URI.

    `host` is a domain name, an IPv4 literal or an IPv6 literal (brackets allowed);
    `transport` is the URI's `transport=` parameter, `secure` is true for sips URIs
    and `maddr` is the URI's `maddr=` parameter, which replaces the host as the
    TARGET (RFC 3263 4).
    """

    host: str
    port: int | None = None
    transport: Transport | None = None
    secure: bool = False
    maddr: str | None = None


@dataclass(frozen=True)
class ResolvedTarget:
    """One next hop: an IP address, port and transport to send the request to.

    ``srv``: the SRV record the hop came from (None without SRV), for a caller that
    keeps the hops and orders them again by priority and weight for each request
    (RFC 2782 selects per request); not part of the hop's identity.
    """

    address: str
    port: int
    transport: Transport
    srv: SrvRecord | None = field(default=None, compare=False)


class ResolutionError(Exception):
    """A SIP target could not be turned into any next hop."""

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(f"cannot resolve SIP target {domain}: {reason}")
        self.domain = domain
        self.reason = reason


class DnsLookupError(Exception):
    """A single DNS lookup failed (SERVFAIL, timeout, bad name); not NXDOMAIN."""


@dataclass(frozen=True)
class SrvRecord:
    """RFC 2782 SRV record data."""

    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True)
class NaptrRecord:
    """RFC 3403 NAPTR record data."""

    order: int
    preference: int
    flags: str
    service: str
    regexp: str
    replacement: str


Rdata = str | SrvRecord | NaptrRecord
"""Address records are their text form; SRV and NAPTR have their own types."""


@dataclass(frozen=True)
class DnsAnswer:
    """The records of one name and type, as one lookup returned them.

    `exists` is false for NXDOMAIN. `additional` holds A/AAAA answers from the
    additional section (RFC 2782 lets SRV responses carry the targets' addresses).
    Names are lower case without the trailing dot.
    """

    name: str
    rdtype: RecordType
    records: tuple[Rdata, ...]
    ttl: float
    exists: bool = True
    additional: tuple[DnsAnswer, ...] = ()


class DnsLookup(Protocol):
    """Answers one DNS question; the resolver's only I/O collaborator."""

    async def query(self, name: str, rdtype: RecordType) -> DnsAnswer:
        """Look `name` up; NXDOMAIN is an answer, failures raise `DnsLookupError`."""
        ...


def _normalise_name(name: str) -> str:
    return name.rstrip(".").lower()


def _name_text(name: dns.name.Name) -> str:
    return "." if name == dns.name.root else _normalise_name(name.to_text())


def _rdata(rdtype: RecordType, rd: Any) -> Rdata:
    if rdtype is RecordType.SRV:
        return SrvRecord(
            priority=int(rd.priority),
            weight=int(rd.weight),
            port=int(rd.port),
            target=_name_text(rd.target),
        )
    if rdtype is RecordType.NAPTR:
        return NaptrRecord(
            order=int(rd.order),
            preference=int(rd.preference),
            flags=bytes(rd.flags).decode("ascii", "replace"),
            service=bytes(rd.service).decode("ascii", "replace"),
            regexp=bytes(rd.regexp).decode("ascii", "replace"),
            replacement=_name_text(rd.replacement),
        )
    return str(rd.address)


class DnspythonLookup:
    """`DnsLookup` over dnspython's asyncio stub resolver.

    With `nameservers=None` the system configuration (/etc/resolv.conf) is used;
    otherwise only the given servers, on `port`, are asked.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        lifetime: float = DEFAULT_LIFETIME,
    ) -> None:
        if nameservers is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = port
        self._resolver.lifetime = lifetime
        self._resolver.timeout = min(self._resolver.timeout, lifetime)
        self._lifetime = lifetime

    async def query(self, name: str, rdtype: RecordType) -> DnsAnswer:
        """Ask the configured servers; see `DnsLookup.query`."""
        what = f"{rdtype.value} lookup for {name}"
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise DnsLookupError(f"{what} failed: invalid domain name ({exc})") from exc
        try:
            answer = await self._resolver.resolve(
                qname, rdtype.value, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return DnsAnswer(_normalise_name(name), rdtype, (), 0.0, exists=False)
        except dns.exception.Timeout as exc:
            raise DnsLookupError(f"{what} timed out after {self._lifetime:g}s") from exc
        except dns.resolver.NoNameservers as exc:
            errors = exc.kwargs.get("errors") or []
            rcodes = sorted({str(error[3]) for error in errors}) or ["no nameserver answered"]
            raise DnsLookupError(f"{what} failed: {', '.join(rcodes)}") from exc
        except dns.exception.DNSException as exc:
            raise DnsLookupError(f"{what} failed: {exc}") from exc
        records: list[Rdata] = []
        if answer.rrset is not None:
            records = [_rdata(rdtype, rd) for rd in list(answer.rrset)[:MAX_RECORDS_PER_ANSWER]]
        additional: list[DnsAnswer] = []
        if rdtype is RecordType.SRV:
            for rrset in answer.response.additional:
                if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    extra_type = RecordType(dns.rdatatype.to_text(rrset.rdtype))
                    additional.append(
                        DnsAnswer(
                            name=_name_text(rrset.name),
                            rdtype=extra_type,
                            records=tuple(
                                _rdata(extra_type, rd)
                                for rd in list(rrset)[:MAX_RECORDS_PER_ANSWER]
                            ),
                            ttl=float(rrset.ttl),
                        )
                    )
        return DnsAnswer(
            name=_normalise_name(name),
            rdtype=rdtype,
            records=tuple(records),
            ttl=float(answer.chaining_result.minimum_ttl) if records else 0.0,
            additional=tuple(additional),
        )


class DnsCache:
    """Bounded LRU of DNS answers, each kept until its TTL runs out on `now`."""

    def __init__(self, max_entries: int, now: Callable[[], float]) -> None:
        if max_entries < 1:
            raise ValueError("DNS cache needs room for at least one entry")
        self._max_entries = max_entries
        self._now = now
        self._entries: OrderedDict[tuple[str, RecordType], tuple[float, DnsAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, rdtype: RecordType) -> DnsAnswer | None:
        """The cached answer, or None if absent or expired."""
        key = (_normalise_name(name), rdtype)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if self._now() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return answer

    def expires_in(self) -> float | None:
        """Seconds until the first cached answer runs out; None if none is left.
        Answers already expired are dropped first (names no longer asked)."""
        now = self._now()
        for key in [key for key, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]
        first = min((expires for expires, _ in self._entries.values()), default=None)
        return None if first is None else first - now

    def put(self, answer: DnsAnswer, ttl: float) -> None:
        """Keep `answer` for `ttl` seconds (clamped to `MAX_TTL`; 0 keeps nothing)."""
        if ttl <= 0:
            return
        key = (answer.name, answer.rdtype)
        self._entries[key] = (self._now() + min(ttl, MAX_TTL), answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


# RFC 6761 6.3: address queries for localhost names get loopback, anything else nothing.
_LOOPBACK: dict[RecordType, tuple[str, ...]] = {
    RecordType.A: ("127.0.0.1",),
    RecordType.AAAA: ("::1",),
}


def is_localhost_name(name: str) -> bool:
    """True for `localhost` and every name under it (RFC 6761 6.3), any case."""
    domain = _normalise_name(name)
    return domain == "localhost" or domain.endswith(".localhost")


HostsTable = dict[str, dict[RecordType, tuple[str, ...]]]
"""Addresses by name (lower case, no trailing dot) and record type, in file order."""


def parse_hosts(text: str) -> HostsTable:
    """Read hosts(5) text: `address name [alias...]` per line.

    Everything from `#` on is a comment; blank lines, lines whose first field is
    not an IP address and lines without a name are skipped. Names are matched
    without case and without a trailing dot; a name listed on several lines has
    every address of every line, once each, in file order.
    """
    found: dict[str, dict[RecordType, list[str]]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        rdtype = RecordType.A if address.version == 4 else RecordType.AAAA
        for name in fields[1:]:
            domain = _normalise_name(name)
            if not domain:
                continue
            addresses = found.setdefault(domain, {}).setdefault(rdtype, [])
            if str(address) not in addresses:
                addresses.append(str(address))
    return {
        name: {rdtype: tuple(addresses) for rdtype, addresses in types.items()}
        for name, types in found.items()
    }


class HostsFile:
    """A hosts file (hosts(5)), re-read when it changes.

    The file is looked at on first use and then at most every `check_interval`
    seconds of `now`; it is read again only when its modification time, size or
    inode changed. A missing or unreadable file has no entries, and is looked for
    again on the same schedule; each problem is logged once (until the file was
    readable in between or the problem changes), never raised.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_HOSTS_FILE,
        now: Callable[[], float] = time.monotonic,
        check_interval: float = HOSTS_CHECK_INTERVAL,
    ) -> None:
        self.path = os.fspath(path)
        self._now = now
        self._check_interval = check_interval
        self._checked: float | None = None
        self._signature: tuple[int, int, int] | None = None
        self._entries: HostsTable = {}
        self._problem: str | None = None

    def addresses(self, name: str, rdtype: RecordType) -> tuple[str, ...] | None:
        """The file's `rdtype` (A or AAAA) addresses of `name`; None if it lacks the name.

        A name the file has only for the other family gets `()`: the file answers
        for the name, as glibc's `files` source does.
        """
        self._refresh()
        types = self._entries.get(_normalise_name(name))
        if types is None:
            return None
        return types.get(rdtype, ())

    def __contains__(self, name: str) -> bool:
        self._refresh()
        return _normalise_name(name) in self._entries

    def _refresh(self) -> None:
        now = self._now()
        if self._checked is not None and now - self._checked < self._check_interval:
            return
        self._checked = now
        try:
            status = os.stat(self.path)
            signature = (status.st_mtime_ns, status.st_size, status.st_ino)
            if signature == self._signature:
                return
            with open(self.path, "rb") as file:
                data = file.read(MAX_HOSTS_FILE_BYTES + 1)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            return
        if len(data) > MAX_HOSTS_FILE_BYTES:
            # Drop the line the limit cut in two along with the rest.
            data = data[:MAX_HOSTS_FILE_BYTES].rpartition(b"\n")[0]
            logger.warning(
                "x %s: only the first %d bytes are used", self.path, MAX_HOSTS_FILE_BYTES
            )
        self._entries = parse_hosts(data.decode("utf-8", "replace"))
        self._signature = signature
        self._problem = None
        logger.debug("- %s: %d names", self.path, len(self._entries))

    def _fail(self, problem: str) -> None:
        self._entries = {}
        self._signature = None
        if problem != self._problem:
            logger.warning("x %s not used: %s", self.path, problem)
            self._problem = problem


def order_srv_records(records: Sequence[SrvRecord], rng: random.Random) -> list[SrvRecord]:
    """Order SRV records the way RFC 2782 ("Usage rules") says clients try them.

    Lowest priority first; within a priority, repeatedly pick a record with
    probability proportional to its weight. Zero-weight records go first in the
    running-sum list so they are chosen only when the random number is 0 (or when
    they are all that is left).
    """
    ordered: list[SrvRecord] = []
    for priority in sorted({record.priority for record in records}):
        # Stable sort: zero weights first, otherwise the published order.
        pool = sorted((r for r in records if r.priority == priority), key=lambda r: r.weight != 0)
        while pool:
            # 0 is the zero-weight records' (RFC 2782's "very small chance"); with
            # none left it would go to the first record too, which then gets one
            # pick more than its weight (weights 1 and 1 shared calls 2:1).
            low = 0 if pool[0].weight == 0 else 1
            pick = rng.randint(low, sum(record.weight for record in pool))
            running = itertools.accumulate(record.weight for record in pool)
            index = next(i for i, total in enumerate(running) if total >= pick)
            ordered.append(pool.pop(index))
    return ordered


def select_naptr_services(
    records: Sequence[NaptrRecord], *, secure: bool, allow_sips_for_sip: bool
) -> list[tuple[NaptrRecord, Transport]]:
    """The NAPTR records RFC 3263 4.1 lets us follow, in the order to follow them.

    Only terminal ("s" flag) records for SIP+D2U, SIP+D2T and SIPS+D2T with an empty
    regexp and a real replacement are kept, sorted by order then preference
    (RFC 3403 4.1). A sips URI MUST discard services other than SIPS+D2T. For a sip
    URI RFC 3263 says SIPS services SHOULD be kept if the client does TLS; this
    resolver drops them unless `allow_sips_for_sip` is set, so a plain sip URI
    never silently becomes a TLS connection.
    """
    selected: list[tuple[NaptrRecord, Transport]] = []
    for record in sorted(records, key=lambda r: (r.order, r.preference)):
        transport = _NAPTR_SERVICES.get(record.service.upper())
        if transport is None or record.flags.lower() != "s":
            continue
        if record.regexp or record.replacement == ".":
            continue
        if (transport is Transport.TLS) != secure and not (
            transport is Transport.TLS and allow_sips_for_sip
        ):
            continue
        selected.append((record, transport))
    return selected


def _srv_name(transport: Transport, domain: str) -> str:
    # RFC 3263 4.2: "_sips" for TLS, "_sip" otherwise; TLS runs over "_tcp".
    if transport is Transport.TLS:
        return f"_sips._tcp.{domain}"
    return f"_sip._{transport.value}.{domain}"


def _ip_literal(host: str) -> str | None:
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _nowhere(address: str) -> bool:
    """True for an address no request can be sent to (RFC 3261 18.2.2: no multicast
    here; unspecified and limited broadcast mean no host)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    return ip.is_unspecified or ip.is_multicast or ip == _BROADCAST


@dataclass(frozen=True)
class _Hop:
    """A host to contact on a port with a transport; addresses may be known already."""

    host: str
    port: int
    transport: Transport
    addresses: tuple[str, ...] | None = None
    srv: SrvRecord | None = None


class SipResolver:
    """Locates SIP servers per RFC 3263 section 4.

    `nameservers`/`port` choose the DNS servers (None: system configuration);
    `lifetime` bounds each lookup; `family` picks A and/or AAAA and their order;
    `rng` drives RFC 2782 weighted selection; `now` is the clock the cache TTLs
    and the hosts file checks run on; `lookup` replaces dnspython entirely (tests,
    other backends). `hosts_file` answers address lookups before DNS (None: no
    file); localhost names never reach DNS (RFC 6761 6.3).
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        *,
        lifetime: float = DEFAULT_LIFETIME,
        family: AddressFamilyPolicy = AddressFamilyPolicy.BOTH_IPV4_FIRST,
        rng: random.Random | None = None,
        now: Callable[[], float] = time.monotonic,
        cache_size: int = DEFAULT_CACHE_SIZE,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        sips_for_sip_uris: bool = False,
        lookup: DnsLookup | None = None,
        hosts_file: str | os.PathLike[str] | None = DEFAULT_HOSTS_FILE,
    ) -> None:
        self._lookup = lookup or DnspythonLookup(nameservers, port, lifetime)
        self._hosts = HostsFile(hosts_file, now) if hosts_file is not None else None
        self._family = family
        self._rng = rng or random.Random()
        self._cache = DnsCache(cache_size, now)
        self._negative_ttl = negative_ttl
        self._sips_for_sip_uris = sips_for_sip_uris

    async def resolve(self, target: SipTarget) -> list[ResolvedTarget]:
        """Every next hop for `target`, in the order to try them.

        Raises `ResolutionError` when there is none.
        """
        return [hop async for hop in self.failover(target)]

    def failover(self, target: SipTarget) -> FailoverTargets:
        """An async iterator over the next hops for `target` (RFC 3263 4.3)."""
        return FailoverTargets(self, target)

    def cache_expires_in(self) -> float | None:
        """Seconds until the first cached DNS answer runs out (its TTL), None with
        nothing cached: when a caller that keeps resolved hops should resolve again."""
        return self._cache.expires_in()

    def _local_answer(self, name: str, rdtype: RecordType) -> DnsAnswer | None:
        """The answer the host itself knows, without DNS or the cache; None if none."""
        domain = _normalise_name(name)
        if is_localhost_name(domain):
            return DnsAnswer(domain, rdtype, _LOOPBACK.get(rdtype, ()), 0.0)
        if self._hosts is None or rdtype not in (RecordType.A, RecordType.AAAA):
            return None
        addresses = self._hosts.addresses(domain, rdtype)
        if addresses is None:
            return None
        return DnsAnswer(domain, rdtype, addresses, 0.0)

    def _known_locally(self, domain: str) -> bool:
        """Whether the host knows `domain`'s addresses: localhost, or in the hosts file."""
        return is_localhost_name(domain) or (self._hosts is not None and domain in self._hosts)

    async def _query(self, name: str, rdtype: RecordType) -> DnsAnswer:
        local = self._local_answer(name, rdtype)
        if local is not None:
            return local
        cached = self._cache.get(name, rdtype)
        if cached is not None:
            return cached
        answer = await self._lookup.query(name, rdtype)
        if answer.records:
            ttl = min([answer.ttl, *(extra.ttl for extra in answer.additional)])
        else:
            ttl = self._negative_ttl
        self._cache.put(answer, ttl)
        return answer

    async def _query_or_error(self, name: str, rdtype: RecordType) -> DnsAnswer | DnsLookupError:
        try:
            return await self._query(name, rdtype)
        except DnsLookupError as exc:
            logger.warning("x %s", exc)
            return exc

    def _transport(self, target: SipTarget) -> Transport | None:
        transport = target.transport
        if target.secure and transport is Transport.TCP:
            # RFC 3261 26.2.2: sips with transport=tcp means TLS over TCP.
            return Transport.TLS
        if target.secure and transport is Transport.UDP:
            raise ResolutionError(target.maddr or target.host, "sips URI cannot use transport udp")
        return transport

    async def _plan(self, target: SipTarget) -> list[_Hop]:
        """RFC 3263 4.1/4.2: the hosts, ports and transports to try, in order."""
        host = target.maddr or target.host
        if not host:
            raise ResolutionError(repr(host), "empty host")
        transport = self._transport(target)
        default_transport = Transport.TLS if target.secure else Transport.UDP
        literal = _ip_literal(host)
        if literal is not None:
            chosen = transport or default_transport
            return [_Hop(literal, target.port or chosen.default_port, chosen, (literal,))]

        domain = _normalise_name(host)
        if target.port is not None:
            return [_Hop(domain, target.port, transport or default_transport)]
        # A name the host knows (hosts file, localhost) exists whatever DNS says, and
        # its addresses are what the operator pinned: when DNS fails or denies it,
        # fall back to them rather than give up.
        local = self._known_locally(domain)
        if transport is not None:
            hops = await self._srv_stage(
                domain, [(_srv_name(transport, domain), transport)], tolerate_failures=local
            )
            return hops if hops is not None else [_Hop(domain, transport.default_port, transport)]

        naptr = await self._query_or_error(domain, RecordType.NAPTR)
        records: list[NaptrRecord] = []
        if isinstance(naptr, DnsLookupError):
            if not local:
                raise ResolutionError(domain, str(naptr))
        elif not naptr.exists:
            if not local:
                raise ResolutionError(domain, "domain does not exist (NXDOMAIN)")
        else:
            records = [r for r in naptr.records if isinstance(r, NaptrRecord)]
        services = select_naptr_services(
            records, secure=target.secure, allow_sips_for_sip=self._sips_for_sip_uris
        )
        if services:
            hops = await self._srv_stage(
                domain,
                [(record.replacement, transport) for record, transport in services],
                tolerate_failures=local,
            )
            if hops is not None:
                return hops
        # RFC 3263 4.1: without NAPTR, query SRV for each transport we support. The
        # order is ours to choose: TLS, then TCP (SIP requests with SDP often exceed
        # the path MTU, RFC 3261 18.1.1), then UDP. Every transport's records are
        # kept, so failover can move across transports.
        fallback = [Transport.TLS] if target.secure else [Transport.TCP, Transport.UDP]
        if not target.secure and self._sips_for_sip_uris:
            fallback.insert(0, Transport.TLS)
        hops = await self._srv_stage(
            domain, [(_srv_name(t, domain), t) for t in fallback], tolerate_failures=local
        )
        if hops is not None:
            return hops
        # RFC 3263 4.2: no SRV either; A/AAAA of the domain on the default port.
        return [_Hop(domain, default_transport.default_port, default_transport)]

    async def _srv_stage(
        self,
        domain: str,
        names: Sequence[tuple[str, Transport]],
        *,
        tolerate_failures: bool = False,
    ) -> list[_Hop] | None:
        """Hops from the SRV records at `names`, in order; None if there are none.

        A stage with no records lets the caller fall back to the next step. If a
        lookup failed and nothing else was found, falling back could reach a host
        the domain never meant to publish, so that is an error instead, unless
        `tolerate_failures` (the host itself knows the domain's addresses).
        """
        answers = await asyncio.gather(
            *(self._query_or_error(name, RecordType.SRV) for name, _ in names)
        )
        hops: list[_Hop] = []
        failures: list[str] = []
        found = False
        for (_, transport), answer in zip(names, answers, strict=True):
            if isinstance(answer, DnsLookupError):
                failures.append(str(answer))
                continue
            records = [r for r in answer.records if isinstance(r, SrvRecord)]
            found = found or bool(records)
            extra = {(a.name, a.rdtype): a for a in answer.additional}
            for record in order_srv_records(records, self._rng):
                if record.target == ".":
                    # RFC 2782: "." means the service is decidedly not available.
                    continue
                if record.port == 0:
                    # Nothing listens on port 0, and the transport never sends there.
                    logger.warning("x %s: SRV %s port 0 skipped", domain, record.target)
                    continue
                hops.append(
                    _Hop(
                        record.target,
                        record.port,
                        transport,
                        self._additional(extra, record),
                        record,
                    )
                )
        if hops:
            return hops
        if failures and not tolerate_failures:
            raise ResolutionError(domain, "; ".join(failures))
        if found:
            raise ResolutionError(domain, "SRV records say the service is not available")
        return None

    def _additional(
        self, extra: dict[tuple[str, RecordType], DnsAnswer], record: SrvRecord
    ) -> tuple[str, ...] | None:
        addresses: list[str] = []
        for rdtype in _ADDRESS_TYPES[self._family]:
            answer = extra.get((record.target, rdtype))
            if answer is not None:
                addresses.extend(str(r) for r in answer.records)
        return tuple(addresses) or None

    async def _hop_addresses(self, hop: _Hop) -> tuple[list[str], list[str]]:
        """Addresses of `hop` in family-policy order, and why lookups failed.

        Addresses no request can go to (unspecified, multicast, broadcast: what DNS
        filters answer for blocked names) are left out, each named as a failure.
        """
        addresses, failures = await self._hop_lookups(hop)
        usable = []
        for address in addresses:
            if _nowhere(address):
                failures.append(f"{hop.host} points to {address}, not a unicast address")
            else:
                usable.append(address)
        return usable, failures

    async def _hop_lookups(self, hop: _Hop) -> tuple[list[str], list[str]]:
        if hop.addresses is not None:
            return list(hop.addresses), []
        answers = await asyncio.gather(
            *(self._query_or_error(hop.host, rdtype) for rdtype in _ADDRESS_TYPES[self._family])
        )
        addresses: list[str] = []
        failures: list[str] = []
        exists = False
        for answer in answers:
            if isinstance(answer, DnsLookupError):
                failures.append(str(answer))
            else:
                exists = exists or answer.exists
                addresses.extend(str(r) for r in answer.records)
        if not addresses and not failures:
            if exists:
                failures.append(f"no address records for {hop.host}")
            else:
                failures.append(f"{hop.host} does not exist (NXDOMAIN)")
        return addresses, failures


class FailoverTargets:
    """Next hops for one request, one at a time (RFC 3263 4.3).

    The first call runs NAPTR/SRV; each SRV target's addresses are looked up only
    when the previous targets are used up, and targets whose lookups fail are
    skipped. `next()` returns None once everything has been handed out; it raises
    `ResolutionError` if nothing at all could be resolved. Not for concurrent use.
    """

    def __init__(self, resolver: SipResolver, target: SipTarget) -> None:
        self._resolver = resolver
        self._target = target
        self._plan: deque[_Hop] | None = None
        self._pending: deque[ResolvedTarget] = deque()
        self._seen: set[ResolvedTarget] = set()
        self._tried: list[ResolvedTarget] = []
        self._failures: list[str] = []

    @property
    def tried(self) -> tuple[ResolvedTarget, ...]:
        """Hops handed out so far, in order; the last one is the current hop."""
        return tuple(self._tried)

    async def next(self) -> ResolvedTarget | None:
        """The next hop to try, or None when there are no more."""
        if self._plan is None:
            self._plan = deque(await self._resolver._plan(self._target))
        while not self._pending:
            if not self._plan:
                if not self._seen:
                    domain = _normalise_name(self._target.maddr or self._target.host)
                    raise ResolutionError(
                        domain, "no usable address (" + "; ".join(self._failures) + ")"
                    )
                return None
            hop = self._plan.popleft()
            addresses, failures = await self._resolver._hop_addresses(hop)
            self._failures.extend(failures)
            for address in addresses:
                resolved = ResolvedTarget(address, hop.port, hop.transport, hop.srv)
                if resolved not in self._seen:
                    self._seen.add(resolved)
                    self._pending.append(resolved)
        resolved = self._pending.popleft()
        self._tried.append(resolved)
        logger.debug(
            "- %s -> %s:%d/%s",
            self._target.host,
            resolved.address,
            resolved.port,
            resolved.transport.value,
        )
        return resolved

    def __aiter__(self) -> FailoverTargets:
        return self

    async def __anext__(self) -> ResolvedTarget:
        resolved = await self.next()
        if resolved is None:
            raise StopAsyncIteration
        return resolved
