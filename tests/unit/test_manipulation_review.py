"""Header manipulation from a review, as an operator and an attacker would use it.

The first group failed when written and was fixed; the second pins behaviour the
review asked about and found correct (or a design choice), so it stays that way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from sbc.b2bua.manipulation import (
    MAX_MATCHED_LENGTH,
    MAX_MATCHED_PER_RULE,
    CompiledRule,
    Direction,
    HeaderManipulator,
    HeaderRule,
    ManipulationAction,
    RuleSkip,
    SkipReason,
)
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from tests.unit.test_manipulation import INVITE, invite, reparsed, response, run

A = ManipulationAction
OUT = Direction.OUTBOUND


@dataclass
class _SpyRegex:
    """A compiled pattern that records the text it is asked to match."""

    regex: re.Pattern[str]
    seen: list[int]

    def search(self, text: str) -> re.Match[str] | None:
        self.seen.append(len(text))
        return self.regex.search(text)

    def sub(self, replacement: str, text: str, count: int = 0) -> str:
        self.seen.append(len(text))
        return self.regex.sub(replacement, text, count=count)


def spied(rule: HeaderRule) -> tuple[HeaderManipulator, list[int]]:
    """A manipulator running ``rule`` whose regex reports each text it matched.

    Python's re cannot be interrupted, so the cost of a rule is bounded only by the
    text it is given: that is what these tests measure, without a clock.
    """
    manipulator = HeaderManipulator([rule])
    compiled = manipulator._compiled[0]
    assert compiled.regex is not None
    seen: list[int] = []
    spy = _SpyRegex(compiled.regex, seen)
    manipulator._compiled = (CompiledRule(rule, compiled.key, regex=spy),)  # type: ignore[arg-type]
    return manipulator, seen


def with_fields(name: str, values: list[str]) -> Request:
    message = invite()
    message.headers.remove(name)
    for value in values:
        message.headers.add(name, value)
    received = parse_message(bytes(message))  # as received: within the parser's limits
    assert isinstance(received, Request)
    return received


# --- failed before the fix --------------------------------------------------------------

# Regex cost: an operator's pattern that backtracks (``(\d+)@`` is quadratic on a
# run of digits without '@') runs on attacker text. Before the fix a single 8 KB
# value cost ~190 ms per rule and message; the text matched is now capped.


def test_a_rewrite_does_not_run_its_regex_on_a_value_beyond_the_cap() -> None:
    rule = HeaderRule(A.REWRITE, "X-Internal", pattern=r"(\d+)@", replacement=r"\1")
    manipulator, seen = spied(rule)
    message = with_fields("X-Internal", ["1" * 8000, "12@x"])
    report = manipulator.apply(message, OUT, "carrier")
    assert seen == [4]
    assert report.applied == (1,)
    assert report.skips == (RuleSkip(0, SkipReason.TOO_LARGE),)
    assert reparsed(message).headers.fields("X-Internal") == ["1" * 8000, "12x"]


def test_a_rewrite_that_would_shrink_a_value_beyond_the_cap_is_skipped() -> None:
    long = "a" * (MAX_MATCHED_LENGTH + 1)
    rule = HeaderRule(A.REWRITE, "Subject", pattern=r"^(.{3}).*$", replacement=r"\1")
    message = with_fields("Subject", [long])
    report, wire = run([rule], message)
    assert report.skips == (RuleSkip(0, SkipReason.TOO_LARGE),)
    assert wire.headers.get("Subject") == long
    # At the cap it still runs.
    report, wire = run([rule], with_fields("Subject", [long[1:]]))
    assert report.applied == (1,) and wire.headers.get("Subject") == "aaa"


def test_one_rule_matches_at_most_the_per_rule_budget_in_one_message() -> None:
    # Many values under the per-value cap add up: the attacker splits the text.
    count = 3 * MAX_MATCHED_PER_RULE // MAX_MATCHED_LENGTH
    message = with_fields("X-Internal", ["1" * MAX_MATCHED_LENGTH] * count)
    rule = HeaderRule(A.REWRITE, "X-Internal", pattern=r"(\d+)@", replacement=r"\1")
    manipulator, seen = spied(rule)
    report = manipulator.apply(message, OUT, "carrier")
    assert sum(seen) <= MAX_MATCHED_PER_RULE
    assert len(seen) == MAX_MATCHED_PER_RULE // MAX_MATCHED_LENGTH
    assert report.skipped == (count - len(seen),)
    assert {skip.reason for skip in report.skips} == {SkipReason.TOO_LARGE}


def test_a_request_uri_rewrite_does_not_run_on_a_uri_beyond_the_cap() -> None:
    uri = "sip:" + "1" * 3000 + "@sbc.example.org"
    old_uri = b"sip:+4930123456@sbc.example.org;user=phone"
    message = parse_message(INVITE.replace(old_uri, uri.encode()))
    assert isinstance(message, Request)
    rule = HeaderRule(A.REWRITE, "request-uri", pattern=r"^sip:\d+@", replacement="sip:0@")
    manipulator, seen = spied(rule)
    report = manipulator.apply(message, OUT, "carrier")
    assert seen == []
    assert report.skips == (RuleSkip(0, SkipReason.TOO_LARGE),)
    assert message.raw_uri == uri


def test_a_strip_with_a_pattern_removes_values_it_cannot_afford_to_match() -> None:
    # Fail closed: padding a value past the cap must not carry it past the strip
    # (an inbound "strip Diversion matching our own domain", an outbound "strip
    # X-Internal matching secret"), and the regex never runs on it.
    rule = HeaderRule(A.STRIP, "X-Internal", pattern=r"^secret")
    manipulator, seen = spied(rule)
    message = with_fields("X-Internal", ["public", "secret " + "x" * 8000])
    report = manipulator.apply(message, OUT, "carrier")
    assert seen == [6]
    assert report.applied == (1,)
    assert reparsed(message).headers.fields("X-Internal") == ["public"]


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("a{99999999999}", "the repetition number is too large"),
        ("(" * 500 + ")" * 500, "nested too deeply"),
    ],
)
def test_patterns_re_cannot_compile_are_refused_with_value_error(pattern: str, error: str) -> None:
    # HeaderRule promises ValueError for every invalid rule; re also raises
    # OverflowError and RecursionError (config's regex_problem knows, the rule did not).
    with pytest.raises(ValueError, match=f"header rule strip 'X-A': bad regex .*{error}"):
        HeaderRule(A.STRIP, "X-A", pattern=pattern)


@pytest.mark.parametrize(
    "replacement",
    [
        ";tag=evil",  # a second tag: this parser reads the first, others the last
        ";TAG=evil",
        ";tag=1928301774",  # the same tag twice
    ],
)
def test_a_from_rewrite_may_not_add_a_second_tag(replacement: str) -> None:
    rule = HeaderRule(A.REWRITE, "From", pattern="$", replacement=replacement)
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.TAG_CHANGED),)
    assert wire.headers.get("From") == '"Alice Smith" <sip:alice@198.51.100.9>;tag=1928301774'


def test_a_to_rewrite_may_not_add_a_tag_without_a_value() -> None:
    # A valueless tag reads as "no tag" here, but it is a tag parameter to the peer
    # (RFC 3261 19.3: tag = token, never empty).
    rule = HeaderRule(A.REWRITE, "To", pattern="$", replacement=";tag")
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.TAG_CHANGED),)
    assert wire.headers.get("To") == "<sip:+4930123456@sbc.example.org>"


# --- pinned: correct already, or a design choice ---------------------------------------


def test_a_to_rewrite_may_not_add_an_empty_tag() -> None:
    rule = HeaderRule(A.REWRITE, "To", pattern="$", replacement=";tag=")
    report, _ = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.BAD_ADDRESS),)


def test_a_from_rewrite_may_respell_the_tag_parameter_name() -> None:
    # RFC 3261 7.3.1: parameter names are case-insensitive; the tag is unchanged.
    rule = HeaderRule(A.REWRITE, "From", pattern=";tag=", replacement=";TAG=")
    report, wire = run([rule], invite())
    assert report.applied == (1,) and wire.from_.tag == "1928301774"


@pytest.mark.parametrize(
    "replacement",
    [r"\r\nVia: SIP/2.0/UDP evil", r"a\nb", r"a\0b", r"\x00", "\\\r"],
)
def test_replacement_escapes_that_make_control_characters_are_skipped(replacement: str) -> None:
    # re turns \r, \n, \0 in a replacement into the characters themselves.
    try:
        rule = HeaderRule(A.REWRITE, "Subject", pattern="lunch", replacement=replacement)
    except ValueError:
        return  # refused when made (bad escape): the config does not load
    report, wire = run([rule], invite())
    assert report.skips == (RuleSkip(0, SkipReason.BAD_CHARACTERS),)
    assert wire.headers.get("Subject") == "lunch" and len(wire.vias) == 1


def test_a_capture_of_raw_octets_cannot_become_a_line_break() -> None:
    # Non-UTF-8 octets arrive as surrogate escapes of 0x80..0xFF only: CR and LF are
    # never escaped, so a capture copies the octets back as they came.
    data = INVITE.replace(b"Subject: lunch", b"Subject: \xff\xfe\x85 lunch")
    message = parse_message(data)
    rule = HeaderRule(A.REWRITE, "Subject", pattern=r"^(\S+) (\w+)$", replacement=r"\2 \1")
    report, wire = run([rule], message)
    assert report.applied == (1,)
    assert b"\r\nSubject: lunch \xff\xfe\x85\r\n" in bytes(wire)


def test_a_group_that_did_not_take_part_is_replaced_by_nothing() -> None:
    rule = HeaderRule(A.REWRITE, "Subject", pattern=r"(lunch)|(dinner)", replacement=r"[\2]\1")
    report, wire = run([rule], invite())
    assert report.applied == (1,) and wire.headers.get("Subject") == "[]lunch"


def test_a_rewrite_to_nothing_keeps_an_empty_field() -> None:
    # A design choice: rewrite never removes a field; a strip with a pattern does.
    rule = HeaderRule(A.REWRITE, "Subject", pattern=".*", replacement="")
    report, wire = run([rule], invite())
    assert report.applied == (1,)
    assert wire.headers.fields("Subject") == [""]


def test_a_rule_for_the_long_form_sees_the_compact_form_and_keeps_its_spelling() -> None:
    message = parse_message(
        INVITE.replace(b"From:", b"f:").replace(b"To:", b"t:").replace(b"Subject:", b"s:")
    )
    rules = [
        HeaderRule(A.REWRITE, "FROM", pattern="alice", replacement="bob"),
        HeaderRule(A.REWRITE, "to", pattern=r"\+49", replacement="0"),
        HeaderRule(A.REWRITE, "subject", pattern="lunch", replacement="tea"),
    ]
    report, wire = run(rules, message)
    assert report.applied == (1, 1, 1)
    data = bytes(wire)
    assert b'\r\nf: "Alice Smith" <sip:bob@198.51.100.9>;tag=1928301774\r\n' in data
    assert b"\r\nt: <sip:030123456@sbc.example.org>\r\n" in data
    assert b"\r\ns: tea\r\n" in data


def test_list_headers_are_rewritten_per_line_not_per_value() -> None:
    # A design choice (documented on HeaderRule): an anchored pattern sees the first
    # value of a comma-joined line only.
    message = with_fields("X-Internal", ["a, a", "a"])
    rule = HeaderRule(A.REWRITE, "X-Internal", pattern="^a", replacement="b")
    _, wire = run([rule], message)
    assert wire.headers.fields("X-Internal") == ["b, a", "b"]


def test_rules_never_raise_on_a_response_to_an_unknown_method() -> None:
    options = parse_message(INVITE.replace(b"INVITE", b"FOO-BAR"))
    assert isinstance(options, Request)
    rules = [
        HeaderRule(A.ADD, "X-M", value="${method}"),
        HeaderRule(A.REWRITE, "request-uri", pattern="sip", replacement="sips"),
        HeaderRule(A.REWRITE, "To", pattern="abc123", replacement="x"),
    ]
    report, wire = run(rules, response(options))
    assert report.applied == (1, 0, 0)
    assert report.skips == (RuleSkip(2, SkipReason.TAG_CHANGED),)
    assert wire.headers.get("X-M") == "FOO-BAR"
