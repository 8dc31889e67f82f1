"""An established call keeps only what the rest of the call needs.

Once the call is answered, the caller's ACK came and every B-leg INVITE transaction
ended (RFC 6026 Timer M, 64*T1 = 32 s), the controller lets go of the A INVITE, its
server transaction, the forks (B INVITEs, client transactions, dialog sets): the
memory of a call held for an hour is the Call, its media session and offers.
Everything after that (re-INVITEs, BYE, CDR) still works, which is what the other
tests here check.
"""

from __future__ import annotations

import gc
import tracemalloc

from sbc.b2bua.call import CallState, EndReason, LegSide
from sbc.b2bua.controller import CallController, DeleteMedia, UpdateMedia
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    ANSWER,
    CALLER,
    TRUNK,
    answer,
    confirmed_call,
    controller,
    ended_calls,
    from_a,
    from_b,
    receive,
    requests,
    responses,
    sdp,
    sent,
    start_call,
)

#: RFC 6026 Timer M (64*T1) is over: the B leg's INVITE transaction is gone.
AFTER_TIMER_M = 40.0


def fire_timers(c: CallController, now: float) -> None:
    c.handle(c.transactions.handle_timers(now), now)
    c.handle_timers(now)


def holds_set_up(c: CallController, ref: str) -> bool:
    live = c._calls[ref]
    return live.invite is not None or live.invite_tx is not None or bool(live.forks)


def test_the_set_up_is_let_go_once_the_b_invite_transaction_ends() -> None:
    c = controller()
    invite, ref, _ = confirmed_call(c)
    # Until Timer M a retransmitted 2xx from B needs the fork's dialog set for its ACK.
    assert holds_set_up(c, ref)
    again = receive(c, answer(invite, 200, ANSWER), TRUNK, 1.0)
    assert [r.method for r in requests(again)] == ["ACK"]
    fire_timers(c, AFTER_TIMER_M)
    assert not holds_set_up(c, ref)
    assert c._calls[ref].call.state is CallState.CONFIRMED


def test_no_ack_yet_keeps_the_set_up_until_it_comes() -> None:
    c = controller()
    (invite,) = _start(c)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.0))
    ref = next(iter(c._calls))
    fire_timers(c, 0.6)  # the 2xx to A goes out again (13.3.1.4)
    fire_timers(c, 31.9)
    fire_timers(c, 32.1)  # Timer M of the B INVITE: over, but A has not ACKed
    assert holds_set_up(c, ref)
    ack = from_a("ACK", ok.to.tag or "", 1, call_id="call-0@198.51.100.9")
    assert sent(receive(c, ack, CALLER, 32.2)) == []
    assert not holds_set_up(c, ref)


def test_a_settled_call_relays_a_re_invite_and_a_bye_and_writes_its_cdr() -> None:
    c = controller()
    invite, ref, a_tag = confirmed_call(c)
    fire_timers(c, AFTER_TIMER_M)
    assert not holds_set_up(c, ref)

    hold = sdp("a", "198.51.100.9", 40000, version=2).replace("t=0 0", "t=0 0\r\na=sendonly")
    step = receive(c, from_a("INVITE", a_tag, 2, body=hold), CALLER, 41.0)
    (reinvite,) = requests(step, "INVITE")
    assert b"a=sendonly" in reinvite.body and b"198.51.100" not in reinvite.body
    assert any(isinstance(m, UpdateMedia) for m in step.media)
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 41.1)
    assert [r.method for r in requests(step)] == ["ACK"]
    (ok,) = responses(step)
    assert ok.status == 200 and b"m=audio 20000 " in ok.body
    assert sent(receive(c, from_a("ACK", a_tag, 2), CALLER, 41.2)) == []

    step = receive(c, from_b(invite, "BYE", 1), TRUNK, 50.0)
    assert [r.status for r in responses(step)] == [200]
    (bye,) = requests(step, "BYE")
    assert bye.call_id == "secret-call@198.51.100.9" and bye.to.tag == "alicetag"
    (ended,) = ended_calls(step)
    assert (ended.end_reason, ended.hangup, ended.answered_at) == (EndReason.BYE, LegSide.B, 0.0)
    assert any(isinstance(m, DeleteMedia) and m.call is not None for m in step.media)
    assert len(c) == 0


def test_an_established_call_holds_a_few_kilobytes() -> None:
    """The controller's memory per established call (the relay's sockets apart)."""
    c = controller()
    confirmed_call(c)  # warm caches up
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        calls = 40
        for n in range(calls):
            _call(c, n)
        fire_timers(c, AFTER_TIMER_M)
        gc.collect()
        held = (tracemalloc.get_traced_memory()[0] - before) / calls
    finally:
        tracemalloc.stop()
    assert len(c) == calls + 1
    # 36 kB a call before the set-up was let go; 7.6 kB with it (Python 3.11).
    assert held < 12_000, held


def _start(c: CallController, n: int = 0) -> list[Request]:
    invites, _ = start_call(
        c, 0.0, call_id=f"call-{n}@198.51.100.9", via_branch=f"z9hG4bKcaller{n}x"
    )
    return invites


def _call(c: CallController, n: int) -> None:
    (invite,) = _start(c, n)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), TRUNK, 0.0))
    ack = from_a("ACK", ok.to.tag or "", 1, call_id=f"call-{n}@198.51.100.9")
    assert sent(receive(c, ack, CALLER, 0.0)) == []
