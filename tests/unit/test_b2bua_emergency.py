"""Emergency routes (``routes[].emergency``): calls to 112, 911 ... are refused by no
admission limit but their route's own (not the realm and trunk limits, nor an
overloaded node) and are not asked for a digest, while every other call still is."""

from __future__ import annotations

from sbc.b2bua.admission import AdmissionControl, Admitted, Limits, Refused
from sbc.b2bua.controller import AllocateMedia, CallController, RealmPolicy
from sbc.b2bua.routing import RouteAction, RouteRule
from sbc.b2bua.targets import Directory
from sbc.b2bua.trunks import Gateway, Trunk, TrunkTable
from sbc.sip.message import Request
from sbc.transport.base import Destination, Transport
from tests.unit.test_b2bua_flows import (
    CALLER,
    CORE,
    SDP,
    StubRegistrar,
    controller,
    invite_text,
    receive,
    requests,
    responses,
    session,
)
from tests.unit.test_b2bua_identity import asserted, registered_directory

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


def start_call_text(c: CallController, text: str) -> tuple[list[Request], str]:
    """``text`` from the caller, its media allocated: the B-leg INVITEs and call ref."""
    step = receive(c, text, CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    return requests(
        c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE"
    ), allocate.call_ref


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


def test_an_emergency_route_s_own_limits_bound_a_flood_of_emergency_calls() -> None:
    # The route's limits are the one bound on its calls (a TDoS of false emergency
    # calls): the realm's limits and a busy node still refuse none of them.
    admission = AdmissionControl(
        {"outside": Limits(max_calls=1)}, {}, routes={"sos": Limits(max_calls=2)}
    )
    admission.busy = lambda: True
    c = emergency_controller(admission)
    assert call_to(c, "112", 1) == []
    assert call_to(c, "112", 2) == []
    assert call_to(c, "112", 3) == [503]
    counts = admission.counters()
    assert counts["route"]["sos"] == {
        "admitted": 2,
        "refused_concurrent": 1,
        "refused_rate": 0,
        "refused_busy": 0,
        "active": 2,
    }
    assert counts["realm"]["outside"]["active"] == 2
    assert counts["node"] == {}  # the busy check was not asked


def test_an_emergency_route_s_rate_limit_answers_with_its_retry_after() -> None:
    control = AdmissionControl({}, {}, routes={"sos": Limits(calls_per_second=0.5, burst=1)})
    first = control.admit(["public"], "esrp", 0.0, route="sos", emergency=True)
    assert isinstance(first, Admitted)
    assert first.ticket.scopes[-1] == ("route", "sos")
    refused = control.admit(["public"], "esrp", 0.0, route="sos", emergency=True)
    assert isinstance(refused, Refused)
    assert (refused.scope, refused.name, refused.reason.value) == ("route", "sos", "rate")
    assert refused.headers == (("Retry-After", "2"),)
    assert isinstance(control.admit(["public"], "esrp", 2.0, route="sos", emergency=True), Admitted)


def test_an_ordinary_route_s_limits_apply_beside_the_realm_s() -> None:
    control = AdmissionControl(
        {"public": Limits(max_calls=5)}, {}, routes={"premium": Limits(max_calls=1)}
    )
    held = control.admit(["public"], None, 0.0, route="premium")
    assert isinstance(held, Admitted)
    refused = control.admit(["public"], None, 0.0, route="premium")
    assert isinstance(refused, Refused) and (refused.scope, refused.name) == ("route", "premium")
    # Another route's calls still have the realm's room; the refusal charged nothing.
    assert isinstance(control.admit(["public"], None, 0.0, route="local"), Admitted)
    assert control.active("realm", "public") == 2
    control.release(held.ticket)
    assert isinstance(control.admit(["public"], None, 1.0, route="premium"), Admitted)


# -- service URNs (RFC 5031) ---------------------------------------------------------------


def urn_invite(uri: str, n: int = 1) -> str:
    text = invite_text(uri=uri, call_id=f"urn-{n}@198.51.100.9", via_branch=f"z9hG4bKurn{n}")
    return text.replace(f"To: <{uri}>", "To: <sip:sos@198.51.100.1>")


def test_a_service_urn_is_routed_and_stays_the_request_uri() -> None:
    rules = [RouteRule("sos", RouteAction.TRUNK, "outside", user_prefix="urn:service:sos",
                       realm="inside", destination=CORE, emergency=True)]  # fmt: skip
    c = controller(rules=rules)
    (invite,), _ = start_call_text(c, urn_invite("urn:service:sos.police"))
    assert invite.raw_uri == "urn:service:sos.police"
    # Any other URN is still a scheme the SBC does not take (RFC 3261 8.2.2.1).
    step = receive(c, urn_invite("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6", 2), CALLER, 1.0)
    assert [r.status for r in responses(step) if r.status >= 200] == [416]


def test_a_service_urn_to_a_trunk_goes_to_its_gateways_as_it_is() -> None:
    gateway = Gateway("psap", "203.0.113.31", 5060)
    directory = Directory(TrunkTable([Trunk("esrp", "inside", (gateway,))]))
    rules = [RouteRule("sos", RouteAction.TRUNK, "outside", user_prefix="urn:service:sos",
                       trunk="esrp", emergency=True)]  # fmt: skip
    c = controller(rules=rules, targets=directory)
    step, _ = start_call_text(c, urn_invite("urn:service:sos"))
    (invite,) = step
    assert invite.raw_uri == "urn:service:sos"


def test_an_emergency_call_goes_through_a_realm_for_registered_phones_only() -> None:
    c = controller(rules=RULES, policies={"outside": RealmPolicy(registered_only=True)})
    assert call_to(c, "1000", 1) == [403]  # nobody registered from there
    assert call_to(c, "112", 2) == []


def test_an_emergency_call_from_a_registered_phone_asserts_its_user() -> None:
    # No digest is asked, but the emergency service still gets a number to call
    # back: the user of the phone registered from where the call came.
    here = Destination(Transport.UDP, CALLER.remote_host, CALLER.remote_port)
    policy = RealmPolicy(registrar=True, authenticate=frozenset({"INVITE"}))
    c = controller(
        rules=RULES,
        targets=registered_directory(here),
        registrar=StubRegistrar(),
        policies={"outside": policy},
    )
    (invite,), _ = start_call_text(c, invite_text(uri="sip:112@198.51.100.1"))
    assert asserted(invite) == ["<sip:alice@203.0.113.1:5060>"]


# -- location conveyance (RFC 6442) ---------------------------------------------------------

PIDF = (
    '<?xml version="1.0" encoding="UTF-8"?>\r\n'
    '<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="pres:alice@198.51.100.9">'
    '<tuple id="t1"><status><geopriv><location-info>'
    "<civicAddress><A1>BE</A1><A3>Brussels</A3><RD>Rue de la Loi</RD><HNO>16</HNO>"
    "</civicAddress></location-info></geopriv></status></tuple></presence>"
)


def located_invite(uri: str, n: int = 1, *, by_reference: bool = False) -> str:
    """An INVITE from the caller with its SDP and its location (by value, or also a
    reference to a location server)."""
    body = (
        "--loc\r\nContent-Type: application/sdp\r\n\r\n" + SDP + "\r\n"
        "--loc\r\nContent-Type: application/pidf+xml\r\n"
        "Content-ID: <loc-1@pbx.inside.example>\r\n\r\n" + PIDF + "\r\n--loc--\r\n"
    )
    geolocation = "<cid:loc-1@pbx.inside.example>"
    if by_reference:
        geolocation += ", <https://lis.example.net/loc/77>"
    text = invite_text(
        uri=uri, call_id=f"loc-{n}@198.51.100.9", via_branch=f"z9hG4bKloc{n}", body=body,
        extra=f"Geolocation: {geolocation}\r\nGeolocation-Routing: yes\r\n",
    )  # fmt: skip
    return text.replace("Content-Type: application/sdp\r\nContent-Length",
                        "Content-Type: multipart/mixed;boundary=loc\r\nContent-Length")  # fmt: skip


def test_an_emergency_call_conveys_the_caller_s_location_under_the_sbc_s_ids() -> None:
    c = controller(rules=RULES)
    (invite,), _ = start_call_text(c, located_invite("sip:112@198.51.100.1", by_reference=True))
    content_type = invite.content_type
    assert content_type is not None and content_type.essence == "multipart/mixed"
    cid, reference = invite.headers.fields("Geolocation")
    assert reference == "<https://lis.example.net/loc/77>"
    assert cid.startswith("<cid:") and cid.endswith("@203.0.113.1>")
    new_id = cid[5:-1]
    assert f"Content-ID: <{new_id}>".encode() in invite.body
    assert PIDF.encode() in invite.body
    assert invite.headers.get("Geolocation-Routing") == "yes"
    # The SDP part is the relay's; the caller's realm's names are gone.
    assert b"c=IN IP4 203.0.113.1" in invite.body
    assert b"pbx.inside.example" not in bytes(invite)


def test_an_ordinary_call_carries_no_location() -> None:
    c = controller(rules=RULES)
    (invite,), _ = start_call_text(c, located_invite("sip:1000@198.51.100.1"))
    assert invite.content_type is not None
    assert invite.content_type.essence == "application/sdp"
    assert not invite.headers.fields("Geolocation") and b"civicAddress" not in invite.body
