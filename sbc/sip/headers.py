"""Parsed views of SIP header values (RFC 3261 20 and 25.1).

The message keeps every header value as text; these frozen values are what the
core reads out of them. Each has ``parse(text)`` and ``__str__`` so a value can be
read, changed with ``dataclasses.replace`` and written back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sbc.evolve import evolve
from sbc.sip.errors import ParseError
from sbc.sip.limits import MAX_PARAMS, MAX_PARAMS_STATUS
from sbc.sip.uri import Params, Uri, parse_uri, plain_host_ok, split_hostport

#: RFC 3261 7.3.3 compact forms, plus RFC 3265/3515/3841/4028 ones.
COMPACT_FORMS: Final = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "o": "Event",
    "u": "Allow-Events",
    "r": "Refer-To",
    "b": "Referred-By",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
    "x": "Session-Expires",
    "y": "Identity",
}

#: Canonical spelling of well-known header names, by lower-case name.
CANONICAL_NAMES: Final = {
    name.lower(): name
    for name in (
        "Accept",
        "Accept-Contact",
        "Accept-Encoding",
        "Accept-Language",
        "Alert-Info",
        "Allow",
        "Allow-Events",
        "Authentication-Info",
        "Authorization",
        "Call-ID",
        "Call-Info",
        "Contact",
        "Content-Disposition",
        "Content-Encoding",
        "Content-Language",
        "Content-Length",
        "Content-Type",
        "CSeq",
        "Date",
        "Error-Info",
        "Event",
        "Expires",
        "From",
        "Identity",
        "In-Reply-To",
        "Max-Forwards",
        "Min-Expires",
        "Min-SE",
        "MIME-Version",
        "Organization",
        "Path",
        "Priority",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Require",
        "RAck",
        "Reason",
        "Record-Route",
        "Refer-To",
        "Referred-By",
        "Reject-Contact",
        "Replaces",
        "Reply-To",
        "Request-Disposition",
        "Require",
        "Retry-After",
        "Route",
        "RSeq",
        "Server",
        "Service-Route",
        "Session-Expires",
        "SIP-ETag",
        "SIP-If-Match",
        "Subject",
        "Subscription-State",
        "Supported",
        "Timestamp",
        "To",
        "Unsupported",
        "User-Agent",
        "Via",
        "Warning",
        "WWW-Authenticate",
    )
}

#: Headers whose values are comma-separated lists (RFC 3261 7.3.1); only these are
#: split. Authorization and friends contain commas but are single values.
LIST_HEADERS: Final = frozenset(
    n.lower()
    for n in (
        "Accept",
        "Accept-Encoding",
        "Accept-Language",
        "Alert-Info",
        "Allow",
        "Allow-Events",
        "Call-Info",
        "Contact",
        "Content-Encoding",
        "Content-Language",
        "Error-Info",
        "In-Reply-To",
        "Path",
        "Proxy-Require",
        "Record-Route",
        "Require",
        "Route",
        "Service-Route",
        "Supported",
        "Unsupported",
        "Via",
        "Warning",
    )
)


def header_key(name: str) -> str:
    """The lookup key of a header name: lower case, compact forms expanded."""
    lower = name.lower()
    full = COMPACT_FORMS.get(lower)
    return full.lower() if full is not None else lower


def canonical_name(name: str) -> str:
    """The conventional spelling of a header name (``call-id`` -> ``Call-ID``)."""
    key = header_key(name)
    return CANONICAL_NAMES.get(key) or "-".join(p.capitalize() for p in key.split("-"))


_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# A parameter value: token, host (IPv6 references included) or quoted-string.
_PARAM_VALUE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~:\[\]]+|\"(?:[^\"\\\r\n]|\\[\s\S])*\"")
_LWS_RUN = re.compile(r"[ \t]+")


def is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def _bad(message: str) -> ParseError:
    return ParseError(message, 400)


def split_list(value: str) -> list[str]:
    """Split a list header value at commas outside quotes and angle brackets."""
    if "," not in value:
        return [value.strip()]
    items: list[str] = []
    start = 0
    quoted = angle = False
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angle = True
        elif ch == ">":
            angle = False
        elif ch == "," and not angle:
            items.append(value[start:i].strip())
            start = i + 1
        i += 1
    items.append(value[start:].strip())
    return items


def _split_semicolons(text: str) -> list[str]:
    """Split at ';' outside quoted strings."""
    if '"' not in text:
        return text.split(";")
    parts: list[str] = []
    start = 0
    quoted = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == ";":
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise _bad(f"unterminated quoted string in parameters: {text!r}")
    parts.append(text[start:])
    return parts


_TOKEN_CHARS = r"[A-Za-z0-9\-.!%*_+`'~]+"
_VALUE_CHARS = r"[A-Za-z0-9\-.!%*_+`'~:\[\]]+"
# The usual case in one regex: no whitespace, no quoted strings.
_SIMPLE_PARAMS = re.compile(
    rf"{_TOKEN_CHARS}(?:={_VALUE_CHARS})?(?:;{_TOKEN_CHARS}(?:={_VALUE_CHARS})?)*"
)


def parse_params(text: str, what: str) -> Params:
    """Parse ``;name[=value]`` pairs (the text after the first ';'), LWS tolerant."""
    if _SIMPLE_PARAMS.fullmatch(text):
        parts = text.split(";")
        if len(parts) > MAX_PARAMS:
            raise ParseError(f"too many parameters in {what}", MAX_PARAMS_STATUS)
        out: list[tuple[str, str | None]] = []
        for part in parts:
            name, sep, value = part.partition("=")
            out.append((name, value if sep else None))
        return tuple(out)
    parts = _split_semicolons(text)
    if len(parts) > MAX_PARAMS:
        raise ParseError(f"too many parameters in {what}", MAX_PARAMS_STATUS)
    params: list[tuple[str, str | None]] = []
    for part in parts:
        name, sep, value = part.partition("=")
        name = name.strip()
        if not _TOKEN.fullmatch(name):
            raise _bad(f"bad parameter {part.strip()!r} in {what}")
        if sep:
            value = value.strip()
            if not _PARAM_VALUE.fullmatch(value):
                raise _bad(f"bad value for parameter {name!r} in {what}")
            params.append((name, value))
        else:
            params.append((name, None))
    return tuple(params)


def format_params(params: Params) -> str:
    return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)


def get_param(params: Params, name: str) -> str | None:
    """A parameter's value ('' for a flag), None if absent; names are case-insensitive."""
    lname = name.lower()
    for n, v in params:
        if n.lower() == lname:
            return v if v is not None else ""
    return None


def set_param(params: Params, name: str, value: str | None) -> Params:
    """Params with ``name`` set to ``value`` (None means a flag), replacing in place."""
    lname = name.lower()
    out: list[tuple[str, str | None]] = []
    found = False
    for n, v in params:
        if n.lower() == lname:
            if not found:
                out.append((name, value))
                found = True
        else:
            out.append((n, v))
    if not found:
        out.append((name, value))
    return tuple(out)


def remove_param(params: Params, name: str) -> Params:
    lname = name.lower()
    return tuple((n, v) for n, v in params if n.lower() != lname)


def unquote_string(text: str) -> str:
    """The content of a quoted-string, quoted-pairs resolved (RFC 3261 25.1)."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        return re.sub(r"\\([\s\S])", r"\1", inner) if "\\" in inner else inner
    return text


def quote_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _end_of_quoted(text: str, start: int) -> int:
    """Index just past the quoted-string that opens at ``start``."""
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        if ch in "\r\n":
            break
        i += 1
    raise _bad(f"unterminated quoted string: {text!r}")


# The usual name-addr in one regex: an optional quoted display name, <URI> with no
# spaces inside, simple parameters. Everything else takes the general parser.
_FAST_ADDRESS = re.compile(
    r'(?:("(?:[^"\\\r\n]|\\[^\r\n])*")[ \t]*)?<([^<>\s"]+)>'
    rf"((?:;{_TOKEN_CHARS}(?:={_VALUE_CHARS})?)*)"
)


@dataclass(frozen=True, slots=True)
class Address:
    """A name-addr or addr-spec with header parameters (From, To, Contact, Route ...).

    ``display`` is as written (a quoted-string keeps its quotes); ``angle`` records
    whether the URI was enclosed in ``<>`` so a value serializes as it came.
    """

    uri: Uri
    display: str | None = None
    params: Params = ()
    angle: bool = True

    @classmethod
    def parse(cls, text: str, what: str = "address") -> Address:
        fast = _FAST_ADDRESS.fullmatch(text)
        if fast is not None:
            quoted, uri, params = fast.groups()
            return cls(parse_uri(uri), quoted, parse_params(params[1:], what) if params else ())
        text = text.strip()
        if not text:
            raise _bad(f"empty {what}")
        display: str | None = None
        if text[0] == '"':
            end = _end_of_quoted(text, 0)
            display = text[:end]
            rest = text[end:].lstrip()
            if not rest.startswith("<"):
                raise _bad(f"expected '<' after display name in {what}")
            return cls._parse_angle(rest, display, what)
        lt = text.find("<")
        semi = text.find(";")
        if lt != -1 and (semi == -1 or lt < semi):
            name = text[:lt].strip()
            if name:
                # RFC 3261 25.1: an unquoted display-name is tokens separated by LWS.
                if not all(_TOKEN.fullmatch(word) for word in _LWS_RUN.split(name)):
                    raise _bad(f"bad display name {name!r} in {what}")
                display = name
            return cls._parse_angle(text[lt:], display, what)
        # RFC 3261 20: an addr-spec outside <> ends at the first ';' (header params),
        # and may not contain ',', '?' or ';' of its own.
        uri_text = text if semi == -1 else text[:semi]
        uri_text = uri_text.rstrip()
        if "?" in uri_text or "," in uri_text or " " in uri_text or "\t" in uri_text:
            raise _bad(f"URI with '?', ',' or spaces must be enclosed in <> in {what}")
        params = parse_params(text[semi + 1 :], what) if semi != -1 else ()
        return cls(parse_uri(uri_text), None, params, angle=False)

    @classmethod
    def _parse_angle(cls, text: str, display: str | None, what: str) -> Address:
        gt = text.find(">")
        if gt == -1:
            raise _bad(f"missing '>' in {what}")
        uri_text = text[1:gt]
        if uri_text != uri_text.strip():
            raise _bad(f"spaces inside <> in {what}")
        rest = text[gt + 1 :].strip()
        params: Params = ()
        if rest:
            if rest[0] != ";":
                raise _bad(f"unexpected {rest!r} after '>' in {what}")
            params = parse_params(rest[1:], what)
        return cls(parse_uri(uri_text), display, params, angle=True)

    @property
    def tag(self) -> str | None:
        return get_param(self.params, "tag") or None

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    def with_param(self, name: str, value: str | None) -> Address:
        return evolve(self, params=set_param(self.params, name, value))

    @property
    def display_name(self) -> str | None:
        """The display name with quotes and escapes removed."""
        return None if self.display is None else unquote_string(self.display)

    def __str__(self) -> str:
        uri = str(self.uri)
        if self.angle or self.display is not None or _needs_angle(uri):
            core = f"{self.display} <{uri}>" if self.display is not None else f"<{uri}>"
        else:
            core = uri
        return core + format_params(self.params)


def _needs_angle(uri: str) -> bool:
    return any(ch in uri for ch in ";,?")


# The common Via in one regex: SIP/2.0, a host name or IPv4 address, simple
# parameters. Everything else takes the general path below.
_FAST_VIA = re.compile(
    r"SIP/2\.0/([A-Za-z]+) "
    r"([A-Za-z0-9_.\-]+)"
    rf"(?::([0-9]{{1,5}}))?((?:;{_TOKEN_CHARS}(?:={_VALUE_CHARS})?)*)"
)
_COLON_LWS = re.compile(r"[ \t]*:[ \t]*")
_VIA_PROTOCOL = re.compile(r"\s*([^\s/]+)\s*/\s*([^\s/]+)\s*/\s*([^\s/;]+)\s+")


@dataclass(frozen=True, slots=True)
class Via:
    """One Via value (RFC 3261 20.42): sent-protocol, sent-by and parameters."""

    transport: str
    host: str
    port: int | None = None
    params: Params = ()
    protocol: str = "SIP"
    version: str = "2.0"

    @classmethod
    def parse(cls, text: str) -> Via:
        fast = _FAST_VIA.fullmatch(text)
        if fast is not None:
            transport, host, port, params_text = fast.groups()
            if (port is None or int(port) <= 65535) and plain_host_ok(host):
                return cls(
                    transport.upper(),
                    host,
                    None if port is None else int(port),
                    parse_params(params_text[1:], "Via") if params_text else (),
                )
        m = _VIA_PROTOCOL.match(text)
        if m is None:
            raise _bad(f"bad Via: {text.strip()!r}")
        protocol, version, transport = m.groups()
        sent_by, semi, params_text = text[m.end() :].partition(";")
        sent_by = sent_by.strip()
        if not sent_by:
            raise _bad(f"bad Via: {text.strip()!r}")
        if not (_TOKEN.fullmatch(protocol) and _TOKEN.fullmatch(version)):
            raise _bad(f"bad Via protocol: {text.strip()!r}")
        if not _TOKEN.fullmatch(transport):
            raise _bad(f"bad Via transport: {transport!r}")
        # RFC 3261 25.1: COLON = SWS ":" SWS, so "host : port" is legal.
        if ":" in sent_by and (" " in sent_by or "\t" in sent_by):
            sent_by = _COLON_LWS.sub(":", sent_by)
        host, port = split_hostport(sent_by, "Via sent-by")
        params = parse_params(params_text, "Via") if semi else ()
        return cls(transport.upper(), host, port, params, protocol, version)

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    @property
    def branch(self) -> str | None:
        return get_param(self.params, "branch")

    @property
    def received(self) -> str | None:
        return get_param(self.params, "received")

    @property
    def rport(self) -> str | None:
        return get_param(self.params, "rport")

    @property
    def is_rfc3261_branch(self) -> bool:
        """RFC 3261 17.2.3: a branch starting with the magic cookie (and more after it)."""
        branch = self.branch
        return branch is not None and branch.startswith("z9hG4bK") and len(branch) > 7

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host, self.port

    def with_param(self, name: str, value: str | None) -> Via:
        return evolve(self, params=set_param(self.params, name, value))

    def __str__(self) -> str:
        hostport = self.host if self.port is None else f"{self.host}:{self.port}"
        return (
            f"{self.protocol}/{self.version}/{self.transport} {hostport}"
            f"{format_params(self.params)}"
        )


_CSEQ = re.compile(r"\s*([0-9]{1,20})\s+(\S+)\s*")

#: RFC 3261 8.1.1.5: the sequence number must fit in 32 bits.
MAX_CSEQ: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class CSeq:
    """CSeq (RFC 3261 20.16): sequence number and method."""

    seq: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        m = _CSEQ.fullmatch(text)
        if m is None:
            raise _bad(f"bad CSeq: {text.strip()!r}")
        seq = int(m.group(1))
        if seq > MAX_CSEQ:
            raise _bad(f"CSeq number {m.group(1)} exceeds 2**32-1")
        method = m.group(2)
        if not _TOKEN.fullmatch(method):
            raise _bad(f"bad CSeq method: {method!r}")
        return cls(seq, method)

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_uint(text: str, what: str, maximum: int) -> int:
    """A header holding one unsigned integer (Max-Forwards, Content-Length, Expires)."""
    text = text.strip()
    if not text.isdigit() or not text.isascii():
        raise _bad(f"bad {what}: {text!r}")
    if len(text) > 10 or int(text) > maximum:
        raise _bad(f"{what} out of range: {text}")
    return int(text)


#: RFC 3261 20.19: delta-seconds beyond 2**32-1 count as 2**32-1.
MAX_DELTA_SECONDS: Final = 2**32 - 1


def parse_delta(text: str, cap: int = MAX_DELTA_SECONDS) -> int | None:
    """1*DIGIT (ASCII, as written: no space) as an int capped at ``cap``; None when it
    is not. A peer may write thousands of digits (a header line holds 8,192): no more
    than the cap's length reaches int(), whose limit is 4,300."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    if len(digits) > len(str(cap)):
        return cap
    return min(int(digits or "0"), cap)


def parse_token_list(text: str, what: str) -> tuple[str, ...]:
    """A comma-separated list of tokens (Require, Supported, Allow ...)."""
    items = []
    for item in split_list(text):
        if not item:
            continue
        if not _TOKEN.fullmatch(item):
            raise _bad(f"bad {what} value: {item!r}")
        items.append(item)
    return tuple(items)


@dataclass(frozen=True, slots=True)
class MediaType:
    """Content-Type / Accept value: type/subtype and parameters (RFC 3261 20.15)."""

    type: str
    subtype: str
    params: Params = ()

    @classmethod
    def parse(cls, text: str) -> MediaType:
        main, _, rest = text.partition(";")
        type_, slash, subtype = main.strip().partition("/")
        type_, subtype = type_.strip(), subtype.strip()
        if not slash or not _TOKEN.fullmatch(type_) or not _TOKEN.fullmatch(subtype):
            raise _bad(f"bad media type: {text.strip()!r}")
        params = parse_params(rest, "media type") if rest.strip() else ()
        return cls(type_.lower(), subtype.lower(), params)

    @property
    def essence(self) -> str:
        return f"{self.type}/{self.subtype}"

    def param(self, name: str) -> str | None:
        value = get_param(self.params, name)
        return None if value is None else unquote_string(value)

    def matches(self, other: MediaType) -> bool:
        """Whether this (possibly wildcard) range admits ``other``."""
        return (self.type == "*" or self.type == other.type) and (
            self.subtype == "*" or self.subtype == other.subtype
        )

    def __str__(self) -> str:
        return f"{self.type}/{self.subtype}{format_params(self.params)}"
