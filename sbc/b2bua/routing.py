"""Routing of new calls: ordered rules on source realm, address, URIs and headers.

Pure: ``Router.route(realm, uri, ...)`` returns the first matching rule's decision.
A rule matches when each of its match fields is unset or agrees: the realm the
request entered, its source address, a prefix of the Request-URI user, the
Request-URI host, the From user (a regular expression) and a header pattern.

What the match fields see:

``user_prefix``
    The Request-URI user with its escapes decoded (a tel URI's number) starts with
    the prefix. For a telephone number (an optional ``+``, then digits, ``*`` and
    ``#``, up to a ``;`` that starts its RFC 3966 parameters) the visual separators
    ``-``, ``.``, ``(`` and ``)`` (RFC 3966 5.1.1), and spaces, are ignored on both
    sides: ``+1-212`` matches ``+1 (212) 555.0100`` and ``+12125550100``. The ``+``
    counts: ``1212`` does not match ``+1-212-555-0100``. Users that are not numbers
    (``john.doe``) are compared as they are written.
``from_user``
    A full match of the From user, escapes decoded. A From without a user
    (``sip:example.com``) has the empty user: ``(anonymous)?`` or ``.*`` match it.
``header_pattern``
    Searched in each value of ``header``; one match is enough. An absent header
    has no value to match: ``.*`` means "the header is there". Requests without
    it are routed by a later rule, after the one that takes those with it.

Both patterns run on the caller's text: a value longer than ``MAX_MATCHED_LENGTH``
(1024) is not matched, and the config refuses nested repetition (``(a+)+``) as it
does for header rules (`sbc.b2bua.manipulation.backtracking_problem`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final

from sbc.b2bua.manipulation import MAX_MATCHED_LENGTH
from sbc.sip.errors import ParseError
from sbc.sip.message import Request
from sbc.sip.uri import SipUri, TelUri, Uri, service_urn
from sbc.transport.base import Destination, Transport, normalize_host

#: RFC 3966 5.1.1 visual-separator, plus the space of numbers as people write them.
_VISUAL_SEPARATORS: Final = str.maketrans("", "", "-.() ")
#: A telephone number once its separators are gone: global (+) or local digits.
_DIAL_STRING: Final = re.compile(r"\+?[0-9*#]+")


class RouteAction(enum.Enum):
    TRUNK = "trunk"
    REGISTERED = "registered"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One rule: what it matches, and where the call goes (or the status refusing it)."""

    name: str
    action: RouteAction
    from_realm: str | None = None
    user_prefix: str = ""
    domain: str | None = None
    #: TRUNK: the realm the B leg lives in and the peer it goes to (a static peer),
    #: or the name of a trunk of gateways. REGISTERED: only contacts of this realm.
    realm: str | None = None
    destination: Destination | None = None
    trunk: str | None = None
    #: REJECT: the status answered to the caller.
    status: int = 403
    #: Source networks (empty: any), From user (full match) and a header pattern.
    source: tuple[IPv4Network | IPv6Network, ...] = ()
    from_user: re.Pattern[str] | None = None
    header: str | None = None
    header_pattern: re.Pattern[str] | None = None
    #: 3xx of the callee: follow its contacts instead of relaying it.
    follow_redirects: bool = field(default=False)
    #: Emergency calls: refused by no admission limit but the route's own, no digest.
    emergency: bool = field(default=False)
    #: ``user_prefix`` without visual separators if it is a number, else None.
    _number_prefix: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: matching runs for every rule on every INVITE.
        object.__setattr__(self, "_number_prefix", dial_string(self.user_prefix))
        if (
            self.action is RouteAction.TRUNK
            and self.trunk is None
            and (self.realm is None or self.destination is None)
        ):
            raise ValueError(f"route {self.name}: a trunk needs a trunk, or a realm and a peer")
        if not 400 <= self.status <= 699:
            raise ValueError(f"route {self.name}: status {self.status} is not 400..699")

    def matches(
        self,
        realm: str | None,
        uri: Uri,
        request: Request | None = None,
        source: IPv4Address | IPv6Address | None = None,
    ) -> bool:
        if self.from_realm is not None and self.from_realm != realm:
            return False
        if self.source and (source is None or not any(source in net for net in self.source)):
            return False
        user, host = uri_user_host(uri)
        if user is None:
            # A service URN (RFC 5031): user_prefix "urn:service:sos" routes it.
            user = service_urn(uri)
        if self.user_prefix and not self._user_has_prefix(user or ""):
            return False
        if self.domain is not None:
            wanted = normalize_host(self.domain).lower()
            if host is None or normalize_host(host).lower() != wanted:
                return False
        if self.from_user is not None:
            if request is None:
                return False
            try:
                from_user, _ = uri_user_host(request.from_.uri)
            except ParseError:
                return False
            # No user (sip:example.com) is the empty user, for patterns such as ".*".
            # The caller's text, and re has no timeout: a longer one never matches.
            from_user = from_user or ""
            if len(from_user) > MAX_MATCHED_LENGTH or not self.from_user.fullmatch(from_user):
                return False
        if self.header is not None and self.header_pattern is not None:
            if request is None:
                return False
            pattern = self.header_pattern
            if not any(
                len(v) <= MAX_MATCHED_LENGTH and pattern.search(v)
                for v in request.headers.fields(self.header)
            ):
                return False
        return True

    def _user_has_prefix(self, user: str) -> bool:
        """``user`` starts with ``user_prefix``, separators in numbers ignored."""
        if user.startswith(self.user_prefix):
            return True
        wanted = self._number_prefix
        if wanted is None:
            return False
        number = dial_string(user.partition(";")[0])
        return number is not None and number.startswith(wanted)


@dataclass(frozen=True, slots=True)
class TrunkRoute:
    """Send the call to ``destination`` through ``realm``, or to the trunk ``trunk``."""

    rule: str
    realm: str | None
    destination: Destination | None
    trunk: str | None = None
    follow_redirects: bool = False
    emergency: bool = False


@dataclass(frozen=True, slots=True)
class RegisteredRoute:
    """Send the call to every contact registered for the Request-URI's user."""

    rule: str
    realm: str | None = None
    follow_redirects: bool = False
    emergency: bool = False


@dataclass(frozen=True, slots=True)
class RejectRoute:
    """Refuse the call with ``status``."""

    rule: str
    status: int


RouteDecision = TrunkRoute | RegisteredRoute | RejectRoute


def dial_string(text: str) -> str | None:
    """``text`` without its visual separators if it is a telephone number, else None.

    ``+1 (212) 555-0100`` gives ``+12125550100``; ``john.doe`` and ``-`` give None.
    """
    stripped = text.translate(_VISUAL_SEPARATORS)
    return stripped if _DIAL_STRING.fullmatch(stripped) else None


def uri_user_host(uri: Uri) -> tuple[str | None, str | None]:
    """The user part and host of a SIP URI; a tel URI's number and no host."""
    if isinstance(uri, SipUri):
        return uri.user_unescaped, uri.host
    if isinstance(uri, TelUri):
        return uri.number, None
    return None, None


class Router:
    """Ordered rules; the first that matches decides."""

    def __init__(self, rules: Iterable[RouteRule] = ()) -> None:
        self.rules = tuple(rules)

    def route(
        self,
        realm: str | None,
        uri: Uri,
        request: Request | None = None,
        source: str | None = None,
    ) -> RouteDecision | None:
        """The decision for a new request entering ``realm`` for ``uri``; None: no rule."""
        address = None
        if source is not None:
            try:
                address = ip_address(normalize_host(source))
            except ValueError:
                address = None
        for rule in self.rules:
            if not rule.matches(realm, uri, request, address):
                continue
            if rule.action is RouteAction.REJECT:
                return RejectRoute(rule.name, rule.status)
            if rule.action is RouteAction.REGISTERED:
                return RegisteredRoute(
                    rule.name, rule.realm, rule.follow_redirects, emergency=rule.emergency
                )
            return TrunkRoute(
                rule.name,
                rule.realm,
                rule.destination,
                rule.trunk,
                rule.follow_redirects,
                emergency=rule.emergency,
            )
        return None


def trunk_destination(host: str, port: int, transport: str) -> Destination:
    return Destination(Transport(transport), normalize_host(host), port)
