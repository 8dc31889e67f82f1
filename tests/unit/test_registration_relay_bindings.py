"""Registration relay: what the phone's 200 lists (RFC 3261 10.3 step 8), per-user
lookups, and Call-ID/CSeq ordering of a binding's updates (10.3 step 7); pure."""

from __future__ import annotations

from typing import Any

from sbc.registrar.relay import CHALLENGE_SECONDS, Forward, RegistrationRelay, RelayPolicy
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

OUTSIDE = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
INSIDE = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
KAMAILIO = Destination(Transport.UDP, "203.0.113.5", 5060)
PHONE = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.77", 40123)
DESK = "<sip:alice@10.0.0.7:5060>"
MOBILE = "<sip:alice@10.0.0.8:5062;transport=udp>"
T0 = 1000.0


def relay() -> RegistrationRelay:
    policy = RelayPolicy(
        "inside", KAMAILIO, INSIDE, upstream_domain="voip.example", phone_expires=60
    )
    return RegistrationRelay(policy)


def register(
    cseq: int,
    contact: str | None = DESK,
    *,
    call_id: str = "desk@10.0.0.7",
    user: str = "alice",
    expires: int = 120,
    extra: str = "",
) -> Request:
    lines = [
        "REGISTER sip:198.51.100.1 SIP/2.0",
        f"Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK{call_id.split('@')[0]}{cseq};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@198.51.100.1>;tag=ph",
        f"To: <sip:{user}@198.51.100.1>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *([] if contact is None else [f"Contact: {contact}", f"Expires: {expires}"]),
        f"{extra}Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def upstream_answer(forward: Forward, status: int = 200, granted: int = 3600) -> Response:
    """The upstream's answer to ``forward``, echoing each of its Contacts."""
    request = forward.request
    uris = [c.split(";expires", 1)[0] for c in request.headers.values("Contact")]
    contact = ", ".join(f"{uri};expires={granted}" for uri in uris)
    reason = "OK" if status == 200 else "Unauthorized"
    text = (
        f"SIP/2.0 {status} {reason}\r\n"
        f"Via: {request.headers.get('Via')}\r\nFrom: {request.headers.get('From')}\r\n"
        f"To: {request.headers.get('To')};tag=kam\r\nCall-ID: {request.call_id}\r\n"
        f"CSeq: {request.cseq.seq} REGISTER\r\nContact: {contact}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Response)
    return message


def relayed(
    r: RegistrationRelay, request: Request, now: float, flow: Flow = PHONE, status: int = 200
) -> Response:
    """``request`` forwarded upstream and answered ``status`` there: the phone's answer."""
    forward = r.register(request, flow, "outside", OUTSIDE, now)
    assert isinstance(forward, Forward)
    return r.upstream_response(forward, request, upstream_answer(forward, status), now)


def local(r: RegistrationRelay, request: Request, now: float, flow: Flow = PHONE) -> Response:
    """``request`` answered by the relay itself, without the upstream."""
    answer = r.register(request, flow, "outside", OUTSIDE, now)
    assert isinstance(answer, Response)
    return answer


def wire_contacts(response: Response) -> list[str]:
    """The Contacts of ``response`` as the phone parses them off the wire, sorted."""
    again = parse_message(bytes(response))
    assert isinstance(again, Response)
    return sorted(f"<{c.uri}>;expires={dict(c.params)['expires']}" for c in again.contacts)


def two_phones(r: RegistrationRelay) -> None:
    """Alice's desk phone registered at T0, her mobile at T0 + 10 (each 60 s)."""
    assert relayed(r, register(1), T0).status == 200
    mobile = register(1, MOBILE, call_id="mobile@10.0.0.8")
    assert relayed(r, mobile, T0 + 10).status == 200


# --- 1. the 200 lists every current binding of the user (RFC 3261 10.3 step 8) -----------


def test_a_relayed_200_lists_every_binding_of_the_user() -> None:
    r = relay()
    assert relayed(r, register(1), T0).status == 200
    mobile = register(1, MOBILE, call_id="mobile@10.0.0.8")
    phone = relayed(r, mobile, T0 + 10)
    assert phone.status == 200
    assert wire_contacts(phone) == [f"{DESK};expires=50", f"{MOBILE};expires=60"]
    # The phones' own contacts: nothing of the inside, nor the SBC's tokens.
    wire = bytes(phone)
    assert b"203.0.113" not in wire
    assert all(b.token.encode() not in wire for b in r.bindings())


def test_a_cached_200_lists_every_binding_of_the_user() -> None:
    r = relay()
    two_phones(r)
    phone = local(r, register(2), T0 + 40)
    assert phone.status == 200 and r.stats.cached == 1
    assert wire_contacts(phone) == [f"{DESK};expires=60", f"{MOBILE};expires=30"]


def test_a_query_lists_every_binding_of_the_user_and_no_one_elses() -> None:
    r = relay()
    two_phones(r)
    bob = register(1, "<sip:bob@10.0.0.9:5060>", call_id="bob@10.0.0.9", user="bob")
    assert relayed(r, bob, T0 + 11).status == 200
    phone = local(r, register(7, None, call_id="query@10.0.0.7"), T0 + 20)
    assert phone.status == 200
    assert wire_contacts(phone) == [f"{DESK};expires=40", f"{MOBILE};expires=50"]


def test_removing_one_contact_lists_the_ones_left() -> None:
    r = relay()
    two_phones(r)
    phone = relayed(r, register(2, expires=0), T0 + 20)
    assert phone.status == 200
    assert wire_contacts(phone) == [f"{MOBILE};expires=50"]
    # Removing a contact the relay does not hold is answered here, with the bindings.
    unknown = register(3, "<sip:alice@10.0.0.99>", expires=0)
    assert wire_contacts(local(r, unknown, T0 + 21)) == [f"{MOBILE};expires=49"]


def test_a_refused_or_expired_binding_is_not_listed() -> None:
    r = relay()
    assert relayed(r, register(1), T0).status == 200
    refused = register(1, MOBILE, call_id="mobile@10.0.0.8")
    assert relayed(r, refused, T0 + 1, status=401).status == 401
    phone = local(r, register(2), T0 + 2)
    assert wire_contacts(phone) == [f"{DESK};expires=60"]


# --- 2. lookups by user go through a per-user index --------------------------------------


class ScanGuard(dict[Any, Any]):
    """A binding table that fails the test when something walks all of it."""

    def __iter__(self) -> Any:
        raise AssertionError("the whole binding table was scanned")

    def values(self) -> Any:
        raise AssertionError("the whole binding table was scanned")

    def items(self) -> Any:
        raise AssertionError("the whole binding table was scanned")

    def keys(self) -> Any:
        raise AssertionError("the whole binding table was scanned")


def fifty_users(r: RegistrationRelay) -> None:
    """Users u0 .. u49, one phone each, registered at T0."""
    for i in range(50):
        other = register(1, f"<sip:u{i}@10.1.0.{i}>", call_id=f"u{i}@x", user=f"u{i}")
        assert relayed(r, other, T0).status == 200


def test_per_user_requests_do_not_scan_every_binding() -> None:
    # Registrations, refreshes, queries and wildcards of one user cost what that user
    # holds, not what the whole table holds (up to MAX_BINDINGS).
    r = relay()
    fifty_users(r)
    r._bindings = ScanGuard(r._bindings)
    two_phones(r)
    assert local(r, register(2), T0 + 20).status == 200
    assert len(wire_contacts(local(r, register(3, None), T0 + 21))) == 2
    assert relayed(r, register(4, expires=0), T0 + 22).status == 200
    wildcard = register(2, "*", call_id="mobile@10.0.0.8", expires=0)
    assert wire_contacts(relayed(r, wildcard, T0 + 23)) == []
    assert len(r) == 50


def test_the_user_index_follows_every_removal() -> None:
    r = relay()
    assert relayed(r, register(1), T0).status == 200
    # A new contact the upstream refused, swept once its retry window passed.
    refused = register(1, MOBILE, call_id="mobile@10.0.0.8")
    assert relayed(r, refused, T0, status=401).status == 401
    assert len(r.expire(T0 + CHALLENGE_SECONDS + 1)) == 1
    bob = register(1, "<sip:bob@10.0.0.9>", call_id="bob@10.0.0.9", user="bob")
    assert relayed(r, bob, T0 + 30).status == 200
    # The desk phone ran out (swept); bob's binding stays.
    assert [b.user for b in r.expire(T0 + 61)] == ["alice"]
    assert wire_contacts(local(r, register(2, None), T0 + 62)) == []
    # Registered again, then removed by a wildcard, then once more: one binding each time.
    assert relayed(r, register(3), T0 + 63).status == 200
    assert relayed(r, register(4, "*", expires=0), T0 + 64).status == 200
    assert wire_contacts(local(r, register(5, None), T0 + 65)) == []
    assert relayed(r, register(6, MOBILE, call_id="mobile-2@10.0.0.8"), T0 + 66).status == 200
    assert wire_contacts(local(r, register(7, None), T0 + 67)) == [f"{MOBILE};expires=59"]
    assert sorted(b.user for b in r.bindings()) == ["alice", "bob"]
    r.expire(T0 + 200)
    assert len(r) == 0 and r._by_user == {}  # no user left behind in the index


def test_a_relay_built_with_bindings_indexes_them() -> None:
    # A relay rebuilt from an existing table (reload, restore) finds its users.
    r = relay()
    two_phones(r)
    again = RegistrationRelay(r.policy, _bindings=dict(r._bindings))
    phone = local(again, register(2, None), T0 + 20)
    assert wire_contacts(phone) == [f"{DESK};expires=40", f"{MOBILE};expires=50"]


# --- 3. Call-ID/CSeq ordering (RFC 3261 10.3 step 7) -------------------------------------


def test_a_cached_refresh_whose_cseq_is_not_higher_fails() -> None:
    r = relay()
    assert relayed(r, register(5), T0).status == 200
    for cseq in (5, 4):  # a replay, an older request
        answer = local(r, register(cseq), T0 + 30)
        assert answer.status == 400 and "CSeq" in answer.reason
    assert r.stats.cached == 0
    # The binding did not move: it still runs out 60 s after the accepted REGISTER.
    assert wire_contacts(local(r, register(9, None), T0 + 30)) == [f"{DESK};expires=30"]
    assert local(r, register(6), T0 + 31).status == 200 and r.stats.cached == 1


def test_a_new_call_id_replaces_the_binding_whatever_its_cseq() -> None:
    r = relay()
    assert relayed(r, register(5), T0).status == 200
    rebooted = local(r, register(1, call_id="desk-reboot@10.0.0.7"), T0 + 30)
    assert rebooted.status == 200 and wire_contacts(rebooted) == [f"{DESK};expires=60"]
    # From now on the new Call-ID orders the binding.
    assert local(r, register(1, call_id="desk-reboot@10.0.0.7"), T0 + 31).status == 400
    assert local(r, register(2, call_id="desk-reboot@10.0.0.7"), T0 + 32).status == 200


def test_an_out_of_order_register_is_not_forwarded_upstream() -> None:
    r = relay()
    assert relayed(r, register(5), T0).status == 200
    elsewhere = Flow(Transport.UDP, "198.51.100.1", 5060, "192.0.2.66", 5060)
    credentials = register(5, extra="Authorization: Digest x\r\n")
    for request, flow in ((register(4), elsewhere), (credentials, PHONE)):
        answer = r.register(request, flow, "outside", OUTSIDE, T0 + 30)
        assert isinstance(answer, Response) and answer.status == 400
    assert r.stats.forwarded == 1
    (found,) = r.location.lookup(r.bindings()[0].token, T0 + 31)
    assert found.received == Destination(Transport.UDP, "198.51.100.77", 40123)


def test_an_out_of_order_deregistration_keeps_the_binding() -> None:
    r = relay()
    assert relayed(r, register(5), T0).status == 200
    for request in (register(5, expires=0), register(3, "*", expires=0)):
        answer = r.register(request, PHONE, "outside", OUTSIDE, T0 + 30)
        assert isinstance(answer, Response) and answer.status == 400
    assert r.stats.forwarded == 1
    assert wire_contacts(local(r, register(9, None), T0 + 31)) == [f"{DESK};expires=29"]


def test_a_late_upstream_answer_does_not_roll_the_binding_back() -> None:
    # The phone moves twice (CSeq 2 from A, then 3 from B); the upstream's answers
    # arrive in the other order. The binding stays where the later REGISTER put it.
    r = relay()
    assert relayed(r, register(1), T0).status == 200
    at_a = Flow(Transport.UDP, "198.51.100.1", 5060, "192.0.2.10", 5060)
    at_b = Flow(Transport.UDP, "198.51.100.1", 5060, "192.0.2.20", 5060)
    first = r.register(register(2), at_a, "outside", OUTSIDE, T0 + 10)
    second = r.register(register(3), at_b, "outside", OUTSIDE, T0 + 11)
    assert isinstance(first, Forward) and isinstance(second, Forward)
    assert r.upstream_response(second, register(3), upstream_answer(second), T0 + 12).status == 200
    late = r.upstream_response(first, register(2), upstream_answer(first), T0 + 13)
    assert late.status == 200 and wire_contacts(late) == [f"{DESK};expires=59"]
    (binding,) = r.bindings()
    assert binding.received == Destination(Transport.UDP, "192.0.2.20", 5060)
    (found,) = r.location.lookup(binding.token, T0 + 14)
    assert found.received == Destination(Transport.UDP, "192.0.2.20", 5060)
    # And the next in-order refresh from B is answered from the cache.
    assert local(r, register(4), T0 + 20, at_b).status == 200


def test_a_deregistration_the_upstream_accepted_wins_over_a_cached_refresh() -> None:
    # The refresh (CSeq 3) was answered from the cache while the removal (CSeq 2) was
    # upstream: the upstream no longer has the binding, so neither does the SBC, and
    # the phone's next refresh registers it upstream again.
    r = relay()
    assert relayed(r, register(1), T0).status == 200
    bye = register(2, expires=0)
    removal = r.register(bye, PHONE, "outside", OUTSIDE, T0 + 10)
    assert isinstance(removal, Forward)
    assert local(r, register(3), T0 + 11).status == 200
    assert r.upstream_response(removal, bye, upstream_answer(removal), T0 + 12).status == 200
    assert len(r) == 0 and len(r.location) == 0
    assert isinstance(r.register(register(4), PHONE, "outside", OUTSIDE, T0 + 20), Forward)


def test_the_challenge_retry_and_a_refused_refresh_still_go_through() -> None:
    # A refused REGISTER records nothing: the retry with the next CSeq is in order.
    r = relay()
    assert relayed(r, register(1), T0, status=401).status == 401
    assert relayed(r, register(2, extra="Authorization: Digest x\r\n"), T0 + 1).status == 200
    refresh = register(3, extra="Authorization: Digest y\r\n")
    assert relayed(r, refresh, T0 + 2, status=401).status == 401
    assert relayed(r, register(4, extra="Authorization: Digest z\r\n"), T0 + 3).status == 200


def test_bindings_keep_the_phones_call_id_and_cseq_across_a_round_trip() -> None:
    r = relay()
    assert relayed(r, register(5), T0).status == 200
    (binding,) = r.bindings()
    again = type(binding).from_dict(binding.to_dict())
    assert again == binding
    assert (again.phone_call_id, again.phone_cseq) == ("desk@10.0.0.7", 5)


# --- 4. a user's contacts are capped; '*' removes what it named --------------------------


def test_a_user_s_contacts_are_capped() -> None:
    r = RegistrationRelay(
        RelayPolicy("inside", KAMAILIO, INSIDE, upstream_domain="voip.example", max_contacts=2)
    )
    two_phones(r)
    third = register(1, "<sip:alice@10.0.0.9:5060>", call_id="third@10.0.0.9")
    refused = r.register(third, PHONE, "outside", OUTSIDE, T0 + 20)
    # As the embedded registrar (Kamailio's wording): the 200s stay bounded too.
    assert isinstance(refused, Response) and refused.status == 503
    assert refused.reason == "Too Many Registered Contacts"
    assert len(r) == 2
    # A refresh of one already there is not a new contact.
    assert isinstance(r.register(register(2), PHONE, "outside", OUTSIDE, T0 + 20), Response)
    # Another user has room of their own.
    bob = register(1, "<sip:bob@10.0.0.10>", call_id="bob@10.0.0.10", user="bob")
    assert relayed(r, bob, T0 + 20).status == 200


def test_a_wildcard_removes_only_the_bindings_it_named() -> None:
    r = relay()
    assert relayed(r, register(1), T0).status == 200
    wildcard = register(2, "*", expires=0)
    forward = r.register(wildcard, PHONE, "outside", OUTSIDE, T0 + 1)
    assert isinstance(forward, Forward)
    # The mobile registers while the '*' is on its way: the upstream never saw it in
    # the '*', so it keeps it, and so must the SBC.
    mobile = register(1, MOBILE, call_id="mobile@10.0.0.8")
    assert relayed(r, mobile, T0 + 2).status == 200
    answer = r.upstream_response(forward, wildcard, upstream_answer(forward), T0 + 3)
    assert answer.status == 200
    assert wire_contacts(answer) == ["<sip:alice@10.0.0.8:5062;transport=udp>;expires=59"]
    assert len(r) == 1


def test_max_contacts_comes_from_the_config() -> None:
    import textwrap
    from pathlib import Path

    from sbc.assembly import register_relays
    from sbc.b2bua.realm import Realm, RealmTable
    from sbc.config.loader import load_config_text

    text = textwrap.dedent(
        """\
        realms:
          - name: phones
            listen: [{transport: udp, address: 198.51.100.1, port: 5060}]
            media_address: 198.51.100.1
            register_relay: {realm: inside, host: 203.0.113.5, max_contacts: 3}
          - name: inside
            listen: [{transport: udp, address: 203.0.113.1, port: 5060}]
            media_address: 203.0.113.1
        """
    )
    config = load_config_text(text, "sbc.yaml", Path("/etc/sbc"))
    realms = RealmTable(
        [
            Realm.build("phones", [OUTSIDE], "198.51.100.1"),
            Realm.build("inside", [INSIDE], "203.0.113.1"),
        ]
    )
    (port,) = register_relays(config, realms).values()
    assert port.relay.policy.max_contacts == 3


def test_expiry_costs_what_runs_out_not_a_walk_over_the_table() -> None:
    # The app sweeps once a second: with every phone's binding walked each time,
    # tens of thousands of relayed phones cost a steady share of the CPU.
    r = relay()
    fifty_users(r)
    r._bindings = ScanGuard(r._bindings)
    assert r.expire(T0 + 30) == []
    # A refresh (answered from the cache) moves a deadline: the old one no longer counts.
    refresh = register(2, "<sip:u0@10.1.0.0>", call_id="u0@x", user="u0")
    assert local(r, refresh, T0 + 40).status == 200
    assert sorted(b.user for b in r.expire(T0 + 61)) == sorted(f"u{i}" for i in range(1, 50))
    assert len(r) == 1
    assert [b.user for b in r.expire(T0 + 101)] == ["u0"] and len(r) == 0
