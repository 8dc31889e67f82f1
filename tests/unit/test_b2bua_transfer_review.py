"""Transfer, Replaces, CANCEL races and forking against the RFCs, from a review.

REFER (RFC 3515, RFC 4488), Replaces (RFC 3891), CANCEL and its races (RFC 3261 9,
13.2.2.4, 15), parallel forking (RFC 3261 16.7 for what a forking element does with
the answers). Each test names the rule; the ones about bugs failed when written.
"""

from __future__ import annotations

import urllib.parse

from sbc.b2bua.call import CallState, EndReason
from sbc.b2bua.controller import AllocateMedia, CallTimers, RealmPolicy, Step
from sbc.b2bua.routing import RouteAction, RouteRule
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    A_CALL_ID,
    ANSWER,
    BOB1_FLOW,
    BOB2_FLOW,
    CALLER,
    CORE,
    TRUNK,
    USERS,
    answer,
    confirmed_call,
    controller,
    ended_calls,
    forked,
    from_a,
    from_b,
    invite_text,
    receive,
    registered_targets,
    requests,
    responses,
    sdp,
    sent,
    session,
    start_call,
    statuses,
)
from tests.unit.test_b2bua_replaces import FIRST_CALL_ID, first_call, replaces
from tests.unit.test_b2bua_review import cancel_for

REFER_TO = "Refer-To: <sip:carol@198.51.100.1>\r\n"
REFER_POLICY = {"outside": RealmPolicy(refer_relay=True)}
RING_TIMEOUT = CallTimers(max_duration=0, no_answer_timeout=5, session_expires=0)


def methods(step: Step) -> list[str]:
    return [r.method for r in requests(step)]


def finals(step: Step) -> list[int]:
    return [s for s in statuses(step) if s >= 200]


def refer_notify(invite: Request, cseq: int, event: str, state: str, frag: str) -> str:
    extra = f"Event: {event}\r\nSubscription-State: {state}\r\n"
    return from_b(invite, "NOTIFY", cseq, body=frag, content_type="message/sipfrag", extra=extra)


# -- CANCEL (RFC 3261 9.1, 9.2) ---------------------------------------------------------


def test_a_cancel_waiting_for_a_provisional_goes_out_on_the_100_trying() -> None:
    # RFC 3261 9.1: a CANCEL must wait for a provisional response, any of them: a
    # 100 Trying is one. A callee that sends 100 and rings without a 180 (or whose
    # 180 is lost) otherwise rings on after the caller hung up.
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, cancel_for(invite_text()), CALLER, 0.1)
    assert sorted(statuses(step)) == [200, 487]
    assert methods(step) == []  # not before a provisional
    step = receive(c, answer(invite, 100), TRUNK, 0.2)
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == invite.call_id and cancel.via.branch == invite.via.branch


def test_a_cancel_waiting_for_a_provisional_is_sent_after_the_call_ended() -> None:
    # RFC 3261 9.1: the call ends (no answer in time) before the callee sent any
    # provisional; the CANCEL it owes goes out on the first one that comes, or the
    # callee rings until it gives up by itself.
    c = controller(RING_TIMEOUT)
    (invite,), _ = start_call(c)
    step = c.handle_timers(5.0)
    assert finals(step) == [408] and len(c) == 0
    assert methods(step) == []
    step = receive(c, answer(invite, 180), TRUNK, 6.0)
    assert responses(step) == []
    (cancel,) = requests(step, "CANCEL")
    assert cancel.via.branch == invite.via.branch
    # Its 200 and the INVITE's 487 are absorbed.
    assert sent(receive(c, answer(cancel, 200), TRUNK, 6.1)) == []
    assert methods(receive(c, answer(invite, 487), TRUNK, 6.2)) == ["ACK"]


def test_a_cancel_crossing_the_200_gives_487_and_the_callee_ack_and_bye() -> None:
    # RFC 3261 9.2 / 15: the caller's CANCEL and the callee's 200 cross; the caller has
    # its 487, the callee's 2xx is ACKed (13.2.2.4) and the dialog ended with BYE.
    c = controller()
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 180), TRUNK, 0.1)
    step = receive(c, cancel_for(invite_text()), CALLER, 0.2)
    assert sorted(statuses(step)) == [200, 487] and methods(step) == ["CANCEL"]
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.3)
    assert responses(step) == []
    assert methods(step) == ["ACK", "BYE"]
    (call,) = ended_calls(step)
    assert call.end_status == 487 and call.end_reason is EndReason.CANCEL
    assert len(c) == 0


def test_a_cancel_after_the_answer_gets_200_and_the_call_goes_on() -> None:
    # RFC 3261 9.2: a CANCEL of an INVITE already answered has no effect.
    c = controller()
    confirmed_call(c)
    step = receive(c, cancel_for(invite_text()), CALLER, 0.5)
    assert statuses(step) == [200] and methods(step) == []
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED


def test_a_retransmitted_invite_after_the_answer_makes_no_second_call() -> None:
    # RFC 3261 17.2.1 / RFC 6026: the INVITE again (same branch) after the 2xx is
    # absorbed by its transaction, no new call, no new B INVITE.
    c = controller()
    confirmed_call(c)
    step = receive(c, invite_text(), CALLER, 0.5)
    assert requests(step) == [] and step.media == () and len(c) == 1


def test_a_cancel_of_the_caller_cancels_every_ringing_fork() -> None:
    c = controller(rules=USERS, targets=registered_targets())
    first, second, _ = forked(c)
    receive(c, answer(first, 180, tag="bob1"), BOB1_FLOW, 0.1)
    receive(c, answer(second, 183, tag="bob2"), BOB2_FLOW, 0.1)
    step = receive(c, cancel_for(invite_text()), CALLER, 0.2)
    assert sorted(statuses(step)) == [200, 487]
    cancels = requests(step, "CANCEL")
    assert sorted(r.call_id for r in cancels) == sorted([first.call_id, second.call_id])
    receive(c, answer(first, 487, tag="bob1"), BOB1_FLOW, 0.3)
    step = receive(c, answer(second, 487, tag="bob2"), BOB2_FLOW, 0.3)
    assert responses(step) == []  # the caller had its 487 already
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.CANCEL and len(c) == 0


# -- forking (RFC 3261 16.7, 13.2.2.4) ------------------------------------------------------


def test_a_6xx_from_one_fork_cancels_the_others_and_reaches_the_caller() -> None:
    # RFC 3261 16.7 step 5 (a forking proxy, and a forking B2BUA alike): a 6xx says
    # the callee will take the call nowhere; the forks still ringing are CANCELled
    # and no more are tried. The caller hears the 6xx (step 6) once they answered,
    # not when the other phone stops ringing by itself.
    c = controller(rules=USERS, targets=registered_targets())
    first, second, _ = forked(c)
    receive(c, answer(second, 180, tag="bob2"), BOB2_FLOW, 0.05)
    step = receive(c, answer(first, 603, tag="bob1"), BOB1_FLOW, 0.1)
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == second.call_id and cancel.via.branch == second.via.branch
    assert finals(step) == []
    step = receive(c, answer(second, 487, tag="bob2"), BOB2_FLOW, 0.2)
    assert finals(step) == [603]
    (call,) = ended_calls(step)
    assert call.end_status == 603 and call.end_reason is EndReason.REJECTED
    assert len(c) == 0


def test_180_and_183_of_two_forks_reach_the_caller_on_one_dialog() -> None:
    c = controller(rules=USERS, targets=registered_targets())
    first, second, _ = forked(c)
    (ringing,) = responses(receive(c, answer(first, 180, tag="bob1"), BOB1_FLOW, 0.1))
    early = sdp("b2", "203.0.113.6", 43000)
    step = receive(
        c, answer(second, 183, early, tag="bob2", contact="sip:bob@203.0.113.6:5070"),
        BOB2_FLOW, 0.2,
    )  # fmt: skip
    (progress,) = responses(step)
    assert (ringing.status, progress.status) == (180, 183)
    assert ringing.to.tag == progress.to.tag  # one early dialog towards the caller
    assert b"203.0.113" not in progress.body  # the relay's address, not the fork's
    (call,) = c.calls()
    assert call.state is CallState.EARLY


# -- REFER (RFC 3515, RFC 4488) ----------------------------------------------------------------


def test_a_refer_without_exactly_one_refer_to_gets_400() -> None:
    # RFC 3515 2.4.1: a REFER has exactly one Refer-To; without it, or with two, 400.
    c = controller(policies=REFER_POLICY)
    _, _, a_tag = confirmed_call(c)
    step = receive(c, from_a("REFER", a_tag, 2), CALLER, 1.0)
    assert statuses(step) == [400] and requests(step) == []
    two = REFER_TO + "Refer-To: <sip:dave@198.51.100.1>\r\n"
    step = receive(c, from_a("REFER", a_tag, 3, extra=two), CALLER, 1.1)
    assert statuses(step) == [400] and requests(step) == []
    (refer,) = requests(receive(c, from_a("REFER", a_tag, 4, extra=REFER_TO), CALLER, 1.2))
    assert refer.headers.get("Refer-To") == "<sip:carol@203.0.113.1:5060>"


def test_refer_sub_false_crosses_to_the_recipient_and_back() -> None:
    # RFC 4488 4: a REFER with Refer-Sub: false asks for no implicit subscription;
    # the recipient's 2xx says with Refer-Sub: false that none was made. Dropped on
    # the way, the recipient subscribes anyway, and the referrer, whose 2xx has no
    # Refer-Sub, must assume a subscription it did not ask for.
    c = controller(policies=REFER_POLICY)
    _, _, a_tag = confirmed_call(c)
    extra = REFER_TO + "Refer-Sub: false\r\nSupported: norefersub, timer\r\n"
    (refer,) = requests(receive(c, from_a("REFER", a_tag, 2, extra=extra), CALLER, 1.0))
    assert refer.headers.get("Refer-Sub") == "false"
    assert "norefersub" in (refer.headers.get("Supported") or "")
    (accepted,) = responses(
        receive(c, answer(refer, 200, extra="Refer-Sub: false\r\n"), TRUNK, 1.1)
    )
    assert accepted.status == 200 and accepted.headers.get("Refer-Sub") == "false"


def test_the_event_id_of_a_refer_notify_names_the_refer_on_the_referrers_leg() -> None:
    # RFC 3515 2.4.6: a NOTIFY's Event id is the CSeq number of its REFER; each leg
    # numbers its own requests, so the id the callee gives (the relayed REFER's
    # CSeq) is not the one the caller's REFER had. Unmapped, the caller matches the
    # NOTIFY to no subscription (a second REFER's NOTIFYs must carry the id).
    c = controller(policies=REFER_POLICY)
    invite, _, a_tag = confirmed_call(c)
    (refer,) = requests(receive(c, from_a("REFER", a_tag, 7, extra=REFER_TO), CALLER, 1.0))
    assert refer.cseq.seq != 7
    receive(c, answer(refer, 202), TRUNK, 1.1)
    frag = "SIP/2.0 100 Trying\r\n"
    step = receive(
        c, refer_notify(invite, 1, f"refer;id={refer.cseq.seq}", "active", frag), TRUNK, 1.2
    )
    (notify,) = requests(step, "NOTIFY")
    assert notify.headers.get("Event") == "refer;id=7"
    # And after the BYE (the subscription lingers, ``_Referral``).
    receive(c, from_a("BYE", a_tag, 8), CALLER, 1.3)
    done = refer_notify(
        invite,
        2,
        f"refer;id={refer.cseq.seq}",
        "terminated;reason=noresource",
        "SIP/2.0 200 OK\r\n",
    )
    (last,) = requests(receive(c, done, TRUNK, 1.4), "NOTIFY")
    assert last.headers.get("Event") == "refer;id=7"


def test_a_second_refer_keeps_its_subscription_after_the_first_one_ends() -> None:
    # RFC 3515 2.4.6: each REFER has its own subscription. The first one's terminating
    # NOTIFY must not end the second's: its outcome still reaches the caller after
    # the caller's BYE (RFC 5057 5.5).
    c = controller(policies=REFER_POLICY)
    invite, _, a_tag = confirmed_call(c)
    (first,) = requests(receive(c, from_a("REFER", a_tag, 2, extra=REFER_TO), CALLER, 1.0))
    receive(c, answer(first, 202), TRUNK, 1.1)
    (second,) = requests(receive(c, from_a("REFER", a_tag, 3, extra=REFER_TO), CALLER, 1.2))
    receive(c, answer(second, 202), TRUNK, 1.3)
    ended = f"refer;id={first.cseq.seq}"
    step = receive(c, refer_notify(invite, 1, ended, "terminated", "SIP/2.0 603 X\r\n"), TRUNK, 1.4)
    assert len(requests(step, "NOTIFY")) == 1
    receive(c, from_a("BYE", a_tag, 4), CALLER, 1.5)
    later = f"refer;id={second.cseq.seq}"
    step = receive(
        c, refer_notify(invite, 2, later, "terminated", "SIP/2.0 200 OK\r\n"), TRUNK, 2.0
    )
    assert statuses(step) == [200]
    (notify,) = requests(step, "NOTIFY")
    assert notify.call_id == A_CALL_ID and notify.headers.get("Event") == "refer;id=3"


def test_a_refer_outside_a_dialog_is_answered_and_not_relayed() -> None:
    # RFC 3515 allows it; the SBC routes only INVITE, SUBSCRIBE, MESSAGE, PUBLISH and
    # NOTIFY out of dialog: the REFER gets a final answer of its own.
    c = controller(policies=REFER_POLICY)
    text = (
        invite_text(body="", extra=REFER_TO)
        .replace("INVITE sip:", "REFER sip:", 1)
        .replace("1 INVITE", "1 REFER")
        .replace("Content-Type: application/sdp\r\n", "")
    )
    step = receive(c, text, CALLER, 1.0)
    assert requests(step) == [] and len(c) == 0
    assert [s for s in statuses(step) if s >= 300] == [404]


def test_a_refer_while_the_call_is_early_gets_481_and_crosses_nothing() -> None:
    c = controller(policies=REFER_POLICY)
    (invite,), _ = start_call(c)
    (ringing,) = responses(receive(c, answer(invite, 180), TRUNK, 0.1))
    assert ringing.to.tag
    step = receive(c, from_a("REFER", ringing.to.tag, 2, extra=REFER_TO), CALLER, 0.2)
    assert statuses(step) == [481] and requests(step) == []


# -- Replaces (RFC 3891) ------------------------------------------------------------------------


HAIRPIN = [
    RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE),
    RouteRule("back", RouteAction.TRUNK, "inside", realm="inside", destination=CORE),
]


def test_an_attended_transfer_through_the_sbc_replaces_the_far_leg() -> None:
    # RFC 3891 with RFC 5589 7: alice (outside) talks to carol (call 1) and bob
    # (call 2), both inside; she REFERs bob to carol with Replaces naming call 1.
    # The SBC rewrites the Replaces to name call 1's inside leg as carol knows it
    # (``_refer_headers``) and points Refer-To at itself: bob's INVITE comes back
    # to the SBC carrying that value. It names a dialog the SBC holds, by the far
    # peer's tags (to-tag carol's, from-tag the SBC's): it goes to carol with that
    # Replaces, not 481. Carol then ends call 1 with a BYE, which alice gets.
    c = controller(rules=HAIRPIN, policies=REFER_POLICY)
    carol_invite, sbc_tag = first_call(c)
    (bob_invite,), _ = start_call(c, 1.0)
    (ok,) = responses(receive(c, answer(bob_invite, 200, ANSWER, tag="bobside"), TRUNK, 1.0))
    assert ok.to.tag
    receive(c, from_a("ACK", ok.to.tag, 1), CALLER, 1.0)
    value = urllib.parse.quote(replaces(FIRST_CALL_ID, sbc_tag, "alicetag"), safe="")
    refer_to = f"Refer-To: <sip:carol@198.51.100.1?Replaces={value}>\r\n"
    (refer,) = requests(receive(c, from_a("REFER", ok.to.tag, 2, extra=refer_to), CALLER, 2.0))
    uri, _, header = (refer.headers.get("Refer-To") or "").strip("<>").partition("?Replaces=")
    named = urllib.parse.unquote(header)

    # Bob's INVITE, as the Refer-To tells him: to the SBC, with that Replaces.
    text = invite_text(
        call_id="bob-transfer@203.0.113.5",
        via_branch="z9hG4bKbobxfer",
        uri=uri,
        extra=f"Replaces: {named}\r\n",
    ).replace("tag=alicetag", "tag=bobxfer")
    step = receive(c, text, TRUNK, 3.0)
    assert finals(step) == []
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, session("s3"), 3.0)
    (to_carol,) = requests(step, "INVITE")
    assert to_carol.headers.get("Replaces") == replaces(
        carol_invite.call_id, "carolside", carol_invite.from_.tag or ""
    )
    assert to_carol.raw_uri == "sip:bob@203.0.113.5:5070"  # carol's Contact on call 1

    # Carol takes bob's call and hangs up the replaced one: alice gets the BYE.
    bye = from_b(carol_invite, "BYE", 2, tag="carolside")
    step = receive(c, bye, TRUNK, 3.1)
    assert statuses(step) == [200]
    (to_alice,) = requests(step, "BYE")
    assert to_alice.call_id == FIRST_CALL_ID


def test_the_replaced_call_ends_with_the_bye_of_the_party_that_accepted_the_replaces() -> None:
    c = controller()
    carol_invite, sbc_tag = first_call(c)
    extra = f"Replaces: {replaces(FIRST_CALL_ID, sbc_tag, 'alicetag')}\r\n"
    (allocate,) = receive(c, invite_text(via_branch="z9hG4bKr", extra=extra), CALLER, 1.0).media
    (to_carol,) = requests(c.media_allocated(allocate.call_ref, session("s2"), 1.0), "INVITE")
    step = receive(c, answer(to_carol, 200, ANSWER, tag="carolnew"), TRUNK, 1.1)
    assert finals(step) == [200]
    step = receive(c, from_b(carol_invite, "BYE", 2, tag="carolside"), TRUNK, 1.2)
    (bye,) = requests(step, "BYE")
    assert bye.call_id == FIRST_CALL_ID
    assert len(c) == 1 and c.calls()[0].b.call_id == to_carol.call_id


def test_an_early_dialog_is_replaced_as_the_far_side_knows_it_with_early_only() -> None:
    # RFC 3891 3: an early dialog may be replaced; early-only crosses with the value.
    c = controller()
    (invite,), _ = start_call(c, 0.0, call_id=FIRST_CALL_ID, via_branch="z9hG4bKe1")
    (ringing,) = responses(receive(c, answer(invite, 180, tag="carolearly"), TRUNK, 0.1))
    assert ringing.to.tag
    value = replaces(FIRST_CALL_ID, ringing.to.tag, "alicetag") + ";early-only"
    text = invite_text(via_branch="z9hG4bKe2", extra=f"Replaces: {value}\r\n")
    (allocate,) = receive(c, text, CALLER, 1.0).media
    (replacing,) = requests(c.media_allocated(allocate.call_ref, session("s2"), 1.0), "INVITE")
    assert replacing.headers.get("Replaces") == (
        replaces(invite.call_id, "carolearly", invite.from_.tag or "") + ";early-only"
    )


def test_a_replaces_naming_an_ended_call_gets_481() -> None:
    c = controller()
    _, sbc_tag = first_call(c)
    receive(c, from_a("BYE", sbc_tag, 2, call_id=FIRST_CALL_ID), CALLER, 0.5)
    extra = f"Replaces: {replaces(FIRST_CALL_ID, sbc_tag, 'alicetag')}\r\n"
    step = receive(c, invite_text(via_branch="z9hG4bKgone", extra=extra), CALLER, 1.0)
    assert finals(step) == [481] and step.media == ()
