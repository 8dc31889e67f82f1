"""A relayed request answered 408 or 481, or not at all, ends the answered call.

RFC 3261 12.2.1.2 (and 14.1 for a re-INVITE): a UAC whose in-dialog request gets
408 or 481, or times out, terminates the dialog. The B2BUA's own dialog with that
side ended so; the requester got the answer and should end its dialog too, but
many do not, and the call then lived on with nothing behind it (holding its relay
ports and admission tickets) until the media or session timer noticed, and a held
call has no media to time out. Now the SBC hangs the requester up itself: the CDR
says ``dialog_gone``, and its hangup side names the side whose dialog was gone.
"""

from __future__ import annotations

from sbc.b2bua.call import EndReason, LegSide
from sbc.cdr.from_call import cdr_record
from sbc.cdr.record import Disposition, HangupSide
from sbc.sip.message import Request
from sbc.transport.base import Flow
from tests.unit.test_b2bua_100rel_caller import until
from tests.unit.test_controller_fuzz import (
    ANSWERED,
    B_CONTACT,
    CALLER,
    HOLD,
    TRUNK,
    Message,
    Run,
    a_answers,
    answer,
    assert_nothing_left,
    from_a,
    from_b,
    latest,
    replay,
)


def feed(run: Run, made: tuple[Message, Flow] | None) -> None:
    assert made is not None
    run.feed(made[0], made[1], None)


#: Up to the caller's ACK of the answered call.
SET_UP = ANSWERED[:4]


def re_invite_from_a(run: Run) -> Request:
    run.feed(from_a("INVITE", 2, "inv2", run, HOLD), CALLER, None)
    relayed = latest(run.to_b, "INVITE")
    assert isinstance(relayed, Request) and relayed.cseq.seq > 1
    return relayed


def test_a_re_invite_the_callee_never_answers_ends_the_call() -> None:
    run = replay(SET_UP, {})
    re_invite_from_a(run)
    until(run, run.now + 32.1)  # Timer B: 408
    final = [(r.status, r.cseq.method) for r in run.responses_to_a if r.cseq.seq == 2]
    assert final == [(100, "INVITE"), (408, "INVITE")]
    ack = from_a("ACK", 2, "inv2", run)  # the 408's, hop by hop (17.1.1.3)
    run.feed(ack, CALLER, None)
    bye = latest(run.to_a, "BYE")
    assert isinstance(bye, Request)
    assert run.to_b.get("BYE") is None  # its dialog is gone: nothing to send it on
    (call,) = run.ended
    assert call.end_reason is EndReason.DIALOG_GONE and call.hangup is LegSide.B
    record = cdr_record(call, None, 0.0)
    assert record.disposition is Disposition.ANSWERED
    assert record.end_reason.value == "dialog_gone"
    assert record.hangup_side is HangupSide.CALLEE
    feed(run, a_answers("BYE", 200)(run))
    assert_nothing_left(run)


def test_a_481_to_the_callee_s_info_ends_the_call_on_the_callee_s_side() -> None:
    run = replay(SET_UP, {})
    info = from_b("INFO", 10, run)
    assert info is not None
    run.feed(info, TRUNK, None)
    relayed = latest(run.to_a, "INFO")
    assert isinstance(relayed, Request)
    feed(run, a_answers("INFO", 481)(run))
    assert [r.status for r in run.responses_to_b if r.cseq.method == "INFO"] == [481]
    bye = latest(run.to_b, "BYE")
    assert isinstance(bye, Request)
    assert run.to_a.get("BYE") is None
    (call,) = run.ended
    assert call.end_reason is EndReason.DIALOG_GONE and call.hangup is LegSide.A
    run.feed(answer(bye, 200, "bobtag", B_CONTACT), TRUNK, None)
    assert_nothing_left(run)


def test_other_refusals_of_a_re_invite_leave_the_call_up() -> None:
    for status in (488, 491, 500, 403):
        run = replay(SET_UP, {})
        relayed = re_invite_from_a(run)
        run.feed(answer(relayed, status, "bobtag", B_CONTACT), TRUNK, None)
        assert [r.status for r in run.responses_to_a if r.cseq.seq == 2][-1] == status
        assert run.ended == [] and len(run.controller) == 1
        assert run.to_a.get("BYE") is None


def test_a_481_to_a_transfer_s_notify_leaves_the_call_up() -> None:
    # RFC 6665 4.1.3: it ends that subscription (the transferor forgot it), not the
    # dialog the call lives in.
    run = replay(SET_UP, {})
    notify = from_b("NOTIFY", 10, run)
    assert notify is not None
    notify.headers += [("Event", "refer"), ("Subscription-State", "active;expires=60")]
    notify.headers += [("Content-Type", "message/sipfrag")]
    notify.body = "SIP/2.0 100 Trying\r\n"
    run.feed(notify, TRUNK, None)
    feed(run, a_answers("NOTIFY", 481)(run))
    assert [r.status for r in run.responses_to_b if r.cseq.method == "NOTIFY"] == [481]
    assert run.ended == [] and run.to_b.get("BYE") is None
