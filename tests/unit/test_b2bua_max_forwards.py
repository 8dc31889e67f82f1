"""Max-Forwards through the B2BUA (RFC 3261 8.1.1.6, 16.3 step 3).

Every request the B2BUA routes to a new target carries the caller's Max-Forwards
less one, so that a loop through SBCs and proxies ends; one that arrives with
none left is answered 483 (an OPTIONS with 0: by the SBC itself, RFC 3261 11).
"""

from __future__ import annotations

import pytest

from sbc.b2bua.controller import AllocateMedia, RealmPolicy
from tests.unit.test_b2bua_flows import (
    CALLER,
    controller,
    invite_text,
    receive,
    requests,
    session,
    statuses,
)


def out_of_dialog(method: str, max_forwards: int | None) -> str:
    forwards = "" if max_forwards is None else f"Max-Forwards: {max_forwards}\r\n"
    extra = "Event: presence\r\nExpires: 600\r\n" if method == "SUBSCRIBE" else ""
    return (
        f"{method} sip:1000@198.51.100.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKmf;rport\r\n"
        f"{forwards}From: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        f"To: <sip:1000@198.51.100.1>\r\nCall-ID: mf@198.51.100.9\r\nCSeq: 7 {method}\r\n"
        f"Contact: <sip:alice@198.51.100.9:5099>\r\n{extra}"
        "Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    )


ROUTED = ["MESSAGE", "SUBSCRIBE", "OPTIONS"]


def relaying():  # type: ignore[no-untyped-def]
    return controller(policies={"outside": RealmPolicy(options_relay=True)})


@pytest.mark.parametrize("method", ROUTED)
@pytest.mark.parametrize(("given", "sent"), [(70, 69), (10, 9), (2, 1), (None, 70), (200, 70)])
def test_routed_requests_carry_one_less(method: str, given: int | None, sent: int) -> None:
    (out,) = requests(receive(relaying(), out_of_dialog(method, given), CALLER, 0.0), method)
    assert out.max_forwards == sent


@pytest.mark.parametrize("method", ["MESSAGE", "SUBSCRIBE"])
@pytest.mark.parametrize("given", [0, 1])
def test_routed_requests_with_none_left_get_483(method: str, given: int) -> None:
    step = receive(relaying(), out_of_dialog(method, given), CALLER, 0.0)
    assert requests(step) == []
    assert statuses(step) == [483]


def test_an_options_with_none_left_is_answered_by_the_sbc() -> None:
    step = receive(relaying(), out_of_dialog("OPTIONS", 0), CALLER, 0.0)
    assert requests(step) == []
    assert statuses(step) == [200]


@pytest.mark.parametrize(("given", "sent"), [(70, 69), (2, 1), (None, 70)])
def test_the_b_leg_invite_carries_one_less(given: int | None, sent: int) -> None:
    text = invite_text()
    text = text.replace(
        "Max-Forwards: 70\r\n", "" if given is None else f"Max-Forwards: {given}\r\n"
    )
    c = controller()
    step = receive(c, text, CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    assert invite.max_forwards == sent


@pytest.mark.parametrize("given", [0, 1])
def test_an_invite_with_none_left_gets_483(given: int) -> None:
    text = invite_text().replace("Max-Forwards: 70\r\n", f"Max-Forwards: {given}\r\n")
    step = receive(controller(), text, CALLER, 0.0)
    assert statuses(step) == [100, 483]
    assert step.media == ()  # no relay session for it
