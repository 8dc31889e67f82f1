"""Call state is a plain value: to_dict/from_dict round-trips through JSON."""

from __future__ import annotations

import json

import pytest

from sbc.b2bua.call import Call, CallError, CallLeg, CallState, LegSide
from sbc.sip.dialog import Dialog, DialogRole, DialogState
from sbc.transport.base import Destination, ListenAddress, Transport

DIALOG = Dialog(
    call_id="b-call",
    local_tag="t1",
    remote_tag="t2",
    local_address="<sip:alice@203.0.113.1:5060>",
    remote_address="<sip:1000@203.0.113.5>",
    remote_target="sip:bob@203.0.113.5:5060",
    route_set=(),
    local_seq=1,
    remote_seq=None,
    secure=False,
    state=DialogState.CONFIRMED,
    role=DialogRole.UAC,
    local_contact="<sip:203.0.113.1:5060>",
    local_invite_seq=1,
)

CALL = Call(
    call_ref="c0ffee",
    state=CallState.CONFIRMED,
    a=CallLeg(
        realm="outside",
        call_id="a-call@198.51.100.9",
        local_tag="a-tag",
        local=ListenAddress(Transport.UDP, "198.51.100.1", 5060),
        peer=Destination(Transport.UDP, "198.51.100.9", 40000),
        sdp_session="123",
        sdp_version=2,
        sdp_digest="abc",
    ),
    b=CallLeg(
        realm="inside",
        call_id="b-call",
        local_tag="t1",
        local=ListenAddress(Transport.TCP, "2001:db8::1", 5060),
        peer=Destination(Transport.TCP, "2001:db8::5", 5060),
        dialog=DIALOG,
    ),
    route="core",
    created=12.5,
    media_session="s1",
)


def test_round_trip_through_json() -> None:
    data = json.loads(json.dumps(CALL.to_dict()))
    assert Call.from_dict(data) == CALL


def test_legs_by_side() -> None:
    assert CALL.leg(LegSide.A).realm == "outside"
    assert CALL.with_leg(LegSide.B, CALL.a).b == CALL.a
    assert LegSide.A.other is LegSide.B


def test_bad_version_and_missing_fields_are_refused() -> None:
    data = CALL.to_dict()
    with pytest.raises(CallError, match="unsupported call dict version: 9"):
        Call.from_dict({**data, "version": 9})
    del data["a"]["peer"]
    with pytest.raises(CallError, match="bad call leg"):
        Call.from_dict(data)
