"""Trunks: candidate order, weighted sharing, probe hysteresis and timers, replication."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from sbc.b2bua.targets import Directory
from sbc.b2bua.trunks import (
    Gateway,
    Health,
    HealthChange,
    ProbePolicy,
    Trunk,
    TrunkState,
    TrunkStateError,
    TrunkTable,
    probe_request,
)
from sbc.sip.parser import parse_message
from sbc.sip.uri import SipUri, parse_uri
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

A = Gateway("a", "198.51.100.1", 5060, priority=1, weight=60)
B = Gateway("b", "198.51.100.2", 5060, priority=1, weight=30)
C = Gateway("c", "198.51.100.3", 5060, priority=1, weight=10)
BACKUP = Gateway("backup", "203.0.113.9", 5080, Transport.TCP, priority=2, weight=1)

POLICY = ProbePolicy(interval=30.0, timeout=5.0, down_after=3, up_after=2)


def trunk(*gateways: Gateway, probe: ProbePolicy = POLICY, **kwargs: Any) -> Trunk:
    """The carrier trunk: A, B, C at priority 1 and a backup at 2, unless told."""
    return Trunk("carrier", "outside", gateways or (A, B, C, BACKUP), probe, **kwargs)


def fail(state: TrunkState, gateway: Gateway, times: int, now: float = 0.0) -> list[HealthChange]:
    changes = []
    for _ in range(times):
        state.probe_sent(gateway.key, now)
        change = state.probe_result(gateway.key, None, now)
        if change is not None:
            changes.append(change)
    return changes


def succeed(
    state: TrunkState, gateway: Gateway, times: int, now: float = 0.0
) -> list[HealthChange]:
    changes = []
    for _ in range(times):
        state.probe_sent(gateway.key, now)
        change = state.probe_result(gateway.key, 200, now)
        if change is not None:
            changes.append(change)
    return changes


# -- values ----------------------------------------------------------------------------


def test_gateway_key_ignores_name_priority_weight_and_host_case() -> None:
    named = Gateway("edge", "GW.Example.NET", 5060, Transport.TLS)
    renamed = Gateway("other", "gw.example.net", 5060, Transport.TLS, priority=5, weight=0)
    assert named.key == renamed.key == "tls:gw.example.net:5060"
    assert Gateway("v6", "2001:db8::1").key == "udp:[2001:db8::1]"
    assert Gateway("a", "198.51.100.1", 5060).key != Gateway("a", "198.51.100.1").key


def test_gateway_uri_and_static_destination() -> None:
    assert A.uri == "sip:198.51.100.1:5060"
    assert BACKUP.uri == "sip:203.0.113.9:5080;transport=tcp"
    assert Gateway("t", "gw.example.net", transport=Transport.TLS).uri == "sips:gw.example.net"
    assert Gateway("v6", "2001:db8::7").static_destination == Destination(
        Transport.UDP, "2001:db8::7", 5060
    )
    assert Gateway("t", "gw.example.net", transport=Transport.TLS).static_destination is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "bad host"}, "bad host of gateway g"),
        ({"port": 0}, "gateway g: port 0 is not 1..65535"),
        ({"weight": -1}, "gateway g: priority and weight must not be negative"),
    ],
)
def test_gateway_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Gateway(**{"name": "g", "host": "198.51.100.1", **kwargs})  # type: ignore[arg-type]


def test_trunk_rejects_duplicate_gateways_and_6xx_failover() -> None:
    with pytest.raises(ValueError, match="the same gateway address appears twice"):
        Trunk("t", "outside", (A, replace(A, name="again")))
    with pytest.raises(ValueError, match=r"failover statuses must be 300\.\.599"):
        Trunk("t", "outside", (A,), failover_statuses=frozenset({503, 603}))
    with pytest.raises(ValueError, match="trunk t has no gateways"):
        Trunk("t", "outside", ())


@pytest.mark.parametrize(
    ("status", "expected"),
    [(408, True), (480, False), (486, False), (500, True), (503, True), (603, False)],
)
def test_should_failover(status: int, expected: bool) -> None:
    assert trunk().should_failover(status) is expected


def test_failover_statuses_are_configurable() -> None:
    custom = trunk(failover_statuses=frozenset({404, 503}))
    assert custom.should_failover(404)
    assert not custom.should_failover(500)


# -- candidates ------------------------------------------------------------------------


def test_candidates_go_by_priority() -> None:
    state = TrunkState(trunk())
    rng = random.Random(1)
    for _ in range(50):
        order = state.candidates(rng)
        assert {g.name for g in order[:3]} == {"a", "b", "c"}
        assert order[3] == BACKUP


def test_weighted_distribution_within_three_percent() -> None:
    state = TrunkState(trunk())
    rng = random.Random(2782)
    draws = 10_000
    first = Counter(state.candidates(rng)[0].name for _ in range(draws))
    for gateway in (A, B, C):
        assert first[gateway.name] / draws == pytest.approx(gateway.weight / 100, abs=0.03)
    assert first["backup"] == 0


def test_second_choice_follows_remaining_weights() -> None:
    # RFC 2782: after A (60) is picked, B (30) and C (10) share 3:1.
    state = TrunkState(trunk())
    rng = random.Random(7)
    seconds = Counter(
        order[1].name for order in (state.candidates(rng) for _ in range(10_000)) if order[0] == A
    )
    total = seconds["b"] + seconds["c"]
    assert seconds["b"] / total == pytest.approx(0.75, abs=0.03)


def test_weight_zero_comes_last_but_is_tried() -> None:
    spare = Gateway("spare", "198.51.100.9", priority=1, weight=0)
    state = TrunkState(trunk(A, spare, B))
    rng = random.Random(3)
    for _ in range(200):
        assert state.candidates(rng)[-1] == spare


def test_all_weight_zero_is_shuffled_evenly() -> None:
    x = Gateway("x", "198.51.100.11", weight=0)
    y = Gateway("y", "198.51.100.12", weight=0)
    state = TrunkState(trunk(x, y))
    rng = random.Random(4)
    first = Counter(state.candidates(rng)[0].name for _ in range(10_000))
    assert first["x"] / 10_000 == pytest.approx(0.5, abs=0.03)


def test_max_attempts_truncates() -> None:
    state = TrunkState(trunk(max_attempts=2))
    assert len(state.candidates(random.Random(0))) == 2


def test_unknown_is_usable_and_down_is_skipped() -> None:
    state = TrunkState(trunk())
    assert state.gateway_health(A.key) is Health.UNKNOWN
    assert A in state.candidates(random.Random(0))
    fail(state, A, 3)
    assert A not in state.candidates(random.Random(0))
    assert len(state.candidates(random.Random(0))) == 3


def test_all_down_fails_fast_by_default() -> None:
    state = TrunkState(trunk(A, BACKUP))
    fail(state, A, 3)
    fail(state, BACKUP, 3)
    assert state.candidates(random.Random(0)) == []


def test_all_down_tries_every_gateway_when_asked() -> None:
    state = TrunkState(trunk(BACKUP, A, try_when_all_down=True))
    fail(state, A, 3)
    fail(state, BACKUP, 3)
    assert state.candidates(random.Random(0)) == [A, BACKUP]
    # One gateway up again: only it is offered.
    succeed(state, BACKUP, 2)
    assert state.candidates(random.Random(0)) == [BACKUP]


# -- hysteresis ------------------------------------------------------------------------


def test_down_after_n_failures_up_after_m_successes() -> None:
    state = TrunkState(trunk())
    assert succeed(state, A, 1) == [HealthChange("carrier", A, Health.UNKNOWN, Health.UP)]
    assert fail(state, A, 2) == []
    assert state.gateway_health(A.key) is Health.UP
    assert fail(state, A, 1) == [HealthChange("carrier", A, Health.UP, Health.DOWN)]
    assert succeed(state, A, 1) == []
    assert state.gateway_health(A.key) is Health.DOWN
    assert succeed(state, A, 1) == [HealthChange("carrier", A, Health.DOWN, Health.UP)]


def test_unknown_goes_down_only_after_n_failures() -> None:
    state = TrunkState(trunk())
    assert fail(state, A, 2) == []
    assert state.gateway_health(A.key) is Health.UNKNOWN
    assert [c.new for c in fail(state, A, 1)] == [Health.DOWN]


@pytest.mark.parametrize("start", [Health.UP, Health.DOWN])
def test_alternating_results_do_not_flap(start: Health) -> None:
    state = TrunkState(trunk())
    if start is Health.UP:
        succeed(state, A, 1)
    else:
        fail(state, A, 3)
    for _ in range(20):
        assert fail(state, A, 1) == []
        assert succeed(state, A, 1) == []
    assert state.gateway_health(A.key) is start


def test_any_response_is_alive_unless_listed_as_down() -> None:
    lenient = TrunkState(trunk())
    for status in (404, 405, 503, 503, 503):
        lenient.probe_sent(A.key, 0.0)
        lenient.probe_result(A.key, status, 0.0)
    assert lenient.gateway_health(A.key) is Health.UP

    strict = TrunkState(trunk(probe=replace(POLICY, down_statuses=frozenset({503}))))
    for _ in range(3):
        strict.probe_sent(A.key, 0.0)
        strict.probe_result(A.key, 503, 0.0)
    assert strict.gateway_health(A.key) is Health.DOWN


def test_passive_call_results_count_like_probes() -> None:
    state = TrunkState(trunk())
    changes = [state.call_result(A.key, None, 1.0) for _ in range(3)]
    assert changes[:2] == [None, None]
    assert changes[2] == HealthChange("carrier", A, Health.UNKNOWN, Health.DOWN, 1.0)
    assert changes[2] is not None and changes[2].at == 1.0
    # A 486 came from the gateway: it is alive.
    state.call_result(A.key, 486, 2.0)
    state.call_result(A.key, 486, 2.0)
    assert state.gateway_health(A.key) is Health.UP


def test_passive_is_ignored_without_probing() -> None:
    off = TrunkState(trunk(probe=ProbePolicy(enabled=False)))
    for _ in range(5):
        assert off.call_result(A.key, None, 0.0) is None
    assert off.gateway_health(A.key) is Health.UNKNOWN
    no_passive = TrunkState(trunk(probe=replace(POLICY, passive=False)))
    for _ in range(5):
        no_passive.call_result(A.key, None, 0.0)
    assert no_passive.gateway_health(A.key) is Health.UNKNOWN


def test_unknown_gateway_key_raises() -> None:
    state = TrunkState(trunk())
    with pytest.raises(KeyError, match=r"trunk carrier has no gateway udp:192\.0\.2\.1"):
        state.gateway_health("udp:192.0.2.1")


# -- timers ----------------------------------------------------------------------------


def test_due_probes_and_next_deadline() -> None:
    state = TrunkState(trunk(A, B))
    # Never probed: due at once.
    assert state.due_probes(100.0) == [A, B]
    assert state.next_deadline() == 0.0
    state.probe_sent(A.key, 100.0)
    state.probe_sent(B.key, 100.0)
    assert state.due_probes(100.0) == []
    # In flight: the next event is the probe timeout.
    assert state.next_deadline() == 105.0
    state.probe_result(A.key, 200, 100.2)
    assert state.next_deadline() == 105.0  # B still in flight
    state.probe_result(B.key, 200, 100.3)
    assert state.next_deadline() == 130.0
    assert state.due_probes(129.9) == []
    assert state.due_probes(130.0) == [A, B]


def test_expired_probe_counts_as_failure_and_late_result_is_ignored() -> None:
    state = TrunkState(trunk(A))
    now = 0.0
    changes: list[HealthChange] = []
    for _ in range(3):
        assert state.due_probes(now) == [A]
        state.probe_sent(A.key, now)
        assert state.expire_probes(now + 4.9) == []
        changes += state.expire_probes(now + 5.0)
        now += 30.0
    assert changes == [HealthChange("carrier", A, Health.UNKNOWN, Health.DOWN)]
    assert changes[0].at == 65.0
    # The answer to the last probe arrives after it was counted lost.
    assert state.probe_result(A.key, 200, 66.0) is None
    assert state.gateway_health(A.key) is Health.DOWN


def test_a_slow_probe_does_not_stack_probes() -> None:
    state = TrunkState(trunk(A, probe=replace(POLICY, interval=2.0, timeout=5.0)))
    state.probe_sent(A.key, 0.0)
    assert state.due_probes(3.0) == []  # interval passed, but one is still in flight
    state.expire_probes(5.0)
    assert state.due_probes(5.0) == [A]


def test_probing_disabled_has_no_deadline() -> None:
    state = TrunkState(trunk(probe=ProbePolicy(enabled=False)))
    assert state.due_probes(1000.0) == []
    assert state.next_deadline() is None


# -- replication and reconfiguration ---------------------------------------------------


def test_to_dict_round_trip() -> None:
    config = trunk()
    state = TrunkState(config)
    fail(state, A, 3)
    succeed(state, B, 1)
    fail(state, C, 1)
    data = json.loads(json.dumps(state.to_dict()))
    copy = TrunkState.from_dict(config, data)
    assert copy.to_dict() == state.to_dict()
    assert copy.gateway_health(A.key) is Health.DOWN
    assert copy.gateway_health(B.key) is Health.UP
    # Timers do not travel: the standby probes at once.
    assert copy.due_probes(0.0) == [A, B, C, BACKUP]
    # Counters do: two more failures take C down.
    assert [c.new for c in fail(copy, C, 2)] == [Health.DOWN]


def test_from_dict_errors() -> None:
    config = trunk()
    good = TrunkState(config).to_dict()
    with pytest.raises(TrunkStateError, match="unsupported trunk state version: 9"):
        TrunkState.from_dict(config, {**good, "version": 9})
    with pytest.raises(TrunkStateError, match="trunk state of 'other', not 'carrier'"):
        TrunkState.from_dict(config, {**good, "trunk": "other"})
    bad = {**good, "gateways": {A.key: {"health": "sideways", "failures": 0, "successes": 0}}}
    with pytest.raises(TrunkStateError, match="bad trunk state of carrier"):
        TrunkState.from_dict(config, bad)


def test_reconfigure_keeps_state_of_unchanged_keys() -> None:
    table = TrunkTable([trunk(A, B), Trunk("core", "inside", (BACKUP,), POLICY)])
    fail(table["carrier"], A, 3)
    fail(table["carrier"], B, 3)
    table["carrier"].probe_sent(A.key, 50.0)
    new_b = replace(B, port=5070)  # a new address: a new gateway
    renamed_a = replace(A, name="a-renamed", weight=5)
    table.reconfigure([trunk(renamed_a, new_b, C)])
    state = table["carrier"]
    assert state.gateway_health(A.key) is Health.DOWN
    assert state.gateway_health(new_b.key) is Health.UNKNOWN
    assert state.gateway_health(C.key) is Health.UNKNOWN
    # Timers are kept too: A's probe is still in flight, the new gateways are due.
    assert state.due_probes(60.0) == [new_b, C]
    assert state.next_deadline() == 0.0
    state.probe_sent(new_b.key, 60.0)
    state.probe_sent(C.key, 60.0)
    assert state.next_deadline() == 55.0
    state.probe_result(A.key, 200, 56.0)
    assert state.due_probes(79.9) == []  # A's next probe: 30 s after the old node's
    assert state.due_probes(80.0) == [renamed_a]
    assert "core" not in table
    assert len(table) == 1
    assert renamed_a not in state.candidates(random.Random(0))


def test_reconfigure_rejects_duplicate_trunk_names() -> None:
    with pytest.raises(ValueError, match="trunk carrier is configured twice"):
        TrunkTable([trunk(), trunk()])


def test_table_deadlines_probes_and_restore() -> None:
    table = TrunkTable(
        [trunk(A), Trunk("core", "inside", (BACKUP,), replace(POLICY, interval=10.0))]
    )
    assert [(s.trunk.name, g) for s, g in table.due_probes(0.0)] == [
        ("carrier", A),
        ("core", BACKUP),
    ]
    for state, gateway in table.due_probes(0.0):
        state.probe_sent(gateway.key, 0.0)
    assert table.next_deadline() == 5.0
    changes = table.expire_probes(5.0)
    assert changes == []
    assert table.next_deadline() == 10.0

    fail(table["core"], BACKUP, 3)
    standby = TrunkTable([trunk(A), Trunk("core", "inside", (BACKUP,), POLICY)])
    standby.restore(json.loads(json.dumps(table.to_dict())))
    assert standby["core"].gateway_health(BACKUP.key) is Health.DOWN
    assert standby["core"].trunk.probe == POLICY  # the standby's own config stays
    assert TrunkTable([]).next_deadline() is None


# -- the probe request -----------------------------------------------------------------

LOCAL = ListenAddress(Transport.UDP, "198.51.100.254", 5062)


def test_probe_request_serialises_and_parses() -> None:
    request = probe_request(
        A,
        Destination(Transport.UDP, "198.51.100.1", 5060),
        LOCAL,
        user_agent="sbc",
        call_id="probe-1@sbc",
        branch="z9hG4bKprobe1",
        tag="t1",
        now=12.5,
    )
    wire = bytes(request)
    parsed = parse_message(wire)
    assert wire.startswith(b"OPTIONS sip:198.51.100.1:5060 SIP/2.0\r\n")
    assert parsed.method == "OPTIONS"  # type: ignore[union-attr]
    assert parsed.max_forwards == 70
    via = parsed.via
    assert (via.host, via.port, via.branch, via.rport) == (
        "198.51.100.254",
        5062,
        "z9hG4bKprobe1",
        "",
    )
    assert parsed.from_.tag == "t1"
    assert str(parsed.from_.uri) == "sip:198.51.100.254:5062"
    assert parsed.to.tag is None
    assert isinstance(parsed.to.uri, SipUri) and parsed.to.uri.host == "198.51.100.1"
    assert parsed.call_id == "probe-1@sbc"
    assert (parsed.cseq.seq, parsed.cseq.method) == (1, "OPTIONS")
    assert str(parsed.contacts[0].uri) == "sip:198.51.100.254:5062"
    assert parsed.headers.get("Timestamp") == "12.500"
    assert parsed.headers.get("Accept") == "application/sdp"
    assert parsed.headers.get("User-Agent") == "sbc"
    assert parsed.body == b""
    assert bytes(parsed) == wire


def test_probe_request_over_tls_to_a_host_name() -> None:
    gateway = Gateway("tls", "gw.example.net", transport=Transport.TLS)
    local = ListenAddress(Transport.TLS, "2001:db8::5", 5063)
    request = probe_request(
        gateway,
        Destination(Transport.TLS, "2001:db8::9", 5061),
        local,
        user_agent="sbc",
        call_id="c",
        branch="z9hG4bKx",
        tag="t",
        now=1.0,
        cseq=7,
    )
    parsed = parse_message(bytes(request))
    assert parsed.start_line() == "OPTIONS sips:gw.example.net SIP/2.0"
    assert parsed.via.transport == "TLS"
    assert str(parsed.headers.get("Via")).startswith("SIP/2.0/TLS [2001:db8::5]:5063;")
    assert parsed.cseq.seq == 7


def test_probe_request_refuses_mismatches() -> None:
    destination = Destination(Transport.TCP, "198.51.100.1", 5060)
    with pytest.raises(ValueError, match="gateway a is udp, destination tcp, listener udp"):
        probe_request(A, destination, LOCAL, user_agent="sbc", call_id="c",
                      branch="z9hG4bKx", tag="t", now=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="lacks the RFC 3261 magic cookie"):
        probe_request(A, replace(destination, transport=Transport.UDP), LOCAL,
                      user_agent="sbc", call_id="c", branch="x", tag="t", now=0.0)  # fmt: skip


# -- review findings -------------------------------------------------------------------


def test_turning_probing_off_does_not_leave_a_down_gateway_down_for_good() -> None:
    # With probing off nothing (no probe, no passive result) can bring a gateway back:
    # the health it had must not outlive the reload that turned probing off.
    table = TrunkTable([trunk(A, BACKUP)])
    fail(table["carrier"], A, 3)
    fail(table["carrier"], BACKUP, 3)
    assert table["carrier"].candidates(random.Random(0)) == []
    table.reconfigure([trunk(A, BACKUP, probe=ProbePolicy(enabled=False))])
    state = table["carrier"]
    assert state.gateway_health(A.key) is Health.UNKNOWN
    assert state.candidates(random.Random(0)) == [A, BACKUP]
    # Nor may a peer's DOWN, restored into a trunk that does not probe.
    probing = TrunkState(trunk(A, BACKUP))
    fail(probing, A, 3)
    off = TrunkState.from_dict(trunk(A, BACKUP, probe=ProbePolicy(enabled=False)),
                               probing.to_dict())  # fmt: skip
    assert off.gateway_health(A.key) is Health.UNKNOWN


def _directory(*gateways: Gateway, **kwargs: Any) -> Directory:
    return Directory(TrunkTable([trunk(*gateways, **kwargs)]), rng=random.Random(0))


def test_results_for_a_gateway_removed_by_a_reload_are_ignored() -> None:
    # A call (or a probe) to A is in flight when a reload drops A from the trunk:
    # its outcome must not raise into the controller.
    directory = _directory(A, B)
    directory.probe_sent("carrier", A.key, 0.0)
    directory.trunks.reconfigure([trunk(B)])
    directory.call_result("carrier", A.key, None, 1.0)
    directory.call_result("carrier", A.key, 503, 1.0)
    directory.probe_result("carrier", A.key, 200, 1.0)
    directory.probe_sent("carrier", A.key, 1.0)
    assert directory.trunks["carrier"].gateway_health(B.key) is Health.UNKNOWN


def test_unresolved_gateways_do_not_use_up_max_attempts() -> None:
    named = Gateway("named", "gw.example.net", 5060, priority=0)
    directory = _directory(named, A, max_attempts=1)
    # gw.example.net is not resolved (yet): the call goes to A rather than nowhere.
    plan = directory.trunk("carrier", parse_uri("sip:1000@sbc.example.org"), 0.0)
    assert plan is not None
    assert [t.gateway for t in plan.targets] == [A.key]


@pytest.mark.parametrize("status", [501, 513, 580])
def test_a_trunk_call_fails_over_on_every_5xx_the_trunk_lists(status: int) -> None:
    from tests.unit.test_b2bua_flows import (
        PSTN,
        answer,
        controller,
        hop_of,
        receive,
        requests,
        responses,
        start_call,
    )

    first_gw = Gateway("first", "203.0.113.21", 5060, priority=0)
    second_gw = Gateway("second", "203.0.113.22", 5060, priority=1)
    config = Trunk("pstn", "inside", (first_gw, second_gw), POLICY)
    assert config.should_failover(status)
    c = controller(rules=PSTN, targets=Directory(TrunkTable([config]), rng=random.Random(0)))
    (invite,), _ = start_call(c)
    flow = Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.21", 5060)
    step = receive(c, answer(invite, status), flow, 0.1)
    assert responses(step) == []  # the caller hears nothing of the failed gateway
    assert [r.method for r in requests(step, "INVITE")] == ["INVITE"]
    assert hop_of(step, "INVITE") == second_gw.static_destination
