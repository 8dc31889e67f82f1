"""Calls to a phone registered through proxies follow its Path (RFC 3327 5.3).

An edge proxy between the phones and the SBC adds itself to the REGISTER's Path
(often with a flow token); requests to that phone must carry the stored Path as
Route header fields, or the proxy cannot tell which phone, or which flow, the
request is for. The next hop stays the flow the REGISTER came from.
"""

from __future__ import annotations

import time

from sbc.b2bua.controller import Target
from sbc.b2bua.targets import Directory
from sbc.registrar.location import LocationService
from sbc.sip.uri import parse_uri
from tests.unit.test_b2bua_flows import (
    ANSWER,
    BOB1,
    BOB1_FLOW,
    BOB2,
    BOB2_FLOW,
    USERS,
    StubTargets,
    answer,
    controller,
    forked,
    hop_of,
    receive,
    requests,
)
from tests.unit.test_location import binding

PATH = ("<sip:Zm9v@edge1.example.net;lr;ob>", "<sip:edge2.example.net;lr>")


def test_the_directory_hands_a_binding_s_path_to_its_target() -> None:
    location = LocationService()
    now = time.time()
    location.replace("bob", [binding(aor="bob", path=PATH, expires_at=now + 600)], now)
    location.replace(
        "bob",
        [
            binding(aor="bob", path=PATH, expires_at=now + 600),
            binding(aor="bob", contact="sip:bob@198.51.100.7:5060", expires_at=now + 600),
        ],
        now,
    )
    targets = Directory(location=location).registered(parse_uri("sip:bob@sbc"), None, now)
    assert sorted(t.route for t in targets) == [(), PATH]


def test_the_invite_and_its_cancel_carry_the_path_as_route() -> None:
    contacts = StubTargets(
        contacts=(
            Target("inside", BOB1, "sip:bob@203.0.113.5:5070", route=PATH),
            Target("inside", BOB2, "sip:bob@203.0.113.6:5070"),
        )
    )
    c = controller(rules=USERS, targets=contacts)
    first, second, _ = forked(c)
    by_uri = {r.raw_uri: r for r in (first, second)}
    via_edge = by_uri["sip:bob@203.0.113.5:5070"]
    direct = by_uri["sip:bob@203.0.113.6:5070"]
    assert via_edge.headers.fields("Route") == list(PATH)
    assert direct.headers.fields("Route") == []
    receive(c, answer(via_edge, 180, tag="b1"), BOB1_FLOW, 0.1)
    # The other fork answers: the one through the edge is CANCELled along its Path
    # (RFC 3261 9.1: the CANCEL's Route header fields are the INVITE's).
    step = receive(
        c,
        answer(direct, 200, ANSWER, tag="b2", contact="sip:bob@203.0.113.6:5070"),
        BOB2_FLOW,
        0.2,
    )
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == via_edge.call_id
    assert cancel.headers.fields("Route") == list(PATH)
    assert hop_of(step, "CANCEL") == BOB1
