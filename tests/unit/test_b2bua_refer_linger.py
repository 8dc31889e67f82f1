"""A REFER's subscription (RFC 3515) outlives the BYE of its call (RFC 5057 5.5).

A blind-transfer transferor often hangs up right after the 202; the transferee's
NOTIFYs with the transfer's outcome still reach it through the B2BUA, until the
terminating one, and nothing else of the ended call is accepted.
"""

from __future__ import annotations

from sbc.b2bua.controller import REFER_LINGER, CallController, RealmPolicy
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    A_CALL_ID,
    CALLER,
    TRUNK,
    answer,
    confirmed_call,
    controller,
    from_a,
    from_b,
    receive,
    requests,
    statuses,
)

REFER_TO = "Refer-To: <sip:carol@198.51.100.1>\r\n"
ACTIVE = "Event: refer\r\nSubscription-State: active;expires=60\r\n"
TERMINATED = "Event: refer\r\nSubscription-State: terminated;reason=noresource\r\n"


def transferred(
    refer_answer: int = 202, refer_extra: str = ""
) -> tuple[CallController, Request, str]:
    """A call whose caller REFERred the callee, got the answer, and hung up."""
    c = controller(policies={"outside": RealmPolicy(refer_relay=True)})
    invite, _, a_tag = confirmed_call(c)
    (refer,) = requests(receive(c, from_a("REFER", a_tag, 2, extra=REFER_TO), CALLER, 1.0))
    receive(c, answer(refer, refer_answer, extra=refer_extra), TRUNK, 1.1)
    bye_step = receive(c, from_a("BYE", a_tag, 3), CALLER, 1.2)
    assert statuses(bye_step) == [200]
    assert [r.method for r in requests(bye_step)] == ["BYE"]
    return c, invite, a_tag


def notify(invite: Request, cseq: int, state: str, frag: str = "SIP/2.0 100 Trying\r\n") -> str:
    return from_b(invite, "NOTIFY", cseq, body=frag, content_type="message/sipfrag", extra=state)


def test_notifies_after_the_bye_are_relayed_until_the_terminating_one() -> None:
    c, invite, _ = transferred()
    trying = receive(c, notify(invite, 1, ACTIVE), TRUNK, 2.0)
    assert statuses(trying) == [200]
    (first,) = requests(trying)
    assert (first.method, first.call_id) == ("NOTIFY", A_CALL_ID)
    assert first.body == b"SIP/2.0 100 Trying\r\n"
    assert first.headers.get("Content-Type") == "message/sipfrag"
    done = receive(c, notify(invite, 2, TERMINATED, "SIP/2.0 200 OK\r\n"), TRUNK, 3.0)
    assert statuses(done) == [200]
    (last,) = requests(done)
    assert last.cseq.seq == first.cseq.seq + 1  # the A leg's CSeq space goes on
    assert (last.headers.get("Subscription-State") or "").startswith("terminated")
    assert statuses(receive(c, notify(invite, 3, ACTIVE), TRUNK, 4.0)) == [481]


def test_only_refer_notifies_pass_and_in_order() -> None:
    c, invite, _ = transferred()
    # Another request in the ended dialog: the INVITE usage is over.
    assert statuses(receive(c, from_b(invite, "INFO", 1), TRUNK, 2.0)) == [481]
    presence = notify(invite, 2, "Event: presence\r\nSubscription-State: active\r\n")
    assert statuses(receive(c, presence, TRUNK, 2.1)) == [481]
    assert statuses(receive(c, notify(invite, 5, ACTIVE), TRUNK, 2.2)) == [200]
    # A lower CSeq than the last one is out of order (RFC 3261 12.2.2).
    stale = receive(c, notify(invite, 4, ACTIVE), TRUNK, 2.3)
    assert statuses(stale) == [500]
    assert requests(stale) == []


def test_the_subscription_ends_after_the_linger_time() -> None:
    c, invite, _ = transferred()
    late = receive(c, notify(invite, 1, TERMINATED), TRUNK, 1.2 + REFER_LINGER + 1)
    assert statuses(late) == [481]
    assert requests(late) == []


def test_no_subscription_no_linger() -> None:
    # A refused REFER, and an accepted one without subscription (RFC 4488 Refer-Sub).
    for status, extra in ((403, ""), (202, "Refer-Sub: false\r\n")):
        c, invite, _ = transferred(status, extra)
        assert statuses(receive(c, notify(invite, 1, TERMINATED), TRUNK, 2.0)) == [481]


def test_the_transferee_hanging_up_keeps_the_transferors_notifies_too() -> None:
    # The callee REFERs the caller this time; the callee hangs up after the 202.
    c = controller(policies={"inside": RealmPolicy(refer_relay=True)})
    invite, _, a_tag = confirmed_call(c)
    refer_step = receive(c, from_b(invite, "REFER", 1, extra=REFER_TO), TRUNK, 1.0)
    (refer,) = requests(refer_step)
    assert refer.call_id == A_CALL_ID
    receive(c, answer(refer, 202, tag="alicetag"), CALLER, 1.1)
    receive(c, from_b(invite, "BYE", 2), TRUNK, 1.2)
    frag = "SIP/2.0 200 OK\r\nContact: <sip:dave@203.0.113.77>\r\n"
    out = receive(
        c,
        from_a("NOTIFY", a_tag, 2, body=frag, content_type="message/sipfrag", extra=TERMINATED),
        CALLER,
        2.0,
    )
    assert statuses(out) == [200]
    (relayed,) = requests(out)
    assert relayed.call_id == invite.call_id
    assert b"203.0.113.77" not in bytes(relayed)


def test_notify_during_the_call_crosses_without_the_fragments_headers() -> None:
    c = controller(policies={"outside": RealmPolicy(refer_relay=True)})
    invite, _, a_tag = confirmed_call(c)
    (refer,) = requests(receive(c, from_a("REFER", a_tag, 2, extra=REFER_TO), CALLER, 1.0))
    receive(c, answer(refer, 202), TRUNK, 1.1)
    frag = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 10.1.2.3;branch=z9hG4bKinside\r\n"
    (relayed,) = requests(receive(c, notify(invite, 1, ACTIVE, frag), TRUNK, 1.2))
    assert relayed.body == b"SIP/2.0 180 Ringing\r\n"
