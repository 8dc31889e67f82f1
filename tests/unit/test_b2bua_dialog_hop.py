"""Where the B2BUA sends its requests in a dialog with a trunk: RFC 3261 12.2.1.1.

A request inside a dialog goes to the first entry of the route set (the callee's
Record-Route), else to the remote target (its Contact). The B2BUA sent them to the
address it had sent the INVITE to: a trunk whose 200 names another node of a
cluster in Contact, or whose Record-Route names another edge proxy, got the BYE
(and the ACK, PRACK, re-INVITE, refresh) at the wrong box.

What stays at the INVITE's address: legs to registered phones (their Contact is
behind NAT: the SBC reaches them through their registration's flow), a next hop
that is a host name (no DNS for in-dialog requests here), one of another transport
or of TLS (its name was verified at the INVITE's destination), one that is the SBC
itself, and a private (RFC 1918, fc00::/7) or loopback address named by a peer that
is not: a trunk behind NAT advertising its inside address.
"""

from __future__ import annotations

import pytest

from sbc.transport.base import Destination, Transport
from tests.unit.test_b2bua_flows import (
    ANSWER,
    BOB1,
    BOB1_FLOW,
    CALLER,
    CORE,
    TRUNK,
    USERS,
    answer,
    controller,
    forked,
    from_a,
    hop_of,
    receive,
    registered_targets,
    requests,
    responses,
    start_call,
)


def answered(contact: str, extra: str = "") -> tuple[object, str]:
    """A call through the default trunk (CORE) answered with ``contact`` (and
    ``extra`` headers), ACKed by the caller: the controller and A's tag."""
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 200, ANSWER, contact=contact, extra=extra), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.to.tag is not None
    return c, ok.to.tag


def bye_hop(contact: str, extra: str = "") -> tuple[Destination, str]:
    c, a_tag = answered(contact, extra)
    step = receive(c, from_a("BYE", a_tag, 2), CALLER, 1.0)  # type: ignore[arg-type]
    (bye,) = requests(step, "BYE")
    return hop_of(step, "BYE"), bytes(bye).decode()


def test_the_bye_goes_to_the_callee_s_contact() -> None:
    hop, bye = bye_hop("sip:bob@203.0.113.9:5080")
    assert hop == Destination(Transport.UDP, "203.0.113.9", 5080)
    assert bye.startswith("BYE sip:bob@203.0.113.9:5080 SIP/2.0")


def test_the_ack_goes_to_the_callee_s_contact() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    ok = answer(invite, 200, ANSWER, contact="sip:bob@203.0.113.9:5080")
    # The B2BUA ACKs the callee's 2xx at once (the caller's ACK is its own dialog's).
    step = receive(c, ok, TRUNK, 0.1)
    assert hop_of(step, "ACK") == Destination(Transport.UDP, "203.0.113.9", 5080)


def test_the_bye_goes_to_the_first_route() -> None:
    # RFC 3261 12.1.2: the UAC's route set is the Record-Route in reverse order, so
    # the first route is the proxy next to the SBC (the last Record-Route entry).
    rr = "Record-Route: <sip:203.0.113.7;lr>, <sip:203.0.113.8:5090;lr>\r\n"
    hop, bye = bye_hop("sip:bob@203.0.113.9:5080", rr)
    assert hop == Destination(Transport.UDP, "203.0.113.8", 5090)
    assert bye.startswith("BYE sip:bob@203.0.113.9:5080 SIP/2.0")
    assert "Route: <sip:203.0.113.8:5090;lr>, <sip:203.0.113.7;lr>" in bye


@pytest.mark.parametrize(
    "contact",
    [
        "sip:bob@gw.example.com:5080",  # a host name: not resolved for the dialog
        "sip:bob@203.0.113.9:5080;transport=tcp",  # another transport
        "sip:bob@203.0.113.1:5060",  # the SBC itself
        "sip:bob@10.0.0.5:5080",  # a trunk behind NAT naming its inside address
        "sip:bob@127.0.0.1:5080",  # loopback named by a peer that is not
    ],
)
def test_the_bye_stays_at_the_invite_s_destination(contact: str) -> None:
    hop, bye = bye_hop(contact)
    assert hop == CORE
    assert bye.startswith(f"BYE {contact} SIP/2.0")


def test_a_registered_phone_is_reached_through_its_registration() -> None:
    c = controller(rules=USERS, targets=registered_targets())
    first, _, _ = forked(c)
    ok = answer(first, 200, ANSWER, contact="sip:bob@203.0.113.9:5080")
    (a_ok,) = [r for r in responses(receive(c, ok, BOB1_FLOW, 0.1)) if r.status == 200]
    assert a_ok.to.tag is not None
    receive(c, from_a("ACK", a_ok.to.tag, 1), CALLER, 0.2)
    step = receive(c, from_a("BYE", a_ok.to.tag, 2), CALLER, 1.0)
    assert hop_of(step, "BYE") == BOB1
