"""SDES-SRTP terminated at the border, by realm policy (`sbc.b2bua.srtp`).

Each leg that speaks SRTP gets a key of the relay's own; the other side's key never
crosses. The relay itself (SRTP to RTP with real packets) is proven in
tests/scenario/test_media_relay.py; here the controller's decisions and the SDP
each side gets, with sessions built as the relay builds them from the offers.
"""

from __future__ import annotations

import base64

import pytest

from sbc.b2bua.controller import (
    AllocateMedia,
    CallController,
    RealmPolicy,
    Step,
    UpdateMedia,
)
from sbc.b2bua.srtp import (
    OFFER_SUITE,
    SrtpPolicy,
    established,
    first_offers,
    offered_crypto,
)
from sbc.media.session import LegOffer, LegState, MediaSession, MediaStream
from sbc.media.srtp import SdesCrypto, SrtpSuite
from sbc.media.values import Endpoint
from sbc.sip.message import Request, Response
from sbc.sip.sdp import SdpError, SessionDescription
from tests.unit.test_b2bua_flows import (
    A_CALL_ID,
    CALLER,
    TRUNK,
    answer,
    controller,
    from_a,
    from_b,
    invite_text,
    receive,
    requests,
    responses,
    sdp,
    statuses,
)

A_KEY_32 = SdesCrypto(1, SrtpSuite.AES_CM_128_HMAC_SHA1_32, bytes(range(30)))
A_KEY_80 = SdesCrypto(2, SrtpSuite.AES_CM_128_HMAC_SHA1_80, bytes(range(1, 31)))
B_KEY = SdesCrypto(1, SrtpSuite.AES_CM_128_HMAC_SHA1_80, bytes(range(2, 32)))


def savp(user: str, address: str, port: int, *keys: SdesCrypto, proto: str = "RTP/SAVP") -> str:
    lines = "".join(f"a=crypto:{key}\r\n" for key in keys)
    return sdp(user, address, port).replace("RTP/AVP", proto) + lines


SRTP_OFFER = savp("a", "198.51.100.9", 40000, A_KEY_32, A_KEY_80)
PLAIN_OFFER = sdp("a", "198.51.100.9", 40000)
SRTP_ANSWER = savp("b", "203.0.113.5", 42000, B_KEY)
PLAIN_ANSWER = sdp("b", "203.0.113.5", 42000)
DTLS_OFFER = (
    sdp("a", "198.51.100.9", 40000).replace("RTP/AVP", "UDP/TLS/RTP/SAVPF")
    + "a=fingerprint:sha-256 AB:CD\r\na=setup:actpass\r\n"
)


def key_text(key: SdesCrypto) -> str:
    return base64.b64encode(key.key).decode()


def relay_session(allocate: AllocateMedia) -> MediaSession:
    """The session the relay makes of ``allocate``: its own key on each SRTP leg."""

    def leg(offer: LegOffer, address: str, port: int) -> LegState:
        return LegState(
            offer.realm,
            Endpoint.of(address, port),
            remote_hint=offer.remote,
            local_crypto=None if offer.srtp is None else SdesCrypto.generate(offer.srtp),
            remote_crypto=offer.crypto,
            encrypted=offer.encrypted,
        )

    streams = tuple(
        MediaStream(
            index,
            leg(stream.a, "198.51.100.1", 20000 + 2 * index),
            leg(stream.b, "203.0.113.1", 21000 + 2 * index),
        )
        for index, stream in enumerate(allocate.streams)
    )
    return MediaSession("sess", A_CALL_ID, streams, 0.0)


def srtp_controller(outside: SrtpPolicy, inside: SrtpPolicy) -> CallController:
    return controller(
        policies={"outside": RealmPolicy(srtp=outside), "inside": RealmPolicy(srtp=inside)}
    )


def call(c: CallController, offer: str) -> tuple[Step, AllocateMedia | None, MediaSession | None]:
    """The caller's INVITE with ``offer``: the step, and when a call starts the
    allocation, the session and (in the step) the B-leg INVITE."""
    step = receive(c, invite_text(body=offer), CALLER, 0.0)
    if not step.media:
        return step, None, None
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    session = relay_session(allocate)
    return c.media_allocated(allocate.call_ref, session, 0.0), allocate, session


def crypto_lines(body: bytes) -> list[str]:
    return [line for line in body.decode().splitlines() if line.lower().startswith("a=crypto")]


def relay_line(tag: int, key: SdesCrypto) -> str:
    """The a=crypto line of the relay's ``key`` under ``tag``."""
    return f"a=crypto:{tag} {key.suite.value} inline:{key_text(key)}"


def media_line(body: bytes) -> str:
    return next(line for line in body.decode().splitlines() if line.startswith("m="))


# -- the policy, as pure functions ---------------------------------------------------------


def offers_of(text: str, realm: str) -> tuple[LegOffer, ...]:
    from sbc.b2bua.realm import Realm
    from sbc.b2bua.topology import leg_offers

    return leg_offers(SessionDescription.parse(text.encode()), Realm.build(realm, [], "192.0.2.1"))


P = SrtpPolicy


@pytest.mark.parametrize(
    ("offer", "a_policy", "b_policy", "expected"),
    [
        # An SRTP offer: terminated; mirrored towards optional/required/passthrough.
        (SRTP_OFFER, P.OPTIONAL, P.OPTIONAL, (A_KEY_32.suite, OFFER_SUITE)),
        (SRTP_OFFER, P.OPTIONAL, P.REQUIRED, (A_KEY_32.suite, OFFER_SUITE)),
        (SRTP_OFFER, P.OPTIONAL, P.OFF, (A_KEY_32.suite, None)),
        (SRTP_OFFER, P.REQUIRED, P.OFF, (A_KEY_32.suite, None)),
        (SRTP_OFFER, P.PASSTHROUGH, P.OPTIONAL, (A_KEY_32.suite, OFFER_SUITE)),
        (SRTP_OFFER, P.OFF, P.OPTIONAL, 488),
        # A plain offer: plain, but towards a realm that requires SRTP.
        (PLAIN_OFFER, P.OPTIONAL, P.OPTIONAL, (None, None)),
        (PLAIN_OFFER, P.OFF, P.REQUIRED, (None, OFFER_SUITE)),
        (PLAIN_OFFER, P.OPTIONAL, P.PASSTHROUGH, (None, None)),
        (PLAIN_OFFER, P.REQUIRED, P.OPTIONAL, 488),
        # SRTP the relay cannot terminate.
        (DTLS_OFFER, P.OPTIONAL, P.OPTIONAL, 488),
        (savp("a", "198.51.100.9", 40000), P.OPTIONAL, P.OPTIONAL, 488),
    ],
)
def test_first_offer_decides_each_leg(
    offer: str, a_policy: SrtpPolicy, b_policy: SrtpPolicy, expected: object
) -> None:
    description = SessionDescription.parse(offer.encode())
    a, b = offers_of(offer, "outside"), offers_of(PLAIN_ANSWER, "inside")
    if expected == 488:
        with pytest.raises(SdpError) as raised:
            first_offers(description, a, a_policy, b, b_policy)
        assert raised.value.status == 488
        return
    out_a, out_b = first_offers(description, a, a_policy, b, b_policy)
    assert (out_a[0].srtp, out_b[0].srtp) == expected
    assert out_a[0].crypto == (A_KEY_32 if out_a[0].srtp else None)
    assert not out_a[0].encrypted and not out_b[0].encrypted


def test_the_offerer_s_first_usable_crypto_is_taken() -> None:
    unusable = "9 AES_256_CM_HMAC_SHA1_80 inline:" + base64.b64encode(bytes(46)).decode()
    text = sdp("a", "198.51.100.9", 40000).replace("RTP/AVP", "RTP/SAVP")
    text += f"a=crypto:{unusable}\r\na=crypto:{A_KEY_80}\r\n"
    (media,) = SessionDescription.parse(text.encode()).media
    assert offered_crypto(media) == A_KEY_80
    assert offered_crypto(media, SrtpSuite.AES_CM_128_HMAC_SHA1_32) is None


def test_later_sdp_keeps_each_leg_s_security() -> None:
    srtp_leg = LegState(
        "outside",
        Endpoint.of("198.51.100.1", 20000),
        local_crypto=SdesCrypto.generate(SrtpSuite.AES_CM_128_HMAC_SHA1_32),
    )
    plain_leg = LegState("outside", Endpoint.of("198.51.100.1", 20000))
    srtp = SessionDescription.parse(SRTP_OFFER.encode())
    plain = SessionDescription.parse(PLAIN_OFFER.encode())
    (kept,) = established(srtp, offers_of(SRTP_OFFER, "outside"), [srtp_leg])
    # The a=crypto of the leg's suite, not the offerer's first choice of another.
    assert kept.srtp is SrtpSuite.AES_CM_128_HMAC_SHA1_32 and kept.crypto == A_KEY_32
    assert established(plain, offers_of(PLAIN_OFFER, "outside"), [plain_leg])[0].srtp is None
    for description, text, leg in ((plain, PLAIN_OFFER, srtp_leg), (srtp, SRTP_OFFER, plain_leg)):
        with pytest.raises(SdpError) as raised:
            established(description, offers_of(text, "outside"), [leg])
        assert raised.value.status == 488
    # A stream the relay has no leg for is rejected downstream: anything goes.
    assert established(srtp, offers_of(SRTP_OFFER, "outside"), [])[0].crypto is None


# -- calls through the controller ----------------------------------------------------------


def test_srtp_caller_and_srtp_callee_each_get_the_relay_s_own_key() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, allocate, session = call(c, SRTP_OFFER)
    assert allocate is not None and session is not None
    (invite,) = requests(step, "INVITE")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None and b_key.suite is OFFER_SUITE
    assert media_line(invite.body).endswith("RTP/SAVP 0")
    assert crypto_lines(invite.body) == [relay_line(1, b_key)]
    wire = bytes(invite)
    assert key_text(A_KEY_32).encode() not in wire and key_text(A_KEY_80).encode() not in wire

    step = receive(c, answer(invite, 200, SRTP_ANSWER), TRUNK, 0.1)
    (ok,) = responses(step)
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None and a_key.suite is A_KEY_32.suite
    # The answer takes the tag of the offer's line it accepts (RFC 4568 5.1.2).
    assert crypto_lines(ok.body) == [relay_line(1, a_key)]
    assert media_line(ok.body).endswith("RTP/SAVP 0")
    assert key_text(B_KEY).encode() not in bytes(ok)
    # The relay learns the callee's key from its answer.
    (update,) = [m for m in step.media if isinstance(m, UpdateMedia)]
    assert update.streams[0].b.crypto == B_KEY and update.streams[0].b.srtp is OFFER_SUITE
    assert update.streams[0].a.crypto == A_KEY_32


def test_srtp_caller_to_a_realm_with_srtp_off_gets_plain_rtp_there() -> None:
    c = srtp_controller(P.OPTIONAL, P.OFF)
    step, _, session = call(c, SRTP_OFFER)
    assert session is not None and session.streams[0].b.local_crypto is None
    (invite,) = requests(step, "INVITE")
    assert media_line(invite.body).endswith("RTP/AVP 0") and crypto_lines(invite.body) == []
    (ok,) = responses(receive(c, answer(invite, 200, PLAIN_ANSWER), TRUNK, 0.1))
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None
    assert media_line(ok.body).endswith("RTP/SAVP 0")
    assert crypto_lines(ok.body) == [relay_line(1, a_key)]


def test_plain_caller_to_a_realm_that_requires_srtp() -> None:
    c = srtp_controller(P.OPTIONAL, P.REQUIRED)
    step, _, session = call(c, PLAIN_OFFER)
    assert session is not None
    (invite,) = requests(step, "INVITE")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None
    assert media_line(invite.body).endswith("RTP/SAVP 0")
    assert crypto_lines(invite.body) == [relay_line(1, b_key)]
    (ok,) = responses(receive(c, answer(invite, 200, SRTP_ANSWER), TRUNK, 0.1))
    assert media_line(ok.body).endswith("RTP/AVP 0") and crypto_lines(ok.body) == []


@pytest.mark.parametrize(
    ("offer", "outside", "inside"),
    [
        (PLAIN_OFFER, P.REQUIRED, P.OPTIONAL),
        (SRTP_OFFER, P.OFF, P.OPTIONAL),
        (DTLS_OFFER, P.OPTIONAL, P.OPTIONAL),
        (DTLS_OFFER, P.PASSTHROUGH, P.OPTIONAL),
    ],
    ids=["plain-required", "srtp-off", "dtls-optional", "dtls-one-passthrough"],
)
def test_offers_a_policy_refuses_get_488_and_start_no_call(
    offer: str, outside: SrtpPolicy, inside: SrtpPolicy
) -> None:
    c = srtp_controller(outside, inside)
    step, allocate, _ = call(c, offer)
    assert allocate is None and statuses(step)[-1] == 488
    assert c.calls() == ()


def test_between_passthrough_realms_the_keys_cross_as_before() -> None:
    c = srtp_controller(P.PASSTHROUGH, P.PASSTHROUGH)
    step, allocate, session = call(c, SRTP_OFFER)
    assert allocate is not None and session is not None
    assert allocate.streams[0].a.encrypted and allocate.streams[0].a.srtp is None
    assert session.streams[0].b.local_crypto is None
    (invite,) = requests(step, "INVITE")
    assert crypto_lines(invite.body) == [f"a=crypto:{A_KEY_32}", f"a=crypto:{A_KEY_80}"]
    # DTLS-SRTP too: the relay passes its packets; a=fingerprint crosses.
    c = srtp_controller(P.PASSTHROUGH, P.PASSTHROUGH)
    step, _, _ = call(c, DTLS_OFFER)
    (invite,) = requests(step, "INVITE")
    assert "UDP/TLS/RTP/SAVPF" in media_line(invite.body)
    assert b"a=fingerprint:sha-256 AB:CD" in invite.body


def test_a_plain_answer_to_the_relay_s_srtp_offer_ends_the_call_with_502() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, _, _ = call(c, SRTP_OFFER)
    (invite,) = requests(step, "INVITE")
    step = receive(c, answer(invite, 200, PLAIN_ANSWER), TRUNK, 0.1)
    assert statuses(step) == [502]
    assert [r.method for r in requests(step)] == ["ACK", "BYE"]


def confirmed_srtp_call(c: CallController) -> tuple[MediaSession, str]:
    """An SRTP call answered in SRTP and ACKed: the relay session, the A leg's tag."""
    step, _, session = call(c, SRTP_OFFER)
    assert session is not None
    (invite,) = requests(step, "INVITE")
    (ok,) = responses(receive(c, answer(invite, 200, SRTP_ANSWER), TRUNK, 0.1))
    a_tag = a_tag_of_response(ok)
    receive(c, from_a("ACK", a_tag, 1), CALLER, 0.2)
    return session, a_tag


def test_re_invites_keep_each_leg_s_security_and_the_relay_s_key() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    session, a_tag = confirmed_srtp_call(c)

    # RTP in a re-INVITE of an SRTP leg: refused, nothing reaches the callee.
    step = receive(c, from_a("INVITE", a_tag, 2, body=PLAIN_OFFER), CALLER, 1.0)
    assert statuses(step)[-1] == 488 and requests(step, "INVITE") == []

    # A new key of the caller's (same suite): the relay takes it, the callee's key
    # from the relay stays as it was.
    new_key = SdesCrypto(1, A_KEY_32.suite, bytes(range(5, 35)))
    rekey = savp("a", "198.51.100.9", 40000, new_key)
    step = receive(c, from_a("INVITE", a_tag, 3, body=rekey), CALLER, 2.0)
    (reinvite,) = requests(step, "INVITE")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None
    assert crypto_lines(reinvite.body) == [relay_line(1, b_key)]
    (update,) = [m for m in step.media if isinstance(m, UpdateMedia)]
    assert update.streams[0].a.crypto == new_key
    step = receive(c, answer(reinvite, 200, SRTP_ANSWER), TRUNK, 2.1)
    (ok,) = responses(step)
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None
    assert crypto_lines(ok.body) == [relay_line(1, a_key)]


def late_call(c: CallController) -> tuple[Request, MediaSession]:
    step = receive(c, invite_text(body=""), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    session = relay_session(allocate)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session, 0.0), "INVITE")
    return invite, session


def late_answer(c: CallController, invite: Request, b_offer: str) -> tuple[Step, Response]:
    step = receive(c, answer(invite, 200, b_offer), TRUNK, 0.1)
    (ok,) = responses(step)
    return step, ok


def test_late_offer_of_srtp_makes_both_legs_srtp_with_the_keys_made_ready() -> None:
    c = srtp_controller(P.OPTIONAL, P.REQUIRED)
    invite, session = late_call(c)
    a_key, b_key = session.streams[0].a.local_crypto, session.streams[0].b.local_crypto
    assert a_key is not None and b_key is not None
    b_offer = savp("b", "203.0.113.5", 42000, evolve_tag(B_KEY, 7))
    _, ok = late_answer(c, invite, b_offer)
    # The caller's realm leaves the choice open: it follows the callee's offer.
    assert media_line(ok.body).endswith("RTP/SAVP 0")
    assert crypto_lines(ok.body) == [relay_line(1, a_key)]
    a_answer = savp("a", "198.51.100.9", 40000, evolve_tag(A_KEY_80, 1))
    step = receive(c, from_a("ACK", a_tag_of_response(ok), 1, body=a_answer), CALLER, 0.2)
    (ack,) = requests(step, "ACK")
    # The answer takes the callee's tag, with the relay's key.
    assert crypto_lines(ack.body) == [relay_line(7, b_key)]
    assert key_text(A_KEY_80).encode() not in bytes(ack)


def test_late_offer_of_rtp_gives_the_keys_made_ready_up() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    invite, _ = late_call(c)
    step, ok = late_answer(c, invite, PLAIN_ANSWER)
    assert media_line(ok.body).endswith("RTP/AVP 0") and crypto_lines(ok.body) == []
    (update,) = [m for m in step.media if isinstance(m, UpdateMedia)]
    # Both legs give their keys up: the relay relays plain RTP.
    assert update.streams[0].a.srtp is None and update.streams[0].b.srtp is None
    step = receive(c, from_a("ACK", a_tag_of_response(ok), 1, body=PLAIN_OFFER), CALLER, 0.2)
    (ack,) = requests(step, "ACK")
    assert media_line(ack.body).endswith("RTP/AVP 0") and crypto_lines(ack.body) == []


def test_late_offer_of_srtp_to_a_caller_whose_realm_has_srtp_off() -> None:
    c = srtp_controller(P.OFF, P.OPTIONAL)
    invite, session = late_call(c)
    assert session.streams[0].a.local_crypto is None
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None
    _, ok = late_answer(c, invite, SRTP_ANSWER)
    assert media_line(ok.body).endswith("RTP/AVP 0") and crypto_lines(ok.body) == []
    step = receive(c, from_a("ACK", a_tag_of_response(ok), 1, body=PLAIN_OFFER), CALLER, 0.2)
    (ack,) = requests(step, "ACK")
    assert crypto_lines(ack.body) == [relay_line(1, b_key)]


def test_late_offer_of_srtp_without_the_ready_key_s_suite_takes_a_key_of_its_suite() -> None:
    # The keys made ready are AES_CM_128_HMAC_SHA1_80; the callee offers _32 only.
    # The relay's key for the callee's leg is in no SDP yet: it is replaced by one
    # of the offered suite (it ended the call with 502 before).
    c = srtp_controller(P.OPTIONAL, P.REQUIRED)
    invite, session = late_call(c)
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None
    b_offer = savp("b", "203.0.113.5", 42000, evolve_tag(A_KEY_32, 3))
    step, ok = late_answer(c, invite, b_offer)
    (update,) = [m for m in step.media if isinstance(m, UpdateMedia)]
    b = update.streams[0].b
    chosen = b.local_crypto
    assert chosen is not None and chosen.suite is SrtpSuite.AES_CM_128_HMAC_SHA1_32
    assert b.srtp is SrtpSuite.AES_CM_128_HMAC_SHA1_32 and b.crypto is not None
    assert b.crypto.key == A_KEY_32.key
    # The caller is offered the key made ready for its own leg, as before.
    assert crypto_lines(ok.body) == [relay_line(1, a_key)]
    a_answer = savp("a", "198.51.100.9", 40000, evolve_tag(A_KEY_80, 1))
    step = receive(c, from_a("ACK", a_tag_of_response(ok), 1, body=a_answer), CALLER, 0.2)
    (ack,) = requests(step, "ACK")
    assert crypto_lines(ack.body) == [relay_line(3, chosen)]
    # A re-offer of the callee's in that suite fits its leg from then on.
    reoffer = savp("b", "203.0.113.5", 42002, evolve_tag(A_KEY_32, 3))
    step = receive(c, from_b(invite, "INVITE", 2, body=reoffer), TRUNK, 1.0)
    assert [r.method for r in requests(step)] == ["INVITE"]


def test_late_offer_of_srtp_with_no_suite_the_relay_has_fails_cleanly() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    invite, _ = late_call(c)
    b_offer = savp("b", "203.0.113.5", 42000, A_KEY_32).replace(
        "AES_CM_128_HMAC_SHA1_32", "AES_256_CM_HMAC_SHA1_80"
    )
    step = receive(c, answer(invite, 200, b_offer), TRUNK, 0.1)
    assert statuses(step) == [502]
    assert [r.method for r in requests(step)] == ["ACK", "BYE"]


def evolve_tag(key: SdesCrypto, tag: int) -> SdesCrypto:
    return SdesCrypto(tag, key.suite, key.key)


def a_tag_of_response(response: Response) -> str:
    assert response.to.tag is not None
    return response.to.tag


def test_t38_in_an_srtp_call_crosses_in_the_clear_and_the_legs_keep_their_keys() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    session, a_tag = confirmed_srtp_call(c)
    fax = sdp("a", "198.51.100.9", 40100).replace("audio 40100 RTP/AVP 0", "image 40100 udptl t38")
    step = receive(c, from_a("INVITE", a_tag, 2, body=fax), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert media_line(reinvite.body).endswith("udptl t38") and crypto_lines(reinvite.body) == []
    # The relay's legs keep their suites (RTP/SRTP cannot change in the relay).
    (update,) = [m for m in step.media if isinstance(m, UpdateMedia)]
    assert not update.streams[0].a.rtp and update.streams[0].a.srtp is A_KEY_32.suite
    fax_answer = sdp("b", "203.0.113.5", 42100).replace(
        "audio 42100 RTP/AVP 0", "image 42100 udptl t38"
    )
    (ok,) = responses(receive(c, answer(reinvite, 200, fax_answer), TRUNK, 1.1))
    assert media_line(ok.body).endswith("udptl t38") and crypto_lines(ok.body) == []
    receive(c, from_a("ACK", a_tag, 2), CALLER, 1.2)
    # Back to audio: SRTP again, with the same relay keys.
    step = receive(c, from_a("INVITE", a_tag, 3, body=SRTP_OFFER), CALLER, 2.0)
    (back,) = requests(step, "INVITE")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None and crypto_lines(back.body) == [relay_line(1, b_key)]


@pytest.mark.parametrize("refusal", [488, 606])
def test_a_callee_refusing_the_mirrored_srtp_offer_is_offered_rtp(refusal: int) -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, _, session = call(c, SRTP_OFFER)
    assert session is not None
    (invite,) = requests(step, "INVITE")
    assert media_line(invite.body).endswith("RTP/SAVP 0")
    step = receive(c, answer(invite, refusal), TRUNK, 0.1)
    assert [s for s in statuses(step) if s >= 200] == []  # the caller hears nothing yet
    (update,) = [m for m in step.media if isinstance(m, UpdateMedia)]
    assert update.streams[0].b.srtp is None and update.streams[0].a.srtp is A_KEY_32.suite
    (plain,) = requests(step, "INVITE")
    assert plain.call_id != invite.call_id
    assert media_line(plain.body).endswith("RTP/AVP 0") and crypto_lines(plain.body) == []
    (ok,) = responses(receive(c, answer(plain, 200, PLAIN_ANSWER), TRUNK, 0.2))
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None and ok.status == 200
    assert crypto_lines(ok.body) == [relay_line(1, a_key)]


@pytest.mark.parametrize(("inside", "offer"), [(P.REQUIRED, SRTP_OFFER), (P.OPTIONAL, PLAIN_OFFER)])
def test_no_rtp_retry_where_srtp_was_not_the_mirror_s_choice(
    inside: SrtpPolicy, offer: str
) -> None:
    c = srtp_controller(P.OPTIONAL, inside)
    step, _, _ = call(c, offer)
    (invite,) = requests(step, "INVITE")
    step = receive(c, answer(invite, 488), TRUNK, 0.1)
    assert requests(step, "INVITE") == [] and 488 in statuses(step)


def test_the_rtp_retry_is_made_once() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, _, _ = call(c, SRTP_OFFER)
    (invite,) = requests(step, "INVITE")
    (plain,) = requests(receive(c, answer(invite, 488), TRUNK, 0.1), "INVITE")
    step = receive(c, answer(plain, 488), TRUNK, 0.2)
    assert requests(step, "INVITE") == [] and 488 in statuses(step)


#: RFC 8643 opportunistic SRTP: the RTP profile with a=crypto.
OSRTP_OFFER = sdp("a", "198.51.100.9", 40000) + f"a=crypto:{A_KEY_80}\r\n"


def test_opportunistic_srtp_is_taken_and_answered_in_the_rtp_profile() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, allocate, session = call(c, OSRTP_OFFER)
    assert allocate is not None and session is not None
    assert allocate.streams[0].a.crypto == A_KEY_80
    (invite,) = requests(step, "INVITE")
    # Towards the callee: SRTP, as for any SRTP offer (RTP after a 488).
    assert media_line(invite.body).endswith("RTP/SAVP 0")
    (ok,) = responses(receive(c, answer(invite, 200, SRTP_ANSWER), TRUNK, 0.1))
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None and a_key.suite is A_KEY_80.suite
    # RFC 8643 3.2: the answer keeps RTP/AVP and carries the key.
    assert media_line(ok.body).endswith("RTP/AVP 0")
    assert crypto_lines(ok.body) == [relay_line(2, a_key)]
    a_tag = a_tag_of_response(ok)
    receive(c, from_a("ACK", a_tag, 1), CALLER, 0.2)
    # A re-offer of the opportunistic caller (same profile) fits its SRTP leg.
    step = receive(c, from_a("INVITE", a_tag, 2, body=OSRTP_OFFER), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    (ok,) = responses(receive(c, answer(reinvite, 200, SRTP_ANSWER), TRUNK, 1.1))
    assert media_line(ok.body).endswith("RTP/AVP 0")
    assert crypto_lines(ok.body) == [relay_line(2, a_key)]


@pytest.mark.parametrize(("outside", "expected"), [(P.OFF, None), (P.REQUIRED, A_KEY_80.suite)])
def test_opportunistic_srtp_where_srtp_is_off_or_required(
    outside: SrtpPolicy, expected: SrtpSuite | None
) -> None:
    # Off: the key is dropped and the call is plain (no 488: RTP was offered too).
    # Required: an opportunistic offer is SRTP enough.
    c = srtp_controller(outside, P.OPTIONAL)
    step, allocate, _ = call(c, OSRTP_OFFER)
    assert allocate is not None
    assert allocate.streams[0].a.srtp is expected
    (invite,) = requests(step, "INVITE")
    assert media_line(invite.body).endswith("RTP/AVP 0" if expected is None else "RTP/SAVP 0")
