"""Health per address of a trunk gateway given by host name.

A name resolving to two servers (two SRV targets, two A records) of which one is
dead: probes went to the first address only, and the results of both servers'
calls landed on one record, so the name flapped (or a dead first address took the
live second one down with it) while half the calls waited 32 s (Timer B) for the
dead server. Each address now has its own up/down state, probes and holds; the
gateway counts as down only when every address is. Gateways given by IP keep
their one record (their one address is the gateway).
"""

from __future__ import annotations

import json
import logging
import random

import pytest

from sbc.b2bua.controller import AllocateMedia, CallController
from sbc.b2bua.realm import Hop
from sbc.b2bua.targets import Directory
from sbc.b2bua.trunks import (
    Gateway,
    Health,
    HealthChange,
    ProbePolicy,
    Trunk,
    TrunkState,
    TrunkTable,
)
from sbc.sip.message import Request
from sbc.sip.uri import parse_uri
from sbc.transport.base import Destination, Flow, Transport
from tests.unit.test_b2bua_flows import (
    CALLER,
    IN,
    PSTN,
    answer,
    controller,
    hop_of,
    invite_text,
    receive,
    requests,
    session,
    statuses,
)

URI = parse_uri("sip:1000@sbc.example")
POLICY = ProbePolicy(interval=30.0, timeout=5.0, down_after=3, up_after=2)

NAMED = Gateway("carrier", "gw.carrier.example", priority=0)
STATIC = Gateway("backup", "203.0.113.50", 5060, priority=1)
STATIC_TARGET = Destination(Transport.UDP, "203.0.113.50", 5060)
LIVE = Destination(Transport.UDP, "192.0.2.21", 5060)
DEAD = Destination(Transport.UDP, "192.0.2.22", 5060)
OTHER = Destination(Transport.UDP, "192.0.2.23", 5060)
LIVE_KEY, DEAD_KEY, OTHER_KEY = "192.0.2.21:5060", "192.0.2.22:5060", "192.0.2.23:5060"


def directory(
    *gateways: Gateway, policy: ProbePolicy = POLICY, try_when_all_down: bool = False
) -> tuple[Directory, TrunkState]:
    trunk = Trunk(
        "pstn", "inside", gateways or (NAMED,), probe=policy, try_when_all_down=try_when_all_down
    )
    table = TrunkTable([trunk])
    found = Directory(table, rng=random.Random(0))
    found.resolved[NAMED.key] = (LIVE, DEAD)
    return found, table["pstn"]


def planned(found: Directory, now: float) -> list[Destination]:
    plan = found.trunk("pstn", URI, now)
    assert plan is not None
    return [target.destination for target in plan.targets]


def probe_round(found: Directory, now: float, alive: set[Destination]) -> list[Destination]:
    """Every due probe sent at ``now``; those to ``alive`` answered 200, the rest lost
    (counted at their timeout). The destinations probed, in order."""
    due = found.due_probes(now)
    for trunk, gateway, destination in due:
        found.probe_sent(trunk, gateway.key, now, destination)
        if destination in alive:
            found.probe_result(trunk, gateway.key, 200, now + 0.1, destination)
    found.due_probes(now + POLICY.timeout)  # expires the lost ones
    return [destination for _, _, destination in due]


def test_probes_go_to_every_address_of_a_name_each_on_its_own_schedule() -> None:
    found, _ = directory()
    assert probe_round(found, 0.0, {LIVE, DEAD}) == [LIVE, DEAD]
    assert found.next_probe() == 30.0
    # A new address of the name is probed at once, then every interval from then.
    found.resolved[NAMED.key] = (LIVE, DEAD, OTHER)
    assert probe_round(found, 12.0, set()) == [OTHER]
    assert found.next_probe() == 30.0
    assert probe_round(found, 30.0, {LIVE}) == [LIVE, DEAD]
    assert found.next_probe() == 42.0
    assert probe_round(found, 42.0, set()) == [OTHER]


def test_a_dead_address_goes_down_after_the_configured_failures_and_is_skipped() -> None:
    found, state = directory()
    for round_ in range(2):
        probe_round(found, 30.0 * round_, {LIVE})
        assert state.address_health(NAMED.key)[DEAD_KEY] is Health.UNKNOWN
        assert planned(found, 30.0 * round_ + 6) == [LIVE, DEAD]
    probe_round(found, 60.0, {LIVE})
    assert state.address_health(NAMED.key) == {LIVE_KEY: Health.UP, DEAD_KEY: Health.DOWN}
    assert state.gateway_health(NAMED.key) is Health.UP
    assert planned(found, 66.0) == [LIVE]
    # Still probed: two answers (up_after) bring it back.
    probe_round(found, 90.0, {LIVE, DEAD})
    assert planned(found, 96.0) == [LIVE]
    probe_round(found, 120.0, {LIVE, DEAD})
    assert planned(found, 126.0) == [LIVE, DEAD]


def test_the_gateway_is_down_only_when_every_address_is() -> None:
    found, state = directory(NAMED, STATIC)
    for round_ in range(3):
        probe_round(found, 30.0 * round_, {LIVE, STATIC_TARGET})
    assert state.gateway_health(NAMED.key) is Health.UP
    assert planned(found, 70.0) == [LIVE, STATIC_TARGET]
    for round_ in range(3, 6):
        probe_round(found, 30.0 * round_, {STATIC_TARGET})
    assert state.address_health(NAMED.key) == {LIVE_KEY: Health.DOWN, DEAD_KEY: Health.DOWN}
    assert state.gateway_health(NAMED.key) is Health.DOWN
    assert state.candidates(random.Random(0), 160.0) == [STATIC]
    assert planned(found, 160.0) == [STATIC_TARGET]
    # With nowhere else to go, every address of every gateway is tried anyway.
    found, state = directory(try_when_all_down=True)
    for round_ in range(3):
        probe_round(found, 30.0 * round_, set())
    assert state.gateway_health(NAMED.key) is Health.DOWN
    assert planned(found, 70.0) == [LIVE, DEAD]


def test_passive_results_hit_the_address_that_answered() -> None:
    found, state = directory()
    for n in range(3):
        found.call_result("pstn", NAMED.key, None, float(n), destination=DEAD)
        found.call_result("pstn", NAMED.key, 200, float(n), destination=LIVE)
    assert state.address_health(NAMED.key) == {LIVE_KEY: Health.UP, DEAD_KEY: Health.DOWN}
    assert state.gateway_health(NAMED.key) is Health.UP
    assert planned(found, 3.0) == [LIVE]
    # A result for an address DNS no longer gives is moot.
    found.call_result("pstn", NAMED.key, None, 4.0, destination=OTHER)
    assert set(state.address_health(NAMED.key)) == {LIVE_KEY, DEAD_KEY}


def test_a_503_retry_after_holds_back_only_that_address() -> None:
    found, state = directory(policy=ProbePolicy(enabled=False))
    found.call_result("pstn", NAMED.key, 503, 10.0, retry_after=60, destination=LIVE)
    assert state.held_until(NAMED.key, LIVE_KEY) == 70.0
    assert state.held_until(NAMED.key, DEAD_KEY) == 0.0
    assert planned(found, 69.9) == [DEAD]
    assert planned(found, 70.0) == [LIVE, DEAD]
    # Both held: the gateway as a whole is out until the first hold ends.
    found.call_result("pstn", NAMED.key, 503, 80.0, retry_after=30, destination=LIVE)
    found.call_result("pstn", NAMED.key, 503, 80.0, retry_after=10, destination=DEAD)
    assert planned(found, 85.0) == []
    assert planned(found, 90.0) == [DEAD]


def test_a_dns_change_forgets_vanished_addresses_and_new_ones_start_unknown() -> None:
    found, state = directory()
    for round_ in range(3):
        probe_round(found, 30.0 * round_, {LIVE})
    assert state.address_health(NAMED.key)[DEAD_KEY] is Health.DOWN
    found.resolved[NAMED.key] = (LIVE, OTHER)
    assert planned(found, 70.0) == [LIVE, OTHER]
    assert state.address_health(NAMED.key) == {LIVE_KEY: Health.UP, OTHER_KEY: Health.UNKNOWN}
    # The dead server coming back into DNS starts afresh, as any new address.
    found.resolved[NAMED.key] = (LIVE, DEAD)
    assert planned(found, 71.0) == [LIVE, DEAD]
    assert state.address_health(NAMED.key)[DEAD_KEY] is Health.UNKNOWN


def test_the_last_live_address_vanishing_from_dns_takes_the_gateway_down() -> None:
    found, state = directory()
    for round_ in range(3):
        probe_round(found, 30.0 * round_, {LIVE})
    found.resolved[NAMED.key] = (DEAD,)
    assert planned(found, 70.0) == []
    assert state.gateway_health(NAMED.key) is Health.DOWN


def test_a_reload_keeps_per_address_health_and_holds() -> None:
    found, state = directory()
    for round_ in range(3):
        probe_round(found, 30.0 * round_, {LIVE})
    found.call_result("pstn", NAMED.key, 503, 70.0, retry_after=60, destination=LIVE)
    renamed = Gateway("renamed", NAMED.host, weight=5)
    found.trunks.reconfigure([Trunk("pstn", "inside", (renamed, STATIC), probe=POLICY)])
    state = found.trunks["pstn"]
    assert state.address_health(NAMED.key) == {LIVE_KEY: Health.UP, DEAD_KEY: Health.DOWN}
    assert state.held_until(NAMED.key, LIVE_KEY) == 130.0
    assert state.gateway_health(NAMED.key) is Health.UP
    assert planned(found, 131.0) == [LIVE, STATIC_TARGET]


def test_state_dicts_carry_per_address_health() -> None:
    found, _ = directory(NAMED, STATIC)
    for round_ in range(3):
        probe_round(found, 30.0 * round_, {LIVE})
    data = json.loads(json.dumps(found.trunks.to_dict()))
    assert data["trunks"]["pstn"]["gateways"][NAMED.key]["addresses"] == {
        LIVE_KEY: {"health": "up", "failures": 0, "successes": 3},
        DEAD_KEY: {"health": "down", "failures": 3, "successes": 0},
    }
    assert "addresses" not in data["trunks"]["pstn"]["gateways"][STATIC.key]
    standby = TrunkTable([Trunk("pstn", "inside", (NAMED, STATIC), probe=POLICY)])
    standby.restore(data)
    assert standby["pstn"].address_health(NAMED.key) == {
        LIVE_KEY: Health.UP,
        DEAD_KEY: Health.DOWN,
    }
    assert standby.to_dict() == data


def test_health_changes_name_the_address_and_the_gateway(
    caplog: pytest.LogCaptureFixture,
) -> None:
    found, state = directory()
    with caplog.at_level(logging.INFO, logger="sbc.b2bua"):
        for round_ in range(3):
            probe_round(found, 30.0 * round_, {LIVE})
    down = [r.getMessage() for r in caplog.records if "down" in r.getMessage()]
    assert down and all(DEAD_KEY in line and NAMED.key in line for line in down), down
    assert not any(LIVE_KEY in line for line in down)
    # One failure more of the live address: the change says the gateway went down too.
    for n in range(3):
        state.probe_sent(NAMED.key, 100.0 + n, LIVE_KEY)
        change = state.probe_result(NAMED.key, None, 100.0 + n, LIVE_KEY)
    assert change == HealthChange(
        "pstn",
        NAMED,
        Health.UP,
        Health.DOWN,
        address=LIVE_KEY,
        gateway_change=HealthChange("pstn", NAMED, Health.UP, Health.DOWN),
    )


def test_static_gateways_keep_one_record_whatever_the_destination() -> None:
    found, state = directory(STATIC)
    for n in range(3):
        found.call_result("pstn", STATIC.key, None, float(n), destination=STATIC_TARGET)
    assert state.gateway_health(STATIC.key) is Health.DOWN
    assert state.address_health(STATIC.key) == {}
    assert [d for _, _, d in found.due_probes(0.0)] == [STATIC_TARGET]
    assert "addresses" not in state.to_dict()["gateways"][STATIC.key]


# -- through the controller -------------------------------------------------------------


def test_the_controller_probes_every_address_and_reports_calls_by_address() -> None:
    policy = ProbePolicy(interval=10.0, timeout=2.0, down_after=2, up_after=1)
    table = TrunkTable([Trunk("pstn", "inside", (NAMED,), probe=policy)])
    found = Directory(table, rng=random.Random(1))
    found.resolved[NAMED.key] = (LIVE, DEAD)
    c = controller(rules=PSTN, targets=found)
    state = table["pstn"]

    def flow(destination: Destination) -> Flow:
        return Flow(Transport.UDP, IN.host, IN.port, destination.host, destination.port)

    def probe(c: CallController, now: float) -> dict[str, Request]:
        out: dict[str, Request] = {}
        for outgoing in c.handle_timers(now).output.messages:
            assert isinstance(outgoing.message, Request)
            assert outgoing.message.method == "OPTIONS"
            assert isinstance(outgoing.destination, Hop)
            out[outgoing.destination.destination.host] = outgoing.message
        return out

    for now in (0.0, 10.0):
        probes = probe(c, now)
        assert set(probes) == {LIVE.host, DEAD.host}
        assert probes[DEAD.host].raw_uri == "sip:gw.carrier.example"
        receive(c, answer(probes[LIVE.host], 200), flow(LIVE), now + 0.1)
        c.handle_timers(now + 2.0)
    assert state.address_health(NAMED.key) == {LIVE_KEY: Health.UP, DEAD_KEY: Health.DOWN}

    # Calls go to the live server only; its 503 with Retry-After holds back that one.
    step = receive(c, invite_text(), CALLER, 12.5)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, session(), 12.5)
    (invite,) = requests(step, "INVITE")
    assert invite.raw_uri == "sip:1000@gw.carrier.example"
    assert hop_of(step, "INVITE") == LIVE
    step = receive(c, answer(invite, 503, extra="Retry-After: 60\r\n"), flow(LIVE), 12.6)
    assert requests(step, "INVITE") == [] and statuses(step) == [500]
    assert state.held_until(NAMED.key, LIVE_KEY) == 72.6
    assert state.held_until(NAMED.key, DEAD_KEY) == 0.0
    assert state.gateway_health(NAMED.key) is Health.UP
