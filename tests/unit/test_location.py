"""The location service: AOR keys, URI matching, expiry, caps, replication."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sbc.registrar.location import (
    Binding,
    LocationService,
    TooManyAorsError,
    TooManyContactsError,
    sip_uris_equal,
)
from sbc.sip.uri import SipUri, parse_uri
from sbc.transport.base import Destination, ListenAddress, Transport

T0 = 1_700_000_000.0
LISTEN = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
PHONE = Destination(Transport.UDP, "198.51.100.20", 40000)


def binding(
    aor: str = "alice", contact: str = "sip:alice@192.0.2.10:5062", **kw: object
) -> Binding:
    values: dict[str, object] = {
        "aor": aor,
        "contact": contact,
        "expires_at": T0 + 3600,
        "call_id": "c1@phone",
        "cseq": 1,
        "received": PHONE,
        "local": LISTEN,
        "realm": "access",
        "registered_at": T0,
    }
    values.update(kw)
    return Binding(**values)  # type: ignore[arg-type]


def sip(text: str) -> SipUri:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    return uri


# --------------------------------------------------------------------------- AOR keys


def test_without_domains_the_key_is_the_user_part_whatever_the_domain() -> None:
    location = LocationService()
    assert location.aor_of(sip("sip:alice@127.0.0.1")) == "alice"
    assert location.aor_of(sip("sips:alice@localhost:5061;transport=tls")) == "alice"
    assert location.normalize("alice@LOCALHOST") == "alice"
    assert location.normalize("alice") == "alice"


def test_user_is_case_sensitive_and_unescaped_domain_is_lowercased() -> None:
    location = LocationService(domains=("Example.COM",))
    assert location.aor_of(sip("sip:%41lice@EXAMPLE.com")) == "Alice@example.com"
    assert location.aor_of(sip("sip:alice@example.com")) == "alice@example.com"
    assert location.normalize("alice@Example.Com") == "alice@example.com"


def test_with_domains_other_domains_and_bare_users_have_no_key() -> None:
    location = LocationService(domains=("example.com",))
    assert location.aor_of(sip("sip:alice@example.org")) is None
    assert location.normalize("alice") is None
    assert location.aor_of(sip("sip:example.com")) is None
    assert location.aor_of(parse_uri("tel:+4930123")) is None


# --------------------------------------------------------------------------- URI equality

EQUIVALENT = [
    # RFC 3261 19.1.4's examples of equivalent URIs.
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;newparam=5"),
    (
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    ),
    (
        "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    ),
]
DIFFERENT = [
    # ... and of URIs that are not.
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
    ("sip:alice@atlanta.com", "sips:alice@atlanta.com"),
    ("sip:alice@atlanta.com;maddr=192.0.2.1", "sip:alice@atlanta.com"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_rfc3261_equivalent_uris(a: str, b: str) -> None:
    assert sip_uris_equal(sip(a), sip(b))
    assert sip_uris_equal(sip(b), sip(a))


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_rfc3261_different_uris(a: str, b: str) -> None:
    assert not sip_uris_equal(sip(a), sip(b))
    assert not sip_uris_equal(sip(b), sip(a))


def test_outbound_bindings_match_by_instance_and_reg_id_not_by_uri() -> None:
    stored = binding(instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>", reg_id=1)
    moved = sip("sip:alice@192.0.2.99:7000")
    assert stored.matches(moved, "<urn:uuid:00000000-0000-1000-8000-000A95A0E128>", 1)
    assert not stored.matches(moved, "<urn:uuid:00000000-0000-1000-8000-000A95A0E128>", 2)
    # The same URI from another outbound flow is another binding.
    assert not stored.matches(sip(stored.contact), "<urn:uuid:other>", 1)
    assert binding().matches(sip("sip:alice@192.0.2.10:5062"), None, None)


# --------------------------------------------------------------------------- lookup, expiry


def test_lookup_orders_by_q_then_latest_registration_and_skips_expired() -> None:
    location = LocationService()
    low = binding(contact="sip:a@192.0.2.1", q=0.1)
    none = binding(contact="sip:a@192.0.2.2", registered_at=T0 + 5)
    high = binding(contact="sip:a@192.0.2.3", q=1.0)
    mid = binding(contact="sip:a@192.0.2.4", q=0.5)
    gone = binding(contact="sip:a@192.0.2.5", expires_at=T0 + 10)
    location.replace("alice", [low, none, high, mid, gone], T0)
    order = [b.contact for b in location.lookup("alice", T0 + 20)]
    assert order == ["sip:a@192.0.2.2", "sip:a@192.0.2.3", "sip:a@192.0.2.4", "sip:a@192.0.2.1"]
    assert location.lookup(sip("sip:alice@anything.example"), T0 + 20)[0] == none
    assert location.lookup("bob", T0) == []


def test_expire_removes_only_what_is_due_and_reports_it() -> None:
    location = LocationService()
    early = binding(contact="sip:a@192.0.2.1", expires_at=T0 + 60)
    late = binding(contact="sip:a@192.0.2.2", expires_at=T0 + 120)
    other = binding(aor="bob", contact="sip:b@192.0.2.3", expires_at=T0 + 60)
    location.replace("alice", [early, late], T0)
    location.replace("bob", [other], T0)
    assert location.next_expiry() == T0 + 60
    assert location.expire(T0 + 59.9) == []
    assert sorted(b.contact for b in location.expire(T0 + 60)) == [
        "sip:a@192.0.2.1",
        "sip:b@192.0.2.3",
    ]
    assert location.aors() == ["alice"]
    assert len(location) == 1
    assert location.next_expiry() == T0 + 120


def test_a_refreshed_binding_keeps_living_past_its_old_deadline() -> None:
    location = LocationService()
    first = binding(expires_at=T0 + 60)
    location.replace("alice", [first], T0)
    refreshed = replace(first, expires_at=T0 + 200, cseq=2)
    change = location.replace("alice", [refreshed], T0 + 50)
    assert change.added == (refreshed,)
    assert change.removed == ()
    assert location.expire(T0 + 100) == []
    assert location.next_expiry() == T0 + 200
    assert location.lookup("alice", T0 + 100) == [refreshed]


def test_remove_aor_returns_the_bindings() -> None:
    location = LocationService()
    location.replace("alice", [binding()], T0)
    assert [b.aor for b in location.remove_aor("alice")] == ["alice"]
    assert "alice" not in location
    assert location.remove_aor("alice") == []


# --------------------------------------------------------------------------- caps


def test_contacts_beyond_the_cap_are_refused_and_nothing_changes() -> None:
    location = LocationService(max_contacts=2)
    one, two = binding(contact="sip:a@192.0.2.1"), binding(contact="sip:a@192.0.2.2")
    location.replace("alice", [one, two], T0)
    three = binding(contact="sip:a@192.0.2.3")
    with pytest.raises(TooManyContactsError, match="alice: 3 contacts exceed the limit of 2"):
        location.replace("alice", [one, two, three], T0)
    assert location.lookup("alice", T0) == [one, two]
    # Expired bindings do not count against the cap.
    location.replace("alice", [one, replace(two, expires_at=T0 + 1)], T0)
    assert location.replace("alice", [one, three], T0 + 2).removed[0].contact == two.contact


def test_a_lowered_cap_still_lets_existing_bindings_refresh() -> None:
    location = LocationService(max_contacts=3)
    items = [binding(contact=f"sip:a@192.0.2.{i}") for i in range(3)]
    location.replace("alice", items, T0)
    location.max_contacts = 1
    refreshed = [replace(b, cseq=2) for b in items]
    assert len(location.replace("alice", refreshed, T0).added) == 3


def test_new_aors_beyond_the_cap_are_refused_refreshes_are_not() -> None:
    location = LocationService(max_aors=1)
    location.replace("alice", [binding()], T0)
    with pytest.raises(TooManyAorsError):
        location.replace("bob", [binding(aor="bob")], T0)
    assert TooManyAorsError.status == 503
    location.replace("alice", [binding(cseq=2)], T0)
    # Once alice is gone, there is room again.
    location.replace("alice", [], T0)
    location.replace("bob", [binding(aor="bob")], T0)
    assert location.aors() == ["bob"]


def test_replace_refuses_foreign_or_duplicate_bindings() -> None:
    location = LocationService()
    with pytest.raises(ValueError, match="every binding must belong"):
        location.replace("alice", [binding(aor="bob")], T0)
    with pytest.raises(ValueError, match="same contact"):
        location.replace("alice", [binding(), binding(cseq=2)], T0)


# --------------------------------------------------------------------------- replication


def test_to_dict_round_trips_through_json() -> None:
    location = LocationService()
    full = binding(
        contact="sips:alice@[2001:db8::10]:5063;transport=tls",
        q=0.7,
        instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>",
        reg_id=2,
        path=("<sip:edge.example.net;lr>",),
        user_agent="Phone/1.0",
        received=Destination(Transport.TLS, "2001:db8::10", 50123),
        local=ListenAddress(Transport.TLS, "2001:db8::1", 5061),
        connection_id=17,
    )
    location.replace("alice", [full, binding(contact="sip:alice@192.0.2.10")], T0)
    location.replace("bob", [binding(aor="bob", contact="sip:bob@192.0.2.11")], T0)
    data = json.loads(json.dumps(location.to_dict()))
    restored = LocationService.from_dict(data)
    assert restored.aors() == ["alice", "bob"]
    assert set(restored) == set(location)
    assert restored.get("alice", full.contact) == full
    assert restored.next_expiry() == T0 + 3600


def test_from_dict_rejects_unknown_versions_and_bad_bindings() -> None:
    with pytest.raises(ValueError, match="unsupported location data version 99"):
        LocationService.from_dict({"version": 99, "bindings": []})
    with pytest.raises(ValueError, match="bad binding"):
        LocationService.from_dict({"version": 1, "bindings": [{"aor": "alice"}]})


def test_apply_replays_a_primary_change() -> None:
    primary, standby = LocationService(), LocationService()
    first = binding()
    change = primary.replace("alice", [first], T0)
    standby.apply(change.added, change.removed)
    second = binding(contact="sip:alice@192.0.2.77")
    change = primary.replace("alice", [second], T0 + 10)
    standby.apply(change.added, change.removed)
    assert standby.lookup("alice", T0 + 10) == [second]
    change = primary.replace("alice", [], T0 + 20)
    standby.apply(change.added, change.removed)
    assert len(standby) == 0
    assert standby.aors() == []


# --------------------------------------------------------------------------- deadlines


def test_refreshes_leave_a_bounded_heap_and_expiry_still_works() -> None:
    """Every refresh pushes a deadline; stale ones are swept in bulk, not per change."""
    location = LocationService()
    users = [f"u{n}" for n in range(50)]
    for round_ in range(40):
        for user in users:
            refreshed = binding(user, f"sip:{user}@192.0.2.10", expires_at=T0 + 100 + round_)
            location.replace(user, [refreshed], T0)
    assert len(location) == 50
    # 2,000 refreshes of 50 bindings: the heap holds at most 2 x 50 + 64 (+1) entries.
    assert len(location._deadlines) <= 2 * 50 + 64 + 1
    assert location.next_expiry() == T0 + 139
    assert len(location.expire(T0 + 138)) == 0
    assert sorted(b.aor for b in location.expire(T0 + 139)) == sorted(users)
    assert len(location) == 0


# --------------------------------------------------------------------------- by source


def test_bindings_are_found_by_where_their_register_came_from() -> None:
    service = LocationService()
    moved = Destination(Transport.UDP, "198.51.100.20", 40002)
    service.replace("alice", [binding()], T0)
    assert [b.aor for b in service.registered_from(PHONE, T0)] == ["alice"]
    assert service.registered_from(moved, T0) == []
    # A refresh from the same address keeps it; one from a new NAT port moves it.
    service.replace("alice", [binding(cseq=2)], T0 + 10)
    assert [b.cseq for b in service.registered_from(PHONE, T0 + 10)] == [2]
    service.replace("alice", [binding(cseq=3, received=moved)], T0 + 20)
    assert service.registered_from(PHONE, T0 + 20) == []
    assert [b.cseq for b in service.registered_from(moved, T0 + 20)] == [3]
    # Expired, unregistered, or its connection closed: no longer there.
    assert service.registered_from(moved, T0 + 3600 + 20) == []
    service.expire(T0 + 3600 + 20)
    assert service._by_received == {}
    tcp = Destination(Transport.TCP, "198.51.100.30", 51000)
    service.replace("bob", [binding("bob", received=tcp, connection_id=7)], T0)
    assert [b.aor for b in service.registered_from(tcp, T0)] == ["bob"]
    service.remove_connection(7)
    assert service.registered_from(tcp, T0) == [] and service._by_received == {}
    service.replace("carol", [binding("carol")], T0)
    service.replace("carol", [], T0)
    assert service._by_received == {}


def test_replicated_and_restored_bindings_are_found_by_source_too() -> None:
    service = LocationService()
    service.apply([binding()], ())
    assert [b.aor for b in service.registered_from(PHONE, T0)] == ["alice"]
    restored = LocationService.from_dict(service.to_dict())
    assert [b.aor for b in restored.registered_from(PHONE, T0)] == ["alice"]
    service.apply((), [binding()])
    assert service.registered_from(PHONE, T0) == [] and service._by_received == {}
