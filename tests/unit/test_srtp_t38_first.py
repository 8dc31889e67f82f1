"""A call whose first offer is T.38 only keeps each realm's SRTP policy when it moves
to audio later (RFC 3264 8.3.2: a re-offer may change a stream's media type).

The legs' security is fixed when the relay session is made: a fax-first call made
its legs with no key, so the audio of a later re-offer went plain into a realm that
requires SRTP.
"""

from __future__ import annotations

from sbc.b2bua.controller import CallController, UpdateMedia
from sbc.media.session import MediaSession
from tests.unit.test_b2bua_flows import (
    CALLER,
    TRUNK,
    answer,
    from_a,
    receive,
    requests,
    responses,
    sdp,
    statuses,
)
from tests.unit.test_b2bua_srtp import (
    PLAIN_ANSWER,
    PLAIN_OFFER,
    SRTP_ANSWER,
    SRTP_OFFER,
    P,
    a_tag_of_response,
    call,
    crypto_lines,
    media_line,
    relay_line,
    srtp_controller,
)


def fax(side: str, host: str, port: int) -> str:
    return sdp(side, host, port).replace(f"audio {port} RTP/AVP 0", f"image {port} udptl t38")


def fax_call(outside: P, inside: P) -> tuple[CallController, str, MediaSession]:
    """A call from outside to inside whose first offer and answer are T.38 only."""
    c = srtp_controller(outside, inside)
    step, _, session = call(c, fax("a", "198.51.100.9", 40100))
    assert session is not None
    (invite,) = requests(step, "INVITE")
    assert media_line(invite.body).endswith("udptl t38") and crypto_lines(invite.body) == []
    (ok,) = responses(receive(c, answer(invite, 200, fax("b", "203.0.113.5", 42100)), TRUNK, 0.1))
    assert media_line(ok.body).endswith("udptl t38") and crypto_lines(ok.body) == []
    a_tag = a_tag_of_response(ok)
    receive(c, from_a("ACK", a_tag, 1), CALLER, 0.2)
    return c, a_tag, session


def test_audio_after_a_fax_first_call_is_srtp_into_a_required_realm() -> None:
    c, a_tag, session = fax_call(P.OPTIONAL, P.REQUIRED)
    step = receive(c, from_a("INVITE", a_tag, 2, body=PLAIN_OFFER), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert media_line(reinvite.body).endswith("RTP/SAVP 0")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None and crypto_lines(reinvite.body) == [relay_line(1, b_key)]
    (ok,) = responses(receive(c, answer(reinvite, 200, SRTP_ANSWER), TRUNK, 1.1))
    # The caller's realm is optional and it offered RTP: it keeps RTP.
    assert media_line(ok.body).endswith("RTP/AVP 0") and crypto_lines(ok.body) == []
    receive(c, from_a("ACK", a_tag, 2), CALLER, 1.2)


def test_plain_audio_from_a_required_realm_after_fax_first_gets_488() -> None:
    c, a_tag, _ = fax_call(P.REQUIRED, P.OPTIONAL)
    step = receive(c, from_a("INVITE", a_tag, 2, body=PLAIN_OFFER), CALLER, 1.0)
    assert statuses(step)[-1] == 488 and requests(step, "INVITE") == []


def test_srtp_audio_from_a_required_realm_after_fax_first_is_terminated() -> None:
    c, a_tag, session = fax_call(P.REQUIRED, P.OPTIONAL)
    step = receive(c, from_a("INVITE", a_tag, 2, body=SRTP_OFFER), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    # The inside is optional and its leg was made plain for the fax: RTP there.
    assert media_line(reinvite.body).endswith("RTP/AVP 0") and crypto_lines(reinvite.body) == []
    (ok,) = responses(receive(c, answer(reinvite, 200, PLAIN_ANSWER), TRUNK, 1.1))
    a_key = session.streams[0].a.local_crypto
    # The key made ready is AES_CM_128_HMAC_SHA1_80: the answer takes the tag of the
    # offer's line of that suite (its second, RFC 4568 5.1.2).
    assert a_key is not None and crypto_lines(ok.body) == [relay_line(2, a_key)]
    assert media_line(ok.body).endswith("RTP/SAVP 0")


def test_fax_first_between_optional_realms_stays_plain_audio() -> None:
    c, a_tag, _ = fax_call(P.OPTIONAL, P.OPTIONAL)
    step = receive(c, from_a("INVITE", a_tag, 2, body=PLAIN_OFFER), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert media_line(reinvite.body).endswith("RTP/AVP 0") and crypto_lines(reinvite.body) == []
    updates = [m for m in step.media if isinstance(m, UpdateMedia)]
    assert all(u.streams[0].b.srtp is None for u in updates)
