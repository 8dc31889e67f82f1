"""Subscriptions (RFC 6665) through the B2BUA: a dialog on each leg, no media, no CDR."""

from __future__ import annotations

from sbc.b2bua.controller import CallController, Step
from tests.unit.test_b2bua_flows import (
    CALLER,
    TRUNK,
    answer,
    controller,
    ended_calls,
    receive,
    requests,
    responses,
)

SUBSCRIBE = (
    "SUBSCRIBE sip:1000@198.51.100.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKsub1;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:alice@198.51.100.9>;tag=alicesub\r\n"
    "To: <sip:1000@198.51.100.1>\r\n"
    "Call-ID: secret-sub@198.51.100.9\r\n"
    "CSeq: 1 SUBSCRIBE\r\n"
    "Contact: <sip:alice@198.51.100.9:5099>\r\n"
    "Event: message-summary\r\n"
    "Expires: 600\r\n"
    "Accept: application/simple-message-summary\r\n"
    "Content-Length: 0\r\n\r\n"
)


def notify(to_b: str, call_id: str, from_b: str, cseq: int, state: str) -> str:
    body = "Messages-Waiting: yes\r\nVoice-Message: 2/8\r\n"
    return (
        f"NOTIFY sip:sbc@203.0.113.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 203.0.113.5:5070;branch=z9hG4bKnotify{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: {from_b};tag=bobtag\r\nTo: {to_b}\r\nCall-ID: {call_id}\r\n"
        f"CSeq: {cseq} NOTIFY\r\nContact: <sip:mwi@203.0.113.5:5070>\r\n"
        "Event: message-summary\r\n"
        f"Subscription-State: {state}\r\n"
        "Content-Type: application/simple-message-summary\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )


def subscribe(c: CallController) -> tuple[Step, str, str, str]:
    step = receive(c, SUBSCRIBE, CALLER, 0.0)
    (b_subscribe,) = requests(step, "SUBSCRIBE")
    wire = bytes(b_subscribe)
    for leak in (b"198.51.100.9", b"secret-sub", b"alicesub", b"z9hG4bKsub1"):
        assert leak not in wire
    assert b_subscribe.headers.get("Event") == "message-summary"
    assert b_subscribe.headers.get("Expires") == "600"
    to_b = b_subscribe.headers.get("From")  # the SBC's identity towards B
    from_b = b_subscribe.headers.get("To")
    assert to_b is not None and from_b is not None
    return step, b_subscribe.call_id, to_b, from_b


def test_subscription_is_two_dialogs_and_notifies_are_relayed() -> None:
    c = controller()
    step, b_call_id, to_b, from_b = subscribe(c)
    (b_subscribe,) = requests(step, "SUBSCRIBE")
    step = receive(c, answer(b_subscribe, 200, extra="Expires: 600\r\n"), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.status == 200 and ok.to.tag and ok.headers.get("Expires") == "600"
    assert b"203.0.113" not in bytes(ok) and b"bobtag" not in bytes(ok)

    step = receive(c, notify(to_b, b_call_id, from_b, 1, "active;expires=599"), TRUNK, 0.2)
    (to_a,) = requests(step, "NOTIFY")
    assert to_a.call_id == "secret-sub@198.51.100.9" and to_a.to.tag == "alicesub"
    assert to_a.from_.tag == ok.to.tag
    assert to_a.headers.get("Subscription-State") == "active;expires=599"
    assert b"Voice-Message: 2/8" in bytes(to_a) and b"203.0.113" not in bytes(to_a)
    step = receive(c, answer(to_a, 200, tag="alicesub"), CALLER, 0.3)
    assert [r.status for r in responses(step)] == [200]

    # The final NOTIFY ends the subscription; no CDR for it.
    step = receive(c, notify(to_b, b_call_id, from_b, 2, "terminated;reason=timeout"), TRUNK, 1.0)
    (last,) = requests(step, "NOTIFY")
    step = receive(c, answer(last, 200, tag="alicesub"), CALLER, 1.1)
    assert len(c) == 0 and ended_calls(step) == []


def test_a_notify_that_overtakes_the_2xx_waits_for_it() -> None:
    c = controller()
    step, b_call_id, to_b, from_b = subscribe(c)
    (b_subscribe,) = requests(step, "SUBSCRIBE")
    early = receive(c, notify(to_b, b_call_id, from_b, 1, "active"), TRUNK, 0.05)
    assert requests(early) == [] and responses(early) == []  # held, not 481
    step = receive(c, answer(b_subscribe, 202, extra="Expires: 600\r\n"), TRUNK, 0.1)
    assert [r.status for r in responses(step)] == [202]
    (to_a,) = requests(step, "NOTIFY")
    assert to_a.call_id == "secret-sub@198.51.100.9"


def test_a_refused_subscription_ends_and_expiry_cleans_up() -> None:
    c = controller()
    step, *_ = subscribe(c)
    (b_subscribe,) = requests(step, "SUBSCRIBE")
    step = receive(c, answer(b_subscribe, 489), TRUNK, 0.1)
    assert [r.status for r in responses(step)] == [489] and len(c) == 0

    c = controller()
    step, *_ = subscribe(c)
    (b_subscribe,) = requests(step, "SUBSCRIBE")
    receive(c, answer(b_subscribe, 200, extra="Expires: 60\r\n"), TRUNK, 0.1)
    assert len(c) == 1
    c.handle_timers(60.0)
    assert len(c) == 1
    c.handle_timers(0.1 + 60 + 32)
    assert len(c) == 0
