"""Configuration of the B2BUA: realms, routes, trunks, registrar, call limits, media, CDRs.

Loader-compatible sections (``sbc.config.schema``'s ``Section`` and ``spec()``); the
root ``Config`` holds them. Durations are whole seconds unless a field says otherwise.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sbc.b2bua.srtp import SrtpPolicy
from sbc.config.schema import (
    PORT_SPEC_EXPECT,
    IPAddress,
    IPNetwork,
    Issue,
    Section,
    SipListener,
    Transport,
    key_path,
    spec,
)
from sbc.sip.errors import ParseError
from sbc.sip.uri import format_host, parse_host

if TYPE_CHECKING:
    from sbc.b2bua.manipulation import HeaderRule

#: A header name as written in a keep-list or a rule (RFC 3261 25.1 token).
HEADER_NAME_PATTERN: Final = r"[A-Za-z0-9\-.!%*_+`'~]{1,64}"

#: A realm, route or trunk name: what logs, metrics and the UI show.
NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}"
#: An RTP encoding name (RFC 4855 3: a media subtype name, e.g. telephone-event).
_ENCODING_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&.+\-^_]{0,63}")

#: A SIP method name (RFC 3261 25.1 token, upper case by convention).
METHOD_PATTERN: Final = r"[A-Z][A-Z\-]{0,31}"

#: A host name or IP literal (brackets allowed for IPv6).
HOST_PATTERN: Final = r"[A-Za-z0-9.:\-\[\]]{1,253}"

_BROADCAST: Final = IPv4Address("255.255.255.255")

#: Headers a realm lets through by default: end-to-end information that names no host.
DEFAULT_KEEP_HEADERS: Final = ("Subject", "Priority", "Accept-Language", "Alert-Info")

#: Highest admission limits of a realm or trunk, checked at load time: concurrent
#: calls (as many as sip.max_connections allows connections), new calls per second
#: (more than one SBC sets up), and calls at once above the rate.
MAX_ADMISSION_CALLS: Final = 1_000_000
MAX_CALLS_PER_SECOND: Final = 100_000
MAX_ADMISSION_BURST: Final = 1_000_000

#: Methods that may require digest authentication in a realm.
AUTH_METHODS: Final = frozenset(
    {"REGISTER", "INVITE", "MESSAGE", "SUBSCRIBE", "PUBLISH", "OPTIONS", "REFER"}
)


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` does not compile, or None when it does.

    Besides re.error, re raises OverflowError (a{99999999999}) and RecursionError
    (a few hundred nested groups); all three are a bad pattern, not a crash.
    """
    try:
        re.compile(pattern)
    except (re.error, OverflowError) as exc:
        return f"bad regular expression: {exc}"
    except RecursionError:
        return "bad regular expression: nested too deeply"
    return None


def unicast_problem(address: IPAddress) -> str | None:
    """Why `address` cannot be a media address or a peer, or None when it can: the
    transport sends nothing to these, and SDP c=0.0.0.0 means hold."""
    if address.is_unspecified or address.is_multicast or address == _BROADCAST:
        return f"{address} is not a unicast address"
    return None


def host_problem(host: str) -> str | None:
    """Why `host` is no SIP host (RFC 3261 25.1: a name, an IPv4 address or an IPv6
    reference; a bare IPv6 address too), or None when it is one."""
    try:
        parse_host(format_host(host))
    except ParseError:
        return f"expected a host name or IP address, got {host!r}"
    return None


def _host_issues(path: str, hosts: Iterable[tuple[str, str | None]]) -> Iterator[Issue]:
    for key, host in hosts:
        problem = None if host is None else host_problem(host)
        if problem is not None:
            yield key_path(path, key), problem


class DigestAlgorithmName(enum.StrEnum):
    MD5 = "MD5"
    SHA_256 = "SHA-256"


class RouteAction(enum.StrEnum):
    #: To a trunk: a named trunk (gateways) or a static peer (host, port, transport).
    TRUNK = "trunk"
    #: To every contact registered for the Request-URI user (parallel forking).
    REGISTERED = "registered"
    REJECT = "reject"


class ReferPolicy(enum.StrEnum):
    #: Relay REFER to the other leg with Refer-To rewritten.
    RELAY = "relay"
    #: Answer 403.
    REJECT = "reject"


class KeepaliveMethod(enum.StrEnum):
    #: CRLFCRLF (RFC 5626 4.4.1): keeps the NAT mapping, tells nothing back.
    CRLF = "crlf"
    #: OPTIONS: keeps the mapping, and a phone that leaves keepalive_failures in a
    #: row unanswered has its bindings removed.
    OPTIONS = "options"


class OptionsPolicy(enum.StrEnum):
    #: Out-of-dialog OPTIONS answered by the SBC itself (keepalive pings).
    LOCAL = "local"
    #: Routed like a call, so the far end answers.
    RELAY = "relay"


@dataclass(frozen=True)
class AdmissionLimits(Section):
    """Concurrent calls and calls per second; null = no limit."""

    max_calls: int | None = field(
        default=None,
        metadata=spec("Concurrent calls at most; null = no limit.", min=1, max=MAX_ADMISSION_CALLS),
    )
    calls_per_second: float | None = field(
        default=None,
        metadata=spec("New calls per second; null = no limit.", min=0.01, max=MAX_CALLS_PER_SECOND),
    )
    burst: int | None = field(
        default=None,
        metadata=spec(
            "New calls at once above the rate; null = the rate rounded up.",
            min=1,
            max=MAX_ADMISSION_BURST,
        ),
    )

    def check(self, path: str) -> Iterator[Issue]:
        # The admission control refuses a burst without a rate when the SBC starts.
        if self.burst is not None and self.calls_per_second is None:
            yield key_path(path, "burst"), "needs calls_per_second"


class HeaderAction(enum.StrEnum):
    KEEP = "keep"
    STRIP = "strip"
    ADD = "add"
    REWRITE = "rewrite"


class HeaderDirection(enum.StrEnum):
    #: Messages received from the realm, before the B2BUA looks at them.
    INBOUND = "inbound"
    #: Messages the B2BUA sends into the realm, last thing before the wire.
    OUTBOUND = "outbound"


class HeaderMessages(enum.StrEnum):
    """Which messages a header rule applies to (a response counts as its CSeq method)."""

    REQUESTS = "requests"
    RESPONSES = "responses"
    BOTH = "both"


@dataclass(frozen=True)
class HeaderRuleConfig(Section):
    """One header manipulation rule of a realm; rules run in order."""

    action: HeaderAction = field(metadata=spec("keep, strip, add or rewrite."))
    header: str = field(
        metadata=spec("Header name; rewrite also takes request-uri.", pattern=HEADER_NAME_PATTERN)
    )
    direction: HeaderDirection = field(
        default=HeaderDirection.OUTBOUND, metadata=spec("inbound or outbound.")
    )
    messages: HeaderMessages = field(
        default=HeaderMessages.BOTH, metadata=spec("requests, responses or both.")
    )
    methods: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            "Methods it applies to (responses: by CSeq); empty = all.", pattern=METHOD_PATTERN
        ),
    )
    value: str | None = field(
        default=None,
        metadata=spec(
            "add: the value (${realm} expands); a header that may appear once (Subject,"
            " User-Agent, Server ...) is replaced, not repeated."
        ),
    )
    pattern: str | None = field(
        default=None,
        metadata=spec(
            "rewrite/strip: a regular expression; it sees values of at most 1024"
            " characters (a longer one is not rewritten, and stripped unseen). Nested"
            " repetition such as (a+)+ or (.*a){20} is refused (it backtracks"
            " exponentially); make the inner one possessive (a++) or atomic ((?>a+))."
        ),
    )
    replacement: str = field(
        default="", metadata=spec(r"rewrite: the replacement, \1 or \g<name> for captures.")
    )
    all_matches: bool = field(default=False, metadata=spec("rewrite: every match, not the first."))
    only_if_absent: bool = field(default=False, metadata=spec("add: only when not present."))

    def check(self, path: str) -> Iterator[Issue]:
        if self.action is HeaderAction.ADD and self.value is None:
            yield key_path(path, "value"), "add needs a value"
            return
        if self.action is HeaderAction.REWRITE and self.pattern is None:
            yield key_path(path, "pattern"), "rewrite needs a pattern"
            return
        from sbc.b2bua.manipulation import backtracking_problem

        if self.pattern is not None:
            problem = regex_problem(self.pattern) or backtracking_problem(self.pattern)
            if problem is not None:
                yield key_path(path, "pattern"), problem
                return
        # The rule as the B2BUA will run it: protected headers, regex and template
        # errors are refused here, with the file and line, not when the SBC starts.
        try:
            self.rule()
        except ValueError as exc:
            yield path, str(exc)

    def rule(self) -> HeaderRule:
        """The rule as the B2BUA runs it; ValueError when it is invalid."""
        from sbc.b2bua.manipulation import HeaderRule

        return HeaderRule.build(
            self.action.value,
            self.header,
            direction=self.direction.value,
            methods=self.methods,
            value=self.value,
            pattern=self.pattern,
            replacement=self.replacement if self.action is HeaderAction.REWRITE else None,
            all_matches=self.all_matches,
            only_if_absent=self.only_if_absent,
            messages=self.messages.value,
        )


@dataclass(frozen=True)
class RegisterRelayConfig(Section):
    """REGISTERs of this realm relayed to an inside registrar, refreshes cached."""

    realm: str = field(metadata=spec("The realm the upstream registrar is reached through."))
    host: IPAddress = field(metadata=spec("The upstream registrar's address."))
    port: int = field(
        default=5060,
        metadata=spec("The upstream's port.", min=1, max=65535, expect=PORT_SPEC_EXPECT),
    )
    transport: Transport = field(default=Transport.UDP, metadata=spec("udp, tcp or tls."))
    domain: str | None = field(
        default=None,
        metadata=spec(
            "Host of the AORs upstream; null = the upstream's address.", pattern=HOST_PATTERN
        ),
    )
    upstream_expires: int = field(
        default=3600,
        metadata=spec(
            "Interval asked of the upstream (it sees a refresh per half).", min=60, max=86400
        ),
    )
    phone_expires: int = field(
        default=300,
        metadata=spec(
            "Most a phone is granted; its refreshes are answered here.", min=30, max=86400
        ),
    )
    max_contacts: int = field(
        default=10,
        metadata=spec("Contacts per user; a new one beyond gets 503.", min=1, max=1000),
    )

    def check(self, path: str) -> Iterator[Issue]:
        problem = unicast_problem(self.host)
        if problem is not None:
            yield key_path(path, "host"), problem
        yield from _host_issues(path, [("domain", self.domain)])


@dataclass(frozen=True)
class RealmConfig(Section):
    """A named group of SIP listeners with its media address and policy."""

    name: str = field(metadata=spec("Realm name, used by routes.", pattern=NAME_PATTERN))
    listen: tuple[SipListener, ...] = field(
        metadata=spec("SIP listeners of this realm.", min_items=1)
    )
    media_address: IPAddress = field(
        metadata=spec("Address the media relay uses in this realm (SDP c=).")
    )
    keep_headers: tuple[str, ...] = field(
        default=DEFAULT_KEEP_HEADERS,
        metadata=spec(
            "Headers copied into this realm from the other leg; all others are dropped,"
            " except those a method needs (Event, Subscription-State, SIP-ETag ...) and"
            " the capability lists (Allow, Accept, Supported ...) of error answers and"
            " relayed OPTIONS answers. Headers the SBC builds or runs per leg (Via,"
            " Contact, Session-Expires, Supported, RSeq, Event ...) are never copied.",
            pattern=HEADER_NAME_PATTERN,
        ),
    )
    registrar: bool = field(
        default=False, metadata=spec("REGISTERs arriving here go to the embedded registrar.")
    )
    register_relay: RegisterRelayConfig | None = field(
        default=None,
        metadata=spec("REGISTERs arriving here are relayed to an inside registrar."),
    )
    authenticate: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            "Methods that need digest credentials of a registrar user here (e.g. INVITE).",
            pattern=METHOD_PATTERN,
        ),
    )
    limits: AdmissionLimits = field(
        default_factory=AdmissionLimits, metadata=spec("Admission limits of calls in this realm.")
    )
    registers_per_second: float | None = field(
        default=None,
        metadata=spec(
            "REGISTERs a second the registrar or relay of this realm takes (one second's"
            " worth at once); above, 503 with a Retry-After of 10-60 s drawn at random,"
            " so a registration storm comes back spread out. A digest registration is"
            " two REGISTERs; the one answering the embedded registrar's challenge is"
            " let through up to one second's worth of debt. null = no limit.",
            min=0.1,
            max=100_000,
        ),
    )
    header_rules: tuple[HeaderRuleConfig, ...] = field(
        default=(), metadata=spec("Header manipulation, in order.")
    )
    refer: ReferPolicy = field(
        default=ReferPolicy.REJECT, metadata=spec("REFER from this realm: relay or reject.")
    )
    options: OptionsPolicy = field(
        default=OptionsPolicy.LOCAL,
        metadata=spec("Out-of-dialog OPTIONS: answered locally or relayed by the routes."),
    )
    from_host: str | None = field(
        default=None,
        metadata=spec(
            "Host of the From URI of requests the SBC starts into this realm (masking);"
            " null = the SBC's own address here.",
            pattern=HOST_PATTERN,
        ),
    )
    to_host: str | None = field(
        default=None,
        metadata=spec(
            "Host of the To URI of those requests; null = the destination's.",
            pattern=HOST_PATTERN,
        ),
    )
    request_uri_host: str | None = field(
        default=None,
        metadata=spec(
            "Host of their Request-URI (they still go to the route's destination);"
            " null = the destination's address.",
            pattern=HOST_PATTERN,
        ),
    )
    srtp: SrtpPolicy = field(
        default=SrtpPolicy.OPTIONAL,
        metadata=spec(
            "SDES-SRTP on this realm's legs, terminated by the media relay (keys never"
            " cross realms): optional = SRTP where the peer offers it, and towards this"
            " realm when the other side's offer was SRTP (RTP if refused with 488);"
            " required = SRTP only (plain offers get 488); off = plain RTP only (SRTP"
            " offers get 488); passthrough = between two passthrough realms a=crypto"
            " crosses end to end, else optional."
        ),
    )
    codecs: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            "RTP encodings allowed in offers into and out of this realm (e.g. [PCMU,"
            " PCMA, telephone-event]); the others are taken out of each offer, a stream"
            " left with none is rejected, an offer left with no stream gets 488. Names"
            " as in a=rtpmap, any case. Empty = any.",
        ),
    )
    registered_only: bool = field(
        default=False,
        metadata=spec(
            "Take calls, MESSAGE, SUBSCRIBE ... only from the address and port a phone"
            " of this realm registered from (403 otherwise; emergency routes excepted):"
            " no digest on each call, and the caller is asserted as that phone's user."
            " Needs registrar: true."
        ),
    )
    trust_identity: bool = field(
        default=False,
        metadata=spec(
            "Inside the trust domain (RFC 3325): P-Asserted-Identity from this realm is"
            " believed, and requests into it carry the caller's asserted identity even"
            " under Privacy: id. Untrusted realms' P-Asserted-Identity is dropped; their"
            " requests assert the user the SBC authenticated, if any.",
        ),
    )
    large_requests_over_tcp: bool = field(
        default=False,
        metadata=spec(
            "Send requests over 1300 bytes to UDP peers of this realm over TCP, from the"
            " realm's TCP listener (RFC 3261 18.1.1: no IP fragmentation); when the peer's"
            " TCP connection fails, the request goes over UDP and that peer gets UDP for"
            " 10 minutes. Off by default: a peer that drops TCP SYNs delays such requests by"
            " the connect timeout."
        ),
    )

    def check(self, path: str) -> Iterator[Issue]:
        problem = unicast_problem(self.media_address)
        if problem is not None:
            yield key_path(path, "media_address"), problem
        yield from _host_issues(
            path,
            [
                ("from_host", self.from_host),
                ("to_host", self.to_host),
                ("request_uri_host", self.request_uri_host),
            ],
        )
        for index, method in enumerate(self.authenticate):
            if method not in AUTH_METHODS:
                yield (
                    key_path(path, f"authenticate[{index}]"),
                    f"{method} cannot be authenticated; one of {', '.join(sorted(AUTH_METHODS))}",
                )
        if self.registrar and self.register_relay is not None:
            yield path, "registrar and register_relay exclude each other"
        if self.registered_only and not self.registrar:
            # A relay's bindings are its own tokens, not the users the From names.
            yield (
                key_path(path, "registered_only"),
                "needs the embedded registrar (registrar: true)",
            )
        if len(self.header_rules) > 64:
            yield key_path(path, "header_rules"), "at most 64 rules per realm"
        for index, name in enumerate(self.codecs):
            if not _ENCODING_NAME.fullmatch(name):
                yield key_path(path, f"codecs[{index}]"), f"{name!r} is not an encoding name"


@dataclass(frozen=True)
class RouteConfig(Section):
    """One routing rule; the first whose match fields all match a new request wins."""

    name: str = field(metadata=spec("Rule name, for logs.", pattern=NAME_PATTERN))
    action: RouteAction = field(
        metadata=spec("trunk (a trunk or static peer), registered (users) or reject.")
    )
    from_realm: str | None = field(
        default=None, metadata=spec("Match calls entering this realm; null = any.")
    )
    source: tuple[IPNetwork, ...] = field(
        default=(), metadata=spec("Match calls from these networks; empty = any.")
    )
    user_prefix: str = field(
        default="",
        metadata=spec(
            "Match Request-URI users starting with this (quote digits); empty = any.",
            pattern=r"[A-Za-z0-9+*#._\-]{0,64}",
        ),
    )
    domain: str | None = field(
        default=None,
        metadata=spec("Match this Request-URI host exactly; null = any.", pattern=HOST_PATTERN),
    )
    from_user: str | None = field(
        default=None,
        metadata=spec(
            "Match From users by this regular expression (full match); null = any. A"
            " user longer than 1024 characters never matches; nested repetition such"
            " as (a+)+ is refused."
        ),
    )
    header: str | None = field(
        default=None,
        metadata=spec(
            "Match requests whose header (header_pattern) matches.", pattern=HEADER_NAME_PATTERN
        ),
    )
    header_pattern: str | None = field(
        default=None,
        metadata=spec(
            "Regular expression searched in the header's values (those of at most 1024"
            " characters); nested repetition such as (a+)+ is refused."
        ),
    )
    realm: str | None = field(
        default=None,
        metadata=spec("trunk: the realm of a static peer; registered: only contacts here."),
    )
    trunk: str | None = field(default=None, metadata=spec("trunk: a trunk from trunks:."))
    host: IPAddress | None = field(default=None, metadata=spec("trunk: a static peer's address."))
    port: int = field(
        default=5060,
        metadata=spec("trunk: the peer's port.", min=1, max=65535, expect=PORT_SPEC_EXPECT),
    )
    transport: Transport = field(default=Transport.UDP, metadata=spec("trunk: udp, tcp or tls."))
    status: int = field(
        default=403, metadata=spec("reject: the status answered.", min=400, max=699)
    )
    follow_redirects: bool = field(
        default=False,
        metadata=spec("3xx from the callee: follow the contacts (true) or relay the 3xx."),
    )
    emergency: bool = field(
        default=False,
        metadata=spec(
            "Emergency calls (112, 911 ...): refused by no admission limit but the"
            " route's own (not the realms', the trunk's or an overloaded node's), and"
            " no digest asked of the caller."
        ),
    )
    limits: AdmissionLimits = field(
        default_factory=AdmissionLimits,
        metadata=spec(
            "Admission limits of the calls this route sends, besides the realms' and"
            " the trunk's; an emergency route's only ones (bound a flood of false"
            " emergency calls)."
        ),
    )

    def check(self, path: str) -> Iterator[Issue]:
        if self.emergency and self.action is RouteAction.REJECT:
            yield key_path(path, "emergency"), "an emergency route cannot reject"
        limited = self.limits.max_calls is not None or self.limits.calls_per_second is not None
        if limited and self.action is RouteAction.REJECT:
            yield key_path(path, "limits"), "a reject route sends no call to limit"
        if self.action is RouteAction.TRUNK:
            if self.trunk is None and (self.realm is None or self.host is None):
                yield path, "a trunk route needs trunk, or realm and host"
            if self.trunk is not None and self.host is not None:
                yield path, "a trunk route takes trunk or host, not both"
        problem = None if self.host is None else unicast_problem(self.host)
        if problem is not None:
            yield key_path(path, "host"), problem
        yield from _host_issues(path, [("domain", self.domain)])
        from sbc.b2bua.manipulation import backtracking_problem

        for key, pattern in (
            ("from_user", self.from_user),
            ("header_pattern", self.header_pattern),
        ):
            # Matched against the caller's text on every INVITE: as header rules.
            problem = (
                None if pattern is None else regex_problem(pattern) or backtracking_problem(pattern)
            )
            if problem is not None:
                yield key_path(path, key), problem
        if (self.header is None) != (self.header_pattern is None):
            yield path, "header and header_pattern go together"


@dataclass(frozen=True)
class ProbeConfig(Section):
    """OPTIONS probing of a trunk's gateways, with hysteresis."""

    enabled: bool = field(default=True, metadata=spec("Probe the gateways with OPTIONS."))
    interval: float = field(default=30.0, metadata=spec("Seconds between probes.", min=1, max=3600))
    timeout: float = field(
        default=5.0, metadata=spec("Seconds without an answer: a failed probe.", min=0.5, max=60)
    )
    down_after: int = field(
        default=3, metadata=spec("Failed probes in a row that mark a gateway down.", min=1, max=100)
    )
    up_after: int = field(
        default=2, metadata=spec("Answered probes in a row that mark it up again.", min=1, max=100)
    )

    def check(self, path: str) -> Iterator[Issue]:
        if self.timeout >= self.interval:
            yield key_path(path, "timeout"), "must be shorter than interval (one probe at a time)"


@dataclass(frozen=True)
class GatewayConfig(Section):
    """One gateway of a trunk."""

    host: str = field(metadata=spec("IP literal or host name (RFC 3263).", pattern=HOST_PATTERN))
    port: int | None = field(
        default=None,
        metadata=spec("Port; null = RFC 3263 (SRV, then 5060/5061).", min=1, max=65535),
    )
    transport: Transport = field(default=Transport.UDP, metadata=spec("udp, tcp or tls."))
    priority: int = field(default=1, metadata=spec("Lower is tried first.", min=0, max=65535))
    weight: int = field(
        default=1, metadata=spec("Share of calls within a priority.", min=0, max=65535)
    )

    def check(self, path: str) -> Iterator[Issue]:
        yield from _host_issues(path, [("host", self.host)])


@dataclass(frozen=True)
class TrunkAuthConfig(Section):
    """The account the SBC has at the trunk's carrier: it answers the carrier's digest
    challenges (401/407) to what it sends the trunk with it."""

    username: str = field(
        metadata=spec("User name of the account.", pattern=r"[!#-\[\]-~]{1,128}"),
    )
    password: str = field(
        repr=False,
        metadata=spec("Its password (never logged).", pattern=r"[ -~]{1,256}", secret=True),
    )
    realm: str | None = field(
        default=None,
        metadata=spec(
            "Answer only challenges of this digest realm; null = any the trunk sends.",
            pattern=r"[ !#-\[\]-~]{1,128}",
        ),
    )


@dataclass(frozen=True)
class TrunkRegisterConfig(Section):
    """The SBC registers the trunk's account at the carrier (calls come to it then)."""

    username: str | None = field(
        default=None,
        metadata=spec(
            "User of the registered address; null = auth.username.", pattern=r"[!#-\[\]-~]{1,128}"
        ),
    )
    domain: str | None = field(
        default=None,
        metadata=spec(
            "The registrar's domain (Request-URI, From, To); null = the first gateway's host.",
            pattern=HOST_PATTERN,
        ),
    )
    expires: int = field(
        default=600, metadata=spec("Seconds of binding asked for.", min=60, max=86400)
    )


@dataclass(frozen=True)
class TrunkConfig(Section):
    """A named group of gateways in one realm."""

    name: str = field(metadata=spec("Trunk name, used by routes.", pattern=NAME_PATTERN))
    realm: str = field(metadata=spec("The realm calls to this trunk leave through."))
    gateways: tuple[GatewayConfig, ...] = field(
        metadata=spec("Gateways, by priority then weight.", min_items=1)
    )
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata=spec("OPTIONS probing."))
    limits: AdmissionLimits = field(
        default_factory=AdmissionLimits, metadata=spec("Admission limits of this trunk.")
    )
    max_attempts: int = field(
        default=3, metadata=spec("Gateways tried per call (serial failover).", min=1, max=16)
    )
    try_when_all_down: bool = field(
        default=False,
        metadata=spec("All gateways down: try them anyway (true) or answer 503 at once."),
    )
    auth: TrunkAuthConfig | None = field(
        default=None,
        metadata=spec("Digest credentials for the carrier's challenges; null = none."),
    )
    register: TrunkRegisterConfig | None = field(
        default=None,
        metadata=spec("Register the account at the carrier; null = no registration."),
    )

    def check(self, path: str) -> Iterator[Issue]:
        if self.register is not None and self.register.username is None and self.auth is None:
            yield key_path(path, "register"), "needs a username (register.username or auth)"


@dataclass(frozen=True)
class GuessLimitConfig(Section):
    """Failed digest authentications that lock a source or a user name out for a
    while (503 with Retry-After, credentials unchecked), with or without the
    firewall. A phone that authenticated from an address in the last 2 h is exempt."""

    per_source: int = field(
        default=10, metadata=spec("Failures from one source per window.", min=1, max=1_000_000)
    )
    per_user: int = field(
        default=20,
        metadata=spec(
            "Failures for one user name per window, from any sources; never below"
            " firewall.detectors.auth.per_user while the firewall runs (a locked-out"
            " guess is not reported to it, so it would never ban by user).",
            min=1,
            max=1_000_000,
        ),
    )
    window: int = field(
        default=60, metadata=spec("Seconds failures are counted over.", min=1, max=86400)
    )
    lockout: int = field(default=300, metadata=spec("Seconds a lockout lasts.", min=1, max=86400))


@dataclass(frozen=True)
class RegistrarConfig(Section):
    """The embedded registrar and its users."""

    realm: str = field(
        default="sbc",
        metadata=spec("Digest realm of challenges.", pattern=r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"),
    )
    domains: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            "Domains served; empty = any (users are keyed by name).", pattern=HOST_PATTERN
        ),
    )
    users_db: Path | None = field(
        default=None,
        metadata=spec("SQLite users table (sbc user add NAME); null = state_dir/users.sqlite."),
    )
    digest_algorithms: tuple[DigestAlgorithmName, ...] = field(
        default=(),
        metadata=spec(
            "Challenge algorithms in order (MD5, SHA-256); empty = MD5 only, which every "
            "phone speaks (some give up on a SHA-256 challenge)."
        ),
    )
    min_expires: int = field(default=60, metadata=spec("Shortest registration.", min=1, max=86400))
    max_expires: int = field(
        default=3600, metadata=spec("Longest registration.", min=1, max=604800)
    )
    default_expires: int = field(
        default=3600, metadata=spec("Registration when the phone asks none.", min=1, max=604800)
    )
    max_contacts: int = field(default=10, metadata=spec("Contacts per user.", min=1, max=1000))
    max_users: int = field(
        default=100_000, metadata=spec("Registered users at once.", min=1, max=10_000_000)
    )
    nat_keepalive: int = field(
        default=25,
        metadata=spec("Seconds between keepalives to UDP contacts; 0 = none.", min=0, max=3600),
    )
    keepalive: KeepaliveMethod = field(
        default=KeepaliveMethod.CRLF,
        metadata=spec(
            "crlf: a CRLFCRLF datagram; options: an OPTIONS request, and a phone that"
            " answers none of keepalive_failures in a row loses its bindings."
        ),
    )
    keepalive_failures: int = field(
        default=3,
        metadata=spec(
            "OPTIONS keepalives in a row a phone may leave unanswered (keepalive: options).",
            min=1,
            max=100,
        ),
    )
    guessing: GuessLimitConfig = field(
        default_factory=GuessLimitConfig,
        metadata=spec("The limit on password guessing (digest failures)."),
    )

    def check(self, path: str) -> Iterator[Issue]:
        yield from _host_issues(path, [(f"domains[{i}]", d) for i, d in enumerate(self.domains)])
        if not self.min_expires <= self.default_expires <= self.max_expires:
            yield path, "expected min_expires <= default_expires <= max_expires"


@dataclass(frozen=True)
class CallsConfig(Section):
    """Call timers and admission."""

    max_duration: int = field(
        default=14400,
        metadata=spec("Seconds an answered call may last; 0 = no limit.", min=0, max=604800),
    )
    no_answer_timeout: int = field(
        default=180, metadata=spec("Seconds a call may ring.", min=5, max=3600)
    )
    timer_c: int = field(
        default=185,
        metadata=spec(
            "RFC 3261 Timer C: seconds each outgoing INVITE (a gateway or a registered"
            " contact) may go without a final response, counted from the INVITE and"
            " again from each provisional but 100; then it is CANCELled and counts as"
            " a 408 (the next gateway is tried). It only acts when shorter than"
            " no_answer_timeout. RFC 3261 asks a proxy for more than 3 minutes.",
            min=60,
            max=3600,
        ),
    )
    progress_timeout: int = field(
        default=0,
        metadata=spec(
            "Seconds each outgoing INVITE may go without ringing or progress (a"
            " provisional but 100); then it is CANCELled and counts as a 408 (the next"
            " gateway is tried), like Timer C but only until the far end rings."
            " Catches a gateway that answers 100 Trying and then nothing. 0 = off.",
            min=0,
            max=600,
        ),
    )
    sequential_ring_timeout: int = field(
        default=20,
        metadata=spec(
            "Seconds the contacts of a registered user that share the highest q-value"
            " ring before the next lower q is tried (RFC 3261 16.6 sequential search:"
            " a desk phone at q=1.0 first, a mobile at q=0.5 next). The ringing ones"
            " are then CANCELled; any 4xx or 5xx answer from all of them moves on"
            " sooner, a 6xx ends the search. Contacts without q count as 1.0, so"
            " without q-values every contact rings at once. no_answer_timeout still"
            " bounds the whole call. 0 = wait for each group's final answers.",
            min=0,
            max=3600,
        ),
    )
    session_expires: int = field(
        default=1800,
        metadata=spec(
            "RFC 4028 session interval asked for; 0 = no session timers.", min=0, max=86400
        ),
    )
    min_se: int = field(default=90, metadata=spec("RFC 4028 Min-SE accepted.", min=90, max=86400))
    retry_after: int = field(
        default=5,
        metadata=spec("Retry-After of 503 answers of admission control.", min=1, max=3600),
    )
    max_setup_backlog: int = field(
        default=100,
        metadata=spec(
            "Media set-ups waiting at which new calls get 503 (overload); each waits"
            " for those before it, a few ms apiece.",
            min=1,
            max=100000,
        ),
    )

    def check(self, path: str) -> Iterator[Issue]:
        if self.session_expires and self.session_expires < self.min_se:
            yield key_path(path, "session_expires"), "below min_se"


@dataclass(frozen=True)
class MediaSection(Section):
    """The media relay."""

    port_min: int = field(default=20000, metadata=spec("Lowest RTP port.", min=1024, max=65535))
    port_max: int = field(
        default=29999, metadata=spec("Highest RTP/RTCP port.", min=1024, max=65535)
    )
    kernel_path: bool = field(
        default=True,
        metadata=spec("Forward plain RTP in the kernel (nftables) once both sides latch."),
    )
    timeout: float = field(
        default=30.0,
        metadata=spec("Seconds without media before the call is ended.", min=1, max=86400),
    )
    hold_timeout: float = field(
        default=3600.0,
        metadata=spec("The same while the call is on hold.", min=1, max=86400),
    )
    relatch_after_silence: float = field(
        default=0.0,
        metadata=spec(
            "Seconds a side's latched media source must be silent before a new source"
            " takes over (after 3 packets in a row): a phone whose NAT binding moved"
            " mid-call. 0 = never (strict source, the RTP bleed defence).",
            min=0,
            max=3600,
        ),
    )
    workers: int = field(
        default=0,
        metadata=spec(
            "Relay media in this many worker processes, each with its own slice of the"
            " port range and its own open-files limit (more cores, more calls); 0 ="
            " in the SIP process. Needs kernel_path: false (the kernel fast path runs"
            " in-process only).",
            min=0,
            max=64,
        ),
    )

    def check(self, path: str) -> Iterator[Issue]:
        pairs = (self.port_max - (self.port_min + self.port_min % 2) + 1) // 2
        if pairs < 1:
            yield path, "port_min..port_max holds no RTP/RTCP pair"
        elif self.workers > pairs:
            yield key_path(path, "workers"), f"{self.workers} workers for {pairs} RTP/RTCP pairs"
        if self.workers and self.kernel_path:
            yield (
                key_path(path, "workers"),
                "the kernel fast path runs in the SIP process only:"
                " set kernel_path: false to relay media in worker processes",
            )


class CdrFormat(enum.StrEnum):
    SQLITE = "sqlite"
    JSONL = "jsonl"


@dataclass(frozen=True)
class CdrConfig(Section):
    """Call detail records: one per call attempt."""

    enabled: bool = field(default=True, metadata=spec("Write CDRs."))
    format: CdrFormat = field(default=CdrFormat.SQLITE, metadata=spec("sqlite or jsonl."))
    path: Path | None = field(
        default=None, metadata=spec("The CDR file; null = state_dir/cdr.sqlite (or .jsonl).")
    )
