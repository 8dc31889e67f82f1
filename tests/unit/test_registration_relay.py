"""Registration relay: the upstream sees the SBC's own REGISTERs, throttled; pure."""

from __future__ import annotations

from sbc.registrar.relay import CHALLENGE_SECONDS, Forward, RegistrationRelay, RelayPolicy
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

OUTSIDE = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
INSIDE = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
KAMAILIO = Destination(Transport.UDP, "203.0.113.5", 5060)
PHONE = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.77", 40123)


def relay(phone_expires: int = 60, upstream_expires: int = 3600) -> RegistrationRelay:
    policy = RelayPolicy(
        "inside",
        KAMAILIO,
        INSIDE,
        upstream_domain="voip.example",
        upstream_expires=upstream_expires,
        phone_expires=phone_expires,
    )
    return RegistrationRelay(policy)


def register(cseq: int, expires: int = 120, extra: str = "") -> Request:
    text = (
        "REGISTER sip:198.51.100.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKphone{cseq};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.1>;tag=ph\r\n"
        "To: <sip:alice@198.51.100.1>\r\nCall-ID: phone-reg@10.0.0.7\r\n"
        f"CSeq: {cseq} REGISTER\r\nContact: <sip:alice@10.0.0.7:5060>\r\n"
        f"Expires: {expires}\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def upstream_ok(forward: Forward, granted: int) -> Response:
    request = forward.request
    contact = request.headers.get("Contact")
    assert contact is not None
    uri = contact.split(";expires", 1)[0]
    text = (
        "SIP/2.0 200 OK\r\n"
        f"Via: {request.headers.get('Via')}\r\nFrom: {request.headers.get('From')}\r\n"
        f"To: {request.headers.get('To')};tag=kam\r\nCall-ID: {request.call_id}\r\n"
        f"CSeq: {request.cseq.seq} REGISTER\r\nContact: {uri};expires={granted}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Response)
    return message


def test_first_register_goes_upstream_as_the_sbcs_own_request() -> None:
    r = relay()
    forward = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    wire = bytes(forward.request)
    for leak in (b"10.0.0.7", b"198.51.100", b"phone-reg", b"z9hG4bKphone", b"tag=ph"):
        assert leak not in wire
    assert str(forward.request.uri) == "sip:voip.example"
    assert b"To: <sip:alice@voip.example>" in wire
    assert b"@203.0.113.1:5060>;expires=3600" in wire  # the SBC's inside Contact, long
    phone = r.upstream_response(forward, register(1), upstream_ok(forward, 3600), 1000.5)
    assert phone.status == 200
    # The phone gets its own contact back, with the short interval (NAT keepalive).
    assert phone.headers.get("Contact") == "<sip:alice@10.0.0.7:5060>;expires=60"
    assert b"203.0.113" not in bytes(phone)


def test_refreshes_inside_the_upstream_expiry_are_answered_locally() -> None:
    r = relay()
    forward = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    r.upstream_response(forward, register(1), upstream_ok(forward, 3600), 1000.0)
    upstream = 0
    now = 1000.0
    for cseq in range(2, 60):  # a phone refreshing every 50 s for ~48 minutes
        now += 50
        answer = r.register(register(cseq), PHONE, "outside", OUTSIDE, now)
        if isinstance(answer, Forward):
            upstream += 1
            r.upstream_response(answer, register(cseq), upstream_ok(answer, 3600), now)
        else:
            assert answer.status == 200
    # 58 phone refreshes over 2,900 s; the upstream saw none (its binding lasts 3,600 s).
    assert upstream == 0 and r.stats.cached == 58
    # Past the upstream's expiry minus the phone interval: the next one goes upstream.
    answer = r.register(register(60), PHONE, "outside", OUTSIDE, 1000.0 + 3600 - 60)
    assert isinstance(answer, Forward)
    assert answer.request.call_id == forward.request.call_id  # same upstream binding
    assert answer.request.cseq.seq == forward.request.cseq.seq + 1


def test_the_token_routes_inbound_calls_to_where_the_phone_really_is() -> None:
    r = relay()
    forward = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    r.upstream_response(forward, register(1), upstream_ok(forward, 3600), 1000.0)
    (binding,) = r.bindings()
    (found,) = r.location.lookup(binding.token, 1001.0)
    assert found.received == Destination(Transport.UDP, "198.51.100.77", 40123)
    assert found.contact == "sip:alice@10.0.0.7:5060" and found.realm == "outside"


def test_challenges_are_relayed_and_credentials_copied_upstream() -> None:
    r = relay()
    forward = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    request = forward.request
    challenge = parse_message(
        (
            "SIP/2.0 401 Unauthorized\r\n"
            f"Via: {request.headers.get('Via')}\r\nFrom: {request.headers.get('From')}\r\n"
            f"To: {request.headers.get('To')};tag=k\r\nCall-ID: {request.call_id}\r\n"
            'CSeq: 1 REGISTER\r\nWWW-Authenticate: Digest realm="voip.example", nonce="n1"\r\n'
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(challenge, Response)
    phone = r.upstream_response(forward, register(1), challenge, 1000.0)
    assert phone.status == 401 and "nonce" in (phone.headers.get("WWW-Authenticate") or "")
    creds = 'Authorization: Digest username="alice", realm="voip.example", nonce="n1"\r\n'
    again = r.register(register(2, extra=creds), PHONE, "outside", OUTSIDE, 1001.0)
    assert isinstance(again, Forward)
    assert again.request.headers.get("Authorization") is not None
    assert again.request.cseq.seq == 2


def test_deregistration_always_goes_upstream_and_forgets_the_phone() -> None:
    r = relay()
    forward = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    r.upstream_response(forward, register(1), upstream_ok(forward, 3600), 1000.0)
    bye = r.register(register(2, expires=0), PHONE, "outside", OUTSIDE, 1010.0)
    assert isinstance(bye, Forward) and b"expires=0" in bytes(bye.request)
    r.upstream_response(bye, register(2, expires=0), upstream_ok(bye, 0), 1010.0)
    assert len(r) == 0 and len(r.location) == 0


def registered(r: RegistrationRelay, contact: str = "<sip:alice@10.0.0.7:5060>") -> None:
    request = register(1)
    request.headers.set("Contact", contact)
    request.invalidate()
    forward = r.register(request, PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    r.upstream_response(forward, request, upstream_ok(forward, 3600), 1000.0)


def test_a_wildcard_needs_expires_0_and_to_be_alone() -> None:
    # RFC 3261 10.3 step 6: "*" with an Expires other than 0, or beside another
    # Contact, is a 400; it must not de-register the phone upstream.
    r = relay()
    registered(r)
    for contact, expires in (("*", 120), ("*, <sip:alice@10.0.0.7:5060>", 0)):
        request = register(2, expires=expires)
        request.headers.set("Contact", contact)
        request.invalidate()
        answer = r.register(request, PHONE, "outside", OUTSIDE, 1010.0)
        assert isinstance(answer, Response) and answer.status == 400
    without = register(2)
    without.headers.set("Contact", "*")
    without.headers.remove("Expires")
    without.invalidate()
    answer = r.register(without, PHONE, "outside", OUTSIDE, 1010.0)
    assert isinstance(answer, Response) and answer.status == 400
    assert len(r) == 1 and r.stats.forwarded == 1


def test_a_wildcard_deregisters_every_contact_of_the_user_upstream() -> None:
    r = relay()
    registered(r, "<sip:alice@10.0.0.7:5060>")
    registered(r, "<sip:alice@10.0.0.8:5060>")
    tokens = {b.token for b in r.bindings()}
    request = register(3, expires=0)
    request.headers.set("Contact", "*")
    request.invalidate()
    bye = r.register(request, PHONE, "outside", OUTSIDE, 1010.0)
    assert isinstance(bye, Forward)
    contacts = bye.request.headers.values("Contact")
    assert {c.split("@", 1)[0].removeprefix("<sip:") for c in contacts} == tokens
    assert all(c.endswith(";expires=0") for c in contacts)
    r.upstream_response(bye, request, upstream_ok(bye, 0), 1010.0)
    assert len(r) == 0 and len(r.location) == 0


def test_odd_expires_values_are_no_crash() -> None:
    # "²".isdigit() is True but int("²") fails; int() refuses over 4,300 digits.
    for value in ("\u00b2", "9" * 5000):
        r = relay()
        request = register(1)
        request.headers.set("Expires", value)
        request.invalidate()
        answer = r.register(request, PHONE, "outside", OUTSIDE, 1000.0)
        assert isinstance(answer, Forward) and answer.expires == 60
        granted = upstream_ok(answer, 3600)
        granted.headers.set("Contact", f"<sip:{r.bindings()[0].token}@x>;expires={value}")
        granted.headers.set("Expires", value)
        granted.invalidate()
        phone = r.upstream_response(answer, request, granted, 1000.0)
        assert phone.status == 200


#: Where ``PHONE`` sends from, as a binding records it.
PHONE_SOURCE = Destination(Transport.UDP, "198.51.100.77", 40123)


def test_a_refresh_from_elsewhere_is_not_answered_from_the_cache() -> None:
    # The cache answers without authentication: only the address the phone
    # registered from may refresh there; anyone else's REGISTER goes upstream (and
    # is challenged), and calls keep going to the phone meanwhile.
    r = relay()
    registered(r)
    other = Flow(Transport.UDP, "198.51.100.1", 5060, "192.0.2.66", 5060)
    for cseq in (2, 3):  # refused upstream, twice: neither is answered locally
        answer = r.register(register(cseq), other, "outside", OUTSIDE, 1050.0)
        assert isinstance(answer, Forward)
        refused = upstream_ok(answer, 3600)
        refused.status, refused.reason = 401, "Unauthorized"
        assert r.upstream_response(answer, register(cseq), refused, 1050.0).status == 401
    (binding,) = r.bindings()
    assert binding.received == PHONE_SOURCE
    (found,) = r.location.lookup(binding.token, 1051.0)
    assert found.received == PHONE_SOURCE
    # A phone that really moved is accepted upstream, and then found at its new address.
    moved = r.register(register(4), other, "outside", OUTSIDE, 1060.0)
    assert isinstance(moved, Forward)
    r.upstream_response(moved, register(4), upstream_ok(moved, 3600), 1060.0)
    (found,) = r.location.lookup(binding.token, 1061.0)
    assert found.received == Destination(Transport.UDP, "192.0.2.66", 5060)
    cached = r.register(register(5), other, "outside", OUTSIDE, 1070.0)
    assert isinstance(cached, Response) and cached.status == 200


def test_a_query_lists_only_current_bindings() -> None:
    # RFC 3261 10.3 step 8: the 200 lists the current bindings; one the upstream
    # refused (or that ran out, not yet swept) is none.
    r = relay()
    registered(r)
    other = register(2)
    other.headers.set("Contact", "<sip:alice@10.0.0.9:5060>")
    other.invalidate()
    attempt = r.register(other, PHONE, "outside", OUTSIDE, 1001.0)
    assert isinstance(attempt, Forward)
    refused = upstream_ok(attempt, 3600)
    refused.status, refused.reason = 401, "Unauthorized"
    r.upstream_response(attempt, other, refused, 1001.0)
    query = register(3)
    query.headers.remove("Contact")
    query.invalidate()
    answer = r.register(query, PHONE, "outside", OUTSIDE, 1002.0)
    assert isinstance(answer, Response)
    assert answer.headers.values("Contact") == ["<sip:alice@10.0.0.7:5060>;expires=58"]
    later = r.register(query, PHONE, "outside", OUTSIDE, 1100.0)
    assert isinstance(later, Response) and later.headers.values("Contact") == []


def test_the_once_a_second_expiry_spares_a_register_waiting_for_the_upstream() -> None:
    # The app calls expire() every second; a new phone's binding waits for the
    # upstream's answer (tens of ms, up to 64*T1) and must still be there for it.
    r = relay()
    forward = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    assert r.expire(1001.0) == []
    answer = r.upstream_response(forward, register(1), upstream_ok(forward, 3600), 1001.5)
    assert answer.status == 200 and answer.headers.values("Contact")
    (binding,) = r.bindings()
    assert r.location.lookup(binding.token, 1002.0)


def refused_first(r: RegistrationRelay) -> Forward:
    """A new phone's first REGISTER, relayed and challenged 401 by the upstream."""
    forward = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(forward, Forward)
    refused = upstream_ok(forward, 3600)
    refused.status, refused.reason = 401, "Unauthorized"
    assert r.upstream_response(forward, register(1), refused, 1000.1).status == 401
    return forward


def test_a_new_binding_the_upstream_refuses_waits_briefly_for_the_retry() -> None:
    r = relay()
    forward = refused_first(r)
    # The phone's retry with credentials goes up in the same Call-ID, next CSeq
    # (RFC 3261 10.2.1), even with an expiry round between, and registers it.
    assert r.expire(1001.0) == []
    retry = r.register(register(2, extra="Authorization: Digest x\r\n"), PHONE, "outside",
                       OUTSIDE, 1001.2)  # fmt: skip
    assert isinstance(retry, Forward)
    assert retry.request.call_id == forward.request.call_id and retry.request.cseq.seq == 2
    r.upstream_response(retry, register(2), upstream_ok(retry, 3600), 1001.3)
    assert len(r) == 1 and len(r.location) == 1


def test_refused_registers_do_not_stay_in_the_table() -> None:
    # Unauthenticated REGISTERs (no retry follows) must not fill it (MAX_BINDINGS).
    r = relay()
    refused_first(r)
    assert len(r.expire(1000.1 + CHALLENGE_SECONDS)) == 1
    assert len(r) == 0


def test_a_registered_phone_whose_refresh_is_refused_keeps_its_binding() -> None:
    r = relay(phone_expires=60, upstream_expires=120)
    first = r.register(register(1), PHONE, "outside", OUTSIDE, 1000.0)
    assert isinstance(first, Forward)
    r.upstream_response(first, register(1), upstream_ok(first, 120), 1000.0)
    again = r.register(register(2), PHONE, "outside", OUTSIDE, 1055.0)  # not cacheable
    assert isinstance(again, Forward)
    refused = upstream_ok(again, 120)
    refused.status, refused.reason = 401, "Unauthorized"
    r.upstream_response(again, register(2), refused, 1055.1)
    assert len(r) == 1  # still registered upstream until its own expiry
