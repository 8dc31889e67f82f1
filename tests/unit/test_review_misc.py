"""Review findings: escaped registration users, CDR JSON lines, probe reloads, routing."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from sbc.b2bua.routing import RouteAction, Router, RouteRule, TrunkRoute
from sbc.b2bua.targets import Directory
from sbc.b2bua.trunks import Gateway, ProbePolicy, Trunk, TrunkTable
from sbc.cdr import JsonLinesCdrStore
from sbc.registrar.credentials import StaticCredentials
from sbc.registrar.location import LocationService
from sbc.registrar.registrar import Registrar, RegistrarPolicy
from sbc.registrar.relay import Forward, RegistrationRelay, RelayPolicy
from sbc.sip.auth import DigestClient, DigestServer, DigestServerConfig
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.uri import SipUri, parse_uri
from sbc.transport.base import Destination, Flow, ListenAddress, Transport
from tests.unit.test_cdr import BUSY

# --- 1. registrations keyed by the unescaped To user (RFC 3261 19.1.4) ----------------------

OUTSIDE = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
INSIDE = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
KAMAILIO = Destination(Transport.UDP, "203.0.113.5", 5060)
PHONE = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.77", 40123)
T0 = 1_700_000_000.0


def relay() -> RegistrationRelay:
    policy = RelayPolicy(
        "inside", KAMAILIO, INSIDE, upstream_domain="voip.example", phone_expires=60
    )
    return RegistrationRelay(policy)


def relay_register(
    user: str, cseq: int, *, contact: str = "<sip:alice@10.0.0.7:5060>", expires: int = 120
) -> Request:
    text = (
        "REGISTER sip:198.51.100.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKphone{cseq};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@198.51.100.1>;tag=ph\r\n"
        f"To: <sip:{user}@198.51.100.1>\r\nCall-ID: phone-reg@10.0.0.7\r\n"
        f"CSeq: {cseq} REGISTER\r\nContact: {contact}\r\n"
        f"Expires: {expires}\r\nContent-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def upstream_ok(forward: Forward, granted: int = 3600) -> Response:
    request = forward.request
    contacts = request.headers.values("Contact")
    uris = ", ".join(f"{c.split(';expires', 1)[0]};expires={granted}" for c in contacts)
    text = (
        "SIP/2.0 200 OK\r\n"
        f"Via: {request.headers.get('Via')}\r\nFrom: {request.headers.get('From')}\r\n"
        f"To: {request.headers.get('To')};tag=kam\r\nCall-ID: {request.call_id}\r\n"
        f"CSeq: {request.cseq.seq} REGISTER\r\nContact: {uris}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Response)
    return message


def registered(r: RegistrationRelay, user: str, now: float) -> Forward:
    forward = r.register(relay_register(user, 1), PHONE, "outside", OUTSIDE, now)
    assert isinstance(forward, Forward)
    answer = r.upstream_response(forward, relay_register(user, 1), upstream_ok(forward), now)
    assert answer.status == 200
    return forward


def test_relay_refresh_of_an_escaped_user_is_the_same_registration() -> None:
    r = relay()
    registered(r, "%61lice", T0)
    # The same phone now writes its user unescaped: one user, one binding, cached.
    answer = r.register(relay_register("alice", 2), PHONE, "outside", OUTSIDE, T0 + 50)
    assert isinstance(answer, Response) and answer.status == 200
    assert r.stats.cached == 1 and r.stats.forwarded == 1
    (binding,) = r.bindings()
    assert binding.user == "alice"


def test_relay_upstream_aor_is_the_unescaped_user() -> None:
    r = relay()
    forward = r.register(relay_register("%61lice", 1), PHONE, "outside", OUTSIDE, T0)
    assert isinstance(forward, Forward)
    assert forward.request.headers.get("To") == "<sip:alice@voip.example>"
    assert forward.request.from_.uri == parse_uri("sip:alice@voip.example")


def test_relay_query_and_wildcard_find_the_user_however_it_is_escaped() -> None:
    r = relay()
    registered(r, "alice", T0)
    query = parse_message(
        b"REGISTER sip:198.51.100.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.7;branch=z9hG4bKq\r\n"
        b"From: <sip:%61lice@198.51.100.1>;tag=q\r\nTo: <sip:%61lice@198.51.100.1>\r\n"
        b"Call-ID: q@10.0.0.7\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(query, Request)
    answer = r.register(query, PHONE, "outside", OUTSIDE, T0 + 1)
    assert isinstance(answer, Response)
    assert answer.headers.values("Contact") == ["<sip:alice@10.0.0.7:5060>;expires=59"]
    wildcard = relay_register("%61lice", 3, contact="*", expires=0)
    forward = r.register(wildcard, PHONE, "outside", OUTSIDE, T0 + 2)
    assert isinstance(forward, Forward)
    (token,) = [b.token for b in r.bindings()]
    r.upstream_response(forward, wildcard, upstream_ok(forward, 0), T0 + 2)
    assert r.bindings() == () and r.location.lookup(token, T0 + 3) == []


@pytest.mark.parametrize("user", ["%ff%fe", "al%0d%0aX-Injected%3a%201", "%00", "a%25b"])
def test_relay_odd_escaped_users_do_not_raise_and_are_escaped_again(user: str) -> None:
    r = relay()
    request = relay_register(user, 1)
    to_uri = request.to.uri
    assert isinstance(to_uri, SipUri)
    forward = r.register(request, PHONE, "outside", OUTSIDE, T0)
    assert isinstance(forward, Forward)
    again = parse_message(bytes(forward.request))
    assert isinstance(again, Request)
    assert again.headers.fields("X-Injected") == []
    upstream_to = again.to.uri
    assert isinstance(upstream_to, SipUri)
    assert upstream_to.user_unescaped == to_uri.user_unescaped
    r.upstream_response(forward, request, upstream_ok(forward), T0)
    (binding,) = r.bindings()
    assert binding.user == to_uri.user_unescaped


def test_relay_user_star_is_a_user_not_a_wildcard() -> None:
    # "*" is a valid user character (RFC 3261 25.1 mark), escaped or not; only a
    # "Contact: *" is a wildcard.
    for user in ("*", "%2a"):
        r = relay()
        registered(r, user, T0)
        (binding,) = r.bindings()
        assert binding.user == "*"
        assert r.location.lookup(binding.token, T0 + 1) != []


REALM = "sbc"


def embedded_registrar() -> Registrar:
    policy = RegistrarPolicy(realm=REALM)
    digest = DigestServer(DigestServerConfig(realm=REALM, key=b"k" * 32))
    return Registrar(policy, StaticCredentials({"alice": "pw-1"}), policy.new_location(), digest)


def registrar_register(user: str, authorization: str | None = None, cseq: int = 1) -> Request:
    lines = [
        "REGISTER sip:203.0.113.1 SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK{cseq}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@example.com>;tag=ft1",
        f"To: <sip:{user}@example.com>",
        "Call-ID: call-1@phone",
        f"CSeq: {cseq} REGISTER",
        "Contact: <sip:alice@192.0.2.10:5062>",
        *([f"Authorization: {authorization}"] if authorization else []),
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def test_embedded_registrar_escaped_to_user_is_the_digest_user_and_routable() -> None:
    registrar = embedded_registrar()
    flow = Flow(Transport.UDP, "203.0.113.1", 5060, "192.0.2.10", 5062)
    first = registrar.register(registrar_register("%61lice"), flow, "access", OUTSIDE, T0)
    assert first.response.status == 401
    authorization = DigestClient("alice", "pw-1").respond(
        first.response.headers.fields("WWW-Authenticate"),
        method="REGISTER",
        uri="sip:203.0.113.1",
    )
    result = registrar.register(
        registrar_register("%61lice", authorization, 2), flow, "access", OUTSIDE, T0
    )
    assert result.response.status == 200 and result.aor == "alice"
    # A call for either spelling reaches the phone (RFC 3261 19.1.4 compares unescaped).
    directory = Directory(location=registrar.location, wall=lambda: T0 + 1)
    for target in ("sip:alice@example.com", "sip:%61lice@example.com"):
        (found,) = directory.registered(parse_uri(target), None, 0.0)
        assert found.uri == "sip:alice@192.0.2.10:5062"


@pytest.mark.parametrize("uri", ["sip:%ff%fe@example.com", "sip:%00@example.com"])
def test_location_lookup_of_odd_users_does_not_raise(uri: str) -> None:
    location = LocationService(domains=("example.com",))
    assert location.lookup(parse_uri(uri), T0) == []
    assert LocationService().lookup(parse_uri(uri), T0) == []


# --- 2. JSON-lines CDRs are valid UTF-8 JSON -------------------------------------------------


def test_json_lines_cdr_has_no_lone_surrogates(tmp_path: Path) -> None:
    path = tmp_path / "cdr.jsonl"
    store = JsonLinesCdrStore(path)
    # Octets that were not UTF-8 (surrogateescape), an escaped UTF-8 "é", a lone high
    # surrogate, and a character outside the BMP that must survive as it is.
    odd = replace(
        BUSY,
        caller="sip:\udcff@198.51.100.10",
        callee="sip:caf\udcc3\udca9@sbc.example.net",
        a_codecs="\ud800/8000,PCMU/8000",
        route="\U0001f4de",
    )
    store.write(odd)
    store.close()
    raw = path.read_bytes()
    assert store.stats().written == 1
    assert b"\\ud" not in raw.lower().replace(b"\\ud83d\\udcde", b"")
    data = json.loads(raw.decode("utf-8", "strict"))
    for value in data.values():
        if isinstance(value, str):
            value.encode("utf-8", "strict")
    assert data["caller"] == "sip:\ufffd@198.51.100.10"
    assert data["callee"] == "sip:café@sbc.example.net"
    assert data["a_codecs"] == "?/8000,PCMU/8000"
    assert data["route"] == "\U0001f4de"


# --- 3. a reload that shortens the probe interval ---------------------------------------------

GATEWAY = Gateway("a", "198.51.100.1", 5060)


def probing(interval: float, timeout: float = 5.0) -> Trunk:
    return Trunk("carrier", "outside", (GATEWAY,), ProbePolicy(interval=interval, timeout=timeout))


def test_reload_with_a_shorter_probe_interval_probes_sooner() -> None:
    table = TrunkTable([probing(300.0)])
    state = table["carrier"]
    state.probe_sent(GATEWAY.key, 100.0)
    state.probe_result(GATEWAY.key, 200, 100.5)
    assert table.next_deadline() == 400.0
    now = 110.0
    table.reconfigure([probing(30.0)])
    deadline = table.next_deadline()
    assert deadline is not None and deadline <= now + 30.0
    assert deadline == 130.0  # the new interval from the last probe
    assert table.due_probes(129.0) == [] and len(table.due_probes(130.0)) == 1


def test_reload_with_a_longer_interval_does_not_postpone_a_due_probe() -> None:
    table = TrunkTable([probing(30.0)])
    table["carrier"].probe_sent(GATEWAY.key, 100.0)
    table["carrier"].probe_result(GATEWAY.key, 200, 100.5)
    table.reconfigure([probing(300.0)])
    assert table.next_deadline() == 130.0


def test_reload_with_a_shorter_timeout_shortens_the_probe_in_flight() -> None:
    table = TrunkTable([probing(300.0, timeout=60.0)])
    table["carrier"].probe_sent(GATEWAY.key, 100.0)
    table.reconfigure([probing(300.0, timeout=2.0)])
    assert table.next_deadline() == 102.0


def test_never_probed_gateway_stays_due_at_once_after_reload() -> None:
    table = TrunkTable([probing(300.0)])
    table.reconfigure([probing(30.0)])
    assert len(table.due_probes(0.0)) == 1


# --- 4. routing: empty From user, absent header, telephone-number separators ---------------

PEER = Destination(Transport.UDP, "203.0.113.5", 5060)


def invite(from_uri: str, *extra: str) -> Request:
    lines = [
        "INVITE sip:100@sbc.example SIP/2.0",
        "Via: SIP/2.0/UDP 198.51.100.9;branch=z9hG4bKr",
        f"From: <{from_uri}>;tag=f",
        "To: <sip:100@sbc.example>",
        "Call-ID: r@198.51.100.9",
        "CSeq: 1 INVITE",
        *extra,
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def rule(**match: object) -> RouteRule:
    return RouteRule("r", RouteAction.TRUNK, realm="inside", destination=PEER, **match)  # type: ignore[arg-type]


RURI = parse_uri("sip:100@sbc.example")


@pytest.mark.parametrize(
    ("pattern", "from_uri", "expected"),
    [
        ("", "sip:example.com", True),
        ("(anonymous)?", "sip:example.com", True),
        (".*", "sip:example.com", True),
        (".+", "sip:example.com", False),
        ("anonymous", "sip:example.com", False),
        ("(anonymous)?", "sip:anonymous@example.com", True),
        ("", "sip:bob@example.com", False),
    ],
)
def test_from_user_regex_sees_a_missing_user_as_empty(
    pattern: str, from_uri: str, expected: bool
) -> None:
    router = Router([rule(from_user=re.compile(pattern))])
    assert (router.route(None, RURI, invite(from_uri)) is not None) is expected


@pytest.mark.parametrize(
    ("pattern", "headers", "expected"),
    [
        # An absent header has no value to match: ".*" means "it is there".
        ("^$", (), False),
        (".*", (), False),
        ("", (), False),
        ("x", (), False),
        ("^$", ("X-Tenant: acme",), False),
        ("acme", ("X-Tenant: acme",), True),
        (".*", ("X-Tenant: acme",), True),
        ("^$", ("X-Tenant: ",), True),
    ],
)
def test_header_pattern_needs_the_header(
    pattern: str, headers: tuple[str, ...], expected: bool
) -> None:
    router = Router([rule(header="X-Tenant", header_pattern=re.compile(pattern))])
    assert (router.route(None, RURI, invite("sip:a@b.example", *headers)) is not None) is expected


@pytest.mark.parametrize(
    ("prefix", "uri", "expected"),
    [
        ("+1212", "sip:+1-212-555-0100@sbc.example;user=phone", True),
        ("+1212555", "tel:+1-212-555-0100", True),
        ("+1-212", "sip:+12125550100@sbc.example", True),
        ("1-212-5", "sip:1.212.555.0100@sbc.example", True),
        ("212555", "sip:(212)%20555.0100@sbc.example", True),
        ("(212) 555", "sip:2125550100@sbc.example", True),
        ("212555", "sip:(212)555-0100;phone-context=example.com@sbc.example", True),
        ("+1213", "sip:+1-212-555-0100@sbc.example", False),
        ("1212", "sip:+1-212-555-0100@sbc.example", False),
        ("212", "sip:+1-212-555-0100@sbc.example", False),
        # Not telephone numbers: separators count as they are written.
        ("johndoe", "sip:john.doe@sbc.example", False),
        ("john.", "sip:john.doe@sbc.example", True),
        ("12a", "sip:1-2a@sbc.example", False),
        ("-", "sip:1-2@sbc.example", False),
        ("", "sip:anything@sbc.example", True),
    ],
)
def test_user_prefix_ignores_visual_separators_in_numbers(
    prefix: str, uri: str, expected: bool
) -> None:
    router = Router([rule(user_prefix=prefix)])
    decision = router.route(None, parse_uri(uri))
    assert (decision == TrunkRoute("r", "inside", PEER)) is expected
