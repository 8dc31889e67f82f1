"""Merged requests (RFC 3261 8.2.2.2): one INVITE reaching the SBC by two paths.

A proxy in front of the SBC that forks to two of its addresses (or a retransmission
that took another route) brings the same INVITE with another branch. It is the same
request: the second copy gets 482, and the callee rings once.
"""

from __future__ import annotations

from sbc.b2bua.controller import AllocateMedia
from sbc.sip.transaction import Output, TransactionTerminated
from tests.unit.test_b2bua_flows import (
    CALLER,
    controller,
    invite_text,
    receive,
    statuses,
)


def test_the_same_invite_by_another_path_gets_482() -> None:
    c = controller()
    first = receive(c, invite_text(via_branch="z9hG4bKpath1"), CALLER, 0.0)
    assert any(isinstance(m, AllocateMedia) for m in first.media)
    second = receive(c, invite_text(via_branch="z9hG4bKpath2"), CALLER, 0.01)
    assert statuses(second) == [100, 482]
    assert second.media == ()
    assert len(c.calls()) == 1


def test_a_new_cseq_or_another_call_is_a_new_request() -> None:
    c = controller()
    receive(c, invite_text(via_branch="z9hG4bKa"), CALLER, 0.0)
    again = receive(c, invite_text(via_branch="z9hG4bKb", cseq=2), CALLER, 0.01)
    assert 482 not in statuses(again)
    other = receive(c, invite_text(via_branch="z9hG4bKc", call_id="other@x"), CALLER, 0.02)
    assert 482 not in statuses(other)
    assert len(c.calls()) == 3


def test_once_the_first_transaction_is_over_the_request_is_new_again() -> None:
    c = controller()
    receive(c, invite_text(via_branch="z9hG4bKa"), CALLER, 0.0)
    (tx,) = c._invites.values()
    # The transaction layer reports the end of the INVITE server transaction.
    c.handle(Output(events=(TransactionTerminated(tx),)), 40.0)
    assert c._invites == {}
