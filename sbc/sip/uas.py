"""Request inspection a UAS performs before acting (RFC 3261 8.2.1 - 8.2.3).

``check_request`` runs the checks in the order RFC 3261 8.2 gives them and returns
the rejection to send, or None when the request may be processed. It is pure: the
caller turns a Rejection into a response with ``Rejection.response_to``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

from sbc.sip.errors import ParseError
from sbc.sip.headers import MediaType
from sbc.sip.message import KNOWN_METHODS, Request, Response, make_response
from sbc.sip.uri import SipUri, TelUri, service_urn

#: Content types an SBC understands in a request body (RFC 3261 8.2.3).
DEFAULT_ACCEPT: Final = ("application/sdp", "multipart/mixed")
#: Methods whose body, when present, the SBC must understand (SDP offers/answers).
_BODY_CHECKED: Final = frozenset({"INVITE", "UPDATE", "PRACK", "ACK"})


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused: status, reason and the headers that explain it."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = field(default=())

    def response_to(self, request: Request, to_tag: str | None = None) -> Response:
        return make_response(request, self.status, self.reason, to_tag=to_tag, headers=self.headers)


@dataclass(frozen=True, slots=True)
class UasPolicy:
    """What this UAS supports: methods, option tags, URI schemes, body types."""

    allowed_methods: Collection[str] = KNOWN_METHODS
    supported: Collection[str] = ("100rel", "timer", "path", "replaces", "outbound")
    accept: tuple[str, ...] = DEFAULT_ACCEPT
    schemes: Collection[str] = ("sip", "sips", "tel")
    #: Request-URIs that are service URNs (RFC 5031: emergency calls) are taken.
    service_urns: bool = False

    @property
    def allow_header(self) -> str:
        return ", ".join(m for m in sorted(self.allowed_methods))


def check_request(request: Request, policy: UasPolicy) -> Rejection | None:
    """The first reason to refuse ``request``, or None (RFC 3261 8.2.1 - 8.2.3)."""
    method = request.method
    # 8.2.1: method inspection.
    if method not in policy.allowed_methods:
        if method in KNOWN_METHODS:
            return Rejection(405, "Method Not Allowed", (("Allow", policy.allow_header),))
        return Rejection(501, "Not Implemented", (("Allow", policy.allow_header),))
    # 8.2.2.1: To and Request-URI.
    uri = request.uri
    urn = policy.service_urns and service_urn(uri) is not None
    if uri.scheme.lower() not in policy.schemes and not urn:
        return Rejection(416, "Unsupported URI Scheme")
    if method == "REGISTER":
        # RFC 3261 10.3 step 1/5: a registrar only binds SIP and SIPS AORs; RFC 4475
        # 3.3.4 expects 400 for a To that is not one.
        to_uri = request.to.uri
        if not isinstance(to_uri, SipUri):
            return Rejection(400, "Bad Request: To is not a SIP or SIPS AOR")
    elif not isinstance(uri, SipUri | TelUri) and not urn:
        return Rejection(416, "Unsupported URI Scheme")
    # 8.2.2.3: Require (Proxy-Require is for proxies; a UAS looks at Require only).
    if method not in ("ACK", "CANCEL"):
        try:
            required = request.tokens("Require")
        except ParseError:
            return Rejection(400, "Bad Request: malformed Require")
        supported = {tag.lower() for tag in policy.supported}
        unknown = [tag for tag in required if tag.lower() not in supported]
        if unknown:
            return Rejection(420, "Bad Extension", (("Unsupported", ", ".join(unknown)),))
    # 8.2.3: content processing.
    if request.body and method in _BODY_CHECKED:
        rejection = _check_body(request, policy)
        if rejection is not None:
            return rejection
    if method == "INVITE":
        rejection = _check_accept(request, policy)
        if rejection is not None:
            return rejection
    return None


def _check_body(request: Request, policy: UasPolicy) -> Rejection | None:
    accept = (("Accept", ", ".join(policy.accept)),)
    try:
        content_type = request.content_type
    except ParseError:
        return Rejection(400, "Bad Request: malformed Content-Type")
    if content_type is None:
        # RFC 3261 7.4.1: a body without Content-Type is taken as SDP only by the
        # lenient; we ask for it to be labelled.
        return Rejection(415, "Unsupported Media Type", accept)
    if content_type.essence not in policy.accept:
        return Rejection(415, "Unsupported Media Type", accept)
    encoding = request.headers.get("Content-Encoding")
    if encoding and encoding.strip().lower() not in ("identity", ""):
        return Rejection(415, "Unsupported Media Type", (("Accept-Encoding", "identity"),))
    return None


def _check_accept(request: Request, policy: UasPolicy) -> Rejection | None:
    """RFC 3261 21.4.7: an INVITE whose Accept excludes SDP cannot get an answer."""
    values = request.headers.values("Accept")
    if not request.headers.fields("Accept"):
        return None
    try:
        ranges = [MediaType.parse(v) for v in values if v]
    except ParseError:
        return Rejection(400, "Bad Request: malformed Accept")
    if not ranges:
        return None
    sdp = MediaType("application", "sdp")
    if any(r.matches(sdp) for r in ranges):
        return None
    # RFC 4475 3.3.15: 406 with a Warning naming what we can send.
    return Rejection(
        406, "Not Acceptable", (("Warning", '399 sbc "only application/sdp is supported"'),)
    )
