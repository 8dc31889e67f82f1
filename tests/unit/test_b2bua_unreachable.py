"""A caller whose responses cannot be sent (RFC 3261 17.2.4) ends its call at once.

Over TCP or TLS a caller's connection may be gone while its call rings (a phone
that lost its network, a NAT that dropped the mapping); the transport then tries a
new connection to the Via's sent-by and, when that fails too, reports a transport
error on the INVITE's server transaction. The B2BUA used to ignore it: the callee
rang on until the no-answer timer, and an answer waited 32 s for an ACK.
"""

from __future__ import annotations

from sbc.b2bua.call import EndReason
from sbc.b2bua.controller import AllocateMedia, CallController, Step
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.sip.transaction import RequestReceived, ServerInviteTransaction
from tests.unit.test_b2bua_flows import (
    ANSWER,
    CALLER,
    TRUNK,
    answer,
    controller,
    ended_calls,
    from_a,
    invite_text,
    receive,
    requests,
    responses,
    session,
)


def ringing_call(c: CallController) -> tuple[ServerInviteTransaction, list[Request]]:
    """A call whose callee rings: the caller's INVITE transaction, the B INVITE."""
    message = parse_message(invite_text().encode())
    out = c.transactions.receive(message, CALLER, 0.0, reliable=False)
    (event,) = [e for e in out.events if isinstance(e, RequestReceived)]
    assert isinstance(event.transaction, ServerInviteTransaction)
    step = c.handle(out, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    receive(c, answer(invite, 180), TRUNK, 0.1)
    return event.transaction, [invite]


def unreachable(c: CallController, tx: ServerInviteTransaction, now: float) -> Step:
    return c.handle(c.transactions.transport_error(tx, now), now)


def test_a_ringing_call_whose_caller_is_gone_cancels_the_callee() -> None:
    c = controller()
    tx, _ = ringing_call(c)
    step = unreachable(c, tx, 1.0)
    assert [r.method for r in requests(step)] == ["CANCEL"]
    # The caller's transaction still gets its final answer (Timer H ends it).
    assert [r.status for r in responses(step)] == [503]
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.TRANSPORT_ERROR
    assert c.calls() == ()
    # Each later failed send reports again: nothing more happens.
    assert unreachable(c, tx, 1.0).output.messages == ()


def test_an_answer_the_caller_cannot_get_hangs_up_now_not_after_32_s() -> None:
    c = controller()
    tx, (invite,) = ringing_call(c)
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.2)
    assert [r.status for r in responses(step)] == [200]
    step = unreachable(c, tx, 0.3)
    assert "BYE" in [r.method for r in requests(step)]
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.TRANSPORT_ERROR


def test_after_the_ack_a_failed_send_on_the_invite_changes_nothing() -> None:
    c = controller()
    tx, (invite,) = ringing_call(c)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.2))
    assert ok.to.tag is not None
    receive(c, from_a("ACK", ok.to.tag, 1), CALLER, 0.3)
    assert unreachable(c, tx, 0.4).output.messages == ()
    assert len(c.calls()) == 1


def test_the_200_to_a_cancel_has_the_to_tag_of_the_invite_s_487() -> None:
    # RFC 3261 8.2.6.2 (a To tag), 9.2 (the same as the INVITE's answer's).
    from tests.unit.test_b2bua_controller import cancel_from_caller, start_call

    c = controller()
    start_call(c)
    step = cancel_from_caller(c, 0.5)
    by_method = {r.cseq.method: r for r in responses(step)}
    ok, terminated = by_method["CANCEL"], by_method["INVITE"]
    assert (ok.status, terminated.status) == (200, 487)
    assert ok.to.tag is not None and ok.to.tag == terminated.to.tag
