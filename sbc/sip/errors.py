"""Errors raised by the SIP core, each carrying the answer it calls for."""

from __future__ import annotations

# Reason phrases for the statuses the core itself produces (RFC 3261 21).
REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
}


def reason_phrase(status: int) -> str:
    """The RFC 3261 reason phrase for ``status``, or a generic one for its class."""
    phrase = REASONS.get(status)
    if phrase is not None:
        return phrase
    return {1: "Trying", 2: "OK", 3: "Redirect", 4: "Client Error", 5: "Server Error"}.get(
        status // 100, "Global Failure"
    )


class SipError(ValueError):
    """Base of the SIP core's errors."""


class ParseError(SipError):
    """A message, or part of one, that cannot be accepted.

    ``status`` is what a server answers to a request that fails this way (h11's
    ``error_status_hint``). A response that fails to parse is dropped, never
    answered (RFC 3261 18.1.2 / 18.2.1). ``close`` asks a stream transport to close
    the connection because the framing can no longer be trusted (RFC 3261 18.3).
    """

    def __init__(self, message: str, status: int = 400, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close
        #: Set by the message parser once it knows the start line: True for a
        #: response, which is dropped rather than answered.
        self.is_response = False
        #: Whatever the parser managed to read before it failed; lets a server
        #: build a response to a request whose other headers are broken.
        self.partial: object | None = None

    @property
    def reason(self) -> str:
        return reason_phrase(self.status)
