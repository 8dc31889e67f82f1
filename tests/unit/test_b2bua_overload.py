"""The B2BUA at the transaction limit: what it would send on is answered or waits.

The layer refuses a new incoming request with a stateless 503 when it is full, but
the request that takes the last place gets in, and the B2BUA's own request for it
(or a timer's: session refreshes) would raise TransactionLimitError half-way
through the step: the requester got no answer, a timer's raise lost every other
timer of the round. Each is now checked before anything changes.
"""

from __future__ import annotations

from sbc.b2bua.call import EndReason
from sbc.b2bua.controller import AllocateMedia, CallController
from tests.unit.test_b2bua_flows import (
    A_ALLOWS_UPDATE,
    ANSWER,
    CALLER,
    MESSAGE,
    SDP,
    SESSION_TIMERS,
    TRUNK,
    answer,
    confirmed_call,
    controller,
    ended_calls,
    from_a,
    invite_text,
    receive,
    requests,
    responses,
    session,
)
from tests.unit.test_b2bua_reoffer_rejected import T38


def one_place_left(c: CallController) -> None:
    """The next incoming request takes the layer's last place."""
    c.transactions.max_transactions = len(c.transactions) + 1


def test_a_re_invite_at_the_limit_gets_503_and_changes_nothing() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c)
    one_place_left(c)
    step = receive(c, from_a("INVITE", a_tag, 2, body=T38), CALLER, 1.0)
    (refused,) = [r for r in responses(step) if r.status >= 200]
    assert refused.status == 503 and refused.headers.get("Retry-After") == "5"
    assert requests(step) == [] and step.media == ()
    # With room again the same re-INVITE goes through, as the first one.
    c.transactions.max_transactions = 1000
    step = receive(c, from_a("INVITE", a_tag, 3, body=T38), CALLER, 2.0)
    assert len(requests(step, "INVITE")) == 1


def test_a_bye_at_the_limit_still_ends_the_call() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c)
    one_place_left(c)
    step = receive(c, from_a("BYE", a_tag, 2), CALLER, 1.0)
    assert len(requests(step, "BYE")) == 1


def test_a_session_refresh_at_the_limit_waits_and_other_timers_still_run() -> None:
    c = controller(SESSION_TIMERS)
    confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    c.transactions.max_transactions = len(c.transactions)
    step = c.handle_timers(45.0)  # both refreshes due: neither can start
    assert requests(step) == []
    c.transactions.max_transactions = 1000
    assert requests(c.handle_timers(49.9)) == []
    step = c.handle_timers(50.0)
    assert {r.method for r in requests(step)} == {"UPDATE", "INVITE"}


def test_a_new_call_whose_b_leg_cannot_start_gets_503() -> None:
    c = controller()
    one_place_left(c)
    step = receive(c, invite_text(body=SDP), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, session(), 0.0)
    assert requests(step, "INVITE") == []
    assert [r.status for r in responses(step)] == [503]
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.TRANSPORT_ERROR
    assert c.calls() == ()


def test_a_message_at_the_limit_gets_503() -> None:
    c = controller()
    one_place_left(c)
    step = receive(c, MESSAGE, CALLER, 0.0)
    assert requests(step) == []
    (refused,) = responses(step)
    assert refused.status == 503 and refused.headers.get("Retry-After") == "5"


def test_the_answer_of_a_call_is_relayed_at_the_limit() -> None:
    # Responses need no new client transaction: a full layer does not hold them.
    c = controller()
    step = receive(c, invite_text(body=SDP), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    c.transactions.max_transactions = len(c.transactions)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1))
    assert ok.status == 200
