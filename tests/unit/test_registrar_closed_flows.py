"""Bindings whose TCP/TLS connection closed are not used any more (RFC 5626 5.3, 6):
the embedded registrar, its location service (indexes, caps, replication) and the
registration relay; pure, a fake clock throughout."""

from __future__ import annotations

from sbc.registrar.location import LocationService
from sbc.registrar.relay import Forward, RegistrationRelay, RelayedBinding
from sbc.transport.base import Destination, Flow, Transport
from tests.unit.test_registrar import (
    FLOW,
    INSTANCE,
    LISTEN,
    T0,
    TCP_FLOW,
    make_registrar,
    register,
)
from tests.unit.test_registration_relay_bindings import (
    DESK,
    OUTSIDE,
    relay,
    relayed,
    upstream_answer,
)
from tests.unit.test_registration_relay_bindings import (
    register as relay_register,
)

OTHER_TCP = Flow(Transport.TCP, "203.0.113.1", 5060, "198.51.100.31", 52000, connection_id=8)


def tcp(port: int, connection_id: int) -> Flow:
    return Flow(Transport.TCP, "203.0.113.1", 5060, "198.51.100.30", port, connection_id)


# -- the embedded registrar ------------------------------------------------------------


def test_only_the_closed_connections_bindings_go() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(), TCP_FLOW, "access", LISTEN, T0)
    desk = ("<sip:alice@192.0.2.11>",)
    registrar.register(register(contacts=desk, call_id="d"), FLOW, "access", LISTEN, T0)
    bob = ("<sip:bob@192.0.2.12;transport=tcp>",)
    registrar.register(
        register(user="bob", contacts=bob, call_id="b"), OTHER_TCP, "access", LISTEN, T0
    )
    assert TCP_FLOW.connection_id is not None
    removed = registrar.connection_closed(TCP_FLOW.connection_id, T0 + 1)
    assert [(b.aor, b.contact) for b in removed] == [("alice", "sip:alice@192.0.2.10:5062")]
    assert [b.contact for b in registrar.location.lookup("alice", T0 + 1)] == [
        "sip:alice@192.0.2.11"
    ]
    assert [b.contact for b in registrar.location.lookup("bob", T0 + 1)] == [
        "sip:bob@192.0.2.12;transport=tcp"
    ]
    # Reported once: a second report of the same connection changes nothing.
    assert registrar.connection_closed(TCP_FLOW.connection_id, T0 + 2) == []


def test_a_user_left_without_bindings_frees_its_place() -> None:
    registrar = make_registrar(auth_required=False, max_aors=1)
    assert registrar.register(register(), TCP_FLOW, "access", LISTEN, T0).response.status == 200
    refused = registrar.register(register(user="bob", call_id="b"), FLOW, "access", LISTEN, T0)
    assert refused.response.status == 503
    assert TCP_FLOW.connection_id is not None
    registrar.connection_closed(TCP_FLOW.connection_id, T0 + 1)
    assert registrar.location.aors() == []
    assert len(registrar.location) == 0
    later = registrar.register(register(user="bob", call_id="b"), FLOW, "access", LISTEN, T0 + 1)
    assert later.response.status == 200


def test_a_binding_refreshed_over_a_new_connection_survives_the_old_ones_close() -> None:
    # The phone reconnected and registered again before the old connection's end
    # was noticed: the binding now lives on the new connection.
    registrar = make_registrar(auth_required=False)
    registrar.register(register(), tcp(51000, 7), "access", LISTEN, T0)
    registrar.register(register(cseq=2), tcp(51001, 9), "access", LISTEN, T0 + 5)
    assert registrar.connection_closed(7, T0 + 6) == []
    (binding,) = registrar.location.lookup("alice", T0 + 6)
    assert (binding.received.port, binding.connection_id) == (51001, 9)
    assert [b.connection_id for b in registrar.connection_closed(9, T0 + 7)] == [9]
    assert registrar.location.lookup("alice", T0 + 7) == []


def test_a_contact_unregistered_then_registered_over_udp_is_not_taken_by_the_close() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(), TCP_FLOW, "access", LISTEN, T0)
    registrar.register(register(cseq=2, expires="0"), TCP_FLOW, "access", LISTEN, T0 + 1)
    registrar.register(register(cseq=3), FLOW, "access", LISTEN, T0 + 2)
    assert registrar.connection_closed(7, T0 + 3) == []
    assert [b.received.transport for b in registrar.location.lookup("alice", T0 + 3)] == [
        Transport.UDP
    ]


def test_an_expired_binding_is_not_reported_again_by_the_close() -> None:
    registrar = make_registrar(auth_required=False, min_expires=60)
    registrar.register(register(expires="60"), TCP_FLOW, "access", LISTEN, T0)
    assert [b.aor for b in registrar.location.expire(T0 + 61)] == ["alice"]
    assert registrar.connection_closed(7, T0 + 62) == []


def test_the_next_flow_of_an_outbound_instance_takes_over() -> None:
    # RFC 5626 5.3: one target per instance, and a failed flow is not used: the
    # instance's other flow (reg-id 2, its own connection) is the one left.
    registrar = make_registrar(auth_required=False)
    one = f'<sip:alice@192.0.2.10:5062;transport=tcp>;+sip.instance="{INSTANCE}";reg-id=1'
    two = f'<sip:alice@192.0.2.10:5063;transport=tcp>;+sip.instance="{INSTANCE}";reg-id=2'
    first, second = register(contacts=(one,), call_id="f1"), register(contacts=(two,), call_id="f2")
    registrar.register(first, tcp(51000, 7), "access", LISTEN, T0)
    registrar.register(second, tcp(51001, 8), "access", LISTEN, T0 + 1)
    (target,) = registrar.location.lookup("alice", T0 + 1)
    assert target.connection_id == 8  # the latest registration ranks first
    registrar.connection_closed(8, T0 + 2)
    (target,) = registrar.location.lookup("alice", T0 + 2)
    assert (target.reg_id, target.connection_id, target.received.port) == (1, 7, 51000)
    registrar.connection_closed(7, T0 + 3)
    assert registrar.location.lookup("alice", T0 + 3) == []


def test_a_standby_applying_the_removal_ends_up_with_what_the_primary_has() -> None:
    registrar = make_registrar(auth_required=False)
    standby = LocationService()
    for request, flow in (
        (register(), TCP_FLOW),
        (register(user="bob", call_id="b", contacts=("<sip:bob@192.0.2.12>",)), FLOW),
    ):
        result = registrar.register(request, flow, "access", LISTEN, T0)
        standby.apply(result.added, result.removed)
    assert standby.to_dict() == registrar.location.to_dict()
    removed = registrar.connection_closed(7, T0 + 1)
    standby.apply((), removed)
    assert standby.to_dict() == registrar.location.to_dict()
    assert standby.aors() == ["bob"]


def test_replicated_bindings_are_not_taken_by_a_local_connection_with_that_number() -> None:
    # Connection ids are the numbering of the node that accepted the connection: a
    # connection #7 of the standby is not the primary's #7.
    primary = make_registrar(auth_required=False)
    result = primary.register(register(), TCP_FLOW, "access", LISTEN, T0)
    standby = make_registrar(auth_required=False)
    standby.location.apply(result.added, result.removed)
    assert standby.connection_closed(7, T0 + 1) == []
    assert len(standby.location.lookup("alice", T0 + 1)) == 1
    restored = LocationService.from_dict(primary.location.to_dict())
    assert restored.remove_connection(7) == []


def test_a_replicated_update_replaces_a_local_binding_and_its_connection() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(), TCP_FLOW, "access", LISTEN, T0)
    (local,) = registrar.location.lookup("alice", T0)
    registrar.location.apply((), (local,))
    assert registrar.connection_closed(7, T0 + 1) == []
    assert registrar.location.aors() == []


# -- the registration relay ------------------------------------------------------------

PHONE_TCP = Flow(Transport.TCP, "198.51.100.1", 5060, "198.51.100.77", 40123, connection_id=3)
NEXT_TCP = Flow(Transport.TCP, "198.51.100.1", 5060, "198.51.100.77", 40124, connection_id=4)


def token_of(r: RegistrationRelay) -> str:
    (binding,) = r.bindings()
    return binding.token


def test_a_relayed_phone_is_not_reached_over_its_closed_connection() -> None:
    r = relay()
    assert relayed(r, relay_register(1), T0, flow=PHONE_TCP).status == 200
    token = token_of(r)
    (located,) = r.location.lookup(token, T0)
    assert located.received == Destination(Transport.TCP, "198.51.100.77", 40123)
    assert r.connection_closed(9, T0 + 1) == []
    assert len(r.location.lookup(token, T0 + 1)) == 1
    gone = r.connection_closed(3, T0 + 1)
    assert [b.token for b in gone] == [token]
    assert r.location.lookup(token, T0 + 1) == []
    # The relayed binding (and its upstream registration) stays until it runs out.
    assert len(r) == 1
    assert r.connection_closed(3, T0 + 2) == []


def test_a_relayed_phone_registering_over_its_next_connection_keeps_its_upstream_contact() -> None:
    r = relay()
    relayed(r, relay_register(1), T0, flow=PHONE_TCP)
    token = token_of(r)
    r.connection_closed(3, T0 + 1)
    # From a new port: not answered from the cache, it goes upstream, and refreshes
    # the same upstream Contact (no stale token left beside a new one).
    forward = r.register(relay_register(2), NEXT_TCP, "outside", OUTSIDE, T0 + 2)
    assert isinstance(forward, Forward)
    assert token in (forward.request.headers.get("Contact") or "")
    answer = r.upstream_response(forward, relay_register(2), upstream_answer(forward), T0 + 2)
    assert answer.status == 200
    (located,) = r.location.lookup(token, T0 + 2)
    assert located.received.port == 40124
    # The new connection is the one that counts now.
    assert r.connection_closed(3, T0 + 3) == []
    assert [b.token for b in r.connection_closed(4, T0 + 3)] == [token]


def test_a_cached_refresh_over_a_new_connection_from_the_same_port_follows_it() -> None:
    r = relay()
    relayed(r, relay_register(1), T0, flow=PHONE_TCP)
    token = token_of(r)
    same_port = Flow(Transport.TCP, "198.51.100.1", 5060, "198.51.100.77", 40123, connection_id=5)
    r.connection_closed(3, T0 + 1)
    cached = r.register(relay_register(2), same_port, "outside", OUTSIDE, T0 + 2)
    assert not isinstance(cached, Forward) and cached.status == 200
    assert len(r.location.lookup(token, T0 + 2)) == 1
    assert [b.token for b in r.connection_closed(5, T0 + 3)] == [token]


def test_a_relayed_binding_keeps_its_connection_through_to_dict() -> None:
    r = relay()
    relayed(r, relay_register(1, DESK), T0, flow=PHONE_TCP)
    (binding,) = r.bindings()
    assert binding.connection_id == 3
    assert RelayedBinding.from_dict(binding.to_dict()) == binding


def test_a_phone_whose_connection_closes_while_the_upstream_decides_is_not_located() -> None:
    r = relay()
    forward = r.register(relay_register(1), PHONE_TCP, "outside", OUTSIDE, T0)
    assert isinstance(forward, Forward)
    # Closed before the upstream's 200 (nothing was located over it yet).
    r.connection_closed(3, T0 + 1)
    answer = r.upstream_response(forward, relay_register(1), upstream_answer(forward), T0 + 2)
    assert answer.status == 200
    token = token_of(r)
    # Registered upstream, but not reached here over the closed connection.
    assert r.location.lookup(token, T0 + 2) == []
    (binding,) = r.bindings()
    assert binding.connection_id is None and binding.upstream_expires_at > T0
    # Its next REGISTER, over a new connection, makes it reachable again.
    forward = r.register(relay_register(2), NEXT_TCP, "outside", OUTSIDE, T0 + 3)
    assert isinstance(forward, Forward)
    r.upstream_response(forward, relay_register(2), upstream_answer(forward), T0 + 3)
    (located,) = r.location.lookup(token, T0 + 3)
    assert located.received.port == 40124


def test_waiting_registers_are_forgotten_once_answered() -> None:
    r = relay()
    first = r.register(relay_register(1), PHONE_TCP, "outside", OUTSIDE, T0)
    assert isinstance(first, Forward)
    r.upstream_failed(first, relay_register(1))
    # Answered (failed) before the close: a later close and REGISTER over a new
    # connection with the same number is not mistaken for one that closed waiting.
    r.connection_closed(3, T0 + 1)
    again = Flow(Transport.TCP, "198.51.100.1", 5060, "198.51.100.77", 40125, connection_id=3)
    forward = r.register(relay_register(2), again, "outside", OUTSIDE, T0 + 2)
    assert isinstance(forward, Forward)
    r.upstream_response(forward, relay_register(2), upstream_answer(forward), T0 + 2)
    assert len(r.location.lookup(token_of(r), T0 + 2)) == 1
    assert r._waiting == {} and r._closed_waiting == set()
