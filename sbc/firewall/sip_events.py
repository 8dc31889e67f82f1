"""Detector events from what the SIP core saw: the only place firewall meets `sbc.sip`."""

from __future__ import annotations

from typing import Final

from sbc.firewall.bans import IPAddress
from sbc.firewall.detectors import MalformedMessage, RequestSeen
from sbc.sip.errors import ParseError
from sbc.sip.message import Request
from sbc.sip.uri import SipUri

#: User-Agent values are cut to this before matching and logging.
MAX_USER_AGENT: Final = 256


def _user_of(uri: object) -> str | None:
    return uri.user if isinstance(uri, SipUri) else None


def request_event(request: Request, source: IPAddress) -> RequestSeen:
    """A `RequestSeen` for `request` received from `source`.

    The probed user is the To user for REGISTER (the AOR being registered; svwar
    walks it), and the Request-URI user otherwise, falling back to To.
    """
    agent = request.headers.get("User-Agent")
    target: str | None = None
    try:
        to_user = _user_of(request.to.uri)
    except ParseError:
        to_user = None
    if request.method == "REGISTER":
        target = to_user
    else:
        try:
            target = _user_of(request.uri) or to_user
        except ParseError:
            target = to_user
    return RequestSeen(
        source=source,
        method=request.method,
        user_agent=agent[:MAX_USER_AGENT] if agent else None,
        target_user=target,
    )


def malformed_event(error: ParseError, source: IPAddress) -> MalformedMessage:
    return MalformedMessage(source=source, reason=str(error)[:120])
