"""Registration relay: the upstream sees the SBC's own REGISTERs, throttled; pure."""

from __future__ import annotations

from sbc.registrar.relay import Forward, RegistrationRelay, RelayPolicy
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
