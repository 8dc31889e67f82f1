"""Review of the embedded registrar and location service against RFC 3261 10.3,
RFC 5626 and RFC 3327, and what an operator expects; a fake clock throughout."""

from __future__ import annotations

import logging
import time

import pytest

from sbc.registrar.location import LocationService
from sbc.transport.base import Flow, Transport
from tests.unit.test_registrar import (
    FLOW,
    INSTANCE,
    LISTEN,
    T0,
    TCP_FLOW,
    Phone,
    contacts_of,
    make_registrar,
    register,
)


def test_expired_users_do_not_count_against_max_users() -> None:
    # Nothing in the app calls LocationService.expire(): users whose bindings ran
    # out must not keep new users out with 503 "Too Many Registered Users".
    registrar = make_registrar(auth_required=False, max_aors=1, min_expires=60)
    first = registrar.register(register(user="alice", expires="60"), FLOW, "access", LISTEN, T0)
    assert first.response.status == 200
    later = T0 + 61
    second = registrar.register(register(user="bob", call_id="b"), FLOW, "access", LISTEN, later)
    assert second.response.status == 200
    assert registrar.location.aors() == ["bob"]


def test_expired_bindings_are_freed_without_an_expire_call() -> None:
    # Memory of bindings nobody refreshes is given back as REGISTERs come in.
    registrar = make_registrar(auth_required=False)
    for n in range(20):
        req = register(user=f"u{n}", expires="60", call_id=f"c{n}")
        assert registrar.register(req, FLOW, "access", LISTEN, T0).response.status == 200
    later = T0 + 61
    registrar.register(register(user="bob", call_id="b"), FLOW, "access", LISTEN, later)
    assert len(registrar.location) == 1


def test_a_huge_number_of_contacts_is_refused_quickly() -> None:
    # The parser caps a header's values at MAX_LIST_VALUES (128); that many
    # distinct contacts are refused whole, and quickly.
    registrar = make_registrar(auth_required=False)
    contacts = tuple(
        ",".join(f"<sip:{n}@h>" for n in range(start, start + 32)) for start in range(0, 128, 32)
    )
    request = register(contacts=contacts)
    started = time.perf_counter()
    result = registrar.register(request, FLOW, "access", LISTEN, T0)
    elapsed = time.perf_counter() - started
    assert result.response.status == 503
    assert len(registrar.location) == 0
    assert elapsed < 1.0


def test_many_contacts_below_the_cap_with_removals_still_work() -> None:
    # The early cap must leave room for expires=0 removals of existing bindings.
    registrar = make_registrar(auth_required=False, max_contacts=2)
    two = ("<sip:alice@192.0.2.10:1>", "<sip:alice@192.0.2.10:2>")
    assert (
        registrar.register(register(contacts=two), FLOW, "access", LISTEN, T0).response.status
        == 200
    )
    swap = (
        "<sip:alice@192.0.2.10:1>;expires=0",
        "<sip:alice@192.0.2.10:2>;expires=0",
        "<sip:alice@192.0.2.10:3>",
        "<sip:alice@192.0.2.10:4>",
    )
    result = registrar.register(register(contacts=swap, cseq=2), FLOW, "access", LISTEN, T0)
    assert result.response.status == 200
    assert sorted(contacts_of(result.response)) == [
        "<sip:alice@192.0.2.10:3>;expires=3600",
        "<sip:alice@192.0.2.10:4>;expires=3600",
    ]


def test_a_contact_from_a_new_flow_replaces_the_old_one() -> None:
    # NAT rebinding: the same contact now comes from another source port.
    registrar = make_registrar(auth_required=False)
    registrar.register(register(), FLOW, "access", LISTEN, T0)
    moved = Flow(Transport.UDP, "203.0.113.1", 5060, "198.51.100.20", 40001)
    registrar.register(register(call_id="other"), moved, "access", LISTEN, T0 + 5)
    bindings = registrar.location.lookup("alice", T0 + 5)
    assert [(b.received.port, b.call_id) for b in bindings] == [(40001, "other")]


def test_an_instance_and_reg_id_replace_the_binding_whatever_the_uri() -> None:
    registrar = make_registrar(auth_required=False)
    first = f'<sip:alice@192.0.2.10:5062;transport=tcp>;+sip.instance="{INSTANCE}";reg-id=1'
    registrar.register(register(contacts=(first,)), TCP_FLOW, "access", LISTEN, T0)
    second = f'<sip:alice@192.0.2.99:6000;transport=tcp>;+sip.instance="{INSTANCE}";reg-id=1'
    result = registrar.register(
        register(contacts=(second,), call_id="new"), TCP_FLOW, "access", LISTEN, T0 + 1
    )
    assert result.response.status == 200
    assert [b.contact for b in registrar.location.lookup("alice", T0 + 1)] == [
        "sip:alice@192.0.2.99:6000;transport=tcp"
    ]
    assert result.response.headers.get("Require") == "outbound"


def test_bindings_of_a_closed_connection_are_unusable() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(), TCP_FLOW, "access", LISTEN, T0)
    assert TCP_FLOW.connection_id is not None
    registrar.connection_closed(TCP_FLOW.connection_id, T0 + 1)
    assert registrar.location.lookup("alice", T0 + 1) == []


def test_a_contact_naming_the_sbc_is_reached_at_the_registering_source() -> None:
    # A phone that registers the SBC's own address: calls go to the flow's source
    # (Binding.received), not to the Contact's host, so they cannot loop.
    registrar = make_registrar(auth_required=False)
    contact = f"<sip:alice@{LISTEN.host}:{LISTEN.port}>"
    registrar.register(register(contacts=(contact,)), FLOW, "access", LISTEN, T0)
    (binding,) = registrar.location.lookup("alice", T0)
    assert (binding.received.host, binding.received.port) == (FLOW.remote_host, FLOW.remote_port)


def test_the_200_lists_every_binding_and_a_date() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(), FLOW, "access", LISTEN, T0)
    two = ("<sip:alice@192.0.2.11>;q=0.5;expires=120",)
    result = registrar.register(
        register(contacts=two, call_id="x"), FLOW, "access", LISTEN, T0 + 10
    )
    assert contacts_of(result.response) == [
        "<sip:alice@192.0.2.10:5062>;expires=3590",
        "<sip:alice@192.0.2.11>;q=0.5;expires=120",
    ]
    assert result.response.headers.get("Date") == "Tue, 14 Nov 2023 22:13:30 GMT"


def test_location_round_trips_through_to_dict() -> None:
    registrar = make_registrar(auth_required=False)
    path = ("Path: <sip:edge.example.com;lr>",)
    contact = f'<sip:alice@192.0.2.10;transport=tcp>;q=0.7;+sip.instance="{INSTANCE}";reg-id=2'
    registrar.register(register(contacts=(contact,), extra=path), TCP_FLOW, "access", LISTEN, T0)
    data = registrar.location.to_dict()
    restored = LocationService.from_dict(data)
    assert restored.lookup("alice", T0) == registrar.location.lookup("alice", T0)
    assert restored.to_dict() == data
    assert restored.next_expiry() == T0 + 3600


def test_third_party_registration_needs_the_to_user_credentials() -> None:
    # From bob, To alice, authenticated as bob: 403; as alice: allowed.
    registrar = make_registrar()
    phone = Phone(registrar, user="bob")
    result = phone.send(T0, extra=())
    assert result.response.status == 200  # bob for bob
    alice = Phone(registrar, user="alice")
    assert alice.send(T0, call_id="c2").response.status == 200


def test_two_flows_of_one_instance_give_one_target() -> None:
    # RFC 5626 5.3: not more than one contact per AOR and instance-id in a target
    # set; the 200 still lists both flows (RFC 3261 10.3 step 8).
    registrar = make_registrar(auth_required=False)
    one = f'<sip:alice@192.0.2.10;transport=tcp>;+sip.instance="{INSTANCE}";reg-id=1'
    two = f'<sip:alice@192.0.2.10;transport=tcp;ob>;+sip.instance="{INSTANCE}";reg-id=2'
    registrar.register(register(contacts=(one,)), TCP_FLOW, "access", LISTEN, T0)
    result = registrar.register(
        register(contacts=(two,), call_id="flow2"), TCP_FLOW, "access", LISTEN, T0 + 1
    )
    assert len(contacts_of(result.response)) == 2
    targets = registrar.location.lookup("alice", T0 + 1)
    assert [b.reg_id for b in targets] == [2]
    assert [b.reg_id for b in registrar.location.bindings("alice", T0 + 1)] == [2, 1]


def test_a_contact_password_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sbc.registrar")
    registrar = make_registrar(auth_required=False)
    contact = "<sip:alice:hunter2@192.0.2.10:5062>"
    result = registrar.register(
        register(contacts=(contact,), expires="60"), FLOW, "access", LISTEN, T0
    )
    assert result.response.status == 200
    gone = registrar.location.expire(T0 + 61)
    assert [b.contact for b in gone] == ["sip:alice:hunter2@192.0.2.10:5062"]
    assert "binding expired alice -> sip:alice:****@192.0.2.10:5062" in caplog.text
    assert "hunter2" not in caplog.text
