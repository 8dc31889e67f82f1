"""Asserted identity (RFC 3325) and privacy (RFC 3323) across realms
(``realms[].trust_identity``, `sbc.b2bua.identity`).

An untrusted realm's P-Asserted-Identity is never believed; a request the SBC
authenticated asserts its user; a trusted realm's assertion crosses with its
hosts replaced by the SBC's own; Privacy: id keeps the identity from untrusted
realms; an authenticated user may call with an anonymous From.
"""

from __future__ import annotations

from sbc.assembly import EmbeddedRegistrar
from sbc.b2bua.controller import AllocateMedia, CallController, RealmPolicy, Step
from sbc.b2bua.identity import Identity, asserted_by_peer, identity_headers, privacy_of
from sbc.b2bua.routing import RouteAction, RouteRule
from sbc.b2bua.targets import Directory
from sbc.registrar.location import Binding, LocationService
from sbc.sip.auth import DigestClient
from sbc.sip.message import Message, Request
from sbc.sip.parser import parse_message
from sbc.transport.base import Destination, Flow, ListenAddress, Transport
from tests.unit.test_b2bua_flows import (
    ANSWER,
    CALLER,
    MESSAGE,
    TRUNK,
    StubRegistrar,
    answer,
    controller,
    invite_text,
    receive,
    requests,
    responses,
    session,
    start_call,
)
from tests.unit.test_registrar import PASSWORDS, make_registrar

CARRIER_PAI = (
    'P-Asserted-Identity: "Carol" <sip:+15551234@carrier.example;user=phone>, <tel:+15551234>\r\n'
)
CREDENTIALS = 'Proxy-Authorization: Digest username="alice", response="right"\r\n'


def policies(
    outside: RealmPolicy | None = None, inside: RealmPolicy | None = None
) -> dict[str, RealmPolicy]:
    return {"outside": outside or RealmPolicy(), "inside": inside or RealmPolicy()}


def b_invite(c: CallController, extra: str = "") -> Request:
    (invite,), _ = start_call(c, extra=extra)
    return invite


def asserted(message: Message) -> list[str]:
    return message.headers.fields("P-Asserted-Identity")


AUTHENTICATING = RealmPolicy(authenticate=frozenset({"INVITE", "MESSAGE"}))
TRUSTED = RealmPolicy(trust_identity=True)


def test_an_untrusted_realm_s_assertion_is_never_believed() -> None:
    c = controller(policies=policies())
    invite = b_invite(c, extra=CARRIER_PAI)
    assert asserted(invite) == []
    assert b"carrier.example" not in bytes(invite) and b"+15551234" not in bytes(invite)


def test_a_trusted_realm_s_assertion_crosses_with_the_sbc_s_host() -> None:
    c = controller(policies=policies(outside=TRUSTED))
    invite = b_invite(c, extra=CARRIER_PAI)
    # Into the untrusted inside: the identity goes (no privacy asked), the carrier's
    # host does not: the user at the SBC's own address there, as in the From.
    assert asserted(invite) == [
        '"Carol" <sip:+15551234@203.0.113.1:5060>',
        '"Carol" <tel:+15551234>',
    ]
    assert b"carrier.example" not in bytes(invite)


def test_an_authenticated_caller_is_asserted_as_its_user() -> None:
    c = controller(registrar=StubRegistrar(), policies=policies(outside=AUTHENTICATING))
    invite = b_invite(c, extra=CREDENTIALS + "P-Asserted-Identity: <sip:boss@x.example>\r\n")
    assert asserted(invite) == ["<sip:alice@203.0.113.1:5060>"]


def test_privacy_id_keeps_the_identity_from_untrusted_realms_only() -> None:
    privacy = "Privacy: id\r\n"
    c = controller(registrar=StubRegistrar(), policies=policies(outside=AUTHENTICATING))
    invite = b_invite(c, extra=CREDENTIALS + privacy)
    assert asserted(invite) == [] and invite.headers.get("Privacy") is None
    # Into a trusted realm the identity goes, and the Privacy with it.
    trusted_inside = policies(outside=AUTHENTICATING, inside=TRUSTED)
    c = controller(registrar=StubRegistrar(), policies=trusted_inside)
    invite = b_invite(c, extra=CREDENTIALS + privacy)
    assert asserted(invite) == ["<sip:alice@203.0.113.1:5060>"]
    assert invite.headers.get("Privacy") == "id"


def test_a_message_asserts_its_sender_too() -> None:
    c = controller(registrar=StubRegistrar(), policies=policies(outside=AUTHENTICATING))
    text = MESSAGE.replace("CSeq: 7 MESSAGE\r\n", "CSeq: 7 MESSAGE\r\n" + CREDENTIALS)
    (out,) = requests(receive(c, text, CALLER, 0.0), "MESSAGE")
    assert asserted(out) == ["<sip:alice@203.0.113.1:5060>"]


def with_digest(c: CallController, text: str, now: float) -> Step:
    """``text`` sent, challenged with 407, and sent again with alice's credentials."""
    step = receive(c, text, CALLER, now)
    (challenge,) = [r for r in responses(step) if r.status == 407]
    values = challenge.headers.fields("Proxy-Authenticate")
    digest = DigestClient("alice", PASSWORDS["alice"])
    authorization = digest.respond(values, method="INVITE", uri="sip:1000@198.51.100.1")
    retry = text.replace("CSeq: 1 INVITE", "CSeq: 2 INVITE").replace(
        "Max-Forwards: 70\r\n", f"Max-Forwards: 70\r\nProxy-Authorization: {authorization}\r\n"
    )
    return receive(c, retry.replace(";branch=", ";branch=z9hG4bKretry"), CALLER, now + 0.1)


def test_an_authenticated_user_may_call_anonymously() -> None:
    # The real registrar: the authenticated user must be the From user, or the From
    # anonymous (RFC 3323 4.1.1.3).
    registrar = EmbeddedRegistrar(make_registrar(), wall=lambda: 1_700_000_000.0)
    c = controller(registrar=registrar, policies=policies(outside=AUTHENTICATING, inside=TRUSTED))
    anonymous = invite_text(extra="Privacy: id\r\n").replace(
        "From: <sip:alice@198.51.100.9>",
        'From: "Anonymous" <sip:anonymous@anonymous.invalid>',
    )
    step = with_digest(c, anonymous, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.1), "INVITE")
    assert str(invite.from_.uri) == "sip:anonymous@anonymous.invalid"
    assert invite.from_.display_name == "Anonymous"
    # The trusted inside learns who it is, and that it must stay private.
    assert asserted(invite) == ["<sip:alice@203.0.113.1:5060>"]
    assert invite.headers.get("Privacy") == "id"
    # Someone else's name in the From is still refused.
    other = invite_text(call_id="other@198.51.100.9", via_branch="z9hG4bKother").replace(
        "From: <sip:alice@198.51.100.9>", "From: <sip:bob@x.example>"
    )
    step = with_digest(c, other, 1.0)
    assert [r.status for r in responses(step) if r.status >= 200] == [403]


def test_privacy_user_makes_the_sbc_send_an_anonymous_from() -> None:
    # RFC 3323 5.3: the SBC, as privacy service, withholds the user-level identity;
    # the trusted inside still learns who called (no "id" asked).
    c = controller(registrar=StubRegistrar(), policies=policies(AUTHENTICATING, TRUSTED))
    named = invite_text(extra=CREDENTIALS + "Privacy: user\r\n").replace(
        "From: <sip:alice@198.51.100.9>", 'From: "Alice A" <sip:alice@198.51.100.9>'
    )
    step = receive(c, named, CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    assert str(invite.from_.uri) == "sip:anonymous@anonymous.invalid"
    assert invite.from_.display_name == "Anonymous"
    assert b"Alice A" not in bytes(invite).split(b"P-Asserted-Identity")[0]
    assert asserted(invite) == ['"Alice A" <sip:alice@203.0.113.1:5060>']


def test_a_trusted_callee_s_connected_identity_reaches_the_caller() -> None:
    callee_pai = 'P-Asserted-Identity: "Bob" <sip:bob@pbx.inside.example>\r\n'
    c = controller(policies=policies(inside=TRUSTED))
    invite = b_invite(c)
    (ringing,) = responses(receive(c, answer(invite, 180, extra=callee_pai), TRUNK, 0.1))
    assert asserted(ringing) == ['"Bob" <sip:bob@198.51.100.1:5060>']
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER, extra=callee_pai), TRUNK, 0.2))
    assert asserted(ok) == ['"Bob" <sip:bob@198.51.100.1:5060>']
    assert b"pbx.inside.example" not in bytes(ok)
    # An untrusted callee's is dropped; one asking for privacy keeps it from the
    # untrusted caller.
    for inside, extra in ((None, callee_pai), (TRUSTED, callee_pai + "Privacy: id\r\n")):
        c = controller(policies=policies(inside=inside))
        invite = b_invite(c)
        (ok,) = responses(receive(c, answer(invite, 200, ANSWER, extra=extra), TRUNK, 0.2))
        assert asserted(ok) == [] and b"bob" not in bytes(ok)


def test_the_peer_s_assertion_keeps_one_sip_and_one_tel_uri() -> None:
    message = parse_message(
        b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 MESSAGE\r\n"
        b"P-Asserted-Identity: <sip:first@x>, <sip:second@y>, garbage\r\n"
        b"P-Asserted-Identity: <tel:+1>, <tel:+2>, <http://x/>\r\n"
        b"Privacy: header; id\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(message, Request)
    assert asserted_by_peer(message) == Identity(None, "first", "tel:+1")
    assert privacy_of(message) == {"header", "id"}


def test_no_identity_and_privacy_none_change_nothing() -> None:
    def uri(user: str) -> str:
        return f"sip:{user}@sbc"

    assert identity_headers(None, frozenset(), trusted=True, sip_uri=uri, privacy_header=None) == []
    fields = identity_headers(
        Identity('A "B"', "u"),
        frozenset({"none"}),
        trusted=True,
        sip_uri=uri,
        privacy_header="none",
    )
    assert fields == [("P-Asserted-Identity", '"A \\"B\\"" <sip:u@sbc>')]


# -- registered_only: calls from where a phone registered, asserted as its user -----------


def registered_directory(source: Destination) -> Directory:
    location = LocationService()
    listen = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
    phone = Binding(
        "alice", "sip:alice@10.0.0.7:5060", 2e9, "reg@phone", 1, source, listen, "outside", 0.0
    )
    location.replace("alice", [phone], 0.0)
    return Directory(location=location)


def test_registered_only_takes_calls_from_a_registered_phone_s_address_only() -> None:
    here = Destination(Transport.UDP, CALLER.remote_host, CALLER.remote_port)
    c = controller(
        targets=registered_directory(here),
        policies=policies(outside=RealmPolicy(registered_only=True)),
    )
    # From where alice registered: no digest asked, and asserted as alice.
    assert asserted(b_invite(c)) == ["<sip:alice@203.0.113.1:5060>"]
    # The same phone from another port (another NAT mapping, or someone else): 403.
    elsewhere = registered_directory(Destination(Transport.UDP, CALLER.remote_host, 5098))
    c = controller(targets=elsewhere, policies=policies(outside=RealmPolicy(registered_only=True)))
    step = receive(c, invite_text(), CALLER, 0.0)
    assert [r.status for r in responses(step) if r.status >= 200] == [403]
    assert not step.media
    # From the registered address, but as someone else: refused too (no spoofed From);
    # an anonymous From is the phone's to send.
    c = controller(
        targets=registered_directory(here),
        policies=policies(outside=RealmPolicy(registered_only=True)),
    )
    spoofed = invite_text(via_branch="z9hG4bKspoof").replace("sip:alice@", "sip:boss@", 1)
    (refusal,) = [r for r in responses(receive(c, spoofed, CALLER, 0.0)) if r.status >= 200]
    assert (refusal.status, refusal.reason) == (403, "Forbidden: not your identity")
    anonymous = invite_text(call_id="anon@x", via_branch="z9hG4bKanon").replace(
        "From: <sip:alice@198.51.100.9>", "From: <sip:anonymous@anonymous.invalid>"
    )
    step = receive(c, anonymous, CALLER, 1.0)
    assert [type(m) for m in step.media] == [AllocateMedia]


def test_a_tel_identity_crosses_as_its_number_only() -> None:
    c = controller(policies=policies(outside=TRUSTED))
    pai = "P-Asserted-Identity: <tel:5551234;phone-context=pbx.inside.example>\r\n"
    invite = b_invite(c, extra=pai)
    assert asserted(invite) == ["<tel:5551234>"]
    assert b"pbx.inside.example" not in bytes(invite)


def test_the_asserted_identity_takes_the_realm_s_from_host() -> None:
    masked = RealmPolicy(from_host="sbc.example.net")
    c = controller(policies=policies(outside=TRUSTED, inside=masked))
    invite = b_invite(c, extra=CARRIER_PAI)
    assert asserted(invite)[0] == '"Carol" <sip:+15551234@sbc.example.net>'
    assert str(invite.from_.uri).startswith("sip:alice@sbc.example.net")


def test_a_registered_callee_is_asserted_to_the_caller_as_its_user() -> None:
    # The phone's own P-Asserted-Identity is not believed (its realm is untrusted);
    # what its registration proved is: the user the call reached it under.
    phone = Destination(Transport.UDP, "198.51.100.7", 5060)
    phone_flow = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.7", 5060)
    users = [RouteRule("users", RouteAction.REGISTERED, "outside")]
    c = controller(targets=registered_directory(phone), rules=users)
    text = invite_text(uri="sip:alice@198.51.100.1", call_id="to-alice@x")
    step = receive(c, text, CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    forged = 'P-Asserted-Identity: "Boss" <sip:boss@10.0.0.7>\r\n'
    (ringing,) = responses(receive(c, answer(invite, 180, extra=forged), phone_flow, 0.1))
    assert asserted(ringing) == ["<sip:alice@198.51.100.1:5060>"]
    private = "Privacy: id\r\n"
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER, extra=private), phone_flow, 0.2))
    assert asserted(ok) == [] and b"boss" not in bytes(ok)
