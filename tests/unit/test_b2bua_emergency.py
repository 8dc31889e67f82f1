"""Emergency routes (``routes[].emergency``): calls to 112, 911 ... are never refused
by admission control (the realm and trunk limits, an overloaded node) and are not
asked for a digest, while every other call still is."""

from __future__ import annotations

from pathlib import Path

import pytest

from sbc.b2bua.admission import AdmissionControl, Admitted, Limits, Refused
from sbc.b2bua.controller import AllocateMedia, CallController, RealmPolicy
from sbc.b2bua.routing import RouteAction, RouteRule
from sbc.config.loader import ConfigError, load_config_text
from tests.unit.test_b2bua_flows import (
    CALLER,
    CORE,
    StubRegistrar,
    controller,
    invite_text,
    receive,
    responses,
)

RULES = [
    RouteRule(
        "sos",
        RouteAction.TRUNK,
        "outside",
        user_prefix="112",
        realm="inside",
        destination=CORE,
        emergency=True,
    ),
    RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE),
]


def emergency_controller(admission: AdmissionControl) -> CallController:
    return controller(
        rules=RULES,
        registrar=StubRegistrar(),
        admission=admission,
        policies={"outside": RealmPolicy(authenticate=frozenset({"INVITE"}))},
    )


def call_to(c: CallController, user: str, n: int) -> list[int]:
    """The final statuses a new call to ``user`` gets at once (none: it goes on)."""
    text = invite_text(
        uri=f"sip:{user}@198.51.100.1", call_id=f"call-{n}@198.51.100.9", via_branch=f"z9hG4bK{n}"
    )
    step = receive(c, text, CALLER, float(n))
    if any(isinstance(command, AllocateMedia) for command in step.media):
        return []
    return [r.status for r in responses(step) if r.status >= 200]


def test_an_emergency_call_goes_through_full_limits_and_needs_no_digest() -> None:
    admission = AdmissionControl({"outside": Limits(max_calls=1)}, {})
    c = emergency_controller(admission)
    # An ordinary call is challenged; the emergency call is not.
    assert call_to(c, "1000", 1) == [407]
    assert call_to(c, "112", 2) == []
    # The realm's one call is taken (by the emergency call): a second emergency call
    # still goes, and it is counted.
    assert call_to(c, "112", 3) == []
    assert admission.counters()["realm"]["outside"]["active"] == 2
    # An ordinary call is still refused (digest given: the stub takes "right").
    credentials = 'Proxy-Authorization: Digest username="alice", response="right"\r\n'
    ordinary = invite_text(call_id="call-4@x", via_branch="z9hG4bK4", extra=credentials)
    assert [r.status for r in responses(receive(c, ordinary, CALLER, 4.0)) if r.status >= 200] == [
        503
    ]


def test_an_emergency_call_goes_through_an_overloaded_node() -> None:
    admission = AdmissionControl({}, {})
    admission.busy = lambda: True
    c = emergency_controller(admission)
    assert call_to(c, "112", 1) == []


def test_admission_counts_an_emergency_call_over_the_limits() -> None:
    control = AdmissionControl({"public": Limits(max_calls=1, calls_per_second=1.0)}, {})
    first = control.admit(["public"], None, 0.0)
    assert isinstance(first, Admitted)
    assert isinstance(control.admit(["public"], None, 0.0), Refused)
    sos = control.admit(["public"], None, 0.0, emergency=True)
    assert isinstance(sos, Admitted)
    control.release(sos.ticket)
    control.release(first.ticket)
    assert isinstance(control.admit(["public"], None, 10.0), Admitted)


def test_an_emergency_route_cannot_reject() -> None:
    text = """
realms:
  - name: outside
    listen: [{transport: udp, address: 127.0.0.1, port: 5060}]
    media_address: 127.0.0.1
routes:
  - {name: sos, user_prefix: "112", action: reject, status: 403, emergency: true}
"""
    with pytest.raises(ConfigError, match=r"routes\[0\]\.emergency: an emergency route"):
        load_config_text(text, "sbc.yaml", Path("/nonexistent-base"))
