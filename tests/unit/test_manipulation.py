"""Header manipulation rules: what each action does on the wire, and what it may not do."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbc.b2bua.manipulation import (
    MAX_RULES,
    MAX_VALUE_BYTES,
    Direction,
    HeaderManipulator,
    HeaderRule,
    ManipulationAction,
    ManipulationReport,
    RuleSkip,
    SkipReason,
    kept_headers,
)
from sbc.b2bua.realm import Realm
from sbc.b2bua.topology import GENERATED_HEADERS, copy_kept_headers
from sbc.sip.limits import MAX_HEADERS
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message

A = ManipulationAction
OUT = Direction.OUTBOUND
IN = Direction.INBOUND

INVITE = (
    b"INVITE sip:+4930123456@sbc.example.org;user=phone SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice Smith" <sip:alice@198.51.100.9>;tag=1928301774\r\n'
    b"To: <sip:+4930123456@sbc.example.org>\r\n"
    b"Call-ID: a84b4c76e66710@198.51.100.9\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@198.51.100.9:5060>\r\n"
    b"Subject: lunch\r\n"
    b"User-Agent: Acme/1.0 (build 7)\r\n"
    b"X-Internal: secret-routing-hint\r\n"
    b"X-Internal: second\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def invite() -> Request:
    message = parse_message(INVITE)
    assert isinstance(message, Request)
    return message


def response(request: Request | None = None, status: int = 200) -> Response:
    return make_response(request or invite(), status, to_tag="abc123")


def reparsed(message: Request | Response) -> Request | Response:
    """The message as a peer would read it: bytes on the wire, parsed again."""
    data = bytes(message)
    again = parse_message(data)
    assert bytes(again) == data
    return again


def run(
    rules: list[HeaderRule], message: Request | Response, direction: Direction = OUT
) -> tuple[ManipulationReport, Request | Response]:
    report = HeaderManipulator(rules).apply(message, direction, "carrier")
    return report, reparsed(message)


# --- actions --------------------------------------------------------------------------


def test_strip_removes_every_field_of_the_header_case_insensitively() -> None:
    report, wire = run([HeaderRule(A.STRIP, "x-INTERNAL")], invite())
    assert report.applied == (2,) and report.skipped == (0,)
    assert "X-Internal" not in wire.headers
    assert b"secret-routing-hint" not in bytes(wire)
    assert wire.headers.get("Subject") == "lunch"


def test_strip_with_a_pattern_removes_only_the_matching_fields() -> None:
    report, wire = run([HeaderRule(A.STRIP, "X-Internal", pattern=r"^secret")], invite())
    assert report.applied == (1,)
    assert wire.headers.fields("X-Internal") == ["second"]


def test_strip_of_an_absent_header_changes_nothing() -> None:
    message = invite()
    before = bytes(message)
    report, _ = run([HeaderRule(A.STRIP, "Organization")], message)
    assert report.applied == (0,) and not report.changed
    assert bytes(message) == before


def test_add_appends_a_field_with_placeholders_expanded() -> None:
    rule = HeaderRule(A.ADD, "X-Realm", value="${realm}/${method}/${direction} costs $$1")
    report, wire = run([rule], invite())
    assert report.applied == (1,)
    assert wire.headers.get("X-Realm") == "carrier/INVITE/outbound costs $1"
    assert bytes(wire).endswith(b"X-Realm: carrier/INVITE/outbound costs $1\r\n\r\n")


def test_add_only_if_absent() -> None:
    rules = [
        HeaderRule(A.ADD, "Subject", value="overridden", only_if_absent=True),
        HeaderRule(A.ADD, "Organization", value="Example", only_if_absent=True),
    ]
    report, wire = run(rules, invite())
    assert report.applied == (0, 1)
    assert wire.headers.fields("Subject") == ["lunch"]
    assert wire.headers.get("Organization") == "Example"


def test_add_without_only_if_absent_adds_another_field() -> None:
    # A header that may repeat; one that may not (Subject) is replaced instead
    # (tests/unit/test_manipulation_safety.py).
    _, wire = run([HeaderRule(A.ADD, "X-Internal", value="third")], invite())
    assert wire.headers.fields("X-Internal") == ["secret-routing-hint", "second", "third"]


def test_rewrite_changes_the_first_match_of_each_field() -> None:
    rule = HeaderRule(A.REWRITE, "X-Internal", pattern="e", replacement="E")
    report, wire = run([rule], invite())
    assert report.applied == (2,)
    assert wire.headers.fields("X-Internal") == ["sEcret-routing-hint", "sEcond"]


def test_rewrite_all_matches() -> None:
    rule = HeaderRule(A.REWRITE, "X-Internal", pattern="e", replacement="E", all_matches=True)
    _, wire = run([rule], invite())
    assert wire.headers.fields("X-Internal") == ["sEcrEt-routing-hint", "sEcond"]


def test_rewrite_results_are_trimmed_as_the_parser_reads_them() -> None:
    rule = HeaderRule(A.REWRITE, "Subject", pattern="^(.*)$", replacement="\t \\1! ")
    _, wire = run([rule], invite())
    assert b"\r\nSubject: lunch!\r\n" in bytes(wire)


def test_rewrite_keeps_every_field_in_its_place() -> None:
    rule = HeaderRule(A.REWRITE, "subject", pattern="lunch", replacement="dinner")
    message = invite()
    names = [name for name, _ in message.headers]
    _, wire = run([rule], message)
    assert [name for name, _ in wire.headers] == names
    assert b"\r\nSubject: dinner\r\nUser-Agent:" in bytes(wire)


def test_rewrite_with_numbered_captures() -> None:
    rule = HeaderRule(A.REWRITE, "User-Agent", pattern=r"^(\w+)/([\d.]+).*$", replacement=r"\1 v\2")
    _, wire = run([rule], invite())
    assert wire.headers.get("User-Agent") == "Acme v1.0"


def test_rewrite_with_named_captures() -> None:
    rule = HeaderRule(
        A.REWRITE,
        "User-Agent",
        pattern=r"(?P<product>\w+)/(?P<version>[\d.]+)",
        replacement=r"\g<version>-\g<product>",
    )
    _, wire = run([rule], invite())
    assert wire.headers.get("User-Agent") == "1.0-Acme (build 7)"


def test_a_rewrite_that_does_not_match_counts_nothing() -> None:
    rule = HeaderRule(A.REWRITE, "Subject", pattern="breakfast", replacement="x")
    report, wire = run([rule], invite())
    assert report == ManipulationReport((0,), (0,))
    assert wire.headers.get("Subject") == "lunch"


def test_rules_run_in_order_each_on_the_previous_result() -> None:
    rules = [
        HeaderRule(A.ADD, "X-Trace", value="${realm}"),
        HeaderRule(A.REWRITE, "X-Trace", pattern="carrier", replacement="upstream"),
        HeaderRule(A.STRIP, "X-Trace", pattern="^carrier$"),
    ]
    report, wire = run(rules, invite())
    assert report.applied == (1, 1, 0)
    assert wire.headers.get("X-Trace") == "upstream"


def test_compact_form_names_match_the_long_form() -> None:
    message = parse_message(INVITE.replace(b"Subject: lunch", b"s: lunch"))
    assert isinstance(message, Request)
    report, wire = run([HeaderRule(A.STRIP, "Subject")], message)
    assert report.applied == (1,)
    assert "Subject" not in wire.headers


# --- request-uri, From, To ------------------------------------------------------------


def test_request_uri_rewrite_normalises_international_to_national() -> None:
    rule = HeaderRule(A.REWRITE, "request-uri", pattern=r"^sip:\+49(\d+)@", replacement=r"sip:0\1@")
    report, wire = run([rule], invite())
    assert report.applied == (1,)
    assert isinstance(wire, Request)
    assert bytes(wire).startswith(b"INVITE sip:030123456@sbc.example.org;user=phone SIP/2.0\r\n")
    assert wire.uri.user == "030123456"  # type: ignore[union-attr]


def test_request_uri_rewrite_that_breaks_the_uri_is_skipped() -> None:
    message = invite()
    rule = HeaderRule(A.REWRITE, "Request-URI", pattern=r"^sip:", replacement="<sip:")
    report, wire = run([rule], message)
    assert report.applied == (0,) and report.skipped == (1,)
    assert report.skips == (RuleSkip(0, SkipReason.BAD_URI),)
    assert isinstance(wire, Request)
    assert wire.raw_uri == "sip:+4930123456@sbc.example.org;user=phone"


def test_request_uri_rewrite_may_not_add_uri_headers() -> None:
    rule = HeaderRule(A.REWRITE, "request-uri", pattern="$", replacement="?Subject=x")
    report, _ = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.BAD_URI),)


def test_request_uri_rules_do_not_apply_to_responses() -> None:
    rule = HeaderRule(A.REWRITE, "request-uri", pattern="sip", replacement="sips")
    report, _ = run([rule], response())
    assert report == ManipulationReport((0,), (0,))


def test_from_display_name_and_user_rewrite_keeps_the_tag() -> None:
    rules = [
        HeaderRule(A.REWRITE, "From", pattern=r'^"[^"]*"', replacement='"Reception"'),
        HeaderRule(A.REWRITE, "f", pattern=r"sip:alice@", replacement="sip:+493055501@"),
    ]
    message = invite()
    report, wire = run(rules, message)
    assert report.applied == (1, 1)
    assert wire.headers.get("From") == '"Reception" <sip:+493055501@198.51.100.9>;tag=1928301774'
    assert wire.from_.tag == "1928301774"
    assert message.from_.display_name == "Reception"  # cached view was dropped


def test_from_rewrite_that_drops_the_tag_is_skipped() -> None:
    rule = HeaderRule(A.REWRITE, "From", pattern=r";tag=\w+", replacement="")
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.TAG_CHANGED),)
    assert wire.from_.tag == "1928301774"


def test_to_rewrite_may_not_add_a_tag() -> None:
    rule = HeaderRule(A.REWRITE, "To", pattern=r"$", replacement=";tag=forged")
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.TAG_CHANGED),)
    assert wire.to.tag is None


def test_to_rewrite_that_is_no_longer_an_address_is_skipped() -> None:
    rule = HeaderRule(A.REWRITE, "To", pattern=r">", replacement="")
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.BAD_ADDRESS),)
    assert wire.headers.get("To") == "<sip:+4930123456@sbc.example.org>"


def test_to_rewrite_in_a_response_keeps_the_tag() -> None:
    rule = HeaderRule(A.REWRITE, "To", pattern=r"\+49", replacement="0")
    report, wire = run([rule], response())
    assert report.applied == (1,)
    assert wire.headers.get("To") == "<sip:030123456@sbc.example.org>;tag=abc123"


# --- filters --------------------------------------------------------------------------


def test_method_filter() -> None:
    rule = HeaderRule(A.ADD, "X-Bye", value="1", methods=frozenset({"BYE"}))
    report, wire = run([rule], invite())
    assert report.applied == (0,) and "X-Bye" not in wire.headers
    bye = parse_message(INVITE.replace(b"INVITE", b"BYE"))
    assert isinstance(bye, Request)
    report, wire = run([rule], bye)
    assert report.applied == (1,) and wire.headers.get("X-Bye") == "1"


def test_direction_filter() -> None:
    rules = [
        HeaderRule(A.ADD, "X-In", value="in", direction=IN),
        HeaderRule(A.ADD, "X-Out", value="out"),
    ]
    report, wire = run(rules, invite(), IN)
    assert report.applied == (1, 0)
    assert wire.headers.get("X-In") == "in" and "X-Out" not in wire.headers
    report, wire = run(rules, invite(), OUT)
    assert report.applied == (0, 1)
    assert "X-In" not in wire.headers and wire.headers.get("X-Out") == "out"


def test_responses_are_filtered_by_their_cseq_method() -> None:
    rule = HeaderRule(A.STRIP, "Server", methods=frozenset({"INVITE"}))
    to_invite = response()
    to_invite.headers.add("Server", "Acme")
    report, wire = run([rule], to_invite)
    assert report.applied == (1,) and "Server" not in wire.headers

    options = parse_message(INVITE.replace(b"INVITE", b"OPTIONS"))
    assert isinstance(options, Request)
    to_options = response(options)
    to_options.headers.add("Server", "Acme")
    report, wire = run([rule], to_options)
    assert report.applied == (0,) and wire.headers.get("Server") == "Acme"


def test_build_reads_config_text() -> None:
    rule = HeaderRule.build("Add", "X-A", direction="INBOUND", methods=["invite"], value="1")
    assert rule == HeaderRule(A.ADD, "X-A", IN, frozenset({"INVITE"}), value="1")
    with pytest.raises(ValueError, match=r"unknown action 'mangle' \(one of keep, strip"):
        HeaderRule.build("mangle", "X-A")
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        HeaderRule.build("strip", "X-A", direction="sideways")


# --- keep-lists -----------------------------------------------------------------------


def test_keep_rules_extend_the_keep_list_and_change_no_message() -> None:
    rules = [HeaderRule(A.KEEP, "X-Billing"), HeaderRule(A.KEEP, "s"), HeaderRule(A.STRIP, "X-A")]
    assert kept_headers(rules) == frozenset({"x-billing", "subject"})
    manipulator = HeaderManipulator(rules)
    assert manipulator.kept_headers() == frozenset({"x-billing", "subject"})
    message = invite()
    before = bytes(message)
    assert manipulator.apply(message, OUT, "carrier").applied == (0, 0, 0)
    assert bytes(message) == before


def test_kept_headers_feed_copy_kept_headers() -> None:
    realm = Realm.build("carrier", [], "198.51.100.1", ["user-agent"])
    extended = Realm(
        realm.name,
        realm.listen,
        realm.media_address,
        realm.keep_headers | kept_headers([HeaderRule(A.KEEP, "X-Internal")]),
    )
    target = Request("INVITE", "sip:b@203.0.113.5")
    assert copy_kept_headers(invite(), target, extended) == 3
    assert target.headers.fields("X-Internal") == ["secret-routing-hint", "second"]


# --- what rules may not do ------------------------------------------------------------


@pytest.mark.parametrize("header", sorted(GENERATED_HEADERS - {"from", "to"}))
@pytest.mark.parametrize("action", list(ManipulationAction))
def test_generated_headers_are_refused_for_every_action(
    header: str, action: ManipulationAction
) -> None:
    assert_refused(action, header)


def assert_refused(action: ManipulationAction, header: str) -> None:
    """A rule of ``action`` on ``header`` is refused as a header the B2BUA builds."""
    fields: dict[str, str] = {}
    if action is A.ADD:
        fields = {"value": "x"}
    if action is A.REWRITE:
        fields = {"pattern": "x", "replacement": "y"}
    with pytest.raises(ValueError, match=f"{header} is built by the B2BUA itself"):
        HeaderRule(action, header, **fields)  # type: ignore[arg-type]


def test_compact_forms_of_generated_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="v is built by the B2BUA itself and cannot be stripped"):
        HeaderRule(A.STRIP, "v")
    with pytest.raises(ValueError, match="i is built by the B2BUA itself and cannot be rewritten"):
        HeaderRule(A.REWRITE, "i", pattern="x", replacement="y")


@pytest.mark.parametrize("header", ["From", "to", "f", "T"])
def test_from_and_to_may_only_be_rewritten(header: str) -> None:
    HeaderRule(A.REWRITE, header, pattern="x", replacement="y")
    expected = f"{header} is built by the B2BUA itself and cannot be %s \\(it may only be rewritten"
    with pytest.raises(ValueError, match=expected % "stripped"):
        HeaderRule(A.STRIP, header)
    with pytest.raises(ValueError, match=expected % "added"):
        HeaderRule(A.ADD, header, value="<sip:a@b>;tag=1")
    with pytest.raises(ValueError, match=expected % "kept"):
        HeaderRule(A.KEEP, header)


def test_bad_regex_is_refused_with_the_regex_error() -> None:
    with pytest.raises(re.error) as caught:
        re.compile("(unclosed")
    with pytest.raises(ValueError) as refused:
        HeaderRule(A.REWRITE, "Subject", pattern="(unclosed", replacement="x")
    assert str(refused.value) == (
        f"header rule rewrite 'Subject': bad regex '(unclosed': {caught.value}"
    )
    assert "missing ), unterminated subpattern at position 0" in str(refused.value)


@pytest.mark.parametrize(
    ("replacement", "error"),
    [(r"\2", "invalid group reference 2"), (r"\g<nope>", "unknown group name 'nope'")],
)
def test_replacement_with_unknown_groups_is_refused(replacement: str, error: str) -> None:
    with pytest.raises(ValueError, match=f"bad replacement .*{error}"):
        HeaderRule(A.REWRITE, "Subject", pattern="(?P<x>a)", replacement=replacement)


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        (dict(action=A.ADD, header="X-A"), "add needs a value"),
        (dict(action=A.REWRITE, header="X-A", replacement="x"), "rewrite needs a pattern"),
        (dict(action=A.REWRITE, header="X-A", pattern="x"), "rewrite needs a replacement"),
        (dict(action=A.STRIP, header="X-A", value="x"), "value not allowed with strip"),
        (dict(action=A.ADD, header="X-A", value="x", pattern="y"), "pattern not allowed with add"),
        (dict(action=A.STRIP, header="X-A", all_matches=True), "all_matches not allowed"),
        (dict(action=A.REWRITE, header="X-A", pattern="x", replacement="y", only_if_absent=True),
         "only_if_absent not allowed with rewrite"),
        (dict(action=A.KEEP, header="X-A", methods=frozenset({"INVITE"})),
         "methods not allowed with keep"),
        (dict(action=A.KEEP, header="X-A", direction=IN), "a keep-list applies to what is sent"),
        (dict(action=A.STRIP, header="request-uri"), "the Request-URI can only be rewritten"),
        (dict(action=A.STRIP, header="X A"), "not a header name"),
        (dict(action="strip", header="X-A"), "action 'strip' is not a ManipulationAction"),
        (dict(action=A.STRIP, header="X-A", direction="inbound"), "is not a Direction"),
        (dict(action=A.STRIP, header=""), "not a header name"),
        (dict(action=A.STRIP, header="X-A", methods=frozenset({"IN VITE"})),
         "'IN VITE' is not a SIP method"),
        (dict(action=A.ADD, header="X-A", value="a\r\nVia: evil"), "control characters"),
        (dict(action=A.ADD, header="X-A", value="${user}"), r"unknown placeholder \$\{user\}"),
        (dict(action=A.ADD, header="X-A", value="costs $5"), "write \\$\\$ for a '\\$'"),
        (dict(action=A.ADD, header="X-A", value="\ud800"), "not encodable"),
    ],
)  # fmt: skip
def test_invalid_rules_are_refused(rule: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        HeaderRule(**rule)  # type: ignore[arg-type]


# --- caps -----------------------------------------------------------------------------


def test_at_most_64_rules_per_realm() -> None:
    rules = [HeaderRule(A.STRIP, f"X-{i}") for i in range(MAX_RULES)]
    HeaderManipulator(rules)
    with pytest.raises(ValueError, match="65 header rules, more than 64 per realm"):
        HeaderManipulator([*rules, HeaderRule(A.STRIP, "X-last")])


def test_values_patterns_and_replacements_are_capped() -> None:
    HeaderRule(A.ADD, "X-A", value="v" * MAX_VALUE_BYTES)
    with pytest.raises(ValueError, match="value has 1025 bytes, more than 1024"):
        HeaderRule(A.ADD, "X-A", value="v" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(ValueError, match="value has 1026 bytes"):
        HeaderRule(A.ADD, "X-A", value="ü" * 513)
    with pytest.raises(ValueError, match="pattern has 1025 bytes"):
        HeaderRule(A.REWRITE, "X-A", pattern="p" * 1025, replacement="")
    with pytest.raises(ValueError, match="replacement has 1025 bytes"):
        HeaderRule(A.REWRITE, "X-A", pattern="p", replacement="r" * 1025)


def test_a_rewrite_whose_result_exceeds_the_cap_is_skipped() -> None:
    rule = HeaderRule(A.REWRITE, "Subject", pattern=".", replacement="x" * 300, all_matches=True)
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.TOO_LARGE),)
    assert wire.headers.get("Subject") == "lunch"


def test_an_add_whose_expanded_value_exceeds_the_cap_is_skipped() -> None:
    rule = HeaderRule(A.ADD, "X-A", value="x" * 1000 + "${realm}")
    message = invite()
    assert HeaderManipulator([rule]).apply(message, OUT, "r" * 24).applied == (1,)
    assert len(message.headers.get("X-A") or "") == MAX_VALUE_BYTES
    report = HeaderManipulator([rule]).apply(message, OUT, "r" * 25)
    assert report.skips == (RuleSkip(0, SkipReason.TOO_LARGE),)
    assert reparsed(message).headers.count("X-A") == 1


def test_adds_stop_at_the_parser_header_limit() -> None:
    message = invite()
    for i in range(MAX_HEADERS - len(message.headers) - 1):
        message.headers.add(f"X-Fill-{i}", "f")
    rules = [HeaderRule(A.ADD, "X-A", value="1"), HeaderRule(A.ADD, "X-B", value="2")]
    report, wire = run(rules, message)
    assert report.applied == (1, 0)
    assert report.skips == (RuleSkip(1, SkipReason.MESSAGE_FULL),)
    assert len(wire.headers) == MAX_HEADERS


def test_rewrites_stop_at_the_parser_header_section_limit() -> None:
    message = invite()
    for i in range(40):
        message.headers.add("X-Pad", f"{i}")
    rule = HeaderRule(A.REWRITE, "X-Pad", pattern="^", replacement="p" * 1000)
    report, _ = run([rule], message)
    assert report.applied[0] + report.skipped[0] == 40
    assert report.skipped[0] > 0
    assert {skip.reason for skip in report.skips} == {SkipReason.MESSAGE_FULL}


def test_a_rewrite_that_would_inject_a_header_line_is_skipped() -> None:
    rule = HeaderRule(A.REWRITE, "Subject", pattern="$", replacement="\r\nVia: SIP/2.0/UDP evil")
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.BAD_CHARACTERS),)
    assert len(wire.vias) == 1


# --- never raises, never breaks the message -------------------------------------------

_FRAGMENTS = [
    ".", ".*", "^", "$", r"\d+", r"\w", "(a|b)", "(?P<n>[a-z]+)", "sip:", "@", ";tag=",
    r"\+49", "<", ">", '"', "[^;]*", "x?", ";", ",", "lunch", "Alice", "(?i:ALICE)", " ",
    r";tag=\w+", r"(\w+)@", "(?P<user>[^@]+)@", r"\s*$",
]  # fmt: skip
_REPLACEMENT_PIECES = [
    "", "x", r"\1", r"\g<0>", "<", ">", '"', ";tag=z", ";", ",", " ", "\t", "\r\n", "\x00",
    "?a=b", "sip:", "@", "\\\\", "ü", "\udcff", "\ud800", "0", "y" * 200,
]  # fmt: skip
_TARGETS = ["From", "To", "f", "t", "Subject", "User-Agent", "X-Internal", "request-uri", "Zzz"]


@st.composite
def rewrite_rules(draw: st.DrawFn) -> HeaderRule | None:
    pattern = "".join(draw(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=3)))
    replacement = "".join(draw(st.lists(st.sampled_from(_REPLACEMENT_PIECES), max_size=4)))
    # Anything else, backslashes aside (mostly invalid escapes, refused when made).
    replacement += draw(
        st.text(st.characters(codec="utf-8", blacklist_characters="\\"), max_size=5)
    )
    try:
        return HeaderRule(
            A.REWRITE,
            draw(st.sampled_from(_TARGETS)),
            draw(st.sampled_from(list(Direction))),
            pattern=pattern,
            replacement=replacement,
            all_matches=draw(st.booleans()),
        )
    except ValueError:
        return None  # refused when made: the config would not load


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.lists(rewrite_rules(), max_size=6),
    subject=st.one_of(
        st.text(st.characters(codec="utf-8", blacklist_characters="\r\n"), max_size=40),
        # Octets that are not UTF-8, as the parser hands them on (surrogateescape).
        st.binary(max_size=40).map(
            lambda data: (
                data.replace(b"\r", b"").replace(b"\n", b"").decode("utf-8", "surrogateescape")
            )
        ),
    ),
    is_response=st.booleans(),
    direction=st.sampled_from(list(Direction)),
)
def test_random_rewrites_never_raise_nor_break_the_message(
    rules: list[HeaderRule | None], subject: str, is_response: bool, direction: Direction
) -> None:
    request = invite()
    request.headers.set("Subject", subject.strip(" \t"))
    message: Request | Response = response(request) if is_response else request
    message = parse_message(bytes(message))
    from_tag, to_tag, call_id = message.from_.tag, message.to.tag, message.call_id
    names = [name for name, _ in message.headers]
    active = [rule for rule in rules if rule is not None]
    report = HeaderManipulator(active).apply(message, direction, "carrier")
    assert len(report.applied) == len(report.skipped) == len(active)
    again = reparsed(message)
    assert (again.from_.tag, again.to.tag, again.call_id) == (from_tag, to_tag, call_id)
    assert [name for name, _ in again.headers] == names  # rewrites add no header line
    for name, value in again.headers:
        if name.lower().startswith(("x-", "subject", "user-agent")):
            assert len(value.encode("utf-8", "surrogateescape")) <= MAX_VALUE_BYTES
