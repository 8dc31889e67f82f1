"""SIP digest authentication (RFC 3261 22, RFC 2617, RFC 7616, RFC 8760), sans-I/O.

This module works on header *values* (the text after ``WWW-Authenticate:``,
``Proxy-Authenticate:``, ``Authorization:`` or ``Proxy-Authorization:``), so it does
not depend on the message model.

* Parsing and serializing: :func:`parse_challenge`, :func:`parse_credentials`,
  :class:`DigestChallenge`, :class:`DigestCredentials` and :class:`GenericAuth` (any
  other scheme, e.g. RFC 4475 3.1.2.9 ``NoOneKnowsThisScheme opaque-data=here``).
* Computation: :func:`digest_ha1`, :func:`digest_response`, :func:`digest_userhash`.
* Server: :class:`DigestServer` issues challenges with stateless, self-validating
  nonces and verifies credentials into an :class:`AuthResult`; it never raises on
  what a peer sends.
* Client: :class:`DigestClient` answers challenges and reuses a nonce with an
  increasing nonce-count.

Nothing here reads the clock: every call that needs time takes ``now`` (seconds,
monotonic or wall clock, the caller's choice, as long as it is the same clock for
issuing and verifying).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import hmac
import ipaddress
import logging
import math
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from sbc.sip.errors import ParseError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- limits

#: Longest auth header value we parse; longer values are rejected (answer 400).
MAX_AUTH_VALUE_LENGTH: Final = 4_096
#: Most auth-params in one challenge or credentials value (answer 400).
MAX_AUTH_PARAMS: Final = 32
#: Longest single auth-param value, after unquoting (answer 400).
MAX_AUTH_PARAM_LENGTH: Final = 1_024
#: Status a server answers to a request whose auth header cannot be parsed.
AUTH_HEADER_ERROR_STATUS: Final = 400

#: Nonces a :class:`DigestServer` tracks for nonce-count replay protection. When
#: full, the oldest-issued nonce is forgotten and every nonce issued at or before it
#: becomes stale (RFC 7616 3.3 lets a server do so), so memory stays bounded without
#: ever accepting a replay.
MAX_TRACKED_NONCES: Final = 65_536
#: Default nonce lifetime in seconds; an older nonce gets ``stale=true``.
DEFAULT_NONCE_LIFETIME: Final = 300.0
#: How far in the future a nonce's timestamp may be (clock steps, HA peers sharing a
#: key) before it is treated as expired.
NONCE_MAX_FUTURE_SKEW: Final = 5.0
#: Shortest server key accepted, in bytes.
MIN_KEY_LENGTH: Final = 16
#: RFC 7616 3.4: nc is 8 hex digits.
MAX_NONCE_COUNT: Final = 0xFFFFFFFF
#: Realms a :class:`DigestClient` keeps a nonce for; a server naming ever new realms
#: makes it forget the least recently challenged one.
MAX_CLIENT_REALMS: Final = 32


# --------------------------------------------------------------------------- errors


class AuthHeaderError(ParseError):
    """An auth header value that does not follow RFC 3261 25.1 / RFC 7616 grammar.

    ``status`` is 400: a server answers Bad Request (a ``ValueError`` subclass).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, AUTH_HEADER_ERROR_STATUS)


class NoUsableChallengeError(ValueError):
    """None of the challenges offered uses Digest with an algorithm and qop we support."""


class CredentialsRejectedError(Exception):
    """A server challenged again, without ``stale=true``, credentials we already sent.

    RFC 3261 22.2 / RFC 7616 3.3: the username or password is wrong; retrying with
    the same ones is pointless, so the user has to be asked again.
    """


# --------------------------------------------------------------------------- algorithms


class DigestAlgorithm(Enum):
    """Digest algorithms (RFC 7616 3.2, RFC 8760 2.2); values are the wire tokens."""

    MD5 = "MD5"
    MD5_SESS = "MD5-sess"
    SHA_256 = "SHA-256"
    SHA_256_SESS = "SHA-256-sess"
    SHA_512_256 = "SHA-512-256"
    SHA_512_256_SESS = "SHA-512-256-sess"

    @classmethod
    def from_token(cls, token: str) -> DigestAlgorithm:
        """The algorithm named by ``token``, compared case-insensitively."""
        algorithm = _ALGORITHMS_BY_TOKEN.get(token.lower())
        if algorithm is None:
            raise AuthHeaderError(f"unsupported algorithm {token!r}")
        return algorithm

    @property
    def is_session(self) -> bool:
        """True for the ``-sess`` variants (RFC 7616 3.4.2)."""
        return self.value.endswith("-sess")

    @property
    def base(self) -> DigestAlgorithm:
        """The non-session algorithm using the same hash (what a stored HA1 is for)."""
        return DigestAlgorithm(self.value.removesuffix("-sess"))

    @property
    def digest_length(self) -> int:
        """Length of a digest in lowercase hex characters."""
        return 32 if self.base is DigestAlgorithm.MD5 else 64

    def hash(self, data: str) -> str:
        """H(data) as lowercase hex; strings are hashed as UTF-8 (RFC 7616 3.4.1)."""
        # surrogateescape gives back the wire bytes of text decoded that way.
        raw = data.encode("utf-8", "surrogateescape")
        return hashlib.new(_HASH_NAMES[self.base], raw).hexdigest()

    def hash_bytes(self, data: bytes) -> str:
        """H(data) for raw bytes (the entity body for qop=auth-int)."""
        return hashlib.new(_HASH_NAMES[self.base], data).hexdigest()


_ALGORITHMS_BY_TOKEN: Final = {a.value.lower(): a for a in DigestAlgorithm}
_HASH_NAMES: Final = {
    DigestAlgorithm.MD5: "md5",
    DigestAlgorithm.SHA_256: "sha256",
    DigestAlgorithm.SHA_512_256: "sha512_256",
}

#: RFC 8760 2.4: a server offers SHA-256 before MD5 (MD5 only for old clients).
SERVER_ALGORITHMS: Final = (DigestAlgorithm.SHA_256, DigestAlgorithm.MD5)
#: A client picks the strongest algorithm offered, in this order.
CLIENT_ALGORITHM_PREFERENCE: Final = (
    DigestAlgorithm.SHA_512_256,
    DigestAlgorithm.SHA_512_256_SESS,
    DigestAlgorithm.SHA_256,
    DigestAlgorithm.SHA_256_SESS,
    DigestAlgorithm.MD5,
    DigestAlgorithm.MD5_SESS,
)


class Qop(Enum):
    """Quality of protection (RFC 7616 3.3)."""

    AUTH = "auth"
    AUTH_INT = "auth-int"


def digest_ha1(algorithm: DigestAlgorithm, username: str, realm: str, password: str) -> str:
    """HA1 = H(username ":" realm ":" password) for ``algorithm``'s hash (RFC 7616 3.4.2).

    This is what a credential store may keep instead of the password. For a
    ``-sess`` algorithm it is the inner hash; :func:`digest_response` adds the nonces.
    """
    return algorithm.hash(f"{username}:{realm}:{password}")


def digest_userhash(algorithm: DigestAlgorithm, username: str, realm: str) -> str:
    """RFC 7616 3.4.4: username = H(username ":" realm) when ``userhash=true``."""
    return algorithm.hash(f"{username}:{realm}")


def digest_response(
    *,
    algorithm: DigestAlgorithm,
    ha1: str,
    nonce: str,
    method: str,
    uri: str,
    qop: Qop | None,
    nc: int | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
    qop_token: str | None = None,
) -> str:
    """The request-digest (RFC 2617 3.2.2.1, RFC 7616 3.4.1).

    ``ha1`` is H(username:realm:password) (see :func:`digest_ha1`), also for the
    ``-sess`` algorithms, whose session key is derived here. ``body`` is only used
    for ``qop=auth-int``. ``qop_token`` is the qop as the credentials spell it, when
    not in lowercase (it is hashed as sent). Raises ``ValueError`` when qop or a
    ``-sess`` algorithm lacks the cnonce (and nc) it needs.
    """
    if algorithm.is_session:
        if cnonce is None:
            raise ValueError(f"algorithm {algorithm.value} requires a cnonce")
        # RFC 7616 3.4.2: HA1 = H(H(user:realm:pass) ":" nonce ":" cnonce)
        ha1 = algorithm.hash(f"{ha1}:{nonce}:{cnonce}")
    if qop is Qop.AUTH_INT:
        # RFC 7616 3.4.3: A2 = Method ":" request-uri ":" H(entity-body)
        ha2 = algorithm.hash(f"{method}:{uri}:{algorithm.hash_bytes(body)}")
    else:
        ha2 = algorithm.hash(f"{method}:{uri}")
    if qop is None:
        # RFC 2069 compatibility (RFC 2617 3.2.2.1).
        return algorithm.hash(f"{ha1}:{nonce}:{ha2}")
    if nc is None or cnonce is None:
        raise ValueError("qop requires nc and cnonce")
    if qop_token is None:
        qop_token = qop.value
    elif qop_token.lower() != qop.value:
        raise ValueError(f"qop_token {qop_token!r} does not spell {qop.value!r}")
    # RFC 7616 3.4.1: KD(HA1, nonce ":" nc ":" cnonce ":" qop ":" HA2), qop as sent.
    return algorithm.hash(f"{ha1}:{nonce}:{nc:08x}:{cnonce}:{qop_token}:{ha2}")


# --------------------------------------------------------------------------- grammar

# RFC 3261 25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`"
# / "'" / "~")
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_LWS_CHARS: Final = " \t\r\n"
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]+")
# RFC 3261 25.1 / RFC 2617 3.2.2: nc-value = 8LHEX, lowercase only. The request-digest
# hashes nc as sent and we rebuild it lowercase, so uppercase would fail as a wrong
# password (and count towards a ban) instead of being answered 400.
_NC_RE: Final = re.compile(r"[0-9a-f]{8}")

Params = tuple[tuple[str, str], ...]


_LWS_RE: Final = re.compile(r"[ \t\r\n]*")
_TOKEN_AT_RE: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]*")
#: A quoted-string of plain qdtext (no quoted-pair, fold or control character): the
#: common case, unquoted by one match; anything else takes the character loop.
_PLAIN_QUOTED_RE: Final = re.compile(r'"([^"\\\x00-\x08\x0a-\x1f\x7f]*)"')


def _skip_lws(text: str, pos: int) -> int:
    # RFC 3261 25.1: LWS = [*WSP CRLF] 1*WSP; values handed to us may still be folded.
    match = _LWS_RE.match(text, pos)
    return pos if match is None else match.end()


def _read_token(text: str, pos: int) -> int:
    match = _TOKEN_AT_RE.match(text, pos)
    return pos if match is None else match.end()


def _read_quoted(text: str, pos: int, name: str) -> tuple[str, int]:
    """Unquote the quoted-string starting at ``text[pos] == '"'``; return it and the end."""
    plain = _PLAIN_QUOTED_RE.match(text, pos)
    if plain is not None and len(plain.group(1)) <= MAX_AUTH_PARAM_LENGTH:
        return plain.group(1), plain.end()
    out: list[str] = []
    pos += 1
    end = len(text)
    while pos < end:
        char = text[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char == "\\":
            # RFC 3261 25.1: quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
            if pos + 1 >= end:
                break
            escaped = text[pos + 1]
            if escaped in "\r\n" or ord(escaped) > 0x7F:
                raise AuthHeaderError(f"invalid quoted-pair in auth-param {name!r}")
            out.append(escaped)
            pos += 2
        elif char in "\r\n":
            # qdtext allows LWS, so a fold (CRLF followed by WSP) counts as one SP.
            fold = pos + 2 if text.startswith("\r\n", pos) else pos + 1
            if fold >= end or text[fold] not in " \t":
                raise AuthHeaderError(f"bare line break in auth-param {name!r}")
            out.append(" ")
            pos = _skip_lws(text, fold)
        elif (ord(char) < 0x20 and char != "\t") or char == "\x7f":
            raise AuthHeaderError(f"control character in auth-param {name!r}")
        else:
            out.append(char)
            pos += 1
        if len(out) > MAX_AUTH_PARAM_LENGTH:
            raise AuthHeaderError(
                f"auth-param {name!r} longer than {MAX_AUTH_PARAM_LENGTH} characters"
            )
    raise AuthHeaderError(f"unterminated quoted-string in auth-param {name!r}")


def _split_scheme(value: str) -> tuple[str, str, int]:
    """Return (scheme, text, pos): the auth-scheme and where its params start."""
    if len(value) > MAX_AUTH_VALUE_LENGTH:
        raise AuthHeaderError(f"auth header value longer than {MAX_AUTH_VALUE_LENGTH} characters")
    text = value.rstrip(_LWS_CHARS)
    start = _skip_lws(text, 0)
    if start == len(text):
        raise AuthHeaderError("empty auth header value")
    end = _read_token(text, start)
    if end == start:
        raise AuthHeaderError("auth-scheme is not a token")
    if end < len(text) and text[end] not in _LWS_CHARS:
        raise AuthHeaderError("expected LWS after auth-scheme")
    return text[start:end], text, _skip_lws(text, end)


def _parse_params(text: str, pos: int) -> Params:
    """RFC 3261 25.1: auth-param *(COMMA auth-param), names lowercased, no duplicates."""
    if pos >= len(text):
        raise AuthHeaderError("no auth-params after auth-scheme")
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    while True:
        end = _read_token(text, pos)
        if end == pos:
            raise AuthHeaderError(f"expected auth-param name at offset {pos}")
        name = text[pos:end].lower()
        pos = _skip_lws(text, end)
        if pos >= len(text) or text[pos] != "=":
            raise AuthHeaderError(f"expected '=' after auth-param {name!r}")
        pos = _skip_lws(text, pos + 1)
        if pos < len(text) and text[pos] == '"':
            param_value, pos = _read_quoted(text, pos, name)
        else:
            end = _read_token(text, pos)
            if end == pos:
                raise AuthHeaderError(f"expected value for auth-param {name!r}")
            param_value, pos = text[pos:end], end
            if len(param_value) > MAX_AUTH_PARAM_LENGTH:
                raise AuthHeaderError(
                    f"auth-param {name!r} longer than {MAX_AUTH_PARAM_LENGTH} characters"
                )
        # RFC 7235 2.2 / RFC 7616 3.3: each parameter appears at most once.
        if name in seen:
            raise AuthHeaderError(f"duplicate auth-param {name!r}")
        seen.add(name)
        params.append((name, param_value))
        if len(params) > MAX_AUTH_PARAMS:
            raise AuthHeaderError(f"more than {MAX_AUTH_PARAMS} auth-params")
        pos = _skip_lws(text, pos)
        if pos >= len(text):
            return tuple(params)
        if text[pos] != ",":
            raise AuthHeaderError(f"expected ',' at offset {pos}")
        pos = _skip_lws(text, pos + 1)


def _quote(name: str, value: str) -> str:
    """A quoted-string for ``value``; refuses line breaks and controls (header injection)."""
    if any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in value):
        raise AuthHeaderError(f"control character in auth-param {name!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(scheme: str, items: Iterable[tuple[str, str | None]]) -> str:
    # Quoted values are passed pre-rendered; None means "omit".
    return scheme + " " + ", ".join(f"{name}={text}" for name, text in items if text is not None)


def _token_or_quoted(name: str, value: str) -> str:
    return value if _TOKEN_RE.fullmatch(value) else _quote(name, value)


def _render_extra(extra: Params) -> list[tuple[str, str | None]]:
    items: list[tuple[str, str | None]] = []
    for name, value in extra:
        if not _TOKEN_RE.fullmatch(name):
            raise AuthHeaderError(f"auth-param name {name!r} is not a token")
        items.append((name, _token_or_quoted(name, value)))
    return items


def _flag(value: str) -> bool:
    # RFC 7616 3.3: stale / userhash are true only if "true" (case-insensitive).
    return value.lower() == "true"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class GenericAuth:
    """A challenge or credentials value with a scheme other than Digest.

    ``params`` holds the auth-params when the rest follows the auth-param grammar,
    else None (e.g. a token68); ``raw`` always keeps the text after the scheme.
    """

    scheme: str
    raw: str
    params: Params | None = None

    def __str__(self) -> str:
        return f"{self.scheme} {self.raw}" if self.raw else self.scheme


@dataclass(frozen=True)
class DigestChallenge:
    """A Digest ``WWW-Authenticate`` / ``Proxy-Authenticate`` value (RFC 3261 25.1,
    RFC 7616 3.3).

    ``algorithm`` is None when absent (which means MD5). ``qop`` keeps the
    qop-options as lowercase tokens, unknown ones included (RFC 2617 3.2.1 says to
    ignore those); :attr:`qop_options` gives the known ones. Unknown auth-params are
    kept in ``extra``.
    """

    realm: str
    nonce: str
    algorithm: DigestAlgorithm | None = None
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False
    domain: str | None = None
    charset: str | None = None
    userhash: bool = False
    extra: Params = ()

    @classmethod
    def parse(cls, value: str) -> DigestChallenge:
        """Parse a Digest challenge; any other scheme raises :class:`AuthHeaderError`."""
        parsed = parse_challenge(value)
        if isinstance(parsed, GenericAuth):
            raise AuthHeaderError(f"unsupported auth-scheme {parsed.scheme!r}")
        return parsed

    @property
    def effective_algorithm(self) -> DigestAlgorithm:
        """The algorithm in use: RFC 7616 3.3 says an absent algorithm means MD5."""
        return self.algorithm or DigestAlgorithm.MD5

    @property
    def qop_options(self) -> tuple[Qop, ...]:
        """The qop-options we understand, in the order offered."""
        known = {q.value: q for q in Qop}
        return tuple(known[token] for token in self.qop if token in known)

    def __str__(self) -> str:
        items: list[tuple[str, str | None]] = [
            ("realm", _quote("realm", self.realm)),
            ("domain", None if self.domain is None else _quote("domain", self.domain)),
            ("nonce", _quote("nonce", self.nonce)),
            ("opaque", None if self.opaque is None else _quote("opaque", self.opaque)),
            ("algorithm", None if self.algorithm is None else self.algorithm.value),
            ("qop", _quote("qop", ",".join(self.qop)) if self.qop else None),
            ("stale", "true" if self.stale else None),
            (
                "charset",
                None if self.charset is None else _token_or_quoted("charset", self.charset),
            ),
            ("userhash", "true" if self.userhash else None),
            *_render_extra(self.extra),
        ]
        return _render("Digest", items)


@dataclass(frozen=True)
class DigestCredentials:
    """A Digest ``Authorization`` / ``Proxy-Authorization`` value (RFC 3261 25.1,
    RFC 7616 3.4). ``nc`` is the nonce-count as an int (8 hex digits on the wire).

    ``qop_token`` keeps the qop as sent when it is not in lowercase (``AUTH``): RFC
    3261 25.1 literals are case-insensitive, and RFC 7616 3.4.1 hashes the qop as
    sent, so the spelling is part of the digest. ``response`` is not in ``repr``:
    with the nonces beside it, it is what an offline dictionary attack on the
    password needs (RFC 7616 5.7).
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str = field(repr=False)
    algorithm: DigestAlgorithm | None = None
    cnonce: str | None = None
    opaque: str | None = None
    qop: Qop | None = None
    nc: int | None = None
    userhash: bool = False
    extra: Params = ()
    qop_token: str | None = None

    def __post_init__(self) -> None:
        if self.qop_token is not None and (
            self.qop is None or self.qop_token.lower() != self.qop.value
        ):
            raise ValueError(f"qop_token {self.qop_token!r} does not spell qop {self.qop}")

    @classmethod
    def parse(cls, value: str) -> DigestCredentials:
        """Parse Digest credentials; any other scheme raises :class:`AuthHeaderError`."""
        parsed = parse_credentials(value)
        if isinstance(parsed, GenericAuth):
            raise AuthHeaderError(f"unsupported auth-scheme {parsed.scheme!r}")
        return parsed

    @property
    def effective_algorithm(self) -> DigestAlgorithm:
        """The algorithm in use: absent means MD5 (RFC 7616 3.4)."""
        return self.algorithm or DigestAlgorithm.MD5

    def __str__(self) -> str:
        if self.nc is not None and not 0 <= self.nc <= MAX_NONCE_COUNT:
            raise AuthHeaderError(f"nc {self.nc} out of range")
        items: list[tuple[str, str | None]] = [
            ("username", _quote("username", self.username)),
            ("realm", _quote("realm", self.realm)),
            ("nonce", _quote("nonce", self.nonce)),
            ("uri", _quote("uri", self.uri)),
            ("response", _quote("response", self.response)),
            ("algorithm", None if self.algorithm is None else self.algorithm.value),
            ("cnonce", None if self.cnonce is None else _quote("cnonce", self.cnonce)),
            ("opaque", None if self.opaque is None else _quote("opaque", self.opaque)),
            # RFC 3261 25.1: message-qop and nonce-count are unquoted.
            ("qop", None if self.qop is None else self.qop_token or self.qop.value),
            ("nc", None if self.nc is None else f"{self.nc:08x}"),
            ("userhash", "true" if self.userhash else None),
            *_render_extra(self.extra),
        ]
        return _render("Digest", items)


_CHALLENGE_PARAMS: Final = frozenset(
    {"realm", "nonce", "algorithm", "qop", "opaque", "stale", "domain", "charset", "userhash"}
)
_CREDENTIAL_PARAMS: Final = frozenset(
    {
        "username",
        "realm",
        "nonce",
        "uri",
        "response",
        "algorithm",
        "cnonce",
        "opaque",
        "qop",
        "nc",
        "userhash",
    }
)


def _generic(scheme: str, text: str, pos: int) -> GenericAuth:
    try:
        params: Params | None = _parse_params(text, pos) if pos < len(text) else ()
    except AuthHeaderError:
        params = None
    return GenericAuth(scheme=scheme, raw=text[pos:], params=params)


def _require(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if value is None:
        raise AuthHeaderError(f"missing auth-param {name!r}")
    return value


def parse_challenge(value: str) -> DigestChallenge | GenericAuth:
    """Parse a ``WWW-Authenticate`` / ``Proxy-Authenticate`` value.

    A Digest challenge (scheme compared case-insensitively) becomes a
    :class:`DigestChallenge`; any other scheme a :class:`GenericAuth`. Raises
    :class:`AuthHeaderError` on malformed Digest values or an unknown algorithm (RFC
    7616 3.3: a client ignores challenges it cannot use).
    """
    scheme, text, pos = _split_scheme(value)
    if scheme.lower() != "digest":
        return _generic(scheme, text, pos)
    params = dict(_parse_params(text, pos))
    algorithm = params.get("algorithm")
    qop = params.get("qop")
    return DigestChallenge(
        realm=_require(params, "realm"),
        nonce=_require(params, "nonce"),
        algorithm=None if algorithm is None else DigestAlgorithm.from_token(algorithm),
        qop=()
        if qop is None
        else tuple(t.strip(_LWS_CHARS).lower() for t in qop.split(",") if t.strip(_LWS_CHARS)),
        opaque=params.get("opaque"),
        stale=_flag(params.get("stale", "")),
        domain=params.get("domain"),
        charset=params.get("charset"),
        userhash=_flag(params.get("userhash", "")),
        extra=tuple((k, v) for k, v in params.items() if k not in _CHALLENGE_PARAMS),
    )


def parse_credentials(value: str) -> DigestCredentials | GenericAuth:
    """Parse an ``Authorization`` / ``Proxy-Authorization`` value.

    Digest credentials become :class:`DigestCredentials`; any other scheme (RFC 4475
    3.1.2.9 regaut01) a :class:`GenericAuth`, which a server answers with a
    challenge. Raises :class:`AuthHeaderError` on malformed Digest credentials.
    """
    scheme, text, pos = _split_scheme(value)
    if scheme.lower() != "digest":
        return _generic(scheme, text, pos)
    params = dict(_parse_params(text, pos))
    algorithm = params.get("algorithm")
    qop_token = params.get("qop")
    qop: Qop | None = None
    if qop_token is not None:
        try:
            qop = Qop(qop_token.lower())
        except ValueError:
            raise AuthHeaderError(f"unsupported qop {qop_token!r}") from None
    nc_text = params.get("nc")
    if nc_text is not None and not _NC_RE.fullmatch(nc_text):
        raise AuthHeaderError(f"invalid nc {nc_text!r}")
    cnonce = params.get("cnonce")
    # RFC 7616 3.4: cnonce and nc MUST be sent with qop.
    if qop is not None and cnonce is None:
        raise AuthHeaderError("auth-param 'cnonce' is required with qop")
    if qop is not None and nc_text is None:
        raise AuthHeaderError("auth-param 'nc' is required with qop")
    return DigestCredentials(
        username=_require(params, "username"),
        realm=_require(params, "realm"),
        nonce=_require(params, "nonce"),
        uri=_require(params, "uri"),
        response=_require(params, "response"),
        algorithm=None if algorithm is None else DigestAlgorithm.from_token(algorithm),
        cnonce=cnonce,
        opaque=params.get("opaque"),
        qop=qop,
        nc=None if nc_text is None else int(nc_text, 16),
        userhash=_flag(params.get("userhash", "")),
        extra=tuple((k, v) for k, v in params.items() if k not in _CREDENTIAL_PARAMS),
        qop_token=None if qop is None or qop_token == qop.value else qop_token,
    )


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class UserSecret:
    """What the credential store knows about one user: a password, or HA1 values.

    ``ha1`` maps non-session algorithms to H(username:realm:password) for this
    server's realm; the ``-sess`` variants use the same HA1. Neither field shows in
    ``repr``.
    """

    password: str | None = field(default=None, repr=False)
    ha1: tuple[tuple[DigestAlgorithm, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for algorithm, _ in self.ha1:
            if algorithm.is_session:
                raise ValueError(f"HA1 key must be a non-session algorithm: {algorithm.value}")

    @classmethod
    def from_password(cls, password: str) -> UserSecret:
        """A secret holding the plaintext password."""
        return cls(password=password)

    @classmethod
    def from_ha1(cls, ha1: Mapping[DigestAlgorithm, str]) -> UserSecret:
        """A secret holding stored HA1 values, keyed by non-session algorithm."""
        return cls(ha1=tuple((a, h.lower()) for a, h in ha1.items()))

    def ha1_for(self, algorithm: DigestAlgorithm, username: str, realm: str) -> str | None:
        """HA1 for ``algorithm``, computed from the password or looked up; None if unknown."""
        for stored_algorithm, value in self.ha1:
            if stored_algorithm is algorithm.base:
                return value
        if self.password is not None:
            return digest_ha1(algorithm, username, realm, self.password)
        return None


# --------------------------------------------------------------------------- server


class AuthOutcome(Enum):
    """Why credentials were accepted or refused."""

    OK = "ok"
    #: Right password, but the nonce is too old or not issued with our key (from
    #: before a restart, say): challenge again with stale=true (RFC 7616 3.3) so
    #: the client retries without asking its user.
    STALE = "stale"
    BAD_RESPONSE = "bad-response"
    UNKNOWN_USER = "unknown-user"
    #: The nonce-count did not increase (RFC 7616 3.4): a replayed request, or two
    #: requests of one client reordered on the way. The digest is right, so it is
    #: challenged with stale=true like an expired nonce (RFC 7616 3.3; OpenSIPS
    #: reports a reused nonce as stale too) and is no failed guess.
    REPLAY = "replay"
    #: Credentials that do not parse or are inconsistent: answer 400.
    MALFORMED = "malformed"
    #: The digest-uri is not the Request-URI (RFC 2617 3.2.2.5).
    URI_MISMATCH = "uri-mismatch"
    REALM_MISMATCH = "realm-mismatch"
    OPAQUE_MISMATCH = "opaque-mismatch"
    #: A scheme other than Digest (RFC 4475 3.1.2.9): challenge.
    UNSUPPORTED_SCHEME = "unsupported-scheme"
    #: An algorithm we do not offer, or one the credential store has no HA1 for.
    UNSUPPORTED_ALGORITHM = "unsupported-algorithm"
    #: A qop we do not offer, or none when RFC 2069 mode is off.
    UNSUPPORTED_QOP = "unsupported-qop"
    #: Too many failed guesses from this source or for this user name: answered
    #: 503 with Retry-After, the credentials unchecked (:class:`PasswordGuessLimiter`).
    LOCKED_OUT = "locked-out"


@dataclass(frozen=True)
class AuthResult:
    """The verdict on one request's credentials. ``detail`` is for logs (no secrets)."""

    outcome: AuthOutcome
    username: str | None = None
    algorithm: DigestAlgorithm | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when the request is authenticated."""
        return self.outcome is AuthOutcome.OK

    @property
    def stale(self) -> bool:
        """True when the next challenge should carry ``stale=true``: the digest was
        right, only the nonce or its count was not (RFC 7616 3.3)."""
        return self.outcome is AuthOutcome.STALE or self.outcome is AuthOutcome.REPLAY


@dataclass(frozen=True)
class DigestServerConfig:
    """Policy of a :class:`DigestServer`. ``key`` (HMAC key for nonces) is not in repr.

    ``algorithms`` is the preference order challenges are offered in (RFC 8760 2.4:
    SHA-256 first). ``qop`` lists the qop-options offered; ``allow_no_qop`` accepts
    RFC 2069 credentials without qop, which have no replay protection besides the
    nonce lifetime, so it is off by default.
    """

    realm: str
    key: bytes = field(repr=False)
    algorithms: tuple[DigestAlgorithm, ...] = SERVER_ALGORITHMS
    nonce_lifetime: float = DEFAULT_NONCE_LIFETIME
    qop: tuple[Qop, ...] = (Qop.AUTH,)
    allow_no_qop: bool = False
    opaque: str | None = None
    max_tracked_nonces: int = MAX_TRACKED_NONCES

    def __post_init__(self) -> None:
        if not self.realm:
            raise ValueError("realm must not be empty")
        if len(self.key) < MIN_KEY_LENGTH:
            raise ValueError(f"key must be at least {MIN_KEY_LENGTH} bytes")
        if not self.algorithms or len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError("algorithms must be non-empty and distinct")
        if not (self.nonce_lifetime > 0 and math.isfinite(self.nonce_lifetime)):
            raise ValueError("nonce_lifetime must be a positive number of seconds")
        if not self.qop and not self.allow_no_qop:
            raise ValueError("qop must not be empty unless allow_no_qop is set")
        if self.max_tracked_nonces < 1:
            raise ValueError("max_tracked_nonces must be at least 1")


_NONCE_TIME: Final = struct.Struct(">d")
_NONCE_RANDOM_LENGTH: Final = 16
_NONCE_MAC_LENGTH: Final = 16
_NONCE_RAW_LENGTH: Final = _NONCE_TIME.size + _NONCE_RANDOM_LENGTH + _NONCE_MAC_LENGTH
_NONCE_TEXT_RE: Final = re.compile(r"[A-Za-z0-9_\-]{54}")  # 40 bytes, unpadded base64url
_NONCE_MAC_LABEL: Final = b"sbc digest nonce v1\x00"


class NonceCountTracker:
    """Highest nonce-count seen per nonce, in bounded memory (RFC 7616 3.4 replay check).

    Only nonces that passed verification are recorded, so a peer without the
    password cannot fill the table. Entries leave when their nonce expires, or,
    oldest-issued first, when ``max_entries`` is reached. Every forgotten nonce
    raises a watermark: a nonce issued at or before it that is not tracked is
    reported stale rather than accepted, so forgetting never opens a replay; the
    client just re-authenticates with a fresh nonce.
    """

    def __init__(self, max_entries: int = MAX_TRACKED_NONCES) -> None:
        self._max_entries = max_entries
        self._highest: dict[str, int] = {}
        self._by_issue: list[tuple[float, str]] = []
        self._watermark = -math.inf
        self._latest = -math.inf

    def __len__(self) -> int:
        return len(self._highest)

    def expire(self, now: float, lifetime: float) -> None:
        """Forget nonces older than ``lifetime`` at ``now``, and everything when the
        clock stepped back: the watermark would then lie in the future and make every
        fresh nonce stale until the clock caught up. Nothing tracked can be replayed
        after that: a nonce issued before the step is from the future, and refused
        as such (``NONCE_MAX_FUTURE_SKEW``)."""
        if now < self._latest - NONCE_MAX_FUTURE_SKEW:
            self._highest.clear()
            self._by_issue.clear()
            self._watermark = -math.inf
        self._latest = now
        while self._by_issue and now - self._by_issue[0][0] > lifetime:
            self._forget_oldest()

    def check_and_record(self, nonce: str, issued_at: float, nc: int) -> AuthOutcome:
        """OK (and remember ``nc``), REPLAY if ``nc`` did not increase, or STALE."""
        highest = self._highest.get(nonce)
        if highest is not None:
            if nc <= highest:
                return AuthOutcome.REPLAY
            self._highest[nonce] = nc
            return AuthOutcome.OK
        if issued_at <= self._watermark:
            return AuthOutcome.STALE
        while len(self._highest) >= self._max_entries:
            self._forget_oldest()
        if issued_at <= self._watermark:
            return AuthOutcome.STALE
        self._highest[nonce] = nc
        heapq.heappush(self._by_issue, (issued_at, nonce))
        return AuthOutcome.OK

    def _forget_oldest(self) -> None:
        issued_at, nonce = heapq.heappop(self._by_issue)
        del self._highest[nonce]
        self._watermark = max(self._watermark, issued_at)


class DigestServer:
    """Digest authentication for one realm (RFC 3261 22.1 / 22.3, RFC 7616).

    Nonces are stateless: base64url(time || random || HMAC-SHA256(key, time ||
    random || realm)), so any node holding the key can check them. State is kept
    only for replay protection (:class:`NonceCountTracker`). Usage::

        values = server.challenge_values(now)          # 401 / 407 headers
        creds = parse_credentials(authorization)       # raises AuthHeaderError
        secret = store.lookup(creds.username)          # caller's I/O
        result = server.verify(creds, method=..., request_uri=..., secret=secret, now=now)
    """

    def __init__(
        self,
        config: DigestServerConfig,
        *,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.config = config
        self._random_bytes = random_bytes
        self._tracker = NonceCountTracker(config.max_tracked_nonces)

    def __repr__(self) -> str:
        return f"DigestServer(realm={self.config.realm!r})"

    @property
    def tracked_nonces(self) -> int:
        """How many nonces are tracked for replay protection."""
        return len(self._tracker)

    # -- nonces

    def _mac(self, stamp: bytes, random: bytes) -> bytes:
        message = _NONCE_MAC_LABEL + stamp + random + self.config.realm.encode("utf-8")
        return hmac.new(self.config.key, message, hashlib.sha256).digest()[:_NONCE_MAC_LENGTH]

    def make_nonce(self, now: float) -> str:
        """A fresh nonce stamped with ``now``."""
        stamp = _NONCE_TIME.pack(now)
        random = self._random_bytes(_NONCE_RANDOM_LENGTH)
        if len(random) != _NONCE_RANDOM_LENGTH:
            raise ValueError(f"random_bytes must return {_NONCE_RANDOM_LENGTH} bytes")
        raw = stamp + random + self._mac(stamp, random)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def nonce_issued_at(self, nonce: str) -> float | None:
        """The time a genuine nonce of ours was issued, or None if it is not ours."""
        if not _NONCE_TEXT_RE.fullmatch(nonce):
            return None
        raw = base64.urlsafe_b64decode(nonce + "==")
        # Only the canonical encoding is accepted, so one nonce has exactly one
        # spelling and the replay tracker (keyed by text) cannot be sidestepped.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != nonce:
            return None
        if len(raw) != _NONCE_RAW_LENGTH:
            return None
        stamp = raw[: _NONCE_TIME.size]
        random = raw[_NONCE_TIME.size : _NONCE_TIME.size + _NONCE_RANDOM_LENGTH]
        mac = raw[_NONCE_TIME.size + _NONCE_RANDOM_LENGTH :]
        if not hmac.compare_digest(mac, self._mac(stamp, random)):
            return None
        (issued_at,) = _NONCE_TIME.unpack(stamp)
        return issued_at if math.isfinite(issued_at) else None

    def nonce_fresh(self, nonce: str, now: float) -> bool:
        """Whether ``nonce`` is one of ours and still within its lifetime (cheap: an
        HMAC, no user lookup; says nothing of whether it was used already)."""
        issued_at = self.nonce_issued_at(nonce)
        return issued_at is not None and not self._expired(issued_at, now)

    def _expired(self, issued_at: float, now: float) -> bool:
        age = now - issued_at
        return age > self.config.nonce_lifetime or age < -NONCE_MAX_FUTURE_SKEW

    # -- challenges

    def challenges(self, now: float, *, stale: bool = False) -> tuple[DigestChallenge, ...]:
        """One challenge per configured algorithm, in preference order (RFC 8760 2.4).

        They share one nonce. ``stale`` is set after an :attr:`AuthOutcome.STALE`
        verdict (RFC 7616 3.3).
        """
        nonce = self.make_nonce(now)
        return tuple(
            DigestChallenge(
                realm=self.config.realm,
                nonce=nonce,
                algorithm=algorithm,
                qop=tuple(q.value for q in self.config.qop),
                opaque=self.config.opaque,
                stale=stale,
            )
            for algorithm in self.config.algorithms
        )

    def challenge_values(self, now: float, *, stale: bool = False) -> list[str]:
        """The ``WWW-Authenticate`` / ``Proxy-Authenticate`` header values to send."""
        return [str(challenge) for challenge in self.challenges(now, stale=stale)]

    # -- verification

    def verify(
        self,
        credentials: DigestCredentials | GenericAuth | str,
        *,
        method: str,
        request_uri: str,
        secret: UserSecret | None,
        now: float,
        body: bytes = b"",
    ) -> AuthResult:
        """Check credentials against this request; never raises on what a peer sent.

        ``credentials`` is a parsed or raw ``Authorization`` value; ``secret`` the
        credential store's answer for ``credentials.username`` (None: no such user).
        ``body`` is only used for ``qop=auth-int``. A successful check with qop
        records the nonce-count, so verifying the same request twice is a REPLAY.
        """
        if isinstance(credentials, str):
            try:
                credentials = parse_credentials(credentials)
            except AuthHeaderError as exc:
                return self._fail(AuthOutcome.MALFORMED, None, None, str(exc))
        if isinstance(credentials, GenericAuth):
            return self._fail(
                AuthOutcome.UNSUPPORTED_SCHEME, None, None, f"scheme {credentials.scheme!r}"
            )
        try:
            return self._verify_digest(credentials, method, request_uri, secret, now, body)
        except ValueError as exc:
            # Text that cannot be hashed (lone surrogates) or serialized.
            return self._fail(AuthOutcome.MALFORMED, credentials.username, None, str(exc))

    def _verify_digest(
        self,
        creds: DigestCredentials,
        method: str,
        request_uri: str,
        secret: UserSecret | None,
        now: float,
        body: bytes,
    ) -> AuthResult:
        config = self.config
        user = creds.username
        algorithm = creds.effective_algorithm
        if creds.realm != config.realm:
            return self._fail(AuthOutcome.REALM_MISMATCH, user, algorithm, "realm differs")
        if algorithm not in config.algorithms:
            return self._fail(AuthOutcome.UNSUPPORTED_ALGORITHM, user, algorithm, "not offered")
        if config.opaque is not None and creds.opaque != config.opaque:
            return self._fail(AuthOutcome.OPAQUE_MISMATCH, user, algorithm, "opaque differs")
        if creds.userhash:
            return self._fail(AuthOutcome.MALFORMED, user, algorithm, "userhash not offered")
        # A nonce not issued with our key: forged, or from before a restart or a
        # failover (the key is the node's). Judged once the digest is: right
        # credentials on it get stale=true, so phones retry without asking their
        # user (RFC 7616 3.3); a wrong digest is a failure like any other.
        issued_at = self.nonce_issued_at(creds.nonce)
        # RFC 2617 3.2.2.5: the digest-uri must be the Request-URI.
        if creds.uri != request_uri:
            return self._fail(AuthOutcome.URI_MISMATCH, user, algorithm, "uri differs")
        if creds.qop is None:
            if not config.allow_no_qop:
                return self._fail(AuthOutcome.UNSUPPORTED_QOP, user, algorithm, "qop required")
            if algorithm.is_session and creds.cnonce is None:
                return self._fail(AuthOutcome.MALFORMED, user, algorithm, "-sess needs cnonce")
        elif creds.qop not in config.qop:
            return self._fail(AuthOutcome.UNSUPPORTED_QOP, user, algorithm, "qop not offered")
        elif creds.nc is None or creds.nc == 0:
            return self._fail(AuthOutcome.MALFORMED, user, algorithm, "nc must be at least 1")
        response = creds.response
        if len(response) != algorithm.digest_length or not _HEX_RE.fullmatch(response):
            return self._fail(AuthOutcome.MALFORMED, user, algorithm, "bad response syntax")
        # An unknown user is hashed like a wrong password (against a dummy HA1), so
        # the time to answer does not tell which user names exist.
        ha1 = (
            "0" * algorithm.digest_length
            if secret is None
            else secret.ha1_for(algorithm, creds.username, config.realm)
        )
        if ha1 is None:
            return self._fail(AuthOutcome.UNSUPPORTED_ALGORITHM, user, algorithm, "no HA1 stored")
        expected = digest_response(
            algorithm=algorithm,
            ha1=ha1,
            nonce=creds.nonce,
            method=method,
            uri=creds.uri,
            qop=creds.qop,
            nc=creds.nc,
            cnonce=creds.cnonce,
            body=body,
            qop_token=creds.qop_token,
        )
        matched = hmac.compare_digest(expected, response.lower())
        if secret is None:
            return self._fail(AuthOutcome.UNKNOWN_USER, user, algorithm, "no such user")
        if not matched:
            # A failure on any nonce: a foreign one must not make a free guess.
            return self._fail(AuthOutcome.BAD_RESPONSE, user, algorithm, "digest mismatch")
        if issued_at is None:
            return self._fail(AuthOutcome.STALE, user, algorithm, "nonce not ours")
        # RFC 7616 3.3: stale only once the digest is known to be right.
        if self._expired(issued_at, now):
            return self._fail(AuthOutcome.STALE, user, algorithm, "nonce expired")
        if creds.nc is not None:
            self._tracker.expire(now, config.nonce_lifetime)
            verdict = self._tracker.check_and_record(creds.nonce, issued_at, creds.nc)
            if verdict is not AuthOutcome.OK:
                return self._fail(verdict, user, algorithm, f"nc {creds.nc:08x}")
        logger.debug("- digest auth ok user=%r algorithm=%s", user, algorithm.value)
        return AuthResult(AuthOutcome.OK, user, algorithm)

    @staticmethod
    def _fail(
        outcome: AuthOutcome,
        username: str | None,
        algorithm: DigestAlgorithm | None,
        detail: str,
    ) -> AuthResult:
        logger.debug("x digest auth %s user=%r: %s", outcome.value, username, detail)
        return AuthResult(outcome, username, algorithm, detail)


# --------------------------------------------------------------------------- guessing

#: Failed authentications (a wrong digest or an unknown user; never a stale nonce or
#: a replay) from one source within :data:`GUESS_WINDOW` that lock the source out
#: for :data:`LOCKOUT_DURATION`. RFC 3261 22 sets no limit of its own; the
#: firewall's detector bans sooner when it runs, this limit holds without it.
MAX_FAILURES_PER_SOURCE: Final = 10
#: The same for one user name, from any number of sources (distributed guessing).
#: Not below the firewall's per-user default (``auth.per_user``, 20): a locked-out
#: guess is answered 503 and not reported as a failure, so a lower limit here would
#: keep the firewall from ever banning the sources of a distributed attack.
MAX_FAILURES_PER_USER: Final = 20
#: Seconds failures are counted over, from the first one of a window.
GUESS_WINDOW: Final = 60.0
#: Seconds a lockout lasts. Nothing sent meanwhile makes it longer.
LOCKOUT_DURATION: Final = 300.0
#: Sources, and user names, counted at most (each table); past that the one that
#: failed least recently is forgotten, so memory stays bounded.
MAX_GUESS_KEYS: Final = 16_384
#: Seconds a (user, source) pair that authenticated stays exempt from lockouts it
#: did not cause, after its last success: a phone keeps registering and calling
#: while its user name is guessed at from elsewhere.
TRUSTED_PAIR_LIFETIME: Final = 7_200.0
#: Trusted pairs kept at most; only a right password adds one.
MAX_TRUSTED_PAIRS: Final = 131_072
#: IPv6 sources are counted per prefix: one host may use any address of its /64.
GUESS_IPV6_PREFIX: Final = 64
#: Longer user names (none is valid in the credential store) are counted under a
#: hash, so an entry stays small whatever name is sent.
MAX_USER_KEY_LENGTH: Final = 64


@functools.lru_cache(maxsize=4_096)
def _source_key(source: str, ipv6_prefix: int) -> str:
    """What failures of ``source`` are counted under: its IPv4 address (also when
    IPv4-mapped), its IPv6 prefix, or the text itself when it is no IP literal."""
    text = source[1:-1] if source.startswith("[") and source.endswith("]") else source
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return source
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


def _user_key(username: str) -> str:
    if len(username) <= MAX_USER_KEY_LENGTH:
        return username
    raw = username.encode("utf-8", "surrogatepass")
    return "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass(slots=True)
class _Failures:
    """Failures of one source or user name in the current window, and its lockout."""

    window_start: float
    count: int = 0
    locked_at: float = -math.inf


class PasswordGuessLimiter:
    """Bounded limit on online password guessing, per source and per user name.

    :meth:`failed` counts a wrong digest or an unknown user (both, so a lockout
    does not tell which names exist). ``per_source`` failures from a source, or
    ``per_user`` for a user name, within ``window`` seconds lock it out for
    ``lockout`` seconds: :meth:`lockout` then gives the seconds left and the caller
    answers without checking the credentials, so no guess is judged, none can
    succeed, and the lockout cannot be stretched. Times are compared both ways, so
    a clock stepped back ends a lockout instead of lengthening it.

    A (user, source) pair that authenticated (:meth:`succeeded`) is exempt from
    both lockouts for ``trust_lifetime`` seconds, so guessing at a user name from
    elsewhere does not lock out the phones already using it; a failure of that very
    pair ends its exemption. Without a source only the user name is counted and
    nobody is exempt.

    Memory is bounded: ``max_keys`` sources and as many user names (least recently
    failed forgotten first; entries leave once their window and lockout are over),
    and ``max_trusted`` pairs (oldest success first), which only a right password
    adds. Sans-I/O: every call takes ``now``.
    """

    def __init__(
        self,
        *,
        per_source: int = MAX_FAILURES_PER_SOURCE,
        per_user: int = MAX_FAILURES_PER_USER,
        window: float = GUESS_WINDOW,
        lockout: float = LOCKOUT_DURATION,
        max_keys: int = MAX_GUESS_KEYS,
        trust_lifetime: float = TRUSTED_PAIR_LIFETIME,
        max_trusted: int = MAX_TRUSTED_PAIRS,
        ipv6_prefix: int = GUESS_IPV6_PREFIX,
    ) -> None:
        if per_source < 1 or per_user < 1 or max_keys < 1 or max_trusted < 1:
            raise ValueError("per_source, per_user, max_keys and max_trusted must be at least 1")
        for name, value in (
            ("window", window),
            ("lockout", lockout),
            ("trust_lifetime", trust_lifetime),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be 0 to 128")
        self.per_source = per_source
        self.per_user = per_user
        self.window = window
        self.lockout_duration = lockout
        self.max_keys = max_keys
        self.trust_lifetime = trust_lifetime
        self.max_trusted = max_trusted
        self.ipv6_prefix = ipv6_prefix
        # Both in order of last failure (or success): the first is the stalest.
        self._sources: dict[str, _Failures] = {}
        self._users: dict[str, _Failures] = {}
        self._trusted: dict[tuple[str, str], float] = {}

    def __repr__(self) -> str:
        return (
            f"PasswordGuessLimiter(sources={len(self._sources)}, users={len(self._users)}, "
            f"trusted={len(self._trusted)})"
        )

    @property
    def tracked(self) -> tuple[int, int, int]:
        """How many sources, user names and trusted pairs are held."""
        return len(self._sources), len(self._users), len(self._trusted)

    def lockout(self, username: str, source: str | None, now: float) -> float | None:
        """Seconds left of a lockout of ``source`` or ``username`` (None: go on and
        check the credentials). A trusted pair is never locked out."""
        user = _user_key(username)
        entries = [self._users.get(user)]
        if source is not None:
            source_key = _source_key(source, self.ipv6_prefix)
            trusted_at = self._trusted.get((user, source_key))
            if trusted_at is not None and trusted_at <= now < trusted_at + self.trust_lifetime:
                return None
            entries.append(self._sources.get(source_key))
        left = 0.0
        for entry in entries:
            if entry is not None and entry.locked_at <= now:
                left = max(left, entry.locked_at + self.lockout_duration - now)
        return left if left > 0 else None

    def failed(self, username: str, source: str | None, now: float) -> list[str]:
        """Count a failed guess; what it locked out (for the log), usually nothing."""
        user = _user_key(username)
        locked: list[str] = []
        if source is not None:
            source_key = _source_key(source, self.ipv6_prefix)
            self._trusted.pop((user, source_key), None)
            if self._count(self._sources, source_key, self.per_source, now):
                locked.append(f"source {source_key}")
        if self._count(self._users, user, self.per_user, now):
            locked.append(f"user {username!r}")
        return locked

    def succeeded(self, username: str, source: str | None, now: float) -> None:
        """Trust the pair that just authenticated (nothing without a source)."""
        if source is None:
            return
        trusted = self._trusted
        key = (_user_key(username), _source_key(source, self.ipv6_prefix))
        trusted.pop(key, None)
        trusted[key] = now
        while trusted:
            stalest = next(iter(trusted))
            at = trusted[stalest]
            if len(trusted) <= self.max_trusted and at <= now < at + self.trust_lifetime:
                break
            del trusted[stalest]

    def _count(self, table: dict[str, _Failures], key: str, limit: int, now: float) -> bool:
        entry = table.pop(key, None)
        if entry is None:
            entry = _Failures(now)
        elif not entry.window_start <= now < entry.window_start + self.window:
            entry.window_start, entry.count = now, 0
        table[key] = entry
        entry.count += 1
        started = False
        locked = entry.locked_at <= now < entry.locked_at + self.lockout_duration
        if entry.count >= limit and not locked:
            entry.locked_at, entry.count, started = now, 0, True
        while table:
            stalest = next(iter(table))
            if len(table) <= self.max_keys and self._alive(table[stalest], now):
                break
            del table[stalest]
        return started

    def _alive(self, entry: _Failures, now: float) -> bool:
        start, locked_at = entry.window_start, entry.locked_at
        return (
            start <= now < start + self.window
            or locked_at <= now < locked_at + self.lockout_duration
        )


# --------------------------------------------------------------------------- client


def select_challenge(
    challenges: Iterable[str | DigestChallenge],
    preference: Sequence[DigestAlgorithm] = CLIENT_ALGORITHM_PREFERENCE,
) -> DigestChallenge | None:
    """The challenge with the strongest algorithm in ``preference`` that we can answer.

    Values that do not parse, other schemes, unknown algorithms and qop-options we
    do not know are skipped (RFC 7616 3.7: a client ignores what it cannot use).
    Ties keep the server's order.
    """
    best: DigestChallenge | None = None
    best_rank = len(preference)
    for item in challenges:
        if isinstance(item, str):
            try:
                parsed = parse_challenge(item)
            except AuthHeaderError:
                continue
            if isinstance(parsed, GenericAuth):
                continue
            item = parsed
        algorithm = item.effective_algorithm
        if algorithm not in preference or not _usable_qop(item):
            continue
        rank = preference.index(algorithm)
        if rank < best_rank:
            best, best_rank = item, rank
    return best


def _usable_qop(challenge: DigestChallenge) -> bool:
    if challenge.qop:
        return bool(challenge.qop_options)
    # Without qop there is no cnonce, which the -sess variants need.
    return not challenge.effective_algorithm.is_session


@dataclass
class _NonceState:
    challenge: DigestChallenge
    cnonce: str
    nc: int = 0


class DigestClient:
    """Answers Digest challenges for one user (RFC 3261 22.2, RFC 7616 3.4).

    Keeps the last challenge per realm so that later requests reuse its nonce with
    an increasing nonce-count (:meth:`authorize`). The password is never in repr.
    """

    def __init__(
        self,
        username: str,
        password: str,
        *,
        cnonce_factory: Callable[[], str] | None = None,
        preference: Sequence[DigestAlgorithm] = CLIENT_ALGORITHM_PREFERENCE,
    ) -> None:
        self.username = username
        self._password = password
        self._cnonce_factory = cnonce_factory or _default_cnonce
        self._preference = tuple(preference)
        self._realms: dict[str, _NonceState] = {}

    def __repr__(self) -> str:
        return f"DigestClient(username={self.username!r})"

    def respond(
        self,
        challenges: str | DigestChallenge | Iterable[str | DigestChallenge],
        *,
        method: str,
        uri: str,
        body: bytes = b"",
        already_tried: bool = False,
    ) -> str:
        """The Authorization value answering the best of ``challenges``.

        ``already_tried`` says the challenged request already carried our
        credentials for that realm: unless the server said ``stale=true`` (RFC 7616
        3.3: re-authenticate with the new nonce, no need to ask the user) that
        raises :class:`CredentialsRejectedError`. Raises
        :class:`NoUsableChallengeError` when nothing offered can be answered.
        """
        if isinstance(challenges, str | DigestChallenge):
            challenges = (challenges,)
        challenge = select_challenge(challenges, self._preference)
        if challenge is None:
            raise NoUsableChallengeError("no usable Digest challenge")
        if already_tried and not challenge.stale:
            raise CredentialsRejectedError(f"credentials rejected for realm {challenge.realm!r}")
        state = self._realms.pop(challenge.realm, None)
        if state is None or state.challenge.nonce != challenge.nonce:
            state = _NonceState(challenge, self._cnonce_factory())
        while len(self._realms) >= MAX_CLIENT_REALMS:
            del self._realms[next(iter(self._realms))]
        self._realms[challenge.realm] = state
        value = self._next(state, method, uri, body)
        if value is None:
            raise NoUsableChallengeError("nonce-count exhausted for this nonce")
        return value

    def authorize(
        self, *, method: str, uri: str, body: bytes = b"", realm: str | None = None
    ) -> str | None:
        """Credentials for a new request reusing a known nonce (nc + 1), or None.

        With ``realm`` None the only known realm is used. None when no challenge
        for the realm is known, or its nonce cannot be reused (no qop).
        """
        if realm is None:
            if len(self._realms) != 1:
                return None
            realm = next(iter(self._realms))
        state = self._realms.get(realm)
        if state is None or not state.challenge.qop:
            return None
        return self._next(state, method, uri, body)

    def forget(self, realm: str | None = None) -> None:
        """Drop the nonce kept for ``realm`` (all realms if None)."""
        if realm is None:
            self._realms.clear()
        else:
            self._realms.pop(realm, None)

    def _next(self, state: _NonceState, method: str, uri: str, body: bytes) -> str | None:
        challenge = state.challenge
        algorithm = challenge.effective_algorithm
        options = challenge.qop_options
        # Prefer auth: auth-int breaks whenever a proxy rewrites the body (SDP).
        qop = (Qop.AUTH if Qop.AUTH in options else options[0]) if options else None
        if qop is not None:
            if state.nc >= MAX_NONCE_COUNT:
                return None
            state.nc += 1
        # One cnonce per nonce: for -sess that keeps the session key of RFC 7616
        # 3.4.2 ("computed only once") the same however the server reads it.
        cnonce = state.cnonce if qop is not None else None
        nc = state.nc if qop is not None else None
        response = digest_response(
            algorithm=algorithm,
            ha1=digest_ha1(algorithm, self.username, challenge.realm, self._password),
            nonce=challenge.nonce,
            method=method,
            uri=uri,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
            body=body,
        )
        username = (
            digest_userhash(algorithm, self.username, challenge.realm)
            if challenge.userhash
            else self.username
        )
        return str(
            DigestCredentials(
                username=username,
                realm=challenge.realm,
                nonce=challenge.nonce,
                uri=uri,
                response=response,
                algorithm=challenge.algorithm,
                cnonce=cnonce,
                opaque=challenge.opaque,
                qop=qop,
                nc=nc,
                userhash=challenge.userhash,
            )
        )


def _default_cnonce() -> str:
    # RFC 7616 3.4: the cnonce should carry at least 64 bits of entropy.
    return secrets.token_hex(16)
