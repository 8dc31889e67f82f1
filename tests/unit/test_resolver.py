"""RFC 3263 server location against a real DNS server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sbc.transport.resolver import (
    AddressFamilyPolicy,
    NaptrRecord,
    ResolutionError,
    ResolvedTarget,
    SipResolver,
    SipTarget,
    SrvRecord,
    Transport,
    order_srv_records,
    select_naptr_services,
)
from tests.dnsserver import DnsTestServer

UDP, TCP, TLS = Transport.UDP, Transport.TCP, Transport.TLS

ZONE = """
$TTL 300
; NAPTR -> SRV -> A. Order 20 prefers UDP over TCP (listed the other way round,
; so only sorting on preference gets it right); the "u" and SIP+D2X records are
; not for us and must be skipped.
naptr  NAPTR 10 50 "s" "SIPS+D2T" "" _sips._tcp.naptr.example.com.
naptr  NAPTR 15 10 "u" "SIP+D2U" "!^.*$!sip:x@example.net!" .
naptr  NAPTR 20 20 "s" "SIP+D2T" "" _sip._tcp.naptr.example.com.
naptr  NAPTR 20 10 "s" "SIP+D2U" "" _sip._udp.naptr.example.com.
naptr  NAPTR 30 10 "s" "SIP+D2X" "" _sip._x.naptr.example.com.
_sips._tcp.naptr  SRV 0 0 5061 tls.naptr.example.com.
_sip._udp.naptr   SRV 0 0 5060 udp.naptr.example.com.
_sip._tcp.naptr   SRV 0 0 5062 tcp.naptr.example.com.
tls.naptr  A 192.0.2.10
udp.naptr  A 192.0.2.11
tcp.naptr  A 192.0.2.12

; No NAPTR, SRV for TCP and UDP (the name itself is an empty non-terminal).
_sip._udp.srvonly  SRV 0 0 5070 udp.srvonly.example.com.
_sip._tcp.srvonly  SRV 0 0 5071 tcp.srvonly.example.com.
udp.srvonly  A 192.0.2.20
tcp.srvonly  A 192.0.2.21

; Neither NAPTR nor SRV.
plain  A 192.0.2.30
plain  AAAA 2001:db8::30

; Both families, short TTL, and a NAPTR that an explicit port must bypass.
dual  60 A 192.0.2.31
dual  60 AAAA 2001:db8::31
dual  NAPTR 10 10 "s" "SIP+D2U" "" _sip._udp.naptr.example.com.

; SRV priorities: 10 before 20 whatever the weights.
_sip._udp.prio  SRV 20 100 5060 c.prio.example.com.
_sip._udp.prio  SRV 10 1 5060 a.prio.example.com.
_sip._udp.prio  SRV 10 1 5060 b.prio.example.com.
a.prio  A 192.0.2.51
b.prio  A 192.0.2.52
c.prio  A 192.0.2.53

; SRV weights 60/30/10 in one priority.
_sip._udp.weights  SRV 10 10 5060 w10.weights.example.com.
_sip._udp.weights  SRV 10 30 5060 w30.weights.example.com.
_sip._udp.weights  SRV 10 60 5060 w60.weights.example.com.
w60.weights  A 192.0.2.60
w30.weights  A 192.0.2.63
w10.weights  A 192.0.2.61

; Failover: two addresses at priority 10, one at priority 20.
_sip._udp.fo  SRV 10 0 5060 fo1.example.com.
_sip._udp.fo  SRV 20 0 5080 fo2.example.com.
fo1  A 192.0.2.41
fo1  A 192.0.2.42
fo2  A 192.0.2.43

; One SRV target per transport parameter.
_sip._udp.tp   SRV 0 0 5001 udp.tp.example.com.
_sip._tcp.tp   SRV 0 0 5002 tcp.tp.example.com.
_sips._tcp.tp  SRV 0 0 5003 tls.tp.example.com.
udp.tp  A 192.0.2.71
tcp.tp  A 192.0.2.72
tls.tp  A 192.0.2.73

; "." target: service decidedly not available (RFC 2782).
_sip._tcp.dot  SRV 0 0 0 .
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver_for(server: DnsTestServer, **kwargs: Any) -> SipResolver:
    kwargs.setdefault("lifetime", 2.0)
    kwargs.setdefault("rng", random.Random(7))
    kwargs.setdefault("family", AddressFamilyPolicy.IPV4_ONLY)
    return SipResolver(["127.0.0.1"], server.port, **kwargs)


def run_with_server(
    scenario: Callable[[DnsTestServer], Awaitable[None]], *, srv_additional: bool = False
) -> None:
    async def main() -> None:
        async with DnsTestServer(ZONE, srv_additional=srv_additional) as server:
            await scenario(server)

    asyncio.run(main())


def test_naptr_srv_a_chain() -> None:
    async def scenario(server: DnsTestServer) -> None:
        targets = await resolver_for(server).resolve(SipTarget("naptr.example.com"))
        assert targets == [
            ResolvedTarget("192.0.2.11", 5060, UDP),
            ResolvedTarget("192.0.2.12", 5062, TCP),
        ]
        assert server.queries == [
            ("naptr.example.com", "NAPTR"),
            ("_sip._udp.naptr.example.com", "SRV"),
            ("_sip._tcp.naptr.example.com", "SRV"),
            ("udp.naptr.example.com", "A"),
            ("tcp.naptr.example.com", "A"),
        ]

    run_with_server(scenario)


def test_srv_additional_section_saves_address_lookups() -> None:
    async def scenario(server: DnsTestServer) -> None:
        targets = await resolver_for(server).resolve(SipTarget("naptr.example.com"))
        assert targets == [
            ResolvedTarget("192.0.2.11", 5060, UDP),
            ResolvedTarget("192.0.2.12", 5062, TCP),
        ]
        assert server.count(rdtype="A") == 0

    run_with_server(scenario, srv_additional=True)


def test_naptr_sips_service_only_for_sips_uris() -> None:
    async def scenario(server: DnsTestServer) -> None:
        resolver = resolver_for(server)
        sip = await resolver.resolve(SipTarget("naptr.example.com"))
        assert TLS not in {t.transport for t in sip}
        assert server.count("_sips._tcp.naptr.example.com") == 0

        sips = await resolver.resolve(SipTarget("naptr.example.com", secure=True))
        assert sips == [ResolvedTarget("192.0.2.10", 5061, TLS)]

        keeping = resolver_for(server, sips_for_sip_uris=True)
        assert await keeping.resolve(SipTarget("naptr.example.com")) == [
            ResolvedTarget("192.0.2.10", 5061, TLS),
            ResolvedTarget("192.0.2.11", 5060, UDP),
            ResolvedTarget("192.0.2.12", 5062, TCP),
        ]

    run_with_server(scenario)


def test_no_naptr_uses_srv_for_each_transport_tcp_first() -> None:
    async def scenario(server: DnsTestServer) -> None:
        targets = await resolver_for(server).resolve(SipTarget("srvonly.example.com"))
        assert targets == [
            ResolvedTarget("192.0.2.21", 5071, TCP),
            ResolvedTarget("192.0.2.20", 5070, UDP),
        ]

    run_with_server(scenario)


@pytest.mark.parametrize(
    ("secure", "expected"),
    [
        (False, ResolvedTarget("192.0.2.30", 5060, UDP)),
        (True, ResolvedTarget("192.0.2.30", 5061, TLS)),
    ],
)
def test_no_naptr_no_srv_falls_back_to_a(secure: bool, expected: ResolvedTarget) -> None:
    async def scenario(server: DnsTestServer) -> None:
        targets = await resolver_for(server).resolve(SipTarget("plain.example.com", secure=secure))
        assert targets == [expected]
        srv_names = {name for name, rdtype in server.queries if rdtype == "SRV"}
        if secure:
            assert srv_names == {"_sips._tcp.plain.example.com"}
        else:
            assert srv_names == {"_sip._tcp.plain.example.com", "_sip._udp.plain.example.com"}

    run_with_server(scenario)


def test_srv_priority_order() -> None:
    async def scenario(server: DnsTestServer) -> None:
        for seed in range(20):
            resolver = resolver_for(server, rng=random.Random(seed))
            targets = await resolver.resolve(SipTarget("prio.example.com", transport=UDP))
            addresses = [t.address for t in targets]
            assert sorted(addresses[:2]) == ["192.0.2.51", "192.0.2.52"]
            assert addresses[2] == "192.0.2.53"

    run_with_server(scenario)


def test_srv_weight_distribution() -> None:
    async def scenario(server: DnsTestServer) -> None:
        resolver = resolver_for(server, rng=random.Random(2024), now=FakeClock())
        target = SipTarget("weights.example.com", transport=UDP)
        first = Counter([(await resolver.resolve(target))[0].address for _ in range(1000)])
        # Deterministic for the seed; a uniform or first-record choice would be far off.
        assert abs(first["192.0.2.60"] / 1000 - 0.6) < 0.05
        assert abs(first["192.0.2.63"] / 1000 - 0.3) < 0.05
        assert abs(first["192.0.2.61"] / 1000 - 0.1) < 0.05
        assert server.count("_sip._udp.weights.example.com") == 1

    run_with_server(scenario, srv_additional=True)


class ScriptedRandom(random.Random):
    def __init__(self, picks: list[int]) -> None:
        super().__init__(0)
        self.picks = picks
        self.bounds: list[tuple[int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.bounds.append((a, b))
        return self.picks.pop(0)


def test_order_srv_records_follows_rfc2782_running_sums() -> None:
    zero = SrvRecord(1, 0, 5060, "zero.example.com")
    ten = SrvRecord(1, 10, 5060, "ten.example.com")
    twenty = SrvRecord(1, 20, 5060, "twenty.example.com")
    backup = SrvRecord(2, 5, 5060, "backup.example.com")
    rng = ScriptedRandom([0, 11, 10, 3])
    # Running sums: zero=0, ten=10, twenty=30. 0 picks zero; then ten=10,
    # twenty=30 and 11 picks twenty; then ten alone; then backup alone.
    assert order_srv_records([backup, twenty, ten, zero], rng) == [zero, twenty, ten, backup]
    # 0 only while a zero-weight record is left: it is theirs, not the first one's.
    assert rng.bounds == [(0, 30), (1, 30), (1, 10), (1, 5)]


def test_equal_weights_share_evenly() -> None:
    # With no zero-weight record, the pick of 0 went to the first record as well:
    # weights 1 and 1 shared 2:1.
    one, two = SrvRecord(1, 1, 5060, "one.example.com"), SrvRecord(1, 1, 5060, "two.example.com")
    rng = random.Random(3)
    firsts = Counter(order_srv_records([one, two], rng)[0] for _ in range(3000))
    assert 1400 <= firsts[one] <= 1600, firsts
    # Beside a zero-weight record the pick of 0 is its own (1 in 21 here).
    ten, other = SrvRecord(1, 10, 5060, "ten.example.com"), SrvRecord(1, 10, 5060, "ten2.example")
    zero = SrvRecord(1, 0, 5060, "zero.example.com")
    firsts = Counter(order_srv_records([ten, zero, other], rng)[0] for _ in range(3000))
    assert 1300 <= firsts[ten] <= 1560 and 1300 <= firsts[other] <= 1560, firsts
    assert 80 <= firsts[zero] <= 220, firsts


def test_select_naptr_services_keeps_only_terminal_sip_records() -> None:
    udp = NaptrRecord(20, 10, "S", "sip+d2u", "", "_sip._udp.example.com")
    tcp = NaptrRecord(10, 90, "s", "SIP+D2T", "", "_sip._tcp.example.com")
    tls = NaptrRecord(10, 5, "s", "SIPS+D2T", "", "_sips._tcp.example.com")
    unusable = [
        NaptrRecord(1, 1, "s", "SIP+D2U", "!^.*$!sip:a@example.net!", "_sip._udp.example.net"),
        NaptrRecord(1, 1, "s", "SIP+D2U", "", "."),
        NaptrRecord(1, 1, "a", "SIP+D2U", "", "sip.example.com"),
        NaptrRecord(1, 1, "s", "SIP+D2S", "", "_sip._sctp.example.com"),
    ]
    records = [udp, *unusable, tls, tcp]
    assert select_naptr_services(records, secure=False, allow_sips_for_sip=False) == [
        (tcp, TCP),
        (udp, UDP),
    ]
    assert select_naptr_services(records, secure=False, allow_sips_for_sip=True) == [
        (tls, TLS),
        (tcp, TCP),
        (udp, UDP),
    ]
    assert select_naptr_services(records, secure=True, allow_sips_for_sip=False) == [(tls, TLS)]


def test_explicit_port_skips_naptr_and_srv() -> None:
    async def scenario(server: DnsTestServer) -> None:
        targets = await resolver_for(server).resolve(SipTarget("dual.example.com", port=5080))
        assert targets == [ResolvedTarget("192.0.2.31", 5080, UDP)]
        assert server.queries == [("dual.example.com", "A")]

        sips = await resolver_for(server).resolve(
            SipTarget("dual.example.com", port=5090, secure=True)
        )
        assert sips == [ResolvedTarget("192.0.2.31", 5090, TLS)]

    run_with_server(scenario)


@pytest.mark.parametrize(
    ("transport", "secure", "srv_name", "expected"),
    [
        (UDP, False, "_sip._udp.tp.example.com", ResolvedTarget("192.0.2.71", 5001, UDP)),
        (TCP, False, "_sip._tcp.tp.example.com", ResolvedTarget("192.0.2.72", 5002, TCP)),
        (TLS, False, "_sips._tcp.tp.example.com", ResolvedTarget("192.0.2.73", 5003, TLS)),
        (TCP, True, "_sips._tcp.tp.example.com", ResolvedTarget("192.0.2.73", 5003, TLS)),
    ],
)
def test_transport_param_picks_srv_name(
    transport: Transport, secure: bool, srv_name: str, expected: ResolvedTarget
) -> None:
    async def scenario(server: DnsTestServer) -> None:
        target = SipTarget("tp.example.com", transport=transport, secure=secure)
        assert await resolver_for(server).resolve(target) == [expected]
        assert [q for q in server.queries if q[1] != "A"] == [(srv_name, "SRV")]

    run_with_server(scenario)


def test_transport_param_without_srv_uses_default_port() -> None:
    async def scenario(server: DnsTestServer) -> None:
        target = SipTarget("plain.example.com", transport=TCP)
        assert await resolver_for(server).resolve(target) == [
            ResolvedTarget("192.0.2.30", 5060, TCP)
        ]

    run_with_server(scenario)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (SipTarget("192.0.2.99"), ResolvedTarget("192.0.2.99", 5060, UDP)),
        (SipTarget("192.0.2.99", secure=True), ResolvedTarget("192.0.2.99", 5061, TLS)),
        (SipTarget("192.0.2.99", transport=TLS), ResolvedTarget("192.0.2.99", 5061, TLS)),
        (
            SipTarget("[2001:DB8::1]", port=5070, transport=TCP),
            ResolvedTarget("2001:db8::1", 5070, TCP),
        ),
        (SipTarget("2001:db8::2"), ResolvedTarget("2001:db8::2", 5060, UDP)),
        (
            SipTarget("missing.example.com", maddr="192.0.2.77", transport=TCP),
            ResolvedTarget("192.0.2.77", 5060, TCP),
        ),
    ],
)
def test_numeric_targets_skip_dns(target: SipTarget, expected: ResolvedTarget) -> None:
    async def scenario(server: DnsTestServer) -> None:
        assert await resolver_for(server).resolve(target) == [expected]
        assert server.queries == []

    run_with_server(scenario)


@pytest.mark.parametrize(
    ("family", "expected", "queried"),
    [
        (AddressFamilyPolicy.IPV4_ONLY, ["192.0.2.31"], {"A"}),
        (AddressFamilyPolicy.IPV6_ONLY, ["2001:db8::31"], {"AAAA"}),
        (AddressFamilyPolicy.BOTH_IPV4_FIRST, ["192.0.2.31", "2001:db8::31"], {"A", "AAAA"}),
        (AddressFamilyPolicy.BOTH_IPV6_FIRST, ["2001:db8::31", "192.0.2.31"], {"A", "AAAA"}),
    ],
)
def test_address_family_policy(
    family: AddressFamilyPolicy, expected: list[str], queried: set[str]
) -> None:
    async def scenario(server: DnsTestServer) -> None:
        resolver = resolver_for(server, family=family)
        targets = await resolver.resolve(SipTarget("dual.example.com", port=5060))
        assert [t.address for t in targets] == expected
        assert {rdtype for _, rdtype in server.queries} == queried

    run_with_server(scenario)


def test_failover_iterates_lazily_in_order() -> None:
    async def scenario(server: DnsTestServer) -> None:
        hops = resolver_for(server).failover(SipTarget("fo.example.com", transport=UDP))
        first = await hops.next()
        second = await hops.next()
        assert first is not None and second is not None
        assert {first.address, second.address} == {"192.0.2.41", "192.0.2.42"}
        assert first.port == second.port == 5060
        # fo2 (priority 20) is looked up only once fo1's addresses are used up.
        assert server.count("fo2.example.com") == 0
        assert await hops.next() == ResolvedTarget("192.0.2.43", 5080, UDP)
        assert await hops.next() is None
        assert hops.tried == (first, second, ResolvedTarget("192.0.2.43", 5080, UDP))

        again = [
            t
            async for t in resolver_for(server).failover(SipTarget("fo.example.com", transport=UDP))
        ]
        assert [t.address for t in again][2:] == ["192.0.2.43"]

    run_with_server(scenario)


def test_servfail_on_first_srv_target_moves_on() -> None:
    async def scenario(server: DnsTestServer) -> None:
        server.servfail("fo1.example.com", "A")
        hops = resolver_for(server).failover(SipTarget("fo.example.com", transport=UDP))
        assert await hops.next() == ResolvedTarget("192.0.2.43", 5080, UDP)
        assert server.count("fo1.example.com", "A") == 1

    run_with_server(scenario)


def test_every_srv_target_failing_is_an_error() -> None:
    async def scenario(server: DnsTestServer) -> None:
        server.servfail("fo1.example.com", "A")
        server.servfail("fo2.example.com", "A")
        with pytest.raises(ResolutionError) as raised:
            await resolver_for(server).resolve(SipTarget("fo.example.com", transport=UDP))
        assert str(raised.value) == (
            "cannot resolve SIP target fo.example.com: no usable address ("
            "A lookup for fo1.example.com failed: SERVFAIL; "
            "A lookup for fo2.example.com failed: SERVFAIL)"
        )

    run_with_server(scenario)


def test_cache_respects_ttl_on_fake_clock() -> None:
    async def scenario(server: DnsTestServer) -> None:
        clock = FakeClock()
        resolver = resolver_for(server, now=clock, family=AddressFamilyPolicy.BOTH_IPV4_FIRST)
        target = SipTarget("dual.example.com", port=5060)
        expected = [
            ResolvedTarget("192.0.2.31", 5060, UDP),
            ResolvedTarget("2001:db8::31", 5060, UDP),
        ]
        assert await resolver.resolve(target) == expected
        assert len(server.queries) == 2
        clock.now += 59  # TTL is 60
        assert await resolver.resolve(target) == expected
        assert len(server.queries) == 2
        clock.now += 1
        assert await resolver.resolve(target) == expected
        assert len(server.queries) == 4

    run_with_server(scenario)


def test_cache_is_bounded() -> None:
    async def scenario(server: DnsTestServer) -> None:
        resolver = resolver_for(server, now=FakeClock(), cache_size=1)
        for host in ("dual.example.com", "plain.example.com", "dual.example.com"):
            await resolver.resolve(SipTarget(host, port=5060))
        assert server.count("dual.example.com", "A") == 2

    run_with_server(scenario)


def test_nxdomain_is_an_error_and_cached_briefly() -> None:
    async def scenario(server: DnsTestServer) -> None:
        clock = FakeClock()
        resolver = resolver_for(server, now=clock, negative_ttl=30.0)
        for _ in range(2):
            with pytest.raises(ResolutionError) as raised:
                await resolver.resolve(SipTarget("missing.example.com"))
            assert str(raised.value) == (
                "cannot resolve SIP target missing.example.com: domain does not exist (NXDOMAIN)"
            )
            assert raised.value.domain == "missing.example.com"
        assert server.queries == [("missing.example.com", "NAPTR")]
        clock.now += 30
        with pytest.raises(ResolutionError):
            await resolver.resolve(SipTarget("missing.example.com"))
        assert server.count("missing.example.com", "NAPTR") == 2

    run_with_server(scenario)


def test_nxdomain_with_explicit_port() -> None:
    async def scenario(server: DnsTestServer) -> None:
        with pytest.raises(ResolutionError) as raised:
            await resolver_for(server).resolve(SipTarget("missing.example.com", port=5060))
        assert str(raised.value) == (
            "cannot resolve SIP target missing.example.com: no usable address "
            "(missing.example.com does not exist (NXDOMAIN))"
        )

    run_with_server(scenario)


def test_servfail_on_naptr_is_an_error() -> None:
    async def scenario(server: DnsTestServer) -> None:
        server.servfail("plain.example.com", "NAPTR")
        with pytest.raises(ResolutionError) as raised:
            await resolver_for(server).resolve(SipTarget("plain.example.com"))
        assert str(raised.value) == (
            "cannot resolve SIP target plain.example.com: "
            "NAPTR lookup for plain.example.com failed: SERVFAIL"
        )

    run_with_server(scenario)


def test_unanswered_lookup_times_out_within_lifetime() -> None:
    async def scenario(server: DnsTestServer) -> None:
        server.drop("plain.example.com", "NAPTR")
        resolver = resolver_for(server, lifetime=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ResolutionError) as raised:
            await resolver.resolve(SipTarget("plain.example.com"))
        assert loop.time() - started < 1.5
        assert str(raised.value) == (
            "cannot resolve SIP target plain.example.com: "
            "NAPTR lookup for plain.example.com timed out after 0.3s"
        )

    run_with_server(scenario)


def test_slow_answer_within_lifetime_is_used() -> None:
    async def scenario(server: DnsTestServer) -> None:
        server.delay("plain.example.com", "NAPTR", 0.1)
        targets = await resolver_for(server).resolve(SipTarget("plain.example.com"))
        assert targets == [ResolvedTarget("192.0.2.30", 5060, UDP)]

    run_with_server(scenario)


def test_srv_root_target_means_service_unavailable() -> None:
    async def scenario(server: DnsTestServer) -> None:
        with pytest.raises(ResolutionError) as raised:
            await resolver_for(server).resolve(SipTarget("dot.example.com", transport=TCP))
        assert str(raised.value) == (
            "cannot resolve SIP target dot.example.com: "
            "SRV records say the service is not available"
        )
        assert server.count(rdtype="A") == 0

    run_with_server(scenario)


def test_sips_with_udp_transport_is_refused() -> None:
    async def scenario(server: DnsTestServer) -> None:
        with pytest.raises(ResolutionError) as raised:
            await resolver_for(server).resolve(
                SipTarget("tp.example.com", transport=UDP, secure=True)
            )
        assert str(raised.value) == (
            "cannot resolve SIP target tp.example.com: sips URI cannot use transport udp"
        )
        assert server.queries == []

    run_with_server(scenario)


def test_transport_from_param() -> None:
    assert Transport.from_param("TCP") is TCP
    with pytest.raises(ValueError, match="unsupported SIP transport 'sctp'"):
        Transport.from_param("sctp")
