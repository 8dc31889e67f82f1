"""Names the host answers itself: localhost (RFC 6761 6.3) and the hosts file.

DNS is a table-driven fake that records every question, except in the last test,
which runs dnspython against the test DNS server on 127.0.0.1. The hosts file is
a temporary file; the clock is fake.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path

import pytest

from sbc.transport import resolver as resolver_module
from sbc.transport.resolver import (
    AddressFamilyPolicy,
    DnsAnswer,
    DnsLookupError,
    HostsFile,
    Rdata,
    RecordType,
    ResolutionError,
    ResolvedTarget,
    SipResolver,
    SipTarget,
    SrvRecord,
    Transport,
    is_localhost_name,
    parse_hosts,
)
from tests.dnsserver import DnsTestServer

UDP, TCP, TLS = Transport.UDP, Transport.TCP, Transport.TLS
A, AAAA, SRV, NAPTR = RecordType.A, RecordType.AAAA, RecordType.SRV, RecordType.NAPTR
BOTH = AddressFamilyPolicy.BOTH_IPV4_FIRST


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDns:
    """A DnsLookup from a table; names in `missing` are NXDOMAIN, `broken` fail."""

    def __init__(
        self,
        records: dict[tuple[str, RecordType], tuple[Rdata, ...]] | None = None,
        *,
        missing: frozenset[str] = frozenset(),
        broken: frozenset[tuple[str, RecordType]] = frozenset(),
    ) -> None:
        self.records = records or {}
        self.missing = missing
        self.broken = broken
        self.asked: list[tuple[str, RecordType]] = []

    async def query(self, name: str, rdtype: RecordType) -> DnsAnswer:
        self.asked.append((name, rdtype))
        if (name, rdtype) in self.broken:
            raise DnsLookupError(f"{rdtype.value} lookup for {name} failed: SERVFAIL")
        if name in self.missing:
            return DnsAnswer(name, rdtype, (), 0.0, exists=False)
        return DnsAnswer(name, rdtype, self.records.get((name, rdtype), ()), 300.0)


def resolve(resolver: SipResolver, target: SipTarget) -> list[ResolvedTarget]:
    return asyncio.run(resolver.resolve(target))


def make_resolver(
    dns: FakeDns,
    hosts: Path | None = None,
    *,
    clock: FakeClock | None = None,
    family: AddressFamilyPolicy = BOTH,
) -> SipResolver:
    return SipResolver(
        lookup=dns,
        hosts_file=hosts,
        now=clock or FakeClock(),
        family=family,
        rng=random.Random(1),
    )


HOSTS = """\
# Trunks pinned by the operator.
127.0.0.1       localhost
198.51.100.10   SBC-Trunk.Example.   trunk-alias     # the carrier's edge
2001:DB8:0:0::10 sbc-trunk.example
198.51.100.11   sbc-trunk.example
198.51.100.10   sbc-trunk.example
not-an-address  broken.example
198.51.100.300  broken.example
203.0.113.5
	203.0.113.6	v4only.example

2001:db8::7 v6only.example
"""


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    return path


# -- the file format ------------------------------------------------------------------


def test_parse_hosts_reads_names_aliases_and_families_in_file_order() -> None:
    assert parse_hosts(HOSTS) == {
        "localhost": {A: ("127.0.0.1",)},
        # Case and the trailing dot do not matter; repeats are listed once.
        "sbc-trunk.example": {
            A: ("198.51.100.10", "198.51.100.11"),
            AAAA: ("2001:db8::10",),
        },
        "trunk-alias": {A: ("198.51.100.10",)},
        "v4only.example": {A: ("203.0.113.6",)},
        "v6only.example": {AAAA: ("2001:db8::7",)},
    }


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("localhost", True),
        ("LocalHost.", True),
        ("sip.localhost", True),
        ("a.b.LOCALHOST", True),
        ("mylocalhost", False),
        ("localhost.example.com", False),
        ("localhost-1", False),
    ],
)
def test_is_localhost_name(name: str, local: bool) -> None:
    assert is_localhost_name(name) is local


# -- localhost (RFC 6761 6.3) -----------------------------------------------------------


def test_localhost_is_loopback_without_dns_and_falls_back_to_the_default_port() -> None:
    dns = FakeDns()
    resolver = make_resolver(dns)  # no hosts file: the rule does not depend on one
    assert resolve(resolver, SipTarget("localhost")) == [
        ResolvedTarget("127.0.0.1", 5060, UDP),
        ResolvedTarget("::1", 5060, UDP),
    ]
    assert resolve(resolver, SipTarget("Edge.LOCALHOST.", secure=True)) == [
        ResolvedTarget("127.0.0.1", 5061, TLS),
        ResolvedTarget("::1", 5061, TLS),
    ]
    assert resolve(resolver, SipTarget("gw.localhost", 5080, TCP)) == [
        ResolvedTarget("127.0.0.1", 5080, TCP),
        ResolvedTarget("::1", 5080, TCP),
    ]
    assert resolve(resolver, SipTarget("localhost", transport=TCP)) == [
        ResolvedTarget("127.0.0.1", 5060, TCP),
        ResolvedTarget("::1", 5060, TCP),
    ]
    assert dns.asked == []


def test_localhost_ignores_dns_even_when_dns_would_answer() -> None:
    dns = FakeDns(
        {
            ("localhost", A): ("192.0.2.1",),
            ("_sip._udp.localhost", SRV): (SrvRecord(0, 0, 5099, "evil.example"),),
        }
    )
    resolver = make_resolver(dns, family=AddressFamilyPolicy.IPV6_ONLY)
    assert resolve(resolver, SipTarget("localhost")) == [ResolvedTarget("::1", 5060, UDP)]
    assert dns.asked == []


# -- the hosts file ---------------------------------------------------------------------


def test_hosts_file_answers_addresses_srv_and_naptr_still_go_to_dns(hosts: Path) -> None:
    dns = FakeDns()
    resolver = make_resolver(dns, hosts)
    assert resolve(resolver, SipTarget("SBC-TRUNK.example")) == [
        ResolvedTarget("198.51.100.10", 5060, UDP),
        ResolvedTarget("198.51.100.11", 5060, UDP),
        ResolvedTarget("2001:db8::10", 5060, UDP),
    ]
    assert dns.asked == [
        ("sbc-trunk.example", NAPTR),
        ("_sip._tcp.sbc-trunk.example", SRV),
        ("_sip._udp.sbc-trunk.example", SRV),
    ]


def test_an_alias_counts_and_a_family_missing_from_the_file_is_not_asked_of_dns(
    hosts: Path,
) -> None:
    dns = FakeDns({("v4only.example", AAAA): ("2001:db8::99",)})
    resolver = make_resolver(dns, hosts)
    assert resolve(resolver, SipTarget("trunk-alias", 5070)) == [
        ResolvedTarget("198.51.100.10", 5070, UDP)
    ]
    # The file knows the name: it answers for both families, as glibc's files source.
    assert resolve(resolver, SipTarget("v4only.example", 5060)) == [
        ResolvedTarget("203.0.113.6", 5060, UDP)
    ]
    assert dns.asked == []
    v6 = make_resolver(dns, hosts, family=AddressFamilyPolicy.IPV6_ONLY)
    with pytest.raises(ResolutionError, match=r"no address records for v4only\.example"):
        resolve(v6, SipTarget("v4only.example", 5060))
    assert dns.asked == []


def test_names_not_in_the_file_go_to_dns(hosts: Path) -> None:
    dns = FakeDns({("pbx.example", A): ("192.0.2.20",)})
    resolver = make_resolver(dns, hosts, family=AddressFamilyPolicy.IPV4_ONLY)
    assert resolve(resolver, SipTarget("pbx.example", 5060)) == [
        ResolvedTarget("192.0.2.20", 5060, UDP)
    ]
    # Neither the malformed lines' names nor a prefix of a listed name count.
    for name in ("broken.example", "trunk.example"):
        with pytest.raises(ResolutionError):
            resolve(resolver, SipTarget(name, 5060))
    assert dns.asked == [
        ("pbx.example", A),
        ("broken.example", A),
        ("trunk.example", A),
    ]


def test_srv_records_in_dns_are_followed_and_their_targets_looked_up_in_the_file(
    hosts: Path,
) -> None:
    dns = FakeDns(
        {
            ("_sip._tcp.carrier.example", SRV): (
                SrvRecord(10, 0, 5070, "sbc-trunk.example"),
                SrvRecord(20, 0, 5080, "backup.carrier.example"),
            ),
            ("backup.carrier.example", A): ("192.0.2.30",),
        }
    )
    resolver = make_resolver(dns, hosts, family=AddressFamilyPolicy.IPV4_ONLY)
    assert resolve(resolver, SipTarget("carrier.example", transport=TCP)) == [
        ResolvedTarget("198.51.100.10", 5070, TCP),
        ResolvedTarget("198.51.100.11", 5070, TCP),
        ResolvedTarget("192.0.2.30", 5080, TCP),
    ]
    assert ("sbc-trunk.example", A) not in dns.asked


def test_a_file_only_name_survives_nxdomain_and_dns_failures(hosts: Path) -> None:
    """The usual case: DNS does not know the pinned name, or is not reachable."""
    nxdomain = FakeDns(missing=frozenset({"sbc-trunk.example", "pbx.example"}))
    resolver = make_resolver(nxdomain, hosts, family=AddressFamilyPolicy.IPV4_ONLY)
    expected = [
        ResolvedTarget("198.51.100.10", 5061, TLS),
        ResolvedTarget("198.51.100.11", 5061, TLS),
    ]
    assert resolve(resolver, SipTarget("sbc-trunk.example", secure=True)) == expected
    # A name the file does not know still fails on NXDOMAIN.
    with pytest.raises(ResolutionError, match=r"does not exist \(NXDOMAIN\)"):
        resolve(resolver, SipTarget("pbx.example"))

    broken = FakeDns(
        broken=frozenset(
            {
                ("sbc-trunk.example", NAPTR),
                ("_sips._tcp.sbc-trunk.example", SRV),
                ("_sip._tcp.sbc-trunk.example", SRV),
                ("pbx.example", NAPTR),
            }
        )
    )
    resolver = make_resolver(broken, hosts, family=AddressFamilyPolicy.IPV4_ONLY)
    assert resolve(resolver, SipTarget("sbc-trunk.example", secure=True)) == expected
    assert resolve(resolver, SipTarget("sbc-trunk.example", transport=TCP)) == [
        ResolvedTarget("198.51.100.10", 5060, TCP),
        ResolvedTarget("198.51.100.11", 5060, TCP),
    ]
    with pytest.raises(ResolutionError, match=r"NAPTR lookup for pbx\.example failed: SERVFAIL"):
        resolve(resolver, SipTarget("pbx.example"))


def test_file_answers_bypass_the_cache_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# nothing yet\n")
    clock = FakeClock()
    dns = FakeDns({("pbx.example", A): ("192.0.2.20",)})
    resolver = make_resolver(dns, path, clock=clock, family=AddressFamilyPolicy.IPV4_ONLY)
    target = SipTarget("pbx.example", 5060)
    assert resolve(resolver, target) == [ResolvedTarget("192.0.2.20", 5060, UDP)]

    # Pinned while DNS's answer is cached (TTL 300): the file wins once it is seen.
    path.write_text("198.51.100.20 pbx.example\n")
    clock.now += 1
    assert resolve(resolver, target) == [ResolvedTarget("198.51.100.20", 5060, UDP)]
    # Unpinned: back to the cached DNS answer, and DNS was asked only once.
    path.write_text("# gone again, and a different size\n")
    clock.now += 1
    assert resolve(resolver, target) == [ResolvedTarget("192.0.2.20", 5060, UDP)]
    assert dns.asked == [("pbx.example", A)]


# -- re-reading the file ----------------------------------------------------------------


def test_changes_are_seen_after_the_check_interval_on_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("198.51.100.1 gw.example\n")
    clock = FakeClock()
    hosts = HostsFile(path, clock)
    assert hosts.addresses("gw.example", A) == ("198.51.100.1",)

    path.write_text("198.51.100.2 gw.example other.example\n")
    clock.now += 0.9
    assert hosts.addresses("gw.example", A) == ("198.51.100.1",)  # not looked at yet
    clock.now += 0.1
    assert hosts.addresses("gw.example", A) == ("198.51.100.2",)
    assert "other.example" in hosts

    # Same size, new modification time: read again.
    path.write_text("198.51.100.3 gw.example other.example\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    clock.now += 1
    assert hosts.addresses("gw.example", A) == ("198.51.100.3",)

    # Replaced by rename (how editors and config management write it).
    staged = tmp_path / "hosts.new"
    staged.write_text("198.51.100.4 gw.example\n")
    staged.replace(path)
    clock.now += 1
    assert hosts.addresses("gw.example", A) == ("198.51.100.4",)
    assert hosts.addresses("gw.example", AAAA) == ()
    assert hosts.addresses("other.example", A) is None


def test_an_unchanged_file_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hosts"
    path.write_text("198.51.100.1 gw.example\n")
    clock = FakeClock()
    hosts = HostsFile(path, clock)
    parsed: list[str] = []
    real_parse = resolver_module.parse_hosts

    def counting(text: str) -> resolver_module.HostsTable:
        parsed.append(text)
        return real_parse(text)

    monkeypatch.setattr(resolver_module, "parse_hosts", counting)
    for _ in range(5):
        assert hosts.addresses("gw.example", A) == ("198.51.100.1",)
        clock.now += 2
    assert len(parsed) == 1


def test_a_missing_or_unreadable_file_has_no_entries_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sbc.transport.resolver")
    path = tmp_path / "hosts"
    clock = FakeClock()
    dns = FakeDns({("gw.example", A): ("192.0.2.40",)})
    resolver = make_resolver(dns, path, clock=clock, family=AddressFamilyPolicy.IPV4_ONLY)
    for _ in range(3):
        assert resolve(resolver, SipTarget("gw.example", 5060)) == [
            ResolvedTarget("192.0.2.40", 5060, UDP)
        ]
        clock.now += 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"x {path} not used: No such file or directory"]

    # It appears: used from the next check on.
    path.write_text("198.51.100.40 gw.example\n")
    clock.now += 1
    assert resolve(resolver, SipTarget("gw.example", 5060)) == [
        ResolvedTarget("198.51.100.40", 5060, UDP)
    ]

    # A path that cannot be read as a file: no entries, one more warning, no raise.
    caplog.clear()
    path.unlink()
    path.mkdir()
    clock.now += 1
    hosts = HostsFile(path, clock)
    assert hosts.addresses("gw.example", A) is None
    clock.now += 1
    assert "gw.example" not in hosts
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"x {path} not used: Is a directory"
    ]


def test_only_the_first_bytes_of_a_huge_file_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver_module, "MAX_HOSTS_FILE_BYTES", 40)
    path = tmp_path / "hosts"
    # The limit falls inside the second line: it is dropped, not read as "198.51".
    path.write_text("198.51.100.1 first.example\n198.51.100.2 second.example\n")
    hosts = HostsFile(path, FakeClock())
    assert hosts.addresses("first.example", A) == ("198.51.100.1",)
    assert hosts.addresses("second.example", A) is None
    assert hosts.addresses("second.exa", A) is None


# -- with dnspython against a real DNS server ---------------------------------------------


ZONE = """
$TTL 300
pinned  A 192.0.2.50
_sip._udp.pinned  SRV 0 0 5090 pinned.example.com.
dnsonly  A 192.0.2.51
"""


def test_dnspython_resolver_reads_the_file_before_asking_the_server(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("198.51.100.50 pinned.example.com\n")

    async def main() -> None:
        async with DnsTestServer(ZONE, srv_additional=False) as server:
            resolver = SipResolver(
                ["127.0.0.1"],
                server.port,
                lifetime=2.0,
                family=AddressFamilyPolicy.IPV4_ONLY,
                hosts_file=path,
                now=FakeClock(),
            )
            assert await resolver.resolve(SipTarget("pinned.example.com", transport=UDP)) == [
                ResolvedTarget("198.51.100.50", 5090, UDP)
            ]
            assert await resolver.resolve(SipTarget("dnsonly.example.com", 5060)) == [
                ResolvedTarget("192.0.2.51", 5060, UDP)
            ]
            assert await resolver.resolve(SipTarget("localhost", 5060)) == [
                ResolvedTarget("127.0.0.1", 5060, UDP)
            ]
            assert server.queries == [
                ("_sip._udp.pinned.example.com", "SRV"),
                ("dnsonly.example.com", "A"),
            ]

    asyncio.run(main())


# -- review findings -------------------------------------------------------------------


def test_dns_answers_that_point_nowhere_are_skipped() -> None:
    # DNS filters answer blocked names with 0.0.0.0 or ::; an SRV record may say
    # port 0. None of these is somewhere a request can go (the transport refuses
    # them): they must not be handed out as hops, least of all as the first one.
    dns = FakeDns(
        {
            ("_sip._udp.sinkhole.example", SRV): (
                SrvRecord(10, 0, 0, "zero-port.sinkhole.example"),
                SrvRecord(20, 0, 5060, "gw.sinkhole.example"),
            ),
            ("zero-port.sinkhole.example", A): ("192.0.2.7",),
            ("gw.sinkhole.example", A): ("0.0.0.0", "224.0.0.1", "255.255.255.255", "192.0.2.8"),
            ("gw.sinkhole.example", AAAA): ("::", "ff02::1"),
            ("blocked.example", A): ("0.0.0.0",),
            ("blocked.example", AAAA): ("::",),
        }
    )
    resolver = make_resolver(dns)
    target = SipTarget("sinkhole.example", transport=UDP)
    assert resolve(resolver, target) == [ResolvedTarget("192.0.2.8", 5060, UDP)]
    with pytest.raises(ResolutionError, match="no usable address"):
        resolve(resolver, SipTarget("blocked.example", port=5060))
