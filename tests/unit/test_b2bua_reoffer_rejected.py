"""A relayed offer that fails leaves the session as it was (RFC 3261 14.1, RFC 3311 5.1).

The common case: a fax machine behind an ATA re-INVITEs to T.38 and the far side,
without T.38, answers 488; the call goes on in audio. The relay must keep sending
to the audio port, and a later session refresh must re-offer the audio session,
not the refused one.
"""

from __future__ import annotations

import pytest

from sbc.b2bua.controller import UpdateMedia
from sbc.media.session import StreamOffer
from sbc.sip.sdp import SessionDescription
from tests.unit.test_b2bua_flows import (
    A_ALLOWS_UPDATE,
    ANSWER,
    CALLER,
    SESSION_TIMERS,
    TRUNK,
    answer,
    confirmed_call,
    controller,
    from_a,
    o_line,
    receive,
    refreshes,
    requests,
    statuses,
)

T38 = (
    "v=0\r\no=a 1 2 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
    "m=image 40100 udptl t38\r\na=T38FaxVersion:0\r\n"
)
#: The caller moves its audio to another port.
MOVED = T38.replace("m=image 40100 udptl t38\r\na=T38FaxVersion:0", "m=audio 40200 RTP/AVP 0")
#: ... and puts the callee on hold.
MOVED_ON_HOLD = MOVED + "a=sendonly\r\n"


def updates(step: object) -> list[tuple[StreamOffer, ...]]:
    return [m.streams for m in step.media if isinstance(m, UpdateMedia)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [488, 415, 500])
def test_a_refused_re_invite_restores_the_relay_and_the_refresh_offer(status: int) -> None:
    c = controller(SESSION_TIMERS)
    _, _, a_tag = confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    _, first = refreshes(c.handle_timers(45.0))
    before = first.body
    receive(c, answer(first, 200, ANSWER), TRUNK, 45.1)

    step = receive(c, from_a("INVITE", a_tag, 2, body=T38), CALLER, 50.0)
    (fax,) = requests(step, "INVITE")
    assert b"m=image" in fax.body
    changed = updates(step)
    assert changed, "the relay follows the offer while it is pending"
    step = receive(c, answer(fax, status), TRUNK, 50.1)
    assert status in statuses(step)
    restored = updates(step)
    assert restored, "the relay goes back to the session as it was"
    assert restored[-1] != changed[-1]

    # The refresh re-offers the session in force (unchanged: same o= version).
    update, reinvite = refreshes(c.handle_timers(100.0))
    assert b"m=image" not in reinvite.body
    assert reinvite.body == before
    assert o_line(reinvite.body) == o_line(before)
    assert update.body == b""


def test_the_next_offer_after_a_refused_one_bumps_the_version_once() -> None:
    # RFC 3264 8: the version grows by one from the SDP in force; the refused
    # offer did not change the session.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    version = SessionDescription.parse(invite.body).origin.sess_version
    (fax,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=T38), CALLER, 1.0), "INVITE")
    assert SessionDescription.parse(fax.body).origin.sess_version == version + 1
    receive(c, answer(fax, 488), TRUNK, 1.1)
    receive(c, from_a("ACK", a_tag, 2), CALLER, 1.2)
    hold = T38.replace(
        "m=image 40100 udptl t38\r\na=T38FaxVersion:0", "m=audio 40000 RTP/AVP 0\r\na=sendonly"
    )
    (held,) = requests(receive(c, from_a("INVITE", a_tag, 3, body=hold), CALLER, 2.0), "INVITE")
    assert SessionDescription.parse(held.body).origin.sess_version == version + 1


def test_a_refused_update_offer_restores_the_relay() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c, 0.0, b_extra=A_ALLOWS_UPDATE)
    step = receive(c, from_a("UPDATE", a_tag, 2, body=MOVED), CALLER, 1.0)
    (update,) = requests(step, "UPDATE")
    changed = updates(step)
    step = receive(c, answer(update, 488), TRUNK, 1.1)
    assert statuses(step) == [488]
    restored = updates(step)
    assert restored and restored[-1] != changed[-1]


def test_an_accepted_re_invite_is_kept() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=MOVED), CALLER, 1.0))
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.1)
    assert statuses(step) == [200]
    # The answer updates the relay; nothing goes back to the old session.
    for streams in updates(step):
        assert [s.a.remote.port for s in streams if s.a.remote is not None] == [40200]


def cancel_for(text: str) -> str:
    head = text.split("\r\n\r\n", 1)[0]
    head = head.replace("INVITE sip:", "CANCEL sip:", 1).replace(" INVITE\r\n", " CANCEL\r\n")
    lines = [
        line
        for line in head.split("\r\n")
        if not line.startswith(("Content-Type:", "Content-Length:"))
    ]
    return "\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n"


def test_a_2xx_to_a_withdrawn_offer_is_rolled_back_with_a_re_invite() -> None:
    # RFC 3261 9.2: the callee answered 2xx before the CANCEL reached it; the caller,
    # with its 487, keeps the old session. The callee gets the old one offered again.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    text = from_a("INVITE", a_tag, 2, body=MOVED_ON_HOLD)
    step = receive(c, text, CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert b"a=sendonly" in reinvite.body
    moved_streams = updates(step)[-1]
    receive(c, answer(reinvite, 180), TRUNK, 1.05)
    assert 487 in statuses(receive(c, cancel_for(text), CALLER, 1.1))
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.2)
    (again,) = requests(step, "INVITE")
    old = SessionDescription.parse(invite.body)
    offered = SessionDescription.parse(again.body)
    assert (
        offered.origin.sess_version
        == SessionDescription.parse(reinvite.body).origin.sess_version + 1
    )
    assert offered.origin.sess_id == old.origin.sess_id
    assert [m.formats for m in offered.media] == [m.formats for m in old.media]
    assert b"a=sendonly" not in again.body
    assert again.body.replace(b" 3 IN IP4", b" 1 IN IP4") == invite.body
    # The relay sends the caller's media where it was before the withdrawn offer.
    (restored,) = updates(step)
    assert restored != moved_streams
    assert [s.a.remote.port for s in restored if s.a.remote is not None] == [40000]
    assert [r.method for r in requests(receive(c, answer(again, 200, ANSWER), TRUNK, 1.3))] == [
        "ACK"
    ]


def test_a_2xx_to_a_withdrawn_offer_that_changed_nothing_needs_no_re_invite() -> None:
    # A new port of the caller's is the relay's business only: the callee's offer
    # was the session it had.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    text = from_a("INVITE", a_tag, 2, body=MOVED)
    (reinvite,) = requests(receive(c, text, CALLER, 1.0), "INVITE")
    assert reinvite.body == invite.body  # the same session: o= version unchanged
    receive(c, cancel_for(text), CALLER, 1.1)
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.2)
    assert [r.method for r in requests(step)] == ["ACK"]


def test_a_2xx_offer_to_a_withdrawn_offerless_re_invite_is_answered_and_offered_back() -> None:
    # The caller's re-INVITE had no offer; the callee's 2xx, which crossed the CANCEL,
    # carries one that nobody will answer now: the SBC's ACK rejects every stream
    # (RFC 3261 13.2.2.4) and the callee is offered the old session again.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    text = from_a("INVITE", a_tag, 2)
    (reinvite,) = requests(receive(c, text, CALLER, 1.0), "INVITE")
    assert reinvite.body == b""
    receive(c, answer(reinvite, 180), TRUNK, 1.05)
    assert 487 in statuses(receive(c, cancel_for(text), CALLER, 1.1))
    offer = ANSWER.replace(" 1 1 IN", " 1 2 IN")
    step = receive(c, answer(reinvite, 200, offer), TRUNK, 1.2)
    ack, again = requests(step)
    assert ack.method == "ACK" and ack.cseq.seq == reinvite.cseq.seq
    rejected = SessionDescription.parse(ack.body)
    assert [m.port for m in rejected.media] == [0]
    assert again.method == "INVITE"
    offered = SessionDescription.parse(again.body)
    assert offered.origin.sess_version > rejected.origin.sess_version
    assert [m.port for m in offered.media] == [
        m.port for m in SessionDescription.parse(invite.body).media
    ]
    # Its answer is ACKed, and later refreshes are not held up by a pending ACK.
    assert [r.method for r in requests(receive(c, answer(again, 200, ANSWER), TRUNK, 1.3))] == [
        "ACK"
    ]
    assert c._calls[next(iter(c._calls))].held_ack is None
