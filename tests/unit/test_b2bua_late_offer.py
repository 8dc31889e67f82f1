"""INVITEs without an offer (late or delayed offer) and the ACKs that carry answers.

RFC 3261 13.2.1 and 13.2.2.4, RFC 3264: an INVITE without SDP gets the offer in the
2xx and the answer in the ACK. The B2BUA sends its own INVITE without an offer too,
relays the callee's offer (rewritten to the relay) in the caller's 2xx, and holds
the callee's ACK until the caller's ACK brings the answer. The same holds for an
offerless re-INVITE in a call. Any ACK the B2BUA sent answers each retransmission
of its 2xx.
"""

from __future__ import annotations

from sbc.b2bua.call import CallState, EndReason
from sbc.b2bua.controller import (
    LATE_OFFER_STREAMS,
    AllocateMedia,
    CallController,
    DeleteMedia,
    Step,
    UpdateMedia,
)
from sbc.sip.message import Request
from sbc.sip.sdp import SessionDescription
from tests.unit.test_b2bua_flows import (
    A_CALL_ID,
    ANSWER,
    CALLER,
    TRUNK,
    answer,
    confirmed_call,
    controller,
    ended_calls,
    from_a,
    from_b,
    invite_text,
    receive,
    requests,
    responses,
    sdp,
    session,
    statuses,
    until_timers,
)

#: The callee's offer in its 2xx: its media address must not reach the caller.
B_OFFER = sdp("b", "203.0.113.5", 42000) + "a=rtpmap:0 PCMU/8000\r\n"
A_ANSWER = sdp("a", "198.51.100.9", 40000)


def late_call(c: CallController, now: float = 0.0) -> tuple[Request, AllocateMedia]:
    """A caller's INVITE without SDP, its media allocated: the B-leg INVITE."""
    step = receive(c, invite_text(body=""), CALLER, now)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), now), "INVITE")
    return invite, allocate


def ack_with(a_tag: str | None, body: str, cseq: int = 1) -> str:
    assert a_tag is not None
    return from_a("ACK", a_tag, cseq, body=body)


def media_lines(body: bytes) -> list[str]:
    description = SessionDescription.parse(body)
    return [f"{m.media} {m.port}" for m in description.media]


def test_late_offer_crosses_with_the_answer_in_the_acks() -> None:
    c = controller()
    invite, allocate = late_call(c)
    # The relay reserves streams for an offer not seen yet, on both sides.
    assert len(allocate.streams) == LATE_OFFER_STREAMS
    assert invite.body == b"" and invite.headers.get("Content-Type") is None
    # No 100rel: a reliable provisional would carry the offer, answered in its PRACK.
    assert "100rel" not in (invite.headers.get("Supported") or "")

    step = receive(c, answer(invite, 200, B_OFFER), TRUNK, 0.1)
    assert requests(step) == []  # no ACK to the callee yet: it must carry the answer
    (ok,) = responses(step)
    assert ok.status == 200 and ok.to.tag
    offer = ok.body.decode()
    assert "c=IN IP4 198.51.100.1" in offer and "m=audio 20000 " in offer
    assert "203.0.113.5" not in offer and "42000" not in offer
    (update,) = step.media
    assert isinstance(update, UpdateMedia)
    assert update.streams[0].b.remote is not None  # the callee's media address

    # A retransmitted 2xx while the caller has not answered: still no ACK.
    step = receive(c, answer(invite, 200, B_OFFER), TRUNK, 0.6)
    assert requests(step) == []

    step = receive(c, ack_with(ok.to.tag, A_ANSWER), CALLER, 0.7)
    (ack,) = requests(step, "ACK")
    assert ack.call_id == invite.call_id and ack.cseq.seq == 1
    assert ack.headers.get("Content-Type") == "application/sdp"
    body = ack.body.decode()
    assert "c=IN IP4 203.0.113.1" in body and "m=audio 21000 " in body
    assert "198.51.100.9" not in body and "40000" not in body
    (update,) = step.media
    assert isinstance(update, UpdateMedia)
    assert update.streams[0].a.remote is not None  # the caller's media address now
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED

    # A 2xx retransmitted after that gets the same ACK, answer included.
    step = receive(c, answer(invite, 200, B_OFFER), TRUNK, 1.0)
    (again,) = requests(step, "ACK")
    assert bytes(again) == bytes(ack)


def test_late_offer_with_an_ack_without_answer_rejects_the_offer_and_hangs_up() -> None:
    c = controller()
    invite, _ = late_call(c)
    (ok,) = responses(receive(c, answer(invite, 200, B_OFFER), TRUNK, 0.1))
    step = receive(c, ack_with(ok.to.tag, ""), CALLER, 0.2)
    # RFC 3261 13.2.2.4: a valid answer (every stream rejected) in the ACK, then BYE.
    assert [r.method for r in requests(step)] == ["ACK", "BYE", "BYE"]
    ack = requests(step, "ACK")[0]
    assert media_lines(ack.body) == ["audio 0"]
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.REJECTED and call.end_status == 488
    assert len(c) == 0


def test_late_offer_whose_caller_never_acks_still_acks_the_callee_before_bye() -> None:
    c = controller()
    invite, _ = late_call(c)
    receive(c, answer(invite, 200, B_OFFER), TRUNK, 0.1)
    step = Step()
    for _ in range(20):
        deadline = c.next_deadline()
        assert deadline is not None
        step = c.handle_timers(deadline)
        if requests(step, "BYE"):
            break
    to_b = [r for r in requests(step) if r.call_id == invite.call_id]
    assert [r.method for r in to_b] == ["ACK", "BYE"]
    assert media_lines(to_b[0].body) == ["audio 0"]
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.ACK_TIMEOUT


def test_late_offer_2xx_without_offer_is_acked_hung_up_and_the_caller_gets_502() -> None:
    c = controller()
    invite, _ = late_call(c)
    step = receive(c, answer(invite, 200), TRUNK, 0.1)
    assert [r.method for r in requests(step)] == ["ACK", "BYE"]
    assert statuses(step) == [502]
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.REJECTED


def test_late_offer_extra_media_beyond_the_reserved_streams_is_rejected() -> None:
    c = controller()
    invite, _ = late_call(c)
    video = "".join(f"m=video {42002 + 2 * i} RTP/AVP 96\r\n" for i in range(LATE_OFFER_STREAMS))
    (ok,) = responses(receive(c, answer(invite, 200, B_OFFER + video), TRUNK, 0.1))
    ports = media_lines(ok.body)
    assert len(ports) == 1 + LATE_OFFER_STREAMS
    assert ports[-1].endswith(" 0")  # no relay stream left for it


def test_early_media_in_an_unreliable_183_reaches_the_caller_rewritten() -> None:
    c = controller()
    invite, _ = late_call(c)
    step = receive(c, answer(invite, 183, B_OFFER), TRUNK, 0.1)
    (progress,) = responses(step)
    assert progress.status == 183 and b"203.0.113.5" not in progress.body
    assert b"198.51.100.1" in progress.body
    assert requests(step) == []  # unreliable: no PRACK


# -- re-INVITEs ---------------------------------------------------------------------------


def test_offerless_re_invite_holds_the_ack_for_the_answer() -> None:
    c = controller()
    invite, _, a_tag = confirmed_call(c, 0.0)
    step = receive(c, from_a("INVITE", a_tag, 2), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert reinvite.body == b""
    step = receive(c, answer(reinvite, 200, sdp("b", "203.0.113.5", 42004, version=2)), TRUNK, 1.1)
    assert requests(step) == []
    (ok,) = [r for r in responses(step) if r.status == 200]
    assert b"42004" not in ok.body and b"m=audio 20000 " in ok.body

    step = receive(c, ack_with(a_tag, sdp("a", "198.51.100.9", 40002, version=2), 2), CALLER, 1.2)
    (ack,) = requests(step, "ACK")
    assert ack.call_id == invite.call_id and ack.cseq.seq == reinvite.cseq.seq
    assert b"m=audio 21000 " in ack.body and b"40002" not in ack.body
    # Its retransmitted 2xx gets the same ACK.
    step = receive(c, answer(reinvite, 200, sdp("b", "203.0.113.5", 42004, version=2)), TRUNK, 1.5)
    assert [bytes(r) for r in requests(step)] == [bytes(ack)]


def test_offerless_re_invite_from_the_callee_is_answered_by_the_callers_ack() -> None:
    c = controller()
    invite, _, _ = confirmed_call(c, 0.0)
    step = receive(c, from_b(invite, "INVITE", 1), TRUNK, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert reinvite.call_id == A_CALL_ID and reinvite.body == b""
    step = receive(
        c, answer(reinvite, 200, sdp("a", "198.51.100.9", 40004, version=2)), CALLER, 1.1
    )
    assert requests(step) == []
    (ok,) = [r for r in responses(step) if r.status == 200]
    assert b"40004" not in ok.body and b"m=audio 21000 " in ok.body
    b_ack = from_b(invite, "ACK", 1, body=sdp("b", "203.0.113.5", 42000, version=2))
    step = receive(c, b_ack, TRUNK, 1.2)
    (ack,) = requests(step, "ACK")
    assert ack.call_id == A_CALL_ID and b"m=audio 20000 " in ack.body


def test_retransmitted_2xx_to_a_relayed_re_invite_is_acked_again() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c, 0.0)
    offer = sdp("a", "198.51.100.9", 40000, version=2)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=offer), CALLER, 1.0))
    (ack,) = requests(receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.1), "ACK")
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.6)
    assert [bytes(r) for r in requests(step)] == [bytes(ack)]


def test_an_ended_late_offer_call_deletes_its_media() -> None:
    c = controller()
    invite, allocate = late_call(c)
    (ok,) = responses(receive(c, answer(invite, 200, B_OFFER), TRUNK, 0.1))
    receive(c, ack_with(ok.to.tag, A_ANSWER), CALLER, 0.2)
    assert ok.to.tag is not None
    step = receive(c, from_a("BYE", ok.to.tag, 2), CALLER, 5.0)
    assert statuses(step) == [200]
    assert step.media == (DeleteMedia(allocate.call_ref, "sess"),)
    (bye,) = requests(step, "BYE")
    assert bye.call_id == invite.call_id


def test_the_acks_kept_for_retransmissions_go_with_their_transactions() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c, 0.0)
    offer = sdp("a", "198.51.100.9", 40000, version=2)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=offer), CALLER, 1.0))
    receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.1)
    assert len(c._acks) == 1
    now, _ = until_timers(c, lambda _: not c._acks)
    assert now >= 1.1 + 64 * c.transactions.config.t1


def test_a_callee_hanging_up_before_the_answer_still_gets_its_ack() -> None:
    c = controller()
    invite, _ = late_call(c)
    receive(c, answer(invite, 200, B_OFFER), TRUNK, 0.1)
    step = receive(c, from_b(invite, "BYE", 2), TRUNK, 0.2)
    to_b = [m for m in requests(step) if m.call_id == invite.call_id]
    assert [r.method for r in to_b] == ["ACK"]
    assert media_lines(to_b[0].body) == ["audio 0"]
    assert 200 in statuses(step)
    assert len(c) == 0
