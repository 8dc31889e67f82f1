"""Review of session timers (RFC 4028), reliable provisionals (RFC 3262) and
re-INVITE/UPDATE glare (RFC 3261 14, RFC 3311 5.2) in the CallController.

Each test drives the real controller with messages and a fake clock, as
``test_b2bua_flows`` does.
"""

from __future__ import annotations

from sbc.b2bua.call import CallState, LegSide
from sbc.b2bua.controller import CallTimers
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    A_ALLOWS_UPDATE,
    A_CALL_ID,
    ANSWER,
    CALLER,
    SESSION_TIMERS,
    TRUNK,
    answer,
    confirmed_call,
    controller,
    from_a,
    from_b,
    receive,
    refreshes,
    requests,
    responses,
    sdp,
    start_call,
    statuses,
)
from tests.unit.test_b2bua_review import cancel_for

OFFER_2 = sdp("a", "198.51.100.9", 40002, version=2)
RELIABLE = "Require: 100rel\r\nRSeq: 1\r\n"
B_ALLOWS_UPDATE = "Allow: INVITE, ACK, BYE, CANCEL, UPDATE\r\n"


def on_a(requests_sent: list[Request]) -> list[Request]:
    return [r for r in requests_sent if r.call_id == A_CALL_ID]


def finals(step: object) -> list[int]:
    return [s for s in statuses(step) if s >= 200]  # type: ignore[arg-type]


# -- RFC 3262: reliable provisionals ----------------------------------------------------------


def test_an_answer_in_a_reliable_183_reaches_the_caller_in_the_2xx() -> None:
    # RFC 3262 5 / RFC 3261 13.2.1: the callee answered the B2BUA's offer in a reliable
    # 183 and its 2xx comes without SDP (the answer was given). On A the 183 went
    # unreliably, so the caller's offer is answered only by the 2xx: it must carry
    # the answer. Before the fix the caller's 200 has no body at all.
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.1)
    (prack,) = requests(step, "PRACK")
    (progress,) = responses(step)
    receive(c, answer(prack, 200), TRUNK, 0.15)
    step = receive(c, answer(invite, 200), TRUNK, 0.3)
    (ok,) = [r for r in responses(step) if r.status == 200]
    assert ok.headers.get("Content-Type") == "application/sdp"
    assert b"m=audio 20000 " in ok.body and b"203.0.113" not in ok.body
    assert ok.body == progress.body  # the same answer, same o= version
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED


def test_a_retransmitted_reliable_provisional_is_not_relayed_again() -> None:
    # RFC 3262 4: "retransmissions of that response MUST be discarded" (same dialog,
    # CSeq and RSeq). Before the fix each retransmission of the callee's reliable 183
    # goes to the caller again (with its SDP), every 500 ms until the PRACK's 2xx.
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.1)
    assert statuses(step) == [183]
    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.6)
    assert requests(step, "PRACK") == []
    assert responses(step) == []


def test_a_reliable_provisional_to_a_relayed_re_invite_is_pracked_or_never_asked_for() -> None:
    # RFC 3262 3/4: a UAC that says Supported: 100rel gets reliable provisionals and
    # must PRACK them, or the UAS retransmits and after 64*T1 rejects the re-INVITE
    # with a 5xx. Before the fix the relayed re-INVITE says "Supported: 100rel" and
    # a reliable 180 to it is never PRACKed (the caller's re-INVITE then fails).
    c = controller()
    _, _, a_tag = confirmed_call(c)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 1.0))
    step = receive(c, answer(reinvite, 180, extra=RELIABLE), TRUNK, 1.1)
    pracks = requests(step, "PRACK")
    assert pracks or "100rel" not in {t.lower() for t in reinvite.tokens("Supported")}


def test_out_of_order_reliable_provisional_after_the_first_is_still_relayed_once() -> None:
    # Pinned: a new reliable provisional (RSeq + 1) is PRACKed and relayed, unreliably.
    c = controller()
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.1)
    step = receive(c, answer(invite, 180, extra="Require: 100rel\r\nRSeq: 2\r\n"), TRUNK, 0.2)
    (prack,) = requests(step, "PRACK")
    assert prack.headers.get("RAck") == "2 1 INVITE"
    (ringing,) = responses(step)
    assert ringing.status == 180 and ringing.headers.get("RSeq") is None


# -- RFC 4028: session timers -----------------------------------------------------------------


def test_the_callers_min_se_bounds_the_session_interval_of_its_2xx() -> None:
    # RFC 4028 9: the UAS "MUST NOT set it to a duration lower than the value in the
    # Min-SE header field in the request". The caller will not accept a session
    # shorter than 600 s; before the fix the 2xx says 90;refresher=uas (the
    # configured interval), which the caller takes as a protocol error.
    c = controller(SESSION_TIMERS)
    extra = "Supported: timer\r\nMin-SE: 600\r\n"
    (invite,), _ = start_call(c, extra=extra)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1))
    value = ok.headers.get("Session-Expires") or ""
    assert int(value.split(";")[0]) >= 600, value


def test_a_caller_that_asks_to_refresh_is_the_refresher_in_its_2xx() -> None:
    # RFC 4028 9, table: UAC supports timer and asks refresher=uac -> the 2xx says
    # refresher=uac, and "the UAS MUST place a Require header field into the response
    # with the value 'timer'". Before a fix the 2xx says refresher=uas, no Require.
    c = controller(SESSION_TIMERS)
    extra = "Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n"
    (invite,), _ = start_call(c, extra=extra)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1))
    assert ok.headers.get("Session-Expires") == "90;refresher=uac"
    assert "timer" in ok.tokens("Require")
    assert ok.to.tag is not None
    receive(c, from_a("ACK", ok.to.tag, 1), CALLER, 0.2)
    # The caller refreshes at half the interval: the B2BUA does not (it would glare)...
    assert not on_a(requests(c.handle_timers(46.0)))
    # ...and refreshes it itself at three quarters when no refresh came.
    assert on_a(requests(c.handle_timers(68.0)))


def test_a_caller_that_asks_to_refresh_without_supporting_timers_is_refreshed() -> None:
    # RFC 4028 9, table: a UAC that does not support timer gets refresher=uas.
    c = controller(SESSION_TIMERS)
    (invite,), _ = start_call(c, extra="Session-Expires: 90;refresher=uac\r\n")
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1))
    assert ok.headers.get("Session-Expires") == "90;refresher=uas"
    assert "timer" not in ok.tokens("Require")


def test_a_refused_re_invite_of_the_caller_does_not_postpone_our_refresh_of_it() -> None:
    # RFC 4028 10: only a 2xx to a session refresh request restarts the session
    # timer. The caller's re-INVITE at 40 s is refused (488) by the callee, so the
    # caller's session still ends 90 s after the call's 2xx (it sends BYE at 60 s as
    # the side that does not refresh). Before the fix its arrival re-armed the
    # B2BUA's refresh of A to 85 s: nothing reaches A in time and the caller hangs up.
    c = controller(SESSION_TIMERS)
    _, _, a_tag = confirmed_call(c, 0.0)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 40.0))
    step = receive(c, answer(reinvite, 488), TRUNK, 40.1)
    assert finals(step) == [488]
    receive(c, from_a("ACK", a_tag, 2), CALLER, 40.2)
    assert on_a(requests(c.handle_timers(45.0))), "no refresh of A at 45 s"


def test_an_accepted_re_invite_of_the_caller_counts_as_its_refresh() -> None:
    # Pinned: a peer's own successful refresh restarts that leg's interval: the
    # B2BUA's next refresh of A comes half an interval after the 2xx it relayed.
    c = controller(SESSION_TIMERS)
    _, _, a_tag = confirmed_call(c, 0.0)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 40.0))
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 40.1)
    assert finals(step) == [200]
    receive(c, from_a("ACK", a_tag, 2), CALLER, 40.2)
    assert on_a(requests(c.handle_timers(45.0))) == []
    assert on_a(requests(c.handle_timers(85.1)))


def test_the_refresh_of_a_leg_carries_its_session_interval_and_timer_support() -> None:
    # Pinned (RFC 4028 7.4): the refresh request names the B2BUA (its UAC) refresher.
    c = controller(SESSION_TIMERS)
    confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    update, reinvite = refreshes(c.handle_timers(45.0))
    for request in (update, reinvite):
        assert request.headers.get("Session-Expires") == "90;refresher=uac"
        assert "timer" in request.tokens("Supported")


def test_the_b_leg_invite_offers_session_timers_and_the_configured_min_se() -> None:
    # Pinned (RFC 4028 7.1): Supported: timer, Session-Expires with refresher=uac
    # (the B2BUA refreshes), Min-SE at least the configured minimum.
    c = controller(CallTimers(max_duration=0, no_answer_timeout=0, session_expires=600, min_se=120))
    (invite,), _ = start_call(c)
    assert "timer" in invite.tokens("Supported")
    assert invite.headers.get("Session-Expires") == "600;refresher=uac"
    assert invite.headers.get("Min-SE") == "120"


# -- RFC 3261 14 / RFC 3311 5.2: glare -------------------------------------------------------


def test_an_update_offer_while_our_re_invite_offer_is_pending_on_that_leg_gets_491() -> None:
    # RFC 3311 5.2: "If an UPDATE is received that contains an offer, and the UAS has
    # generated an offer (in an UPDATE, PRACK or INVITE) to which it has not yet
    # received an answer, the UAS MUST reject the UPDATE with a 491". The B2BUA's
    # refresh re-INVITE (with SDP) is pending on A; the caller's UPDATE offer crossed
    # it. Before the fix it is relayed to the callee.
    c = controller(SESSION_TIMERS)
    _, _, a_tag = confirmed_call(c, 0.0, b_extra=B_ALLOWS_UPDATE)
    step = c.handle_timers(45.0)
    (ours,) = requests(step, "INVITE")
    assert ours.call_id == A_CALL_ID and ours.body
    step = receive(c, from_a("UPDATE", a_tag, 2, body=OFFER_2), CALLER, 45.1)
    assert finals(step) == [491]
    assert requests(step, "UPDATE") == []


def test_a_body_less_update_during_our_re_invite_is_still_relayed() -> None:
    # Pinned: an UPDATE without an offer is no glare (RFC 3311 5.2 is about offers).
    c = controller(SESSION_TIMERS)
    _, _, a_tag = confirmed_call(c, 0.0, b_extra=B_ALLOWS_UPDATE)
    c.handle_timers(45.0)
    step = receive(c, from_a("UPDATE", a_tag, 2), CALLER, 45.1)
    assert len([r for r in requests(step, "UPDATE") if r.call_id != A_CALL_ID]) == 1


def test_both_legs_re_invite_at_once_both_get_491() -> None:
    # Pinned (RFC 3261 14.2): the caller's re-INVITE is relayed to B; the callee's own
    # re-INVITE crosses it: the B2BUA, UAC of an INVITE on B, answers it 491, and the
    # callee's 491 to the relayed one goes back to the caller. The session stays.
    c = controller()
    invite, _, a_tag = confirmed_call(c)
    (relayed,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 1.0))
    b_offer = sdp("b", "203.0.113.5", 42002, version=2)
    step = receive(c, from_b(invite, "INVITE", 1, body=b_offer), TRUNK, 1.01)
    assert finals(step) == [491] and requests(step) == []
    step = receive(c, answer(relayed, 491), TRUNK, 1.02)
    assert finals(step) == [491]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED
    # Once both are done, either side's retry goes through.
    step = receive(c, from_a("INVITE", a_tag, 3, body=OFFER_2), CALLER, 3.0)
    assert len(requests(step, "INVITE")) == 1


def test_a_491_to_a_re_offer_is_retried_as_a_re_offer_not_a_body_less_update() -> None:
    # RFC 3261 14.1: after a 491 the UAC retries *its request*. The B2BUA re-offers
    # the old session to a callee that took an offer the caller withdrew (the 2xx
    # crossed the CANCEL). The callee answers 491 (glare); the retry 2.1-4 s later must
    # offer that session again. Before the fix the retry is a session refresh,
    # a body-less UPDATE where the callee allows it: the callee stays on the
    # withdrawn session for good.
    c = controller()
    _, _, a_tag = confirmed_call(c, b_extra=B_ALLOWS_UPDATE)
    moved = sdp("a", "198.51.100.9", 40000, version=2) + "a=sendonly\r\n"
    text = from_a("INVITE", a_tag, 2, body=moved)
    (reinvite,) = requests(receive(c, text, CALLER, 1.0), "INVITE")
    receive(c, answer(reinvite, 180), TRUNK, 1.05)
    assert 487 in statuses(receive(c, cancel_for(text), CALLER, 1.1))
    (again,) = requests(receive(c, answer(reinvite, 200, ANSWER), TRUNK, 1.2), "INVITE")
    assert again.body and b"a=sendonly" not in again.body
    receive(c, answer(again, 491), TRUNK, 1.3)
    assert requests(c.handle_timers(3.3)) == []  # not before 2.1 s
    retry = requests(c.handle_timers(5.4))
    assert [r.method for r in retry] == ["INVITE"]
    assert retry[0].body == again.body


def test_a_491_to_our_refresh_on_a_retries_within_two_seconds() -> None:
    # Pinned (RFC 3261 14.1): the A leg's Call-ID is the caller's: 0-2 s back-off.
    c = controller(SESSION_TIMERS)
    confirmed_call(c, 0.0)
    step = c.handle_timers(45.0)
    (ours,) = on_a(requests(step, "INVITE"))
    receive(c, answer(ours, 491), CALLER, 45.1)
    retry = on_a(requests(c.handle_timers(47.2), "INVITE"))
    assert len(retry) == 1 and retry[0].cseq.seq == ours.cseq.seq + 1


def test_a_refused_refresh_re_invite_keeps_the_call() -> None:
    # Pinned: a non-2xx other than 408/481 (RFC 4028 10) does not end the call.
    c = controller(SESSION_TIMERS)
    confirmed_call(c, 0.0)
    (ours,) = on_a(requests(c.handle_timers(45.0), "INVITE"))
    step = receive(c, answer(ours, 500), CALLER, 45.1)
    assert requests(step, "BYE") == []
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED
    assert LegSide.A not in c._calls[call.call_ref].reinvite_pending


def test_a_refresh_held_off_by_a_relayed_re_invite_comes_soon_after_it_fails() -> None:
    # RFC 4028 10: the callee's session is refreshed only by a 2xx. The B leg's refresh
    # falls due (45 s) while the caller's re-INVITE is relayed there (RFC 3261 14.1: no
    # second INVITE); the callee refuses it (488). Before the fix the refresh was put
    # off by half an interval (to 90 s, when the callee's session has ended); now it
    # is tried again REFRESH_RETRY (5 s) later.
    c = controller(SESSION_TIMERS)
    invite, _, a_tag = confirmed_call(c, 0.0)
    (relayed,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=OFFER_2), CALLER, 40.0))
    assert [r for r in requests(c.handle_timers(45.0)) if r.call_id == invite.call_id] == []
    receive(c, answer(relayed, 488), TRUNK, 46.0)
    step = c.handle_timers(50.0)
    (refresh,) = [r for r in requests(step) if r.call_id == invite.call_id]
    assert refresh.method == "INVITE" and refresh.cseq.seq == relayed.cseq.seq + 1


# -- RFC 4028 7.4: a 422 to a refresh ---------------------------------------------------------


def test_a_422_to_our_refresh_is_retried_at_once_with_its_min_se() -> None:
    # The peer raised its Min-SE mid-call: without a retry nothing refreshed the
    # session, and the peer would end it when the interval ran out.
    c = controller(SESSION_TIMERS)
    confirmed_call(c, 0.0)
    (ours,) = on_a(requests(c.handle_timers(45.0), "INVITE"))
    assert ours.headers.get("Min-SE") == "90"
    step = receive(c, answer(ours, 422, extra="Min-SE: 300\r\n"), CALLER, 45.1)
    assert requests(step, "BYE") == []
    (retry,) = on_a(requests(c.handle_timers(45.1), "INVITE"))
    assert retry.cseq.seq == ours.cseq.seq + 1
    assert retry.headers.get("Session-Expires") == "300;refresher=uac"
    assert retry.headers.get("Min-SE") == "300"
    receive(c, answer(retry, 200, ANSWER), CALLER, 45.2)
    # The next refresh keeps the raised interval: half of it later.
    assert on_a(requests(c.handle_timers(150.0), "INVITE")) == []
    (later,) = on_a(requests(c.handle_timers(195.3), "INVITE"))
    assert later.headers.get("Min-SE") == "300"


def test_a_422_that_asks_nothing_new_is_not_retried() -> None:
    c = controller(SESSION_TIMERS)
    confirmed_call(c, 0.0)
    (ours,) = on_a(requests(c.handle_timers(45.0), "INVITE"))
    receive(c, answer(ours, 422, extra="Min-SE: 90\r\n"), CALLER, 45.1)
    assert on_a(requests(c.handle_timers(46.0), "INVITE")) == []
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED
