"""Route patterns run on caller text too: the same bounds as header rules.

``from_user`` (full match on the From user) and ``header_pattern`` (searched in a
header's values) are operator regexes matched against what the caller sent, for
every rule on every INVITE. Python's re has no timeout: a nested repetition
such as ``(a+)+$`` lets one crafted From stall the SBC. Such patterns are refused
when the config is loaded, and a value longer than ``MAX_MATCHED_LENGTH`` is not
matched (the rule does not apply) whatever the pattern.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from sbc.b2bua.manipulation import MAX_MATCHED_LENGTH
from sbc.b2bua.routing import RouteAction, RouteRule
from sbc.config.loader import ConfigError, load_config_text
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.sip.uri import parse_uri


def load_route(route: str) -> str:
    """Problems of a config whose one route is ``route`` (a YAML flow item), or ''."""
    text = (
        textwrap.dedent(
            """\
        realms:
          - name: carrier
            listen: [{transport: udp, address: 203.0.113.1, port: 5060}]
            media_address: 203.0.113.1
        routes:
        """
        )
        + f"  - {route}\n"
    )
    try:
        load_config_text(text, "sbc.yaml", Path("/etc/sbc"))
    except ConfigError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("key", ["from_user", "header_pattern"])
def test_a_catastrophic_route_pattern_is_refused_with_file_and_line(key: str) -> None:
    extra = ", header: X-Tag" if key == "header_pattern" else ""
    problem = load_route(
        f"{{name: r, from_realm: carrier, action: reject, {key}: '(a+)+$'{extra}}}"
    )
    assert f"sbc.yaml:6: routes[0].{key}: pattern '(a+)+$' repeats" in problem
    assert "backtrack exponentially" in problem


@pytest.mark.parametrize("pattern", [r"\+?49\d+", r"(alice|bob)", ".*", r"[^@]+", r"\d{3,6}"])
def test_ordinary_route_patterns_load(pattern: str) -> None:
    assert load_route(f"{{name: r, action: reject, from_user: '{pattern}'}}") == ""


def invite(from_user: str, header: str = "") -> Request:
    text = (
        "INVITE sip:100@203.0.113.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKx\r\n"
        f"From: <sip:{from_user}@198.51.100.9>;tag=a\r\nTo: <sip:100@203.0.113.1>\r\n"
        "Call-ID: c@x\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        f"{header}Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def test_a_long_from_user_is_not_matched() -> None:
    uri = parse_uri("sip:100@203.0.113.1")
    rule = RouteRule("r", RouteAction.REJECT, from_user=re.compile(r"1+"))
    assert rule.matches("carrier", uri, invite("1" * 20))
    # Beyond the cap the rule does not apply, whatever the pattern: a polynomial
    # one the load check lets through (\d*\d*\d*x) costs what the cap allows.
    assert not rule.matches("carrier", uri, invite("1" * (MAX_MATCHED_LENGTH + 1)))


def test_a_long_header_value_is_not_searched() -> None:
    rule = RouteRule("r", RouteAction.REJECT, header="X-Tag", header_pattern=re.compile("gold"))
    uri = parse_uri("sip:100@203.0.113.1")
    assert rule.matches("carrier", uri, invite("alice", "X-Tag: gold\r\n"))
    padded = "x" * MAX_MATCHED_LENGTH + "gold"
    assert not rule.matches("carrier", uri, invite("alice", f"X-Tag: {padded}\r\n"))
