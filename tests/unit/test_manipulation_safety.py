"""Header rules that must not hurt the SBC: backtracking regexes, requests vs
responses, single-valued headers added twice, and headers the B2BUA owns.

Each group failed on the code before it was written; the config tests load a real
YAML file, as ``sbc check-config`` and a SIGHUP reload do.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from sbc.assembly import header_rules
from sbc.b2bua.manipulation import (
    MAX_MATCHED_LENGTH,
    Direction,
    HeaderManipulator,
    HeaderRule,
    ManipulationAction,
    MessageKind,
    RuleSkip,
    SkipReason,
    backtracking_problem,
)
from sbc.config.loader import ConfigError, load_config_text
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from tests.unit.test_manipulation import INVITE, assert_refused, invite, response, run

A = ManipulationAction
OUT = Direction.OUTBOUND
IN = Direction.INBOUND


def load_rules(rules: str) -> str:
    """Problems of a config whose one realm has ``rules`` (YAML flow items), or ''."""
    text = textwrap.dedent(
        """\
        realms:
          - name: carrier
            listen: [{transport: udp, address: 203.0.113.1, port: 5060}]
            media_address: 203.0.113.1
            header_rules:
        """
    ) + "".join(f"      - {rule}\n" for rule in rules.splitlines())
    try:
        load_config_text(text, "sbc.yaml", Path("/etc/sbc"))
    except ConfigError as exc:
        return str(exc)
    return ""


# --- 1. regexes that backtrack without end -------------------------------------------

CATASTROPHIC = [
    r"(a+)+$",  # the textbook exponential one
    r"(.*a){20}",  # a bounded repeat of an unbounded one: n**20
    r"(a*)*b",
    r"(?:x+y?)*z",
    r"((ab)*c)+",
    r"^(\w+\s?)*$",  # the classic "words" validator
    r"(a{1,2})+$",  # an unbounded repeat of a part of varying length: Fibonacci
    r"(?>(a+)+b)",  # atomic only once the group has matched: inside it still backtracks
    r"(a+)++$",  # a possessive outer repeat still tries every split before giving up
    r"(?i:(x|y+)+)z",
]

LEGITIMATE = [
    r"^sip:(\d+)@",
    r".*",
    r"(foo|bar)baz",
    r"[^;]+",
    r"^(\w+)/([\d.]+).*$",
    r"(\d{1,3}\.){3}\d{1,3}",  # bounded in bounded: at most 3**3 ways
    r"(a++)+$",  # possessive inner: the outer repeat cannot split it again
    r"((?>a+)b)+",  # atomic inner, likewise
    r"(a+)?b",  # at most once is no repetition
    r"(?P<user>[^@]+)@",
    r";tag=\w+",
]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_nested_unbounded_repetition_is_refused_when_the_rule_is_made(pattern: str) -> None:
    assert backtracking_problem(pattern) is not None
    for action, fields in [(A.STRIP, {}), (A.REWRITE, {"replacement": "x"})]:
        with pytest.raises(ValueError) as refused:
            HeaderRule(action, "X-Account", pattern=pattern, **fields)  # type: ignore[arg-type]
        message = str(refused.value)
        assert message.startswith(f"header rule {action.value} 'X-Account': pattern {pattern!r}")
        assert "backtrack" in message and "possessive" in message


@pytest.mark.parametrize("pattern", LEGITIMATE)
def test_ordinary_patterns_still_load(pattern: str) -> None:
    assert backtracking_problem(pattern) is None
    HeaderRule(A.REWRITE, "X-Account", pattern=pattern, replacement="x")
    HeaderRule(A.STRIP, "X-Account", pattern=pattern)


def test_request_uri_rewrites_are_checked_too() -> None:
    with pytest.raises(ValueError, match=r"header rule rewrite 'request-uri': pattern"):
        HeaderRule(A.REWRITE, "request-uri", pattern=r"^sip:(\d+)+@", replacement="sip:0@")


def test_a_catastrophic_pattern_in_the_config_file_is_refused_with_file_and_line() -> None:
    problems = load_rules(
        "{action: strip, header: X-Debug}\n"
        "{action: rewrite, header: X-Account, pattern: '(a+)+$', replacement: x}"
    )
    lines = problems.splitlines()
    assert len(lines) == 1, problems
    assert lines[0].startswith(
        "sbc.yaml:7: realms[0].header_rules[1].pattern: pattern '(a+)+$' repeats a part"
    ), problems
    assert "exponentially" in lines[0]


def test_the_config_accepts_ordinary_patterns() -> None:
    rules = "\n".join(
        f"{{action: strip, header: X-Account, pattern: '{pattern}'}}" for pattern in LEGITIMATE
    )
    assert load_rules(rules) == ""


def test_a_100_kb_header_value_is_not_matched_and_costs_nothing() -> None:
    # Python's re cannot be interrupted: the only bound on an accepted pattern's cost
    # is the text it runs on. A quadratic pattern (accepted: it nests nothing) on
    # 100 KB of digits would take minutes; a value beyond the cap is never matched.
    huge = "1" * 100_000
    rules = [
        HeaderRule(A.REWRITE, "X-Account", pattern=r"(\d+)@", replacement=r"\1"),
        HeaderRule(A.STRIP, "X-Other", pattern=r"(\d+)@"),
    ]
    message = invite()
    message.headers.add("X-Account", huge)
    message.headers.add("X-Other", huge)
    started = time.monotonic()
    report = HeaderManipulator(rules).apply(message, OUT, "carrier")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert report.skips == (RuleSkip(0, SkipReason.TOO_LARGE),)
    assert message.headers.fields("X-Account") == [huge]
    assert "X-Other" not in message.headers  # fail closed: stripped unseen
    assert MAX_MATCHED_LENGTH == 1024


# --- 2. requests, responses or both ---------------------------------------------------


def test_rules_apply_to_requests_and_responses_by_default() -> None:
    rule = HeaderRule(A.ADD, "X-Both", value="1")
    assert rule.messages is MessageKind.BOTH
    assert run([rule], invite())[0].applied == (1,)
    assert run([rule], response())[0].applied == (1,)


def test_a_rule_for_requests_leaves_responses_alone() -> None:
    rule = HeaderRule(A.STRIP, "User-Agent", messages=MessageKind.REQUESTS)
    report, wire = run([rule], invite())
    assert report.applied == (1,) and "User-Agent" not in wire.headers
    answer = response()
    answer.headers.add("User-Agent", "Acme/1.0")
    report, wire = run([rule], answer)
    assert report.applied == (0,) and wire.headers.get("User-Agent") == "Acme/1.0"


def test_a_rule_for_responses_leaves_requests_alone() -> None:
    rule = HeaderRule(
        A.ADD, "X-Answered-By", value="${realm}", messages=MessageKind.RESPONSES, direction=IN
    )
    report, wire = run([rule], invite(), IN)
    assert report.applied == (0,) and "X-Answered-By" not in wire.headers
    report, wire = run([rule], response(), IN)
    assert report.applied == (1,) and wire.headers.get("X-Answered-By") == "carrier"


def test_messages_and_methods_combine() -> None:
    # Responses to INVITE only: a 200 to OPTIONS is left alone.
    rule = HeaderRule.build(
        "strip", "Server", methods=["invite"], messages="Responses", direction="outbound"
    )
    assert rule.messages is MessageKind.RESPONSES
    to_invite = response()
    to_invite.headers.add("Server", "Acme")
    options = parse_message(INVITE.replace(b"INVITE", b"OPTIONS"))
    assert isinstance(options, Request)
    to_options = response(options)
    to_options.headers.add("Server", "Acme")
    assert run([rule], to_invite)[1].headers.fields("Server") == []
    assert run([rule], to_options)[1].headers.fields("Server") == ["Acme"]


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        (dict(action="strip", header="X-A", messages="replies"),
         r"unknown messages 'replies' \(one of requests, responses, both\)"),
        (dict(action="keep", header="X-A", messages="requests"), "messages not allowed with keep"),
        (dict(action="rewrite", header="request-uri", pattern="x", replacement="y",
              messages="responses"), "a response has no Request-URI"),
    ],
)  # fmt: skip
def test_bad_messages_are_refused(rule: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        HeaderRule.build(**rule)  # type: ignore[arg-type]


def test_messages_in_the_config_file() -> None:
    assert load_rules("{action: strip, header: Server, messages: responses}") == ""
    assert "sbc.yaml:6: realms[0].header_rules[0].messages: expected one of" in load_rules(
        "{action: strip, header: Server, messages: replies}"
    )
    assert "sbc.yaml:6: realms[0].header_rules[0]: header rule keep 'X-A': messages not" in (
        load_rules("{action: keep, header: X-A, messages: requests}")
    )


def test_the_running_rules_honour_messages_from_the_config() -> None:
    text = textwrap.dedent(
        """\
        realms:
          - name: carrier
            listen: [{transport: udp, address: 203.0.113.1, port: 5060}]
            media_address: 203.0.113.1
            header_rules:
              - {action: strip, header: User-Agent, messages: responses}
        """
    )
    config = load_config_text(text, "sbc.yaml", Path("/etc/sbc"))
    assert config.realms[0].header_rules[0].rule().messages is MessageKind.RESPONSES
    manipulator = header_rules(config)["carrier"]
    request = invite()
    manipulator.apply(request, OUT, "carrier")
    assert request.headers.get("User-Agent") == "Acme/1.0 (build 7)"


# --- 3. add of a header that may appear once -----------------------------------------

# RFC 3261 7.3.1: a header may appear more than once only when its value is a
# comma-separated list (20: Subject, User-Agent, Server ... are not).


def test_add_of_a_single_valued_header_replaces_it_in_place() -> None:
    report, wire = run([HeaderRule(A.ADD, "Subject", value="dinner")], invite())
    assert report.applied == (1,)
    assert wire.headers.fields("Subject") == ["dinner"]
    names = [name for name, _ in wire.headers]
    assert names.index("Subject") == 7  # where the peer's was
    assert bytes(wire).count(b"Subject:") == 1


def test_add_replaces_every_copy_a_peer_sent() -> None:
    twice = parse_message(INVITE.replace(b"Subject: lunch\r\n", b"Subject: lunch\r\ns: brunch\r\n"))
    assert twice.headers.fields("Subject") == ["lunch", "brunch"]
    report, wire = run([HeaderRule(A.ADD, "Subject", value="${method}")], twice)
    assert report.applied == (1,)
    assert wire.headers.fields("Subject") == ["INVITE"]


def test_add_of_server_replaces_the_b2buas_own_in_a_response() -> None:
    answer = response()
    answer.headers.add("Server", "sbc/1.0")
    _, wire = run([HeaderRule(A.ADD, "Server", value="Carrier Edge")], answer)
    assert wire.headers.fields("Server") == ["Carrier Edge"]


def test_add_only_if_absent_still_keeps_the_existing_value() -> None:
    rule = HeaderRule(A.ADD, "Subject", value="dinner", only_if_absent=True)
    report, wire = run([rule], invite())
    assert report.applied == (0,) and wire.headers.fields("Subject") == ["lunch"]


@pytest.mark.parametrize("header", ["X-Internal", "Alert-Info", "Reason"])
def test_add_of_a_header_that_may_repeat_adds_another_field(header: str) -> None:
    message = invite()
    before = message.headers.fields(header)
    _, wire = run([HeaderRule(A.ADD, header, value="<urn:x>")], message)
    assert wire.headers.fields(header) == [*before, "<urn:x>"]


# --- 4. headers the B2BUA owns on each leg --------------------------------------------

OWNED = [
    "Session-Expires", "x", "Min-SE",  # RFC 4028 session timers
    "Require", "Supported", "k", "Unsupported",  # option tags: 100rel, timer
    "RSeq", "RAck",  # RFC 3262 reliable provisionals, PRACKed per leg
    "Content-Encoding", "e",  # the body is rebuilt per leg (SDP)
    "Event", "o", "Subscription-State", "Refer-Sub",  # subscriptions it tracks (RFC 6665)
]  # fmt: skip


@pytest.mark.parametrize("header", OWNED)
@pytest.mark.parametrize("action", list(ManipulationAction))
def test_headers_the_b2bua_owns_are_refused_for_every_action(
    header: str, action: ManipulationAction
) -> None:
    assert_refused(action, header)


def test_an_owned_header_in_the_config_file_is_refused_with_file_and_line() -> None:
    problems = load_rules("{action: strip, header: Session-Expires, direction: inbound}")
    assert problems == (
        "sbc.yaml:6: realms[0].header_rules[0]: header rule strip 'Session-Expires':"
        " Session-Expires is built by the B2BUA itself and cannot be stripped"
        " (RFC 4028: it runs the session timers of each leg)"
    )


@pytest.mark.parametrize("header", ["Subject", "User-Agent", "Server", "X-Account", "Expires"])
def test_end_to_end_headers_stay_free(header: str) -> None:
    HeaderRule(A.STRIP, header)
    HeaderRule(A.ADD, header, value="1")
