"""The call controller against the RFCs, from a review: each test names the rule and
what is expected. They failed when written and were fixed.
"""

from __future__ import annotations

import re

import pytest

from sbc.b2bua.call import CallState, LegSide
from sbc.b2bua.controller import AllocateMedia, CallController, CallTimers, RealmPolicy, Step
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    A_CALL_ID,
    ANSWER,
    CALLER,
    SDP,
    TRUNK,
    answer,
    confirmed_call,
    controller,
    from_a,
    from_b,
    invite_text,
    receive,
    requests,
    responses,
    sdp,
    session,
    start_call,
    statuses,
)

RELIABLE = "Require: 100rel\r\n"
OFFER_2 = sdp("a", "198.51.100.9", 40002, version=2)


def finals(step: object) -> list[int]:
    return [s for s in statuses(step) if s >= 200]  # type: ignore[arg-type]


def cancel_for(invite: str) -> str:
    """The CANCEL of an INVITE's text (same Via branch, Call-ID, From, To, CSeq number)."""
    head = invite.split("\r\n\r\n", 1)[0]
    head = head.replace("INVITE sip:", "CANCEL sip:", 1).replace(" INVITE\r\n", " CANCEL\r\n")
    head = re.sub(r"Content-Type:[^\r]*\r\n", "", head)
    head = re.sub(r"Content-Length:[^\r]*", "Content-Length: 0", head)
    return head + "\r\n\r\n"


# -- BYE while something is pending (RFC 3261 15.1.2) ----------------------------------


def test_caller_bye_on_an_early_dialog_answers_the_pending_invite_with_487() -> None:
    # RFC 3261 15.1.2: after a BYE "the UAS MUST still respond to any pending requests
    # received for that dialog. It is RECOMMENDED that a 487 be generated". The caller
    # may BYE an early dialog (RFC 3261 15); its INVITE must still get a final answer.
    c = controller()
    (invite,), _ = start_call(c)
    (ringing,) = responses(receive(c, answer(invite, 180), TRUNK, 0.1))
    assert ringing.to.tag
    step = receive(c, from_a("BYE", ringing.to.tag, 2), CALLER, 0.2)
    assert 200 in statuses(step)
    assert 487 in statuses(step), statuses(step)  # before the fix: only the BYE's 200
    assert len(c) == 0


def test_callee_bye_on_an_early_dialog_still_gives_the_caller_a_final_response() -> None:
    # RFC 3261 15: the callee MUST NOT BYE an early dialog; when it does anyway, the
    # B2BUA ends the call, but RFC 3261 13.3.1 / 17.2.1: the caller's INVITE server
    # transaction must still get a final response. Before the fix the call is dropped and
    # the caller hears nothing: its INVITE stays in Proceeding for ever.
    c = controller()
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 180), TRUNK, 0.1)
    step = receive(c, from_b(invite, "BYE", 1), TRUNK, 0.2)
    to_a = [r for r in responses(step) if r.call_id == A_CALL_ID]
    assert [r.status for r in to_a if r.status >= 300], "the caller got no final response"


@pytest.mark.parametrize("who", ["caller", "callee"])
def test_bye_while_a_relayed_reinvite_is_pending_answers_that_reinvite(who: str) -> None:
    # RFC 3261 15.1.2: pending requests of the dialog still get a response (487
    # recommended). The caller's re-INVITE is pending at the B2BUA (its UAS) when
    # either side hangs up; before the fix it never gets a final response.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    step = receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 1.0)
    assert len(requests(step, "INVITE")) == 1
    if who == "caller":
        step = receive(c, from_a("BYE", a_tag, 3), CALLER, 1.1)
    else:
        step = receive(c, from_b(invite, "BYE", 1), TRUNK, 1.1)
    to_a_invite = [
        r.status for r in responses(step) if r.call_id == A_CALL_ID and r.cseq.method == "INVITE"
    ]
    assert [s for s in to_a_invite if s >= 300] == [487], to_a_invite
    assert len(c) == 0


def test_a_2xx_to_a_relayed_reinvite_that_crossed_the_bye_is_acked() -> None:
    # RFC 3261 13.2.2.4: "The UAC core MUST generate an ACK request for each 2xx
    # received from the transaction layer." The callee answered the relayed
    # re-INVITE while the caller's BYE was on its way: before the fix the 2xx is dropped
    # without ACK (the callee retransmits it for 64*T1).
    c = controller()
    _, _, a_tag = confirmed_call(c)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 1.0))
    receive(c, from_a("BYE", a_tag, 3), CALLER, 1.1)
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.2)
    acks = requests(step, "ACK")
    assert [(a.call_id, a.cseq.seq) for a in acks] == [(reinvite.call_id, reinvite.cseq.seq)]


def test_a_retransmitted_2xx_of_the_initial_invite_after_the_call_ended_is_acked() -> None:
    # RFC 3261 13.2.2.4: every 2xx gets an ACK (our first ACK may have been lost);
    # the B INVITE client transaction is still alive (Timer M, RFC 6026). Before the fix a
    # 2xx retransmission that arrives after the call ended is silently dropped.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    receive(c, from_a("BYE", a_tag, 2), CALLER, 1.0)
    assert len(c) == 0
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 1.1)
    (ack,) = requests(step, "ACK")
    assert ack.call_id == invite.call_id and ack.cseq.seq == invite.cseq.seq


# -- INVITE overlap and CANCEL of a re-INVITE (RFC 3261 14.2, 9.2) --------------------------


def test_a_second_reinvite_while_the_first_is_pending_gets_500_with_retry_after() -> None:
    # RFC 3261 14.2: "A UAS that receives a second INVITE before it sends the final
    # response to a first INVITE with a lower CSeq sequence number on the same dialog
    # MUST return a 500 (Server Internal Error) response to the second INVITE and
    # MUST include a Retry-After header field". 491 is for glare with the UAS's own
    # INVITE, which the B2BUA has not sent on this leg. Before the fix: 491 without Retry-After.
    c = controller()
    _, _, a_tag = confirmed_call(c)
    receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 1.0)
    step = receive(c, from_a("INVITE", a_tag, 3, body=OFFER_2), CALLER, 1.1)
    (refused,) = [r for r in responses(step) if r.status >= 300]
    assert refused.status == 500, refused.status
    assert refused.headers.get("Retry-After") is not None


def cancelled_reinvite(c: CallController) -> tuple[Request, str, Step]:
    """A confirmed call whose caller re-INVITEs, gets 180 from the callee, then
    CANCELs: the relayed re-INVITE, the caller's tag and the CANCEL's step."""
    _, _, a_tag = confirmed_call(c)
    text = from_a("INVITE", a_tag, 2, body=OFFER_2)
    (reinvite,) = requests(receive(c, text, CALLER, 1.0), "INVITE")
    receive(c, answer(reinvite, 180), TRUNK, 1.05)
    return reinvite, a_tag, receive(c, cancel_for(text), CALLER, 1.1)


def test_cancel_of_a_pending_reinvite_ends_it_with_487_and_cancels_the_relayed_one() -> None:
    # RFC 3261 9.2: a CANCEL matching an INVITE not yet finally answered: "the UAS
    # SHOULD immediately respond to the INVITE with a 487". Before the fix the B2BUA
    # answered the CANCEL 200 and did nothing else: no 487 for the re-INVITE and no
    # CANCEL for its relayed copy on the B leg.
    c = controller()
    reinvite, _, step = cancelled_reinvite(c)
    assert [(r.status, r.cseq.method) for r in responses(step) if r.status >= 200] == [
        (200, "CANCEL"),
        (487, "INVITE"),
    ]
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == reinvite.call_id and cancel.via.branch == reinvite.via.branch


def test_a_2xx_crossing_the_relayed_cancel_is_acked_and_not_relayed() -> None:
    c = controller()
    reinvite, a_tag, _ = cancelled_reinvite(c)
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.2)
    assert [(a.call_id, a.cseq.seq) for a in requests(step)] == [
        (reinvite.call_id, reinvite.cseq.seq)
    ]  # only the ACK: the caller had its 487
    assert responses(step) == []
    (live,) = c._calls.values()
    assert live.reinvite_pending == frozenset() and not live.relayed
    # The call goes on: the next re-INVITE is relayed.
    step = receive(c, from_a("INVITE", a_tag, 3, body=OFFER_2), CALLER, 2.0)
    assert len(requests(step, "INVITE")) == 1


# -- PRACK (RFC 3262) ---------------------------------------------------------------------


def test_a_reliable_provisional_out_of_order_is_not_pracked() -> None:
    # RFC 3262 4: "if the UAC receives another reliable provisional response to the
    # same request, and its RSeq value is not one higher than the value of the
    # sequence number, that response MUST NOT be acknowledged with a PRACK".
    # Before the fix RSeq 3 after RSeq 1 is PRACKed at once.
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE + "RSeq: 1\r\n"), TRUNK, 0.1)
    assert len(requests(step, "PRACK")) == 1
    step = receive(c, answer(invite, 180, extra=RELIABLE + "RSeq: 3\r\n"), TRUNK, 0.2)
    assert requests(step, "PRACK") == []


def test_rseq_numbering_is_per_early_dialog_of_a_downstream_fork() -> None:
    # RFC 3262 3 (errata 4600, verified): "the RSeq value of a provisional response
    # within a fork of a request is independent of the RSeq value of a provisional
    # response within any other fork". A second callee UA (To tag f2) starts at RSeq 7
    # after the first one's 500: its first reliable 183 must be PRACKed on its own
    # early dialog. Before the fix fork.rseq is kept per B INVITE, so RSeq 7 <= 500 is taken for
    # a retransmission, never PRACKed, and f2 keeps retransmitting, then fails.
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(
        c, answer(invite, 183, ANSWER, tag="f1", extra=RELIABLE + "RSeq: 500\r\n"), TRUNK, 0.1
    )
    assert len(requests(step, "PRACK")) == 1
    second = answer(
        invite,
        183,
        ANSWER,
        tag="f2",
        contact="sip:bob2@203.0.113.5:5070",
        extra=RELIABLE + "RSeq: 7\r\n",
    )
    step = receive(c, second, TRUNK, 0.2)
    (prack,) = requests(step, "PRACK")
    assert prack.to.tag == "f2" and prack.headers.get("RAck") == "7 1 INVITE"


# -- UPDATE in an early dialog (RFC 3311) ----------------------------------------------------


def test_an_early_update_offer_is_not_sent_to_a_caller_whose_offer_was_not_answered_reliably() -> (
    None
):
    # RFC 3311 5.1: before the initial INVITE completes, the callee may send an UPDATE
    # with an offer only "if the callee generated an answer in a reliable provisional
    # response" (and got it PRACKed). On the A leg the B2BUA is the callee and it
    # relays the 183 unreliably (100rel stripped): the caller's offer has no
    # answer yet, so the callee's early UPDATE offer must not be relayed to it (the
    # B2BUA should refuse it, e.g. 500 with Retry-After per RFC 3311 5.2, or hold it).
    # Before the fix it goes straight to the caller.
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE + "RSeq: 1\r\n"), TRUNK, 0.1)
    (prack,) = requests(step, "PRACK")
    (progress,) = responses(step)
    assert "100rel" not in progress.tokens("Require")  # unreliable on A
    receive(c, answer(prack, 200), TRUNK, 0.15)
    update = from_b(invite, "UPDATE", 2, body=sdp("b", "203.0.113.5", 42010, 2))
    step = receive(c, update, TRUNK, 0.2)
    offers_to_a = [r for r in requests(step, "UPDATE") if r.call_id == A_CALL_ID and r.body]
    assert offers_to_a == []


# -- session timers (RFC 4028) ---------------------------------------------------------------

SESSION_TIMERS = CallTimers(max_duration=0, no_answer_timeout=0, session_expires=1800, min_se=90)


def test_the_2xx_to_the_caller_does_not_increase_its_session_expires() -> None:
    # RFC 4028 9: the UAS "MAY reduce" the Session-Expires of the request in its 2xx
    # but "MUST NOT increase" it. The caller asked for 120 s; before the fix the 2xx says
    # 1800;refresher=uas, and the B2BUA refreshes the caller only after 900 s, long
    # after the caller's own 120 s session timer has torn the call down.
    c = controller(SESSION_TIMERS)
    extra = "Supported: timer\r\nSession-Expires: 120\r\nMin-SE: 90\r\n"
    (invite,), ref = start_call(c, extra=extra)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1))
    value = ok.headers.get("Session-Expires")
    assert value is not None
    assert int(value.split(";")[0]) <= 120, value
    # The B2BUA is the refresher on A (refresher=uas): before the caller's 120 s end.
    assert c._calls[ref].refresh_at[LegSide.A] < 0.1 + 120


def test_a_session_expires_below_our_min_se_gets_422() -> None:
    # RFC 4028 8.1: the UAS answers 422 with its Min-SE rather than raise the interval.
    c = controller(SESSION_TIMERS)
    extra = "Supported: timer\r\nSession-Expires: 60\r\n"
    step = receive(c, invite_text(extra=extra), CALLER, 0.0)
    (refused,) = [r for r in responses(step) if r.status >= 300]
    assert refused.status == 422 and refused.headers.get("Min-SE") == "90"
    assert step.media == () and len(c) == 0


def test_the_session_interval_of_the_callees_2xx_is_the_one_refreshed() -> None:
    # RFC 4028 7.2: the session interval is the Session-Expires of the 2xx (the UAS
    # may lower what the request proposed, 9); with refresher=uac the UAC refreshes
    # before it runs out (half of it recommended, 10). The callee lowered it to 120;
    # before the fix the B2BUA keeps its own 1800 and refreshes the B leg at 900 s.
    c = controller(SESSION_TIMERS)
    (invite,), ref = start_call(c)
    extra = "Require: timer\r\nSession-Expires: 120;refresher=uac\r\n"
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER, extra=extra), TRUNK, 0.1))
    receive(c, from_a("ACK", ok.to.tag or "", 1), CALLER, 0.2)
    assert c._calls[ref].refresh_at[LegSide.B] < 0.1 + 120, c._calls[ref].refresh_at


def test_a_422_from_the_callee_is_retried_with_its_min_se_not_relayed() -> None:
    # RFC 4028 7.4 (UAC): on a 422 the UAC retries with a Session-Expires no smaller
    # than the Min-SE of the 422. The B2BUA is the UAC that chose Session-Expires on the
    # B leg (from its own config, whatever the caller sent): relaying the 422 to the
    # caller, whose INVITE had no Session-Expires at all, leaves a call that can never
    # succeed (the caller's retry brings the same 1800 to the callee).
    c = controller(SESSION_TIMERS)
    (invite,), _ = start_call(c)
    assert invite.headers.get("Session-Expires") == "1800;refresher=uac"
    step = receive(c, answer(invite, 422, extra="Min-SE: 3600\r\n"), TRUNK, 0.1)
    assert 422 not in statuses(step)
    (retry,) = requests(step, "INVITE")
    assert int((retry.headers.get("Session-Expires") or "0").split(";")[0]) >= 3600


# -- malformed but parseable SDP: crashes and requests left unanswered ------------------------

BAD_RTCP = "a=rtcp:notaport\r\n"


def test_an_offer_with_a_malformed_rtcp_attribute_does_not_raise_out_of_the_controller() -> None:
    # An exception escapes media_allocated (SdpError from rewrite_sdp/_relay_rtcp in
    # _fork): the SDP passed _new_call's check, the a=rtcp value is only parsed when
    # rewritten. Expected: the caller gets a 4xx (488/400), nothing raises.
    c = controller()
    step = receive(c, invite_text(body=SDP + BAD_RTCP), CALLER, 0.0)
    allocates = [m for m in step.media if isinstance(m, AllocateMedia)]
    if not allocates:
        assert any(400 <= s < 500 for s in statuses(step))
        return
    step = c.media_allocated(allocates[0].call_ref, session(), 0.0)  # raised before the fix
    assert any(400 <= s < 500 for s in statuses(step)) and len(c) == 0


def test_a_2xx_with_a_malformed_rtcp_attribute_is_still_acked_and_answered() -> None:
    # RFC 3261 13.2.2.4: the 2xx MUST be ACKed. Before the fix SdpError in _to_a (rewrite_sdp)
    # aborts _answered after the fork was made the winner: no ACK to the callee, no
    # answer to the caller, and the call stays CALLING for ever (len(c) == 1).
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 200, ANSWER + "a=rtcp:zz\r\n"), TRUNK, 0.1)
    assert [r.method for r in requests(step)][:1] == ["ACK"]
    assert [s for s in statuses(step) if s >= 200], "the caller got no final response"
    assert [call.state for call in c.calls()] != [CallState.CALLING]


@pytest.mark.parametrize("method", ["INVITE", "UPDATE"])
def test_an_in_dialog_offer_that_is_not_sdp_gets_a_final_response(method: str) -> None:
    # RFC 3261 8.2 / 13.3.1: every request gets a final response (400 or 488 for a
    # body that cannot be parsed, RFC 3261 21.4.26). Before the fix parse_sdp in _relay raises
    # SdpError, handle() logs it and the re-INVITE gets only its 100 (the UPDATE
    # nothing at all): the caller retransmits until its transaction times out.
    c = controller()
    _, _, a_tag = confirmed_call(c)
    step = receive(c, from_a(method, a_tag, 2, body="garbage\r\n"), CALLER, 1.0)
    assert [s for s in statuses(step) if s >= 400], statuses(step)


def test_a_2xx_to_a_relayed_reinvite_with_a_malformed_rtcp_attribute_is_acked_and_relayed() -> None:
    # RFC 3261 13.2.2.4: ACK each 2xx. Before the fix rewrite_sdp raises in _relayed_response
    # after the relay role was dropped: no ACK for the 2xx (nor for its
    # retransmissions), the caller's re-INVITE never answered, and reinvite_pending
    # stays set, so every later re-INVITE of either side gets 491 and the B leg is
    # never refreshed again.
    c = controller()
    _, _, a_tag = confirmed_call(c)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 1.0))
    step = receive(c, answer(reinvite, 200, ANSWER + "a=rtcp:zz\r\n"), TRUNK, 1.1)
    assert [(a.call_id, a.cseq.seq) for a in requests(step, "ACK")] == [
        (reinvite.call_id, reinvite.cseq.seq)
    ]
    assert [s for s in statuses(step) if s >= 200], "the caller's re-INVITE got no answer"
    (live,) = c._calls.values()
    assert live.reinvite_pending == frozenset()


# -- REFER subscription usage (RFC 3515, RFC 6665, RFC 5057) --------------------------------


def test_a_refer_notify_after_the_invite_usage_ended_is_not_refused_481() -> None:
    # RFC 3515 2.4.4 / RFC 6665 4.4.1 / RFC 5057 5: the REFER's implicit subscription is
    # a dialog usage of its own; the BYE ends only the INVITE usage, and the final
    # NOTIFY (the transfer's outcome) still belongs to the dialog. A blind-transfer
    # transferor often hangs up right after the 202: the transferee's NOTIFY
    # got 481 from the B2BUA and the transferor never learned the outcome.
    c = controller(policies={"outside": RealmPolicy(refer_relay=True)})
    invite, _, a_tag = confirmed_call(c)
    refer_to = "Refer-To: <sip:carol@198.51.100.1>\r\n"
    (refer,) = requests(receive(c, from_a("REFER", a_tag, 2, extra=refer_to), CALLER, 1.0))
    receive(c, answer(refer, 202), TRUNK, 1.1)
    receive(c, from_a("BYE", a_tag, 3), CALLER, 1.2)
    notify = from_b(
        invite,
        "NOTIFY",
        1,
        body="SIP/2.0 200 OK\r\nContact: <sip:carol@10.0.0.7>\r\n",
        content_type="message/sipfrag",
        extra="Event: refer\r\nSubscription-State: terminated;reason=noresource\r\n",
    )
    step = receive(c, notify, TRUNK, 1.3)
    assert statuses(step) == [200]
    (relayed,) = requests(step)
    assert relayed.method == "NOTIFY"
    assert relayed.call_id == A_CALL_ID
    assert relayed.headers.get("Event") == "refer"
    assert (relayed.headers.get("Subscription-State") or "").startswith("terminated")
    # Only the status line of the fragment crosses: its headers are the inside's.
    assert relayed.body == b"SIP/2.0 200 OK\r\n"
    # The terminating NOTIFY ended the subscription: the dialog is gone for good.
    again = from_b(invite, "NOTIFY", 2, extra="Event: refer\r\n")
    assert statuses(receive(c, again, TRUNK, 1.4)) == [481]


# -- passing: behaviour worth pinning ----------------------------------------------------------


def test_in_dialog_requests_are_matched_on_both_tags_and_ordered_by_cseq() -> None:
    # RFC 3261 12.2.2: the dialog ID is Call-ID, local and remote tag (a wrong From tag
    # is another dialog: 481, even though _by_dialog is keyed on Call-ID and our tag
    # only); a lower CSeq than the last one is out of order: 500, and the call lives.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    stranger = from_a("BYE", a_tag, 5).replace("tag=alicetag", "tag=mallory")
    assert statuses(receive(c, stranger, CALLER, 1.0)) == [481]
    assert statuses(receive(c, from_b(invite, "BYE", 5, tag="other"), TRUNK, 1.0)) == [481]
    info = from_a("INFO", a_tag, 5, body="x", content_type="text/plain")
    assert len(requests(receive(c, info, CALLER, 1.1), "INFO")) == 1
    assert statuses(receive(c, from_a("BYE", a_tag, 4), CALLER, 1.2)) == [500]
    info_b = from_b(invite, "INFO", 5, body="x", content_type="text/plain")
    assert len(requests(receive(c, info_b, TRUNK, 1.3), "INFO")) == 1
    assert statuses(receive(c, from_b(invite, "BYE", 3), TRUNK, 1.4)) == [500]
    assert len(c) == 1


def test_an_extra_2xx_from_a_downstream_fork_is_acked_and_hung_up_at_its_contact() -> None:
    # RFC 3261 13.2.2.4: a second 2xx to the same B INVITE (another To tag) is ACKed
    # and BYEd on its own dialog, at its own Contact, and the caller hears nothing.
    c = controller()
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 200, ANSWER, tag="f1"), TRUNK, 0.1)
    late = answer(invite, 200, ANSWER, tag="f2", contact="sip:bob2@203.0.113.5:5070")
    step = receive(c, late, TRUNK, 0.2)
    assert responses(step) == []
    assert [(r.method, r.to.tag, r.raw_uri) for r in requests(step)] == [
        ("ACK", "f2", "sip:bob2@203.0.113.5:5070"),
        ("BYE", "f2", "sip:bob2@203.0.113.5:5070"),
    ]


def test_a_compact_form_bye_ends_the_call() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c)
    text = (
        "BYE sip:198.51.100.1:5060 SIP/2.0\r\n"
        "v: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKcompact;rport\r\n"
        "Max-Forwards: 70\r\nf: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        f"t: <sip:1000@198.51.100.1>;tag={a_tag}\r\ni: {A_CALL_ID}\r\nCSeq: 2 BYE\r\n"
        "m: <sip:alice@198.51.100.9:5099>\r\nl: 0\r\n\r\n"
    )
    step = receive(c, text, CALLER, 1.0)
    assert statuses(step) == [200] and len(requests(step, "BYE")) == 1
    assert len(c) == 0


def test_a_reinvite_cancelled_before_its_copy_got_a_provisional_is_cancelled_on_the_first() -> None:
    # RFC 3261 9.1: no CANCEL before a provisional response; the B2BUA sends it on the
    # first one. Before the fix none was ever sent: the copy ran to its final answer.
    c = controller()
    _, _, a_tag = confirmed_call(c)
    text = from_a("INVITE", a_tag, 2, body=OFFER_2)
    (reinvite,) = requests(receive(c, text, CALLER, 1.0), "INVITE")
    step = receive(c, cancel_for(text), CALLER, 1.1)
    assert [r.status for r in responses(step) if r.status >= 200] == [200, 487]
    assert requests(step, "CANCEL") == []
    step = receive(c, answer(reinvite, 180), TRUNK, 1.2)
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == reinvite.call_id and cancel.via.branch == reinvite.via.branch
    assert responses(step) == []  # the caller had its 487
    # A second provisional sends no second CANCEL.
    assert requests(receive(c, answer(reinvite, 183), TRUNK, 1.3), "CANCEL") == []
