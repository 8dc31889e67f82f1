"""Review of trunk routing and failover: trunks, the Directory's plans, RFC 3263.

Each xfail names a bug still open (its fix is outside trunks, targets and the
resolver); the plain tests pin behaviour checked against RFC 3261, RFC 3263 and
RFC 2782. The controller is driven as in test_b2bua_flows; DNS is a table.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sbc.b2bua.controller import AllocateMedia, CallController, Step, Target, TrunkPlan
from sbc.b2bua.targets import Directory
from sbc.b2bua.trunks import (
    MAX_RETRY_AFTER,
    Gateway,
    Health,
    ProbePolicy,
    Trunk,
    TrunkState,
    TrunkTable,
)
from sbc.sip.message import Request
from sbc.sip.uri import parse_uri
from sbc.transport.base import Destination, Transport
from sbc.transport.resolver import (
    AddressFamilyPolicy,
    DnsAnswer,
    DnsLookupError,
    Rdata,
    RecordType,
    ResolutionError,
    ResolvedTarget,
    SipResolver,
    SipTarget,
    SrvRecord,
)
from sbc.transport.resolver import Transport as RTransport
from tests.unit.test_b2bua_flows import (
    CALLER,
    GW,
    PSTN,
    StubTargets,
    answer,
    controller,
    gw_flow,
    hop_of,
    invite_text,
    receive,
    requests,
    responses,
    session,
    statuses,
    trunk_plan,
)
from tests.unit.test_resolver_hosts import FakeClock, resolve

URI = parse_uri("sip:1000@sbc.example")


def plan_of(directory: Directory, now: float = 0.0) -> TrunkPlan:
    plan = directory.trunk("pstn", URI, now)
    assert plan is not None
    return plan


def destinations(plan: TrunkPlan) -> list[Destination]:
    return [target.destination for target in plan.targets]


def first_invite(c: CallController, now: float = 0.0) -> tuple[Request, Step]:
    step = receive(c, invite_text(), CALLER, now)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, session(), now)
    (invite,) = requests(step, "INVITE")
    return invite, step


# -- trunks: order, weights, health ---------------------------------------------------------


def test_weights_share_the_first_attempts_as_configured() -> None:
    # RFC 2782: within one priority, a gateway goes first weight / total of the time.
    heavy = Gateway("heavy", "203.0.113.11", weight=3)
    light = Gateway("light", "203.0.113.12", weight=1)
    backup = Gateway("backup", "203.0.113.13", priority=1, weight=100)
    state = TrunkState(Trunk("pstn", "inside", (heavy, light, backup)))
    rng = random.Random(5)
    firsts = Counter(state.ordered(rng)[0].name for _ in range(8000))
    assert set(firsts) == {"heavy", "light"}  # a lower priority never goes first
    assert 0.72 < firsts["heavy"] / 8000 < 0.78
    assert all(state.ordered(rng)[2] is backup for _ in range(100))


def test_weight_zero_goes_after_every_weighted_gateway() -> None:
    zero = Gateway("zero", "203.0.113.11", weight=0)
    one = Gateway("one", "203.0.113.12", weight=1)
    state = TrunkState(Trunk("pstn", "inside", (zero, one)))
    rng = random.Random(3)
    assert all(state.ordered(rng) == [one, zero] for _ in range(200))


def test_hysteresis_alternating_results_never_flap() -> None:
    gateway = Gateway("gw", "203.0.113.11")
    policy = ProbePolicy(interval=10.0, timeout=2.0, down_after=2, up_after=2)
    state = TrunkState(Trunk("pstn", "inside", (gateway,), probe=policy))
    now = 0.0
    seen = []
    for status in (None, 200, None, 200, None, None, 200, None, 200, 200):
        state.probe_sent(gateway.key, now)
        state.probe_result(gateway.key, status, now + 0.1)
        seen.append(state.gateway_health(gateway.key))
        now += 10.0
    up, down = Health.UP, Health.DOWN
    assert seen == [Health.UNKNOWN, up, up, up, up, down, down, down, down, up]


def test_a_down_gateway_is_skipped_and_all_down_fails_fast_unless_configured() -> None:
    one = Gateway("one", "203.0.113.11")
    two = Gateway("two", "203.0.113.12", priority=1)
    policy = ProbePolicy(down_after=1)
    for try_anyway, expected in ((False, []), (True, [one, two])):
        trunk = Trunk("pstn", "inside", (one, two), probe=policy, try_when_all_down=try_anyway)
        state = TrunkState(trunk)
        state.call_result(one.key, None, 1.0)  # passive: a call it never answered
        assert state.ordered(random.Random(1)) == [two]
        state.call_result(two.key, None, 2.0)
        assert state.ordered(random.Random(1)) == expected


# -- the Directory's plans ------------------------------------------------------------------


def test_a_second_gateway_reaching_the_same_address_is_not_tried_again() -> None:
    # RFC 3263 4.3: after a 503 or a timeout, the next *server*. Two names of one
    # host, or one address with the port given and left to the default, are one.
    a = Gateway("a", "gw-a.example", priority=0)
    b = Gateway("b", "gw-b.example", priority=1)
    c = Gateway("c", "203.0.113.21", priority=2)
    d = Gateway("d", "203.0.113.21", 5060, priority=3)
    e = Gateway("e", "203.0.113.22", priority=4)
    table = TrunkTable([Trunk("pstn", "inside", (a, b, c, d, e), max_attempts=3)])
    directory = Directory(table, rng=random.Random(1))
    same = Destination(Transport.UDP, "203.0.113.20", 5060)
    directory.resolved[a.key] = (same,)
    directory.resolved[b.key] = (same,)
    plan = plan_of(directory)
    assert destinations(plan) == [
        same,
        Destination(Transport.UDP, "203.0.113.21", 5060),
        Destination(Transport.UDP, "203.0.113.22", 5060),
    ]
    assert [t.gateway for t in plan.targets] == [a.key, c.key, e.key]


def test_max_attempts_none_plans_every_gateway() -> None:
    # Trunk.max_attempts: "None: every candidate" (the plan used to stop at 3).
    gateways = tuple(Gateway(f"g{n}", f"203.0.113.{n}", priority=n) for n in range(11, 16))
    directory = Directory(TrunkTable([Trunk("pstn", "inside", gateways)]))
    plan = plan_of(directory)
    assert len(plan.targets) == 5 and plan.max_attempts == 5


def test_an_unresolved_gateway_s_probe_does_not_keep_the_timer_in_the_past() -> None:
    # Its probe cannot go before DNS answers; next_probe stayed at 0.0, so the app's
    # timer fired at once, again and again (a busy loop) until the name resolved.
    named = Gateway("named", "gw.example")
    policy = ProbePolicy(interval=30.0, timeout=5.0)
    table = TrunkTable([Trunk("pstn", "inside", (named,), probe=policy)])
    directory = Directory(table)
    assert directory.due_probes(100.0) == []
    assert directory.next_probe() == 130.0
    directory.resolved[named.key] = (Destination(Transport.UDP, "203.0.113.30", 5060),)
    assert directory.due_probes(120.0) == []
    assert [g for _, g, _ in directory.due_probes(130.0)] == [named]


def test_a_503_with_retry_after_holds_the_gateway_back_for_that_long() -> None:
    # RFC 3261 21.5.4 and 20.33, RFC 3263 4.3: not that server again for the time.
    one = Gateway("one", "203.0.113.11", priority=0)
    two = Gateway("two", "203.0.113.12", priority=1)
    table = TrunkTable([Trunk("pstn", "inside", (one, two))])
    directory = Directory(table)
    directory.call_result("pstn", one.key, 503, 10.0, retry_after=60)
    assert [t.gateway for t in plan_of(directory, 69.9).targets] == [two.key]
    assert [t.gateway for t in plan_of(directory, 70.0).targets] == [one.key, two.key]
    # A 503 without Retry-After, or another status, holds nothing back.
    directory.call_result("pstn", one.key, 503, 80.0)
    directory.call_result("pstn", one.key, 500, 80.0, retry_after=60)
    assert [t.gateway for t in plan_of(directory, 80.1).targets] == [one.key, two.key]
    # A huge Retry-After is capped; every gateway held: fail fast, as all down.
    directory.call_result("pstn", one.key, 503, 100.0, retry_after=10**9)
    directory.call_result("pstn", two.key, 503, 100.0, retry_after=5)
    assert plan_of(directory, 101.0).targets == ()
    assert table["pstn"].held_until(one.key) == 100.0 + MAX_RETRY_AFTER
    # A reload keeps the hold of a gateway whose address is unchanged.
    table.reconfigure([Trunk("pstn", "inside", (one, two), probe=ProbePolicy(enabled=False))])
    assert [t.gateway for t in plan_of(directory, 106.0).targets] == [two.key]


# -- the controller: failover and what the caller hears -------------------------------------


class RecordingTargets(StubTargets):
    """A StubTargets that also records whatever extra a call result carries."""

    def __init__(self, plan: TrunkPlan) -> None:
        super().__init__(plan=plan)
        self.extras: list[dict[str, object]] = []

    def call_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        retry_after: float | None = None,
        destination: Destination | None = None,
    ) -> None:
        super().call_result(trunk, gateway, status, now)
        self.extras.append({} if retry_after is None else {"retry_after": retry_after})


def test_failover_on_each_of_408_5xx_but_not_on_4xx_or_6xx() -> None:
    for status, fails_over in ((500, True), (502, True), (504, True), (404, False), (603, False)):
        c = controller(rules=PSTN, targets=trunk_plan())
        invite, _ = first_invite(c)
        step = receive(c, answer(invite, status), gw_flow(GW[0]), 0.1)
        if fails_over:
            assert responses(step) == [] and hop_of(step, "INVITE") == GW[1], status
        else:
            assert requests(step, "INVITE") == [] and statuses(step) == [status]


def test_the_controller_reports_a_gateway_503_s_retry_after() -> None:
    plan = trunk_plan().plan
    assert plan is not None
    targets = RecordingTargets(plan)
    c = controller(rules=PSTN, targets=targets)
    invite, _ = first_invite(c)
    receive(c, answer(invite, 503, extra="Retry-After: 120\r\n"), gw_flow(GW[0]), 0.1)
    assert targets.results[0] == ("pstn", "gw1", 503)
    assert targets.extras[0] == {"retry_after": 120}


def test_every_gateway_failing_the_caller_hears_the_best_answer_of_all() -> None:
    c = controller(rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    step = receive(c, answer(invite, 500), gw_flow(GW[0]), 0.1)
    (invite,) = requests(step, "INVITE")
    step = receive(c, answer(invite, 502), gw_flow(GW[1]), 0.2)
    (invite,) = requests(step, "INVITE")
    step = receive(c, answer(invite, 503, extra="Retry-After: 3600\r\n"), gw_flow(GW[2]), 0.3)
    assert statuses(step) == [500]


def test_a_gateway_s_503_retry_after_does_not_reach_the_caller() -> None:
    # The caller (a carrier) would take the SBC itself out of service for an hour,
    # for every call, because one gateway behind it was busy.
    single = TrunkPlan("inside", (Target("inside", GW[0], "sip:1000@203.0.113.11", "gw1"),))
    c = controller(rules=PSTN, targets=StubTargets(plan=single))
    invite, _ = first_invite(c)
    step = receive(c, answer(invite, 503, extra="Retry-After: 3600\r\n"), gw_flow(GW[0]), 0.1)
    (final,) = responses(step)
    assert final.status == 500 and final.headers.get("Retry-After") is None


def test_a_gateway_that_sends_100_and_then_nothing_is_cancelled_and_failed_over() -> None:
    c = controller(rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    assert requests(receive(c, answer(invite, 100), gw_flow(GW[0]), 0.1)) == []
    out = Step()
    for now in (60.0, 120.0, 181.0, 200.0):
        out = out + c.handle_timers(now) + c.handle(c.transactions.handle_timers(now), now)
    (cancel,) = requests(out, "CANCEL")
    assert cancel.call_id == invite.call_id and hop_of(out, "CANCEL") == GW[0]
    assert hop_of(out, "INVITE") == GW[1]


# -- RFC 3263 resolution --------------------------------------------------------------------


class TableDns:
    """A DnsLookup from a table; names in ``missing`` are NXDOMAIN, ``broken`` fail."""

    def __init__(
        self,
        records: dict[tuple[str, RecordType], tuple[Rdata, ...]],
        *,
        ttl: float = 300.0,
        missing: frozenset[str] = frozenset(),
        broken: frozenset[str] = frozenset(),
    ) -> None:
        self.records, self.ttl, self.missing, self.broken = records, ttl, missing, broken
        self.asked: list[tuple[str, RecordType]] = []

    async def query(self, name: str, rdtype: RecordType) -> DnsAnswer:
        self.asked.append((name, rdtype))
        if name in self.broken:
            raise DnsLookupError(f"{rdtype.value} lookup for {name} failed: SERVFAIL")
        if name in self.missing:
            return DnsAnswer(name, rdtype, (), 0.0, exists=False)
        records = self.records.get((name, rdtype), ())
        return DnsAnswer(name, rdtype, records, self.ttl if records else 0.0)


A, AAAA, SRV = RecordType.A, RecordType.AAAA, RecordType.SRV
UDP = RTransport.UDP


def resolver(dns: TableDns, clock: FakeClock | None = None, seed: int = 1) -> SipResolver:
    return SipResolver(
        lookup=dns,
        hosts_file=None,
        now=clock or FakeClock(),
        rng=random.Random(seed),
        family=AddressFamilyPolicy.BOTH_IPV4_FIRST,
    )


GW_UDP = SipTarget("gw.example", transport=UDP)


def srv_table(*records: SrvRecord) -> dict[tuple[str, RecordType], tuple[Rdata, ...]]:
    return {
        ("_sip._udp.gw.example", SRV): records,
        ("one.example", A): ("203.0.113.41",),
        ("two.example", A): ("203.0.113.42",),
        ("two.example", AAAA): ("2001:db8::42",),
        ("alias.example", A): ("203.0.113.41",),
        ("three.example", A): ("203.0.113.43",),
    }


def test_srv_priority_first_then_weights_honoured_statistically() -> None:
    table = srv_table(
        SrvRecord(10, 60, 5060, "one.example"),
        SrvRecord(10, 20, 5070, "two.example"),
        SrvRecord(20, 0, 5080, "three.example"),
    )
    firsts: Counter[str] = Counter()
    for seed in range(2000):
        hops = resolve(resolver(TableDns(table), seed=seed), GW_UDP)
        assert hops[-1] == ResolvedTarget("203.0.113.43", 5080, UDP)
        firsts[hops[0].address] += 1
    # RFC 2782: 60 / (60 + 20), give or take the "+1" of its inclusive random number.
    assert 0.70 < firsts["203.0.113.41"] / 2000 < 0.80


def test_failover_order_lists_every_address_once_even_reached_by_two_names() -> None:
    table = srv_table(
        SrvRecord(10, 0, 5060, "one.example"),
        SrvRecord(20, 0, 5060, "alias.example"),  # the same address as one.example
        SrvRecord(30, 0, 5070, "two.example"),
    )
    assert resolve(resolver(TableDns(table)), GW_UDP) == [
        ResolvedTarget("203.0.113.41", 5060, UDP),
        ResolvedTarget("203.0.113.42", 5070, UDP),
        ResolvedTarget("2001:db8::42", 5070, UDP),
    ]


def test_answers_are_cached_for_their_ttl_and_asked_again_after_it() -> None:
    clock = FakeClock()
    table: dict[tuple[str, RecordType], tuple[Rdata, ...]] = {
        ("_sip._udp.gw.example", SRV): (SrvRecord(10, 0, 5060, "four.example"),),
        ("four.example", A): ("203.0.113.44",),
        ("four.example", AAAA): ("2001:db8::44",),
    }
    dns = TableDns(table, ttl=60.0)
    r = resolver(dns, clock)
    resolve(r, GW_UDP)
    asked = len(dns.asked)
    clock.now += 59.0
    resolve(r, GW_UDP)
    assert len(dns.asked) == asked
    clock.now += 1.0
    resolve(r, GW_UDP)
    assert len(dns.asked) == 2 * asked


def test_servfail_is_not_cached_nxdomain_is_and_the_errors_say_which() -> None:
    clock = FakeClock()
    broken = TableDns({}, broken=frozenset({"_sip._udp.gw.example"}))
    r = resolver(broken, clock)
    for _ in range(2):
        with pytest.raises(ResolutionError, match="SERVFAIL"):
            resolve(r, GW_UDP)
    assert broken.asked.count(("_sip._udp.gw.example", SRV)) == 2

    missing = TableDns({}, missing=frozenset({"gw.example"}))
    r = resolver(missing, clock)
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        resolve(r, SipTarget("gw.example"))
    asked = len(missing.asked)
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        resolve(r, SipTarget("gw.example"))
    assert len(missing.asked) == asked  # RFC 2308: the negative answer is cached


def test_ipv6_gateways_by_literal_and_by_aaaa() -> None:
    v6 = Gateway("v6", "2001:DB8:0::51", priority=0)
    assert v6.static_destination == Destination(Transport.UDP, "2001:db8::51", 5060)
    directory = Directory(TrunkTable([Trunk("pstn", "inside", (v6,))]))
    (target,) = plan_of(directory).targets
    assert target.uri == "sip:1000@[2001:DB8:0::51]"
    dns = TableDns({("v6.example", AAAA): ("2001:db8::52",)})
    r = SipResolver(
        lookup=dns, hosts_file=None, now=FakeClock(), family=AddressFamilyPolicy.IPV6_ONLY
    )
    assert resolve(r, SipTarget("v6.example", 5062, UDP)) == [
        ResolvedTarget("2001:db8::52", 5062, UDP)
    ]


def test_a_gateway_no_listener_reaches_does_not_keep_the_timer_in_the_past() -> None:
    tls = Gateway("tls", "203.0.113.31", 5061, transport=Transport.TLS)
    policy = ProbePolicy(interval=30.0, timeout=5.0)
    directory = Directory(TrunkTable([Trunk("pstn", "inside", (tls,), probe=policy)]))
    c = controller(rules=PSTN, targets=directory)  # the inside realm listens on UDP only
    assert c.handle_timers(100.0).output.messages == ()
    deadline = c.next_deadline()
    assert deadline is not None and deadline > 100.0
