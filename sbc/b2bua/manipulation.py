"""Declared header manipulation per realm: keep, strip, add and rewrite rules.

Pure: ``HeaderManipulator.apply(message, direction, realm_name)`` edits a message
the B2BUA is about to send into a realm (OUTBOUND) or has just received from one
(INBOUND) and reports, per rule, how many values it changed and how many changes
it refused. Rules run in order, each on the result of the previous one.

What the rules may not do, whatever the config says:

* Target a header the B2BUA builds itself on each leg (``PROTECTED_HEADERS``):
  Via, Route, Call-ID, CSeq ... (``GENERATED_HEADERS``) and the headers of the
  session timers, reliable provisionals, option tags, body framing and
  subscriptions it runs per leg (``OWNED_HEADERS``: Session-Expires, RSeq,
  Supported, Event ...) are refused when the rule is made. From and To may be
  rewritten (display name, user) but never stripped, added or kept.
* Corrupt the dialog: a From/To rewrite whose result is not an address or whose
  tag differs from the original's (RFC 3261 12.1.1, 19.3: the tags identify the
  dialog) is skipped for that message, as is a Request-URI rewrite whose result is
  not a URI. Skipped changes are counted in the report; the message is left as it
  was for that value.
* Repeat a header that may appear once: RFC 3261 7.3.1 allows several fields of a
  name only for comma-separated lists, so an ADD of a header in
  ``SINGLE_VALUED_HEADERS`` (Subject, User-Agent, Server ...) replaces the fields
  already there (an ADD means "this is the value"; refusing it would only make the
  operator write a strip before it). ``only_if_absent`` still keeps the present one.
* Inject header lines: results with CR, LF or other control characters are skipped
  (RFC 3261 7.3.1: a line break inside a value starts a new header field).
* Make messages explode: at most ``MAX_RULES`` rules, values and results of at
  most ``MAX_VALUE_BYTES``, and no change that would take the message beyond the
  parser's own limits (header count, header section, message size).
* Spend unbounded time: a pattern runs on peer text, and Python's re has no
  timeout. Two bounds:

  - A pattern that repeats a part which itself repeats without bound (``(a+)+$``,
    ``(.*a){20}``, ``(\\w+\\s?)*$``), or repeats without bound a part of varying
    length (``(a{1,2})+$``), is refused when the rule is made
    (``backtracking_problem``): on a crafted value such a pattern tries
    exponentially many ways to split it (~0.3 s for 22 characters, doubling with
    each one more). The inner repetition made possessive (``a++``) or atomic
    (``(?>a+)``) is accepted: the outer one can no longer split what it matched.
  - A rule's regex sees values of at most ``MAX_MATCHED_LENGTH`` characters and
    at most ``MAX_MATCHED_PER_RULE`` in one message; beyond that a rewrite is
    skipped (TOO_LARGE) and a strip with a pattern removes the field unseen (fail
    closed: padding a value must not carry it past the strip). This bounds what
    the check lets through, polynomial patterns such as ``([0-9]+)@`` (~190 ms on
    one 8 KB value, ~4 ms at the cap) or ``.*.*.*=``, and alternatives that
    overlap (``(a|aa)+$``), which the check does not see: only the operator can
    avoid those (anchors, possessive ``++`` or atomic ``(?>...)`` groups).

KEEP rules change no message: ``kept_headers(rules)`` is what the caller unions
with ``Realm.keep_headers`` before copying headers across (topology.py).
"""

from __future__ import annotations

import enum
import logging
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parser  # type: ignore[attr-defined]
from typing import Any, Final

from sbc.b2bua.topology import NEVER_KEPT
from sbc.sip.errors import ParseError
from sbc.sip.headers import Address, header_key, is_token
from sbc.sip.limits import MAX_HEADER_SECTION, MAX_HEADERS, MAX_MESSAGE_SIZE, MAX_URI_LENGTH
from sbc.sip.message import Headers, Request, Response
from sbc.sip.uri import SipUri, Uri, parse_uri

logger = logging.getLogger(__name__)

#: Most rules one realm may declare (KEEP rules included).
MAX_RULES: Final = 64
#: Longest value, pattern, replacement or rewrite result, in UTF-8 bytes.
MAX_VALUE_BYTES: Final = 1_024
#: Longest header name a rule may name.
MAX_NAME_LENGTH: Final = 128
#: Longest value (or Request-URI), in characters, a rule's regex runs on: the cost
#: of a backtracking pattern grows with it. A longer rewrite result is refused anyway.
MAX_MATCHED_LENGTH: Final = MAX_VALUE_BYTES
#: Characters one rule's regex runs on in one message, all values together: the
#: peer could otherwise split its text over many fields under the per-value cap.
MAX_MATCHED_PER_RULE: Final = 4 * MAX_MATCHED_LENGTH

#: The pseudo-header a REWRITE rule names to rewrite a request's Request-URI.
REQUEST_URI: Final = "request-uri"

#: Why of each of ``topology.PER_LEG_HEADERS`` (the B2BUA runs them on each leg),
#: for the error: a rule that strips, adds or rewrites them breaks what they run.
OWNED_HEADERS: Final = {
    "session-expires": "RFC 4028: it runs the session timers of each leg",
    "min-se": "RFC 4028: it runs the session timers of each leg",
    "require": "RFC 3261 8.2.2.3: it negotiates the option tags (100rel, timer) of each leg",
    "supported": "RFC 3261 8.2.2.3: it negotiates the option tags (100rel, timer) of each leg",
    "unsupported": "RFC 3261 8.2.2.3: it negotiates the option tags (100rel, timer) of each leg",
    "rseq": "RFC 3262: it PRACKs reliable provisional responses on each leg",
    "rack": "RFC 3262: it PRACKs reliable provisional responses on each leg",
    "content-encoding": "it rebuilds the body (SDP) of each leg",
    "event": "RFC 6665: it tracks the subscriptions of each leg",
    "subscription-state": "RFC 6665: it tracks the subscriptions of each leg",
    "refer-sub": "RFC 4488: it tracks the subscriptions of each leg",
}

#: Every header a rule may not name (lookup keys); From and To may be rewritten.
PROTECTED_HEADERS: Final = NEVER_KEPT

#: Generated headers a rule may rewrite (never strip, add or keep).
REWRITABLE_GENERATED: Final = frozenset({"from", "to"})

#: Headers that may appear at most once (RFC 3261 7.3.1: only comma-separated lists
#: may repeat; 20 and the extensions' grammars say which are not lists). An ADD of
#: one replaces it. Protected ones are listed too, in case they are ever freed.
SINGLE_VALUED_HEADERS: Final = frozenset(
    {
        # RFC 3261 20
        "call-id", "content-disposition", "content-length", "content-type", "cseq",
        "date", "expires", "from", "max-forwards", "mime-version", "min-expires",
        "organization", "priority", "reply-to", "retry-after", "server", "subject",
        "timestamp", "to", "user-agent",
        # RFC 3262, 3323, 3515, 3891, 3892, 3903, 4028, 4488, 4538, 5393, 6665, 7315
        "rseq", "rack", "privacy", "refer-to", "replaces", "referred-by", "sip-etag",
        "sip-if-match", "session-expires", "min-se", "refer-sub", "target-dialog",
        "max-breadth", "event", "subscription-state", "p-charging-vector",
        "p-called-party-id",
    }
)  # fmt: skip

#: Placeholders an ADD value may contain, as ``${name}`` (``$$`` is a literal ``$``).
PLACEHOLDERS: Final = frozenset({"realm", "method", "direction"})

# RFC 3261 25.1: header values are TEXT-UTF8 and LWS; HTAB is the only control
# character allowed (CR/LF only as folding, which we never produce).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Room left in the header section for the Content-Length line bytes() may add.
_CONTENT_LENGTH_RESERVE: Final = len("Content-Length: 65535\r\n")


class ManipulationAction(enum.Enum):
    """What a rule does to the header it names."""

    KEEP = "keep"
    STRIP = "strip"
    ADD = "add"
    REWRITE = "rewrite"


class Direction(enum.Enum):
    """Which messages a rule applies to, seen from the SBC and the rule's realm."""

    #: Received from the realm, before the B2BUA processes it.
    INBOUND = "inbound"
    #: About to be sent into the realm.
    OUTBOUND = "outbound"


class MessageKind(enum.Enum):
    """Which messages a rule applies to: requests, responses or both."""

    REQUESTS = "requests"
    RESPONSES = "responses"
    BOTH = "both"

    def covers(self, message: Request | Response) -> bool:
        if self is MessageKind.BOTH:
            return True
        return (self is MessageKind.REQUESTS) == isinstance(message, Request)


class SkipReason(enum.Enum):
    """Why a rule's change to one value was refused."""

    TOO_LARGE = "too-large"
    BAD_CHARACTERS = "bad-characters"
    BAD_ADDRESS = "bad-address"
    TAG_CHANGED = "tag-changed"
    BAD_URI = "bad-uri"
    MESSAGE_FULL = "message-full"


def _utf8_length(text: str) -> int:
    """Bytes of ``text`` on the wire, or a few more; never raises.

    bytes(message) encodes with surrogateescape (one byte per escaped octet); a
    surrogate counted here as three bytes only makes the caps stricter.
    """
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _encodable(text: str) -> bool:
    """True when bytes(message) can encode ``text`` (no lone surrogates but escapes)."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(what: str, text: str) -> None:
    """Refuse config text that could never go on the wire as one header value."""
    if not _encodable(text):
        raise ValueError(f"{what} is not encodable as UTF-8")
    size = _utf8_length(text)
    if size > MAX_VALUE_BYTES:
        raise ValueError(f"{what} has {size} bytes, more than {MAX_VALUE_BYTES}")


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A validated rule with its regex and value template, ready to run."""

    rule: HeaderRule
    key: str
    regex: re.Pattern[str] | None = None
    template: string.Template | None = None


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """One declared manipulation of one header (or of the Request-URI).

    * KEEP: ``header`` may cross into the realm (extends its keep-list).
    * STRIP: remove every field of ``header``; with ``pattern``, only the fields
      whose value it matches (``re.search``) or is too long to match.
    * ADD: add a field ``header: value``; ``value`` may contain ``${realm}``,
      ``${method}`` and ``${direction}``. With ``only_if_absent`` nothing is added
      when the header is already there.
    * REWRITE: ``re.sub(pattern, replacement, field)`` on each field of ``header``
      (one header line each, list headers are not split), the first match only
      unless ``all_matches``. ``replacement`` takes ``\\1`` and ``\\g<name>``.
      ``header`` may be ``request-uri`` (requests only).

    ``messages`` limits the rule to requests or responses (default both) and
    ``methods`` to those methods (empty: all); a response counts as its CSeq
    method. Invalid rules raise ValueError when made.
    """

    action: ManipulationAction
    header: str
    direction: Direction = Direction.OUTBOUND
    methods: frozenset[str] = field(default_factory=frozenset)
    value: str | None = None
    pattern: str | None = None
    replacement: str | None = None
    all_matches: bool = False
    only_if_absent: bool = False
    messages: MessageKind = MessageKind.BOTH

    def __post_init__(self) -> None:
        self.compile()

    @classmethod
    def build(
        cls,
        action: str | ManipulationAction,
        header: str,
        *,
        direction: str | Direction = Direction.OUTBOUND,
        methods: Iterable[str] = (),
        value: str | None = None,
        pattern: str | None = None,
        replacement: str | None = None,
        all_matches: bool = False,
        only_if_absent: bool = False,
        messages: str | MessageKind = MessageKind.BOTH,
    ) -> HeaderRule:
        """A rule from config text: names of actions, directions and message kinds,
        any-case methods."""
        try:
            action = ManipulationAction(action.lower() if isinstance(action, str) else action)
        except ValueError:
            known = ", ".join(a.value for a in ManipulationAction)
            raise ValueError(f"header rule: unknown action {action!r} (one of {known})") from None
        try:
            direction = Direction(direction.lower() if isinstance(direction, str) else direction)
        except ValueError:
            known = ", ".join(d.value for d in Direction)
            raise ValueError(
                f"header rule: unknown direction {direction!r} (one of {known})"
            ) from None
        try:
            messages = MessageKind(messages.lower() if isinstance(messages, str) else messages)
        except ValueError:
            known = ", ".join(k.value for k in MessageKind)
            raise ValueError(
                f"header rule: unknown messages {messages!r} (one of {known})"
            ) from None
        return cls(
            action,
            header,
            direction,
            frozenset(m.upper() for m in methods),
            value,
            pattern,
            replacement,
            all_matches,
            only_if_absent,
            messages,
        )

    def __str__(self) -> str:
        kind = "" if self.messages is MessageKind.BOTH else f" {self.messages.value}"
        return f"{self.action.value} {self.header} ({self.direction.value}{kind})"

    def compile(self) -> CompiledRule:
        """Validate the rule; ValueError says what is wrong and names the header."""
        action = self.action
        if not isinstance(action, ManipulationAction):
            raise ValueError(f"header rule: action {action!r} is not a ManipulationAction")
        what = f"header rule {action.value} {self.header!r}"
        if not isinstance(self.direction, Direction):
            raise ValueError(f"{what}: direction {self.direction!r} is not a Direction")
        if not isinstance(self.messages, MessageKind):
            raise ValueError(f"{what}: messages {self.messages!r} is not a MessageKind")
        if not self.header or len(self.header) > MAX_NAME_LENGTH or not is_token(self.header):
            raise ValueError(f"{what}: not a header name (a token of 1..{MAX_NAME_LENGTH})")
        key = header_key(self.header)
        self._check_target(what, key)
        for method in self.methods:
            if not isinstance(method, str) or not is_token(method):
                raise ValueError(f"{what}: {method!r} is not a SIP method")
        self._check_fields(what)
        if action is ManipulationAction.ADD:
            assert self.value is not None
            return CompiledRule(self, key, template=_value_template(what, self.value))
        if self.pattern is None:
            return CompiledRule(self, key)
        _check_text(f"{what}: pattern", self.pattern)
        try:
            regex = re.compile(self.pattern)
        except (re.error, OverflowError) as exc:
            # OverflowError: a{99999999999}.
            raise ValueError(f"{what}: bad regex {self.pattern!r}: {exc}") from None
        except RecursionError:
            # A few hundred nested groups exhaust the stack of re's parser.
            raise ValueError(f"{what}: bad regex {self.pattern!r}: nested too deeply") from None
        problem = backtracking_problem(self.pattern)
        if problem is not None:
            raise ValueError(f"{what}: {problem}")
        if self.replacement is not None:
            _check_text(f"{what}: replacement", self.replacement)
            try:
                # re compiles the replacement template before searching, so this
                # catches \3 with two groups and \g<unknown> without a match.
                regex.sub(self.replacement, "")
            except (re.error, IndexError) as exc:
                raise ValueError(f"{what}: bad replacement {self.replacement!r}: {exc}") from None
        return CompiledRule(self, key, regex=regex)

    def _check_target(self, what: str, key: str) -> None:
        action = self.action
        if key == REQUEST_URI:
            if action is not ManipulationAction.REWRITE:
                raise ValueError(f"{what}: the Request-URI can only be rewritten")
            if self.messages is MessageKind.RESPONSES:
                raise ValueError(f"{what}: a response has no Request-URI")
            return
        if key in PROTECTED_HEADERS and not (
            action is ManipulationAction.REWRITE and key in REWRITABLE_GENERATED
        ):
            if key in REWRITABLE_GENERATED:
                allowed = " (it may only be rewritten)"
            elif key in OWNED_HEADERS:
                allowed = f" ({OWNED_HEADERS[key]})"
            else:
                allowed = ""
            raise ValueError(
                f"{what}: {self.header} is built by the B2BUA itself and cannot be "
                f"{_PAST[action]}{allowed}"
            )

    def _check_fields(self, what: str) -> None:
        action = self.action
        given = {
            "value": self.value is not None,
            "pattern": self.pattern is not None,
            "replacement": self.replacement is not None,
            "all_matches": self.all_matches,
            "only_if_absent": self.only_if_absent,
            "methods": bool(self.methods),
            "messages": self.messages is not MessageKind.BOTH,
        }
        allowed = _ALLOWED_FIELDS[action]
        extra = [name for name, present in given.items() if present and name not in allowed]
        if extra:
            raise ValueError(f"{what}: {', '.join(extra)} not allowed with {action.value}")
        if action is ManipulationAction.KEEP and self.direction is not Direction.OUTBOUND:
            raise ValueError(f"{what}: a keep-list applies to what is sent into the realm")
        if action is ManipulationAction.ADD and self.value is None:
            raise ValueError(f"{what}: add needs a value")
        if action is ManipulationAction.REWRITE:
            if self.pattern is None:
                raise ValueError(f"{what}: rewrite needs a pattern")
            if self.replacement is None:
                raise ValueError(f"{what}: rewrite needs a replacement")


_PAST: Final = {
    ManipulationAction.KEEP: "kept",
    ManipulationAction.STRIP: "stripped",
    ManipulationAction.ADD: "added",
    ManipulationAction.REWRITE: "rewritten",
}

_ALLOWED_FIELDS: Final = {
    ManipulationAction.KEEP: frozenset(),
    ManipulationAction.STRIP: frozenset({"pattern", "methods", "messages"}),
    ManipulationAction.ADD: frozenset({"value", "only_if_absent", "methods", "messages"}),
    ManipulationAction.REWRITE: frozenset(
        {"pattern", "replacement", "all_matches", "methods", "messages"}
    ),
}


def _value_template(what: str, value: str) -> string.Template:
    _check_text(f"{what}: value", value)
    if _CONTROL.search(value):
        raise ValueError(f"{what}: value contains control characters (CR, LF ...)")
    template = string.Template(value)
    if not template.is_valid():
        raise ValueError(f"{what}: bad placeholder in value {value!r} (write $$ for a '$')")
    unknown = sorted(set(template.get_identifiers()) - PLACEHOLDERS)
    if unknown:
        known = ", ".join(f"${{{name}}}" for name in sorted(PLACEHOLDERS))
        raise ValueError(f"{what}: unknown placeholder ${{{unknown[0]}}} (known: {known})")
    return template


_REPEATS: Final = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT)
_ATOMIC: Final = (sre_constants.POSSESSIVE_REPEAT, sre_constants.ATOMIC_GROUP)
_UNBOUNDED: Final[int] = sre_constants.MAXREPEAT


def backtracking_problem(pattern: str) -> str | None:
    """Why ``pattern`` can backtrack exponentially on a crafted value, or None.

    Reads re's own parse of the pattern (``re._parser``, Python 3.11) rather than
    its text: a repetition (more than once) of a part that itself repeats without
    bound (``(a+)+``, ``(.*a){20}``), or an unbounded repetition of a part that
    repeats a varying number of times (``(a{1,2})+``). On a value that almost
    matches, re tries every way of splitting it between the two. A possessive
    (``a++``) or atomic (``(?>a+)``) inner repetition cannot be split again and is
    fine; anything inside an atomic group still backtracks until the group matches.
    A pattern re cannot compile is None here: ``re.compile`` says why.
    """
    try:
        parsed = sre_parser.parse(pattern)
        found = _nested_repeat(parsed.data)
    except (re.error, OverflowError):
        return None
    except RecursionError:
        return f"pattern {pattern!r} is nested too deeply to check"
    if found is None:
        return None
    return (
        f"pattern {pattern!r} {found}, so a crafted value makes it backtrack exponentially"
        " (re has no timeout): make the inner repetition possessive (a++, a{1,3}+) or"
        " atomic ((?>...)), or write it without nesting"
    )


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns of one parsed item (each a sequence of items)."""
    if op is sre_constants.SUBPATTERN:
        return [av[3]]
    if op is sre_constants.BRANCH:
        return list(av[1])
    if op is sre_constants.ATOMIC_GROUP:
        return [av]
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op is sre_constants.GROUPREF_EXISTS:
        return [part for part in av[1:] if part is not None]
    if op in _REPEATS or op is sre_constants.POSSESSIVE_REPEAT:
        return [av[2]]
    return []


def _nested_repeat(items: Any) -> str | None:
    """What makes a parsed pattern backtrack exponentially, or None."""
    for op, av in items:
        if op in _REPEATS or op is sre_constants.POSSESSIVE_REPEAT:
            _, high, body = av
            # An outer repetition that may stop anywhere splits any varying inner
            # one; a bounded one (n times) multiplies only unbounded ones (n**k).
            if high > 1 and _inner_repeat(body, varying=high == _UNBOUNDED):
                if high == _UNBOUNDED and not _inner_repeat(body, varying=False):
                    return "repeats without bound a part that repeats a varying number of times"
                return "repeats a part that itself repeats without bound"
        for child in _children(op, av):
            found = _nested_repeat(child)
            if found is not None:
                return found
    return None


def _inner_repeat(items: Any, *, varying: bool) -> bool:
    """Whether ``items`` hold a repetition the enclosing one can split: unbounded,
    or (``varying``) of any varying count; possessive and atomic parts cannot be."""
    for op, av in items:
        if op in _ATOMIC:
            continue
        if op in _REPEATS:
            low, high, _ = av
            if high == _UNBOUNDED or (varying and low != high):
                return True
        if any(_inner_repeat(child, varying=varying) for child in _children(op, av)):
            return True
    return False


def kept_headers(rules: Iterable[HeaderRule]) -> frozenset[str]:
    """Lookup keys of the headers KEEP rules let in; union with ``Realm.keep_headers``."""
    return frozenset(
        header_key(rule.header) for rule in rules if rule.action is ManipulationAction.KEEP
    )


@dataclass(frozen=True, slots=True)
class RuleSkip:
    """One refused change: the rule's index and why."""

    rule: int
    reason: SkipReason


@dataclass(frozen=True, slots=True)
class ManipulationReport:
    """What ``apply`` did, indexed like the rules.

    ``applied[i]``: values rule ``i`` rewrote, added or removed (the Request-URI
    counts as one value); ``skipped[i]``: changes it computed but refused, each
    listed with its reason in ``skips``.
    """

    applied: tuple[int, ...]
    skipped: tuple[int, ...]
    skips: tuple[RuleSkip, ...] = ()

    @property
    def changed(self) -> bool:
        return any(self.applied)


class _Budget:
    """Header fields and header-section bytes left before the parser's limits."""

    __slots__ = ("fields", "size")

    def __init__(self, message: Request | Response) -> None:
        headers = message.headers
        has_length = "content-length" in headers
        reserve = 0 if has_length else _CONTENT_LENGTH_RESERVE
        used = _utf8_length(message.start_line()) + 2 + reserve
        used += sum(_field_size(name, value) for name, value in headers)
        # RFC 3261 18.1.1 / limits.py: the whole message must stay parseable.
        limit = min(MAX_HEADER_SECTION, MAX_MESSAGE_SIZE - 4 - len(message.body))
        self.size = limit - used
        self.fields = MAX_HEADERS - len(headers) - (0 if has_length else 1)

    def allows(self, grow: int, fields: int = 0) -> bool:
        return grow <= max(self.size, 0) and fields <= self.fields

    def spend(self, grow: int, fields: int = 0) -> None:
        self.size -= grow
        self.fields -= fields


def _field_size(name: str, value: str) -> int:
    return _utf8_length(name) + _utf8_length(value) + 4


def _clean(text: str) -> tuple[str, SkipReason | None]:
    """A result as the parser would read it back, or why it cannot go on the wire."""
    text = text.strip(" \t")
    if _utf8_length(text) > MAX_VALUE_BYTES:
        return text, SkipReason.TOO_LARGE
    if _CONTROL.search(text) or not _encodable(text):
        return text, SkipReason.BAD_CHARACTERS
    return text, None


class HeaderManipulator:
    """A realm's rules, in order; ``apply`` runs them on one message.

    ``apply`` edits the message in place; a rewrite, a strip with a pattern or an
    add that replaces a single-valued header puts a rebuilt ``Headers`` in
    ``message.headers`` (every other field keeps its
    place and spelling), so callers must not hold on to the old ``headers`` object.
    """

    def __init__(self, rules: Sequence[HeaderRule] = ()) -> None:
        if len(rules) > MAX_RULES:
            raise ValueError(f"{len(rules)} header rules, more than {MAX_RULES} per realm")
        self.rules = tuple(rules)
        self._compiled = tuple(rule.compile() for rule in self.rules)

    def kept_headers(self) -> frozenset[str]:
        """The headers this realm's KEEP rules let in."""
        return kept_headers(self.rules)

    def apply(
        self, message: Request | Response, direction: Direction, realm_name: str
    ) -> ManipulationReport:
        """Run every rule for ``direction`` on ``message``, in order; never raises."""
        count = len(self._compiled)
        applied = [0] * count
        skipped = [0] * count
        skips: list[RuleSkip] = []
        method = _method(message)
        budget: _Budget | None = None
        for index, compiled in enumerate(self._compiled):
            rule = compiled.rule
            if rule.action is ManipulationAction.KEEP or rule.direction is not direction:
                continue
            if not rule.messages.covers(message):
                continue
            if rule.methods and method not in rule.methods:
                continue
            if budget is None:
                budget = _Budget(message)
            run = _Run(message, compiled, budget, realm_name, direction, method)
            run.execute()
            applied[index] = run.applied
            skipped[index] = len(run.skips)
            for reason in run.skips:
                skips.append(RuleSkip(index, reason))
                logger.debug(
                    "x %s: header rule %d (%s) skipped: %s", realm_name, index, rule, reason.value
                )
            if run.applied:
                message.invalidate()
        return ManipulationReport(tuple(applied), tuple(skipped), tuple(skips))


def _method(message: Request | Response) -> str | None:
    if isinstance(message, Request):
        return message.method
    try:
        return message.cseq.method
    except ParseError:
        return None


class _Run:
    """One rule on one message: the changes made and the ones refused."""

    __slots__ = (
        "applied",
        "budget",
        "compiled",
        "direction",
        "matchable",
        "message",
        "method",
        "realm",
        "skips",
    )

    def __init__(
        self,
        message: Request | Response,
        compiled: CompiledRule,
        budget: _Budget,
        realm: str,
        direction: Direction,
        method: str | None,
    ) -> None:
        self.message = message
        self.compiled = compiled
        self.budget = budget
        self.realm = realm
        self.direction = direction
        self.method = method
        self.applied = 0
        self.skips: list[SkipReason] = []
        self.matchable = MAX_MATCHED_PER_RULE

    def _affordable(self, text: str) -> bool:
        """Whether the rule's regex may run on ``text``; counts it against the budget."""
        size = len(text)
        if size > MAX_MATCHED_LENGTH or size > self.matchable:
            return False
        self.matchable -= size
        return True

    def execute(self) -> None:
        action = self.compiled.rule.action
        if action is ManipulationAction.STRIP:
            self._strip()
        elif action is ManipulationAction.ADD:
            self._add()
        elif self.compiled.key == REQUEST_URI:
            self._rewrite_uri()
        else:
            self._rewrite_fields()

    def _strip(self) -> None:
        headers = self.message.headers
        key = self.compiled.key
        regex = self.compiled.regex
        if regex is None:
            removed = [(n, v) for n, v in headers if header_key(n) == key]
            if removed:
                headers.remove(key)
        else:
            kept: list[tuple[str, str]] = []
            removed = []
            for name, value in headers:
                # Fail closed: a value too long to match is removed unseen.
                matches = header_key(name) == key and (
                    not self._affordable(value) or regex.search(value) is not None
                )
                (removed if matches else kept).append((name, value))
            if removed:
                self.message.headers = Headers(kept)
        for name, value in removed:
            self.budget.spend(-_field_size(name, value), -1)
        self.applied = len(removed)

    def _add(self) -> None:
        rule = self.compiled.rule
        headers = self.message.headers
        if rule.only_if_absent and self.compiled.key in headers:
            return
        assert self.compiled.template is not None
        value, reason = _clean(
            self.compiled.template.substitute(
                realm=self.realm, method=self.method or "", direction=self.direction.value
            )
        )
        if reason is None and not self.budget.allows(_field_size(rule.header, value), 1):
            reason = SkipReason.MESSAGE_FULL
        if reason is not None:
            self.skips.append(reason)
            return
        if self.compiled.key in SINGLE_VALUED_HEADERS and self.compiled.key in headers:
            self._replace(value)
            return
        headers.add(rule.header, value)
        self.budget.spend(_field_size(rule.header, value), 1)
        self.applied = 1

    def _replace(self, value: str) -> None:
        """ADD of a header that may appear once (RFC 3261 7.3.1): the new field takes
        the place of the first present one, and every other one goes."""
        rule = self.compiled.rule
        key = self.compiled.key
        added = (rule.header, value)
        fields: list[tuple[str, str]] = []
        removed: list[tuple[str, str]] = []
        for name, old in self.message.headers:
            if header_key(name) != key:
                fields.append((name, old))
                continue
            if not removed:
                fields.append(added)
            removed.append((name, old))
        grow = _field_size(*added) - sum(_field_size(name, old) for name, old in removed)
        if not self.budget.allows(grow, 1 - len(removed)):
            self.skips.append(SkipReason.MESSAGE_FULL)
            return
        self.message.headers = Headers(fields)
        self.budget.spend(grow, 1 - len(removed))
        self.applied = 1

    def _substitute(self, text: str) -> str:
        rule = self.compiled.rule
        assert self.compiled.regex is not None and rule.replacement is not None
        return self.compiled.regex.sub(rule.replacement, text, count=0 if rule.all_matches else 1)

    def _rewrite_fields(self) -> None:
        key = self.compiled.key
        fields = list(self.message.headers)
        changed = False
        for position, (name, value) in enumerate(fields):
            if header_key(name) != key:
                continue
            if not self._affordable(value):
                self.skips.append(SkipReason.TOO_LARGE)
                continue
            result = self._substitute(value)
            if result == value:
                continue
            result, reason = _clean(result)
            if reason is None and result == value:
                continue
            if reason is None and key in REWRITABLE_GENERATED:
                reason = _dialog_safe(name, value, result)
            grow = _utf8_length(result) - _utf8_length(value) if reason is None else 0
            if reason is None and not self.budget.allows(grow):
                reason = SkipReason.MESSAGE_FULL
            if reason is not None:
                self.skips.append(reason)
                continue
            fields[position] = (name, result)
            self.budget.spend(grow)
            self.applied += 1
            changed = True
        if changed:
            # Rebuilt rather than set(): every field keeps its place and its name.
            self.message.headers = Headers(fields)

    def _rewrite_uri(self) -> None:
        request = self.message
        if not isinstance(request, Request):
            return
        old = request.raw_uri
        if not self._affordable(old):
            self.skips.append(SkipReason.TOO_LARGE)
            return
        result, reason = _clean(self._substitute(old))
        if result == old:
            return
        parsed = _request_uri(result) if reason is None else None
        if reason is None and parsed is None:
            reason = SkipReason.BAD_URI
        grow = _utf8_length(result) - _utf8_length(old)
        if reason is None and not self.budget.allows(grow):
            reason = SkipReason.MESSAGE_FULL
        if reason is not None or parsed is None:
            self.skips.append(reason or SkipReason.BAD_URI)
            return
        request.uri = parsed
        # The setter writes str(parsed); keep the text exactly as the rule made it.
        request.raw_uri = result
        self.budget.spend(grow)
        self.applied = 1


def _dialog_safe(name: str, old: str, new: str) -> SkipReason | None:
    """None when a From/To rewrite keeps an address with the same tag (RFC 3261 12)."""
    try:
        before = Address.parse(old, name)
    except ParseError:
        return SkipReason.BAD_ADDRESS
    try:
        after = Address.parse(new, name)
    except ParseError:
        return SkipReason.BAD_ADDRESS
    # Every tag parameter, not just the first one this parser reads: a second (or a
    # valueless) tag is read differently by other parsers.
    return None if _tags(after) == _tags(before) else SkipReason.TAG_CHANGED


def _tags(address: Address) -> list[str | None]:
    return [value for name, value in address.params if name.lower() == "tag"]


def _request_uri(text: str) -> Uri | None:
    """The parsed Request-URI, or None when the parser would refuse it."""
    if not text or len(text) > MAX_URI_LENGTH or " " in text or "\t" in text:
        return None
    try:
        uri = parse_uri(text)
    except ParseError:
        return None
    # RFC 3261 19.1.1: no headers in a Request-URI (the parser answers 400).
    if isinstance(uri, SipUri) and uri.headers:
        return None
    return uri
