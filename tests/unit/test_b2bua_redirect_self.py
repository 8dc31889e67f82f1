"""A 3xx followed by the SBC never sends the call back to the SBC itself.

With ``follow_redirects`` a callee's 3xx Contacts become the call's next targets. A
Contact naming one of the SBC's own listeners made the SBC send the INVITE to
itself: a new call, routed the same way, redirected again, until Max-Forwards ran
out (some 70 calls deep, each with its relay ports) from one INVITE.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from sbc.b2bua.controller import CallController
from sbc.b2bua.routing import RouteAction, RouteRule
from tests.unit.test_b2bua_flows import (
    CORE,
    TRUNK,
    answer,
    controller,
    hop_of,
    receive,
    requests,
    responses,
    start_call,
    statuses,
)


def follow_controller() -> CallController:
    rule = RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE)
    rule = replace(rule, follow_redirects=True)
    return controller(rules=[rule])


@pytest.mark.parametrize(
    "contact",
    [
        "sip:bob@203.0.113.1:5060",  # the inside listener
        "sip:bob@203.0.113.1",  # the same, by the default port
        "sip:bob@198.51.100.1;transport=tcp",  # the outside listener's address and port
    ],
)
def test_a_3xx_to_the_sbc_itself_is_not_followed(contact: str) -> None:
    c = follow_controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 302, contact=contact), TRUNK, 0.1)
    assert requests(step, "INVITE") == []
    # Nothing to follow: the caller gets the 3xx (its Contacts name the SBC, as for
    # any relayed 3xx: a new INVITE from the caller is routed like any call).
    assert statuses(step) == [302]


def test_the_other_contacts_of_such_a_3xx_are_still_tried() -> None:
    c = follow_controller()
    (invite,), _ = start_call(c)
    extra = "Contact: <sip:bob@203.0.113.7:5080>\r\n"
    step = receive(
        c, answer(invite, 302, extra=extra, contact="sip:bob@203.0.113.1:5060"), TRUNK, 0.1
    )
    assert responses(step) == []
    (again,) = requests(step, "INVITE")
    assert again.raw_uri == "sip:bob@203.0.113.7:5080"
    assert hop_of(step, "INVITE").host == "203.0.113.7"


def test_another_port_of_the_sbc_s_address_is_followed() -> None:
    c = follow_controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 302, contact="sip:bob@203.0.113.1:5080"), TRUNK, 0.1)
    assert len(requests(step, "INVITE")) == 1
    assert hop_of(step, "INVITE").port == 5080
