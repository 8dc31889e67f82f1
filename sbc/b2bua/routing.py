"""Routing of new calls: ordered rules on source realm and Request-URI.

Pure: ``Router.route(realm, uri)`` returns the first matching rule's decision. A
rule matches when each of its match fields is unset or agrees: the realm the
INVITE entered, a prefix of the Request-URI user, the Request-URI host.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from sbc.sip.uri import SipUri, TelUri, Uri
from sbc.transport.base import Destination, Transport, normalize_host


class RouteAction(enum.Enum):
    TRUNK = "trunk"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One rule: what it matches, and where the call goes (or the status refusing it)."""

    name: str
    action: RouteAction
    from_realm: str | None = None
    user_prefix: str = ""
    domain: str | None = None
    #: TRUNK: the realm the B leg lives in and the peer it goes to.
    realm: str | None = None
    destination: Destination | None = None
    #: REJECT: the status answered to the caller.
    status: int = 403

    def __post_init__(self) -> None:
        if self.action is RouteAction.TRUNK and (self.realm is None or self.destination is None):
            raise ValueError(f"route {self.name}: a trunk needs a realm and a destination")
        if not 400 <= self.status <= 699:
            raise ValueError(f"route {self.name}: status {self.status} is not 400..699")

    def matches(self, realm: str | None, uri: Uri) -> bool:
        if self.from_realm is not None and self.from_realm != realm:
            return False
        user, host = uri_user_host(uri)
        if self.user_prefix and not (user or "").startswith(self.user_prefix):
            return False
        if self.domain is None:
            return True
        wanted = normalize_host(self.domain).lower()
        return host is not None and normalize_host(host).lower() == wanted


@dataclass(frozen=True, slots=True)
class TrunkRoute:
    """Send the call to ``destination`` through ``realm``."""

    rule: str
    realm: str
    destination: Destination


@dataclass(frozen=True, slots=True)
class RejectRoute:
    """Refuse the call with ``status``."""

    rule: str
    status: int


RouteDecision = TrunkRoute | RejectRoute


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

    def route(self, realm: str | None, uri: Uri) -> RouteDecision | None:
        """The decision for a new INVITE entering ``realm`` for ``uri``; None: no rule."""
        for rule in self.rules:
            if not rule.matches(realm, uri):
                continue
            if rule.action is RouteAction.REJECT:
                return RejectRoute(rule.name, rule.status)
            assert rule.realm is not None and rule.destination is not None
            return TrunkRoute(rule.name, rule.realm, rule.destination)
        return None


def trunk_destination(host: str, port: int, transport: str) -> Destination:
    return Destination(Transport(transport), normalize_host(host), port)
