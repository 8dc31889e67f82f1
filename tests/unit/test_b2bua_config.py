"""The realms: and routes: configuration sections, and what sbc.app builds from them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sbc.app import realm_table, router
from sbc.assembly import trunk_credentials, trunk_registrations
from sbc.b2bua.routing import RejectRoute, TrunkRoute
from sbc.b2bua.trunk_auth import TrunkCredentials
from sbc.b2bua.trunk_register import TrunkRegistration
from sbc.config.loader import ConfigError, load_config_text
from sbc.config.schema import Config
from sbc.sip.uri import parse_uri
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

GOOD = """\
sip:
  listen: [{transport: udp, address: 127.0.0.1, port: 0}]
realms:
  - name: outside
    listen: [{transport: udp, address: 198.51.100.1, port: 5060}]
    media_address: 198.51.100.1
  - name: inside
    listen:
      - {transport: udp, address: 203.0.113.1, port: 5060}
      - {transport: tcp, address: "2001:db8::1", port: 5060}
    media_address: 203.0.113.1
    keep_headers: [Subject, X-Account]
routes:
  - {name: busy, action: reject, user_prefix: "900", status: 486}
  - {name: core, action: trunk, from_realm: outside, realm: inside,
     host: 203.0.113.5, port: 5070, transport: tcp}
"""


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "sbc.yaml", Path("/etc/sbc"))


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value)


def test_realms_and_routes_build_the_b2bua_tables() -> None:
    config = load(GOOD)
    realms = realm_table(config)
    inside = realms.get("inside")
    assert inside is not None and inside.keeps("x-account") and not inside.keeps("X-Other")
    flow = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.9", 4000)
    outside = realms.of_flow(flow)
    assert outside is not None and outside.name == "outside"
    assert realms.of_flow(Flow(Transport.UDP, "127.0.0.1", 5060, "127.0.0.1", 1)) is None
    rules = router(config)
    assert rules.route("outside", parse_uri("sip:9001@x")) == RejectRoute("busy", 486)
    assert rules.route("outside", parse_uri("sip:1000@x")) == TrunkRoute(
        "core", "inside", Destination(Transport.TCP, "203.0.113.5", 5070)
    )
    hop = realms.hop(inside, Destination(Transport.TCP, "2001:db8::5", 5060))
    assert hop is not None and hop.local == ListenAddress(Transport.TCP, "2001:db8::1", 5060)


def test_embedded_default_has_no_realms_or_routes(tmp_path: Path) -> None:
    config = load_config_text("{}", "empty.yaml", tmp_path)
    assert config.realms == () and config.routes == ()


def test_unknown_realm_in_a_route_is_located() -> None:
    text = GOOD.replace("from_realm: outside", "from_realm: dmz")
    assert "sbc.yaml:15: routes[1].from_realm: unknown realm 'dmz'" in problems(text)


def test_a_trunk_without_host_is_refused() -> None:
    text = GOOD.replace("host: 203.0.113.5, ", "")
    assert "routes[1]: a trunk route needs trunk, or realm and host" in problems(text)


def test_duplicate_realm_names_and_sockets_are_refused() -> None:
    text = GOOD.replace("name: inside", "name: outside").replace(
        "203.0.113.1, port: 5060", "198.51.100.1, port: 5060"
    )
    found = problems(text)
    assert "realms[1].name: duplicate realm 'outside'" in found
    assert "realms[1].listen[0]: udp 198.51.100.1:5060 is already used by another listener" in found


def test_duplicate_route_names_are_refused() -> None:
    # CDRs, logs and metrics name the route a call took.
    found = problems(GOOD.replace("name: core", "name: busy"))
    assert "routes[1].name: duplicate route 'busy'" in found


def test_a_probe_timeout_not_shorter_than_its_interval_is_refused() -> None:
    text = GOOD + (
        "trunks:\n  - {name: t, realm: inside, gateways: [{host: 203.0.113.9}],"
        " probe: {interval: 5, timeout: 5}}\n"
    )
    assert "trunks[0].probe.timeout: must be shorter than interval" in problems(text)


def test_unquoted_digit_prefix_and_bad_status_are_type_errors() -> None:
    found = problems(GOOD.replace('user_prefix: "900"', "user_prefix: 900").replace("486", "200"))
    assert "routes[0].user_prefix: expected" in found
    assert "routes[0].status: expected an integer 400..699, got 200" in found


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("a{99999999999}", "the repetition number is too large"),
        ("(" * 500 + ")" * 500, "nested too deeply"),
    ],
)
def test_regexes_python_cannot_compile_are_config_errors(pattern: str, reason: str) -> None:
    # re raises OverflowError / RecursionError for these, not re.error.
    rule = f"{{action: rewrite, header: Subject, pattern: '{pattern}', replacement: x}}"
    text = GOOD.replace(
        "keep_headers: [Subject, X-Account]",
        f"keep_headers: [Subject, X-Account]\n    header_rules: [{rule}]",
    ).replace(
        'user_prefix: "900"',
        f"user_prefix: \"900\", from_user: '{pattern}', header: Subject,"
        f" header_pattern: '{pattern}'",
    )
    found = problems(text)
    assert f"sbc.yaml:13: realms[1].header_rules[0].pattern: bad regular expression: {reason}" in (
        found
    )
    assert f"sbc.yaml:15: routes[0].from_user: bad regular expression: {reason}" in found
    assert f"sbc.yaml:15: routes[0].header_pattern: bad regular expression: {reason}" in found


def test_management_port_clashes_with_a_realm_listener() -> None:
    management = "management:\n  listen: {address: 203.0.113.1, port: 5060}\n"
    load(GOOD + management)  # a UDP listener leaves the TCP port free
    text = GOOD.replace(
        "{transport: udp, address: 203.0.113.1", "{transport: tcp, address: 203.0.113.1"
    )
    assert problems(text + management) == (
        "sbc.yaml:18: management.listen: 203.0.113.1:5060 is already used by"
        " realms[1].listen[0] (tcp 203.0.113.1:5060)"
    )


@pytest.mark.parametrize("address", ["0.0.0.0", "'::'", "224.0.0.1", "'ff02::1'"])
def test_unspecified_or_multicast_media_and_peer_addresses_are_refused(address: str) -> None:
    # Valid bind addresses, but SDP c= 0.0.0.0 puts a call on hold and the transport
    # drops anything sent to them: meaningless as a media address or a peer.
    text = GOOD.replace("media_address: 198.51.100.1", f"media_address: {address}").replace(
        "host: 203.0.113.5", f"host: {address}"
    )
    found = problems(text).splitlines()
    assert found == [
        f"sbc.yaml:6: realms[0].media_address: {address.strip(chr(39))} is not a unicast address",
        f"sbc.yaml:16: routes[1].host: {address.strip(chr(39))} is not a unicast address",
    ]


@pytest.mark.parametrize("host", ["'[['", "'...'", "'-'", "'1:2'", "a..b", "'[::1'", "999.1.1.1"])
def test_hosts_must_be_sip_hosts(host: str) -> None:
    # The character set alone let these through, into From/To/Request-URI and DNS.
    text = GOOD.replace(
        "media_address: 198.51.100.1", f"media_address: 198.51.100.1\n    from_host: {host}"
    )
    text = text.replace("status: 486}", f"status: 486, domain: {host}}}")
    text += f"trunks:\n  - {{name: t, realm: inside, gateways: [{{host: {host}}}]}}\n"
    shown = repr(host.strip("'"))
    assert problems(text).splitlines() == [
        f"sbc.yaml:7: realms[0].from_host: expected a host name or IP address, got {shown}",
        f"sbc.yaml:15: routes[0].domain: expected a host name or IP address, got {shown}",
        f"sbc.yaml:19: trunks[0].gateways[0].host: expected a host name or IP address, got {shown}",
    ]


def test_ip_hosts_may_be_bare_or_bracketed() -> None:
    for host in ("'2001:db8::1'", "'[2001:db8::1]'", "192.0.2.1", "sip.example.com."):
        load(GOOD.replace("status: 486}", f"status: 486, domain: {host}}}"))


def test_srtp_policy_of_a_realm_reaches_the_controller_and_bad_values_are_located() -> None:
    from sbc.assembly import realm_policies
    from sbc.b2bua.srtp import SrtpPolicy

    text = GOOD.replace("    keep_headers:", "    srtp: required\n    keep_headers:")
    policies = realm_policies(load(text))
    assert policies["inside"].srtp is SrtpPolicy.REQUIRED
    assert policies["outside"].srtp is SrtpPolicy.OPTIONAL
    report = problems(GOOD.replace("    keep_headers:", "    srtp: maybe\n    keep_headers:"))
    assert "sbc.yaml:12" in report and "srtp" in report and "required" in report


def test_srtp_off_written_plainly_is_the_word_not_a_yaml_boolean() -> None:
    from sbc.assembly import realm_policies
    from sbc.b2bua.srtp import SrtpPolicy

    text = GOOD.replace("    keep_headers:", "    srtp: off\n    keep_headers:")
    assert realm_policies(load(text))["inside"].srtp is SrtpPolicy.OFF
    # Any other boolean is still no policy.
    report = problems(GOOD.replace("    keep_headers:", "    srtp: yes\n    keep_headers:"))
    assert "sbc.yaml:12" in report and "srtp" in report


def test_the_guessing_limit_comes_from_the_config_and_fits_the_firewall() -> None:
    from sbc.assembly import registrar
    from sbc.registrar.credentials import StaticCredentials

    text = GOOD + "registrar:\n  guessing: {per_source: 3, per_user: 30, window: 10, lockout: 60}\n"
    config = load(text)
    limiter = registrar(config, StaticCredentials({}), b"k" * 32).guesses
    assert (limiter.per_source, limiter.per_user) == (3, 30)
    assert (limiter.window, limiter.lockout_duration) == (10.0, 60.0)
    # Never below the firewall's per-user detector, which would then never ban by user.
    low = GOOD + "registrar:\n  guessing: {per_user: 5}\n"
    assert registrar(load(low), StaticCredentials({}), b"k" * 32).guesses.per_user == 5
    firewall = "firewall: {enabled: true, detectors: {auth: {per_user: 100}}}\n"
    limiter = registrar(load(low + firewall), StaticCredentials({}), b"k" * 32).guesses
    assert limiter.per_user == 100


def test_trust_identity_of_a_realm_reaches_the_controller() -> None:
    from sbc.assembly import realm_policies

    text = GOOD.replace("    keep_headers:", "    trust_identity: true\n    keep_headers:")
    policies = realm_policies(load(text))
    assert policies["inside"].trust_identity and not policies["outside"].trust_identity
    report = problems(GOOD.replace("    keep_headers:", "    trust_identity: 3\n    keep_headers:"))
    assert "sbc.yaml:12" in report and "trust_identity" in report


def test_registered_only_of_a_realm_reaches_the_controller() -> None:
    from sbc.assembly import realm_policies

    text = GOOD.replace(
        "    keep_headers:", "    registrar: true\n    registered_only: true\n    keep_headers:"
    )
    policies = realm_policies(load(text))
    assert policies["inside"].registered_only and not policies["outside"].registered_only
    # Only with the embedded registrar: a relay's bindings name tokens, not users.
    report = problems(
        GOOD.replace("    keep_headers:", "    registered_only: true\n    keep_headers:")
    )
    assert "registered_only: needs the embedded registrar" in report


def test_an_emergency_route_cannot_reject() -> None:
    report = problems(GOOD.replace("status: 486}", "status: 486, emergency: true}"))
    assert "emergency: an emergency route cannot reject" in report


def test_a_reject_route_takes_no_limits() -> None:
    report = problems(GOOD.replace("status: 486}", "status: 486, limits: {max_calls: 5}}"))
    assert "limits: a reject route sends no call to limit" in report


TRUNK_AUTH = GOOD + (
    "trunks:\n  - name: t\n    realm: inside\n    gateways: [{host: 203.0.113.9}]\n"
    "    auth: {username: acct-1, password: 'p@ss word!', realm: carrier.example}\n"
)


def test_trunk_credentials_reach_the_controller_s_trunk_auth() -> None:
    credentials = trunk_credentials(load(TRUNK_AUTH))
    assert credentials == {"t": TrunkCredentials("acct-1", "p@ss word!", "carrier.example")}
    assert "p@ss" not in repr(load(TRUNK_AUTH).trunks[0])


def test_a_bad_trunk_password_is_refused_without_showing_it() -> None:
    report = problems(TRUNK_AUTH.replace("'p@ss word!'", '"tab\\there"'))
    assert "trunks[0].auth.password" in report
    assert "tab" not in report.replace("trunks[0].auth.password", "")
    assert "username" in problems(TRUNK_AUTH.replace("username: acct-1, ", ""))


def test_a_trunk_registration_takes_the_account_and_the_first_gateway_s_domain() -> None:
    text = TRUNK_AUTH.replace("gateways: [{host: 203.0.113.9}]", (
        "gateways: [{host: gw2.carrier.example, priority: 2},"
        " {host: gw1.carrier.example, port: 5080, priority: 1}]"
    )) + "    register: {expires: 300}\n"  # fmt: skip
    assert trunk_registrations(load(text)) == [
        TrunkRegistration("t", "acct-1", "gw1.carrier.example:5080", 300)
    ]
    named = text.replace("register: {expires: 300}", "register: {domain: carrier.example}")
    assert trunk_registrations(load(named))[0].domain == "carrier.example"
    lone = "\n".join(line for line in text.splitlines() if "auth:" not in line) + "\n"
    assert "register: needs a username" in problems(lone)


def test_the_readme_s_trunk_example_loads_and_builds_its_account() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Connecting a SIP trunk provider", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load(example)
    assert trunk_credentials(config) == {
        "carrier": TrunkCredentials("acct-1", "secret", "carrier.example")
    }
    assert trunk_registrations(config) == [
        TrunkRegistration("carrier", "acct-1", "carrier.example", 600)
    ]
    assert [route.name for route in config.routes] == ["sos", "out", "in"]
