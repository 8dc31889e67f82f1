"""SIP, SIPS and tel URIs (RFC 3261 19.1, RFC 3966), and any other absolute URI.

URIs keep their parts exactly as written (escapes included) so that a parsed URI
serializes back to the same text; comparison and lookups unescape where RFC 3261
19.1.4 says they must.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote

from sbc.sip.errors import ParseError
from sbc.sip.limits import MAX_PARAMS, MAX_PARAMS_STATUS

Params = tuple[tuple[str, str | None], ...]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
# RFC 3261 25.1: hostname labels; '_' is tolerated because real networks use it.
#: One label of a host name (RFC 3261 25.1; '_' tolerated).
HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{HOST_LABEL}(?:\.{HOST_LABEL})*\.?")
IPV4 = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
# Characters allowed in user, password, params and headers: RFC 3261 unreserved,
# escaped, and the per-part reserved sets (user-unreserved, param-unreserved,
# hnv-unreserved) taken together; whitespace, controls, quotes and angle brackets
# never appear unescaped in a URI.
_URIC = re.compile(r"[A-Za-z0-9\-_.!~*'()%&=+$,;?/:\[\]@]*")
_TEL_NUMBER = re.compile(r"\+?[0-9A-Fa-f*#\-.()pw]+")


#: What `escape_user` leaves as it is: RFC 3261 25.1 unreserved and user-unreserved
#: (";" included: a telephone-subscriber user such as "+4930123;phone-context=+49").
_USER_SAFE = "!*'()&=+$,;?/"


def escape_user(user: str) -> str:
    """``user`` (as `SipUri.user_unescaped` gives it) escaped again for a new URI.

    A peer can write any byte in a user part as %HH, CR and LF included; put back
    unescaped into a URI the SBC builds (its own From, a Refer-To or a gateway's
    Request-URI) that would end the header line and inject headers of the peer's
    choosing. Bytes that were not UTF-8 (kept as surrogates) come back as they were.
    """
    return quote(user, safe=_USER_SAFE, errors="surrogateescape")


def _bad(message: str) -> ParseError:
    return ParseError(message, 400)


def parse_host(text: str, what: str = "host") -> str:
    """Validate a host (RFC 3261 25.1 ``host``) and return it as written.

    IPv6 references must be bracketed. The RFC 3261 ABNF bug that allows three
    colons (``[2001:db8:::192.0.2.1]``, RFC 5118 4.10) is tolerated.
    """
    if not text:
        raise _bad(f"empty {what}")
    if text[0] == "[":
        if text[-1] != "]" or not _IPV6_CHARS.fullmatch(text[1:-1]):
            raise _bad(f"bad IPv6 reference in {what}: {text!r}")
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            # RFC 5118 4.10: tolerate the 3-colon form allowed by RFC 3261's ABNF.
            try:
                ipaddress.IPv6Address(inner.replace(":::", "::", 1))
            except ValueError:
                raise _bad(f"bad IPv6 reference in {what}: {text!r}") from None
        return text
    if IPV4.fullmatch(text):
        if any(int(octet) > 255 for octet in text.split(".")):
            raise _bad(f"bad IPv4 address in {what}: {text!r}")
        return text
    if not _HOSTNAME.fullmatch(text):
        raise _bad(f"bad {what}: {text!r}")
    return text


def plain_host_ok(host: str) -> bool:
    """Whether a host made of letters, digits, '_', '-' and '.' is one parse_host
    accepts: no empty label, no label starting or ending with '-', and an IPv4
    address only with octets up to 255. Cheaper than the label regex."""
    if host[0] in "-." or host[-1] == "-" or ".." in host or ".-" in host or "-." in host:
        return False
    if host[-1].isdigit() and IPV4.fullmatch(host):
        return all(int(octet) <= 255 for octet in host.split("."))
    return True


def parse_port(text: str, what: str = "port") -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535:
        raise _bad(f"bad {what}: {text!r}")
    return int(text)


def split_hostport(text: str, what: str = "host") -> tuple[str, int | None]:
    """Split ``host[:port]``; an IPv6 reference keeps its brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise _bad(f"bad IPv6 reference in {what}: {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return parse_host(host, what), None
        if rest[0] != ":":
            raise _bad(f"bad {what}: {text!r}")
        return parse_host(host, what), parse_port(rest[1:], f"port in {what}")
    host, sep, port = text.partition(":")
    if sep:
        return parse_host(host, what), parse_port(port, f"port in {what}")
    return parse_host(host, what), None


def format_host(address: str) -> str:
    """An address ready to put in a URI or Via: IPv6 gets brackets."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _parse_uri_params(text: str, what: str) -> Params:
    if not text:
        return ()
    parts = text.split(";")
    if len(parts) > MAX_PARAMS:
        raise ParseError(f"too many parameters in {what}", MAX_PARAMS_STATUS)
    params = []
    for part in parts:
        name, sep, value = part.partition("=")
        if not name:
            raise _bad(f"empty parameter in {what}")
        params.append((name, value if sep else None))
    return tuple(params)


def _format_params(params: Params) -> str:
    return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)


def _param(params: Params, name: str) -> str | None:
    lname = name.lower()
    for n, v in params:
        if n.lower() == lname:
            return v if v is not None else ""
    return None


@dataclass(frozen=True, slots=True)
class SipUri:
    """A ``sip:`` or ``sips:`` URI; every part as written (escapes kept)."""

    scheme: str
    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: Params = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def secure(self) -> bool:
        return self.scheme.lower() == "sips"

    @property
    def user_unescaped(self) -> str | None:
        """The user part with %HH escapes decoded once (RFC 3261 19.1.4); NULs stay."""
        return None if self.user is None else unquote(self.user, errors="surrogateescape")

    def param(self, name: str) -> str | None:
        """A URI parameter's value ('' for a flag such as ``lr``), None if absent."""
        return _param(self.params, name)

    @property
    def transport(self) -> str | None:
        value = self.param("transport")
        return value.lower() if value else None

    @property
    def lr(self) -> bool:
        return self.param("lr") is not None

    def with_params(self, **changes: str | None) -> SipUri:
        """A copy with URI parameters set (a value, or '' for a flag) or removed (None)."""
        params = [(n, v) for n, v in self.params if n.lower() not in changes]
        for name, value in changes.items():
            if value is not None:
                params.append((name, value or None))
        return replace(self, params=tuple(params))

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out += [":", str(self.port)]
        out.append(_format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{n}={v}" for n, v in self.headers))
        return "".join(out)


@dataclass(frozen=True, slots=True)
class TelUri:
    """A ``tel:`` URI (RFC 3966): the number and its parameters."""

    number: str
    params: Params = ()
    scheme: str = "tel"

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    def param(self, name: str) -> str | None:
        return _param(self.params, name)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.number}{_format_params(self.params)}"


@dataclass(frozen=True, slots=True)
class AbsoluteUri:
    """Any other absolute URI (RFC 3986): kept opaque, scheme and the rest."""

    scheme: str
    opaque: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.opaque}"


Uri = SipUri | TelUri | AbsoluteUri


def service_urn(uri: Uri) -> str | None:
    """A service URN (RFC 5031: ``urn:service:sos``, ``urn:service:sos.police``
    ...) in lower case, as emergency calls may carry in their Request-URI; else None."""
    if isinstance(uri, AbsoluteUri) and uri.scheme.lower() == "urn":
        text = f"urn:{uri.opaque}".lower()
        if text.startswith("urn:service:") and len(text) > len("urn:service:"):
            return text
    return None


# The common SIP URI in one regex (a hot path: every message carries several):
# plain user, a host name or IPv4 address, port, parameters, no headers. Anything
# else (IPv6, passwords, unusual characters, errors) takes the general parser,
# which gives the same result for what this pattern accepts.
_PCHAR = r"[A-Za-z0-9\-_.!~*'()%&+$\[\]:/]"
_FAST_SIP = re.compile(
    r"(sips?):(?:([A-Za-z0-9\-_.!~*'()%&=+$,]+)@)?"
    r"([A-Za-z0-9_.\-]+)(?::([0-9]{1,5}))?"
    rf"((?:;{_PCHAR}+(?:={_PCHAR}*)?)*)"
)


@functools.lru_cache(maxsize=4096)
def parse_uri(text: str) -> Uri:
    """Parse a URI as it appears in a Request-URI or inside ``<>``.

    URIs are frozen values, and the same ones come back call after call (a phone's
    From and Contact, a trunk's Request-URI, the SBC's own): parsed ones are kept,
    a bounded number, least recently used out. Errors are not kept.

    Raises ParseError(400) for anything that is not a well-formed absolute URI, and
    for SIP URIs whose host, port or parameters are malformed.
    """
    m = _FAST_SIP.fullmatch(text)
    if m is not None:
        scheme, user, host, port, params = m.groups()
        if (port is None or int(port) <= 65535) and plain_host_ok(host):
            return SipUri(
                scheme,
                host,
                user,
                None,
                None if port is None else int(port),
                _parse_uri_params(params[1:], "URI") if params else (),
            )
    colon = text.find(":")
    if colon <= 0 or not _SCHEME.fullmatch(text, 0, colon):
        raise _bad(f"bad URI: {text!r}")
    scheme = text[:colon]
    rest = text[colon + 1 :]
    if not _URIC.fullmatch(rest) or not rest:
        raise _bad(f"bad URI: {text!r}")
    lower = scheme.lower()
    if lower in ("sip", "sips"):
        return _parse_sip(scheme, rest, text)
    if lower == "tel":
        number, _, params = rest.partition(";")
        if not _TEL_NUMBER.fullmatch(number):
            raise _bad(f"bad tel URI: {text!r}")
        return TelUri(number, _parse_uri_params(params, "tel URI"), scheme)
    return AbsoluteUri(scheme, rest)


def _parse_sip(scheme: str, rest: str, text: str) -> SipUri:
    user = password = None
    at = rest.find("@")
    if at != -1:
        userinfo, rest = rest[:at], rest[at + 1 :]
        # RFC 3261 25.1: user never contains ':'; the first ':' starts the password.
        user, sep, pw = userinfo.partition(":")
        if sep:
            password = pw
        if not user:
            raise _bad(f"empty user in URI: {text!r}")
    hostport, qmark, headers_text = rest.partition("?")
    hostport, _, params_text = hostport.partition(";")
    host, port = split_hostport(hostport, "URI host")
    params = _parse_uri_params(params_text, "URI")
    headers: tuple[tuple[str, str], ...] = ()
    if qmark:
        pairs = []
        for item in headers_text.split("&"):
            name, eq, value = item.partition("=")
            if not name or not eq:
                raise _bad(f"bad URI header {item!r} in {text!r}")
            pairs.append((name, value))
        headers = tuple(pairs)
    return SipUri(scheme, host, user, password, port, params, headers)
