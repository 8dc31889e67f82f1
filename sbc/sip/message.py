"""SIP requests and responses (RFC 3261 7).

A message keeps its header fields in order, each as (name as written, lookup key,
value text), so that what was received serializes back to the same bytes. Parsed
views (Via, From, To, CSeq ...) are computed on demand, cached, and dropped when
the headers change. Messages are mutable on purpose: the B2BUA builds the other
leg's message by editing a fresh one; parsed views are frozen values.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Final, TypeVar, cast

from sbc.sip.errors import ParseError, reason_phrase
from sbc.sip.headers import (
    LIST_HEADERS,
    Address,
    CSeq,
    MediaType,
    Via,
    canonical_name,
    header_key,
    parse_token_list,
    parse_uint,
    split_list,
)
from sbc.sip.uri import Uri, parse_uri

SIP_VERSION: Final = "SIP/2.0"

_T = TypeVar("_T")

#: RFC 3261 and the extension methods an SBC relays (RFC 3262, 3265, 3311, 3428,
#: 3515, 3903, 6086). Anything else is an unknown method (501).
KNOWN_METHODS: Final = frozenset(
    {
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "OPTIONS",
        "REGISTER",
        "PRACK",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "INFO",
        "REFER",
        "MESSAGE",
        "UPDATE",
    }
)

#: RFC 3261 17.2.3 / 8.1.1.7: the magic cookie that marks an RFC 3261 branch.
MAGIC_COOKIE: Final = "z9hG4bK"

#: Lookup keys of header names already seen (``header_key`` is pure), shared by the
#: parser and every message built here. Looking a name up costs less than
#: lower-casing it, and one name gets one key string. Bounded: names come from peers.
HEADER_KEYS: dict[str, str] = {}
_MAX_KEYS: Final = 2048


def lookup_key(name: str) -> str:
    """``header_key(name)``, remembered in :data:`HEADER_KEYS`."""
    key = HEADER_KEYS.get(name)
    if key is None:
        key = header_key(name)
        if len(HEADER_KEYS) < _MAX_KEYS:
            HEADER_KEYS[name] = key
    return key


#: The header each cached parsed view is computed from (``Message._cache`` keys).
_VIEW_SOURCES: Final = {
    "vias": "via",
    "From": "from",
    "To": "to",
    "CSeq": "cseq",
    "Contact": "contact",
}


class Headers:
    """Ordered header fields with case-insensitive, compact-form-aware lookup."""

    __slots__ = ("_fields", "_index")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str, str]] = [
            (n, HEADER_KEYS.get(n) or lookup_key(n), v) for n, v in fields
        ]
        self._index: dict[str, list[int]] | None = None

    @classmethod
    def _from_parsed(cls, fields: list[tuple[str, str, str]]) -> Headers:
        headers = cls.__new__(cls)
        headers._fields = fields
        headers._index = None
        return headers

    def _lookup(self) -> dict[str, list[int]]:
        index = self._index
        if index is None:
            index = {}
            for i, (_, key, _) in enumerate(self._fields):
                index.setdefault(key, []).append(i)
            self._index = index
        return index

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((name, value) for name, _, value in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, name: str) -> bool:
        return (HEADER_KEYS.get(name) or lookup_key(name)) in self._lookup()

    def fields(self, name: str) -> list[str]:
        """Every field value of ``name``, one per header line, in order."""
        positions = self._lookup().get(HEADER_KEYS.get(name) or lookup_key(name))
        if positions is None:
            return []
        fields = self._fields
        return [fields[i][2] for i in positions]

    def get(self, name: str) -> str | None:
        """The first field value of ``name``, or None."""
        positions = self._lookup().get(HEADER_KEYS.get(name) or lookup_key(name))
        return self._fields[positions[0]][2] if positions else None

    def values(self, name: str) -> list[str]:
        """Every value of ``name``; list headers are split at commas (RFC 3261 7.3.1)."""
        key = HEADER_KEYS.get(name) or lookup_key(name)
        fields = self.fields(name)
        if key not in LIST_HEADERS:
            return fields
        out: list[str] = []
        for field in fields:
            out.extend(split_list(field))
        return out

    def count(self, name: str) -> int:
        return len(self._lookup().get(HEADER_KEYS.get(name) or lookup_key(name), ()))

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Append a field (or put it before every other field of that name)."""
        key = HEADER_KEYS.get(name) or lookup_key(name)
        entry = (canonical_name(name) if name.islower() else name, key, value)
        if first:
            positions = self._lookup().get(key)
            self._fields.insert(positions[0] if positions else len(self._fields), entry)
            self._index = None
            return
        self._fields.append(entry)
        index = self._index
        if index is not None:
            # Appending keeps every position: the index only gains one.
            positions = index.get(key)
            if positions is None:
                index[key] = [len(self._fields) - 1]
            else:
                positions.append(len(self._fields) - 1)

    def set(self, name: str, value: str) -> None:
        """Replace every field of ``name`` with one value, where the first one stood."""
        key = HEADER_KEYS.get(name) or lookup_key(name)
        positions = self._lookup().get(key)
        if not positions:
            self.add(name, value)
            return
        first = positions[0]
        raw_name = self._fields[first][0]
        self._fields[first] = (raw_name, key, value)
        for i in reversed(positions[1:]):
            del self._fields[i]
        self._index = None

    def remove(self, name: str) -> int:
        """Remove every field of ``name``; returns how many were removed."""
        key = HEADER_KEYS.get(name) or lookup_key(name)
        before = len(self._fields)
        self._fields = [f for f in self._fields if f[1] != key]
        self._index = None
        return before - len(self._fields)

    def pop_first_value(self, name: str) -> str | None:
        """Remove the first value of a list header (the top Via, a Route entry)."""
        key = HEADER_KEYS.get(name) or lookup_key(name)
        positions = self._lookup().get(key)
        if not positions:
            return None
        i = positions[0]
        raw_name, _, field = self._fields[i]
        items = split_list(field) if key in LIST_HEADERS else [field]
        if len(items) > 1:
            self._fields[i] = (raw_name, key, ", ".join(items[1:]))
        else:
            del self._fields[i]
        self._index = None
        return items[0]

    def copy(self) -> Headers:
        return Headers._from_parsed(list(self._fields))

    def encode_into(self, out: list[str]) -> None:
        for name, _, value in self._fields:
            out.append(f"{name}: {value}\r\n")


class _BodyView:
    """A value parsed from a body, with the body and Content-Type it came from."""

    __slots__ = ("body", "key", "value")

    def __init__(self, body: bytes, key: str, value: object) -> None:
        self.body, self.key, self.value = body, key, value


class Message:
    """What requests and responses share: headers, body, parsed views."""

    __slots__ = ("_cache", "_headers", "_prior", "body")

    def __init__(self, headers: Headers | None = None, body: bytes = b"") -> None:
        self._cache: dict[str, object] = {}
        self._prior: Headers | None = None
        self._headers = headers if headers is not None else Headers()
        self.body = body

    @property
    def headers(self) -> Headers:
        return self._headers

    @headers.setter
    def headers(self, headers: Headers) -> None:
        # The fields the parsed views were computed from, until ``invalidate`` has
        # compared them with the new ones.
        if self._prior is None and self._cache:
            self._prior = self._headers
        self._headers = headers

    # -- parsed views -----------------------------------------------------------------

    def invalidate(self, *names: str) -> None:
        """Forget cached parsed views; call after editing ``headers`` directly.

        With ``names``, only the views of those headers are forgotten. Without, after
        ``headers`` was replaced by a new Headers (a Via stamped with ``received``),
        the views whose fields are the same in both are kept; after an edit in
        place, every view goes.
        """
        cache = self._cache
        if names:
            keys = {HEADER_KEYS.get(name) or lookup_key(name) for name in names}
            for view, source in _VIEW_SOURCES.items():
                if source in keys:
                    cache.pop(view, None)
            return
        prior, self._prior = self._prior, None
        if not cache:
            return
        headers = self._headers
        if prior is None or prior is headers:
            cache.clear()
            return
        before, after = prior._fields, headers._fields
        if len(before) == len(after):
            # Field by field (a rewritten Via keeps every field where it stood): the
            # keys of the fields that differ; a moved field counts as changed.
            changed: set[str] = set()
            for (_, old_key, value), (_, new_key, new_value) in zip(before, after, strict=True):
                if value != new_value or old_key != new_key:
                    changed.add(old_key)
                    changed.add(new_key)
            for view in list(cache):
                key = _VIEW_SOURCES.get(view)
                if key is None or key in changed:
                    del cache[view]
            return
        for view in list(cache):
            key = _VIEW_SOURCES.get(view)
            if key is None or prior.fields(key) != headers.fields(key):
                del cache[view]

    def body_view(self, name: str, parse: Callable[[bytes, str], _T]) -> _T:
        """``parse(body, Content-Type)``, computed once for this body and Content-Type
        (a call reads the SDP of one INVITE or 2xx at several steps). Exceptions are
        not cached."""
        body = self.body
        content_type = self._headers.get("Content-Type") or ""
        cached = self._cache.get(name)
        if isinstance(cached, _BodyView) and cached.body is body and cached.key == content_type:
            return cast(_T, cached.value)
        value = parse(body, content_type)
        self._cache[name] = _BodyView(body, content_type, value)
        return value

    def compact(self) -> None:
        """Drop what is derived from the fields (parsed views, the lookup index) to
        save memory while the message is only kept; it is computed again on use."""
        self._cache.clear()
        self._prior = None
        self._headers._index = None

    @property
    def vias(self) -> list[Via]:
        cached = self._cache.get("vias")
        if cached is None:
            cached = [Via.parse(v) for v in self.headers.values("Via")]
            self._cache["vias"] = cached
        return cached  # type: ignore[return-value]

    @property
    def via(self) -> Via:
        vias = self.vias
        if not vias:
            raise ParseError("missing Via")
        return vias[0]

    def _single(self, name: str) -> str:
        fields = self.headers.fields(name)
        if not fields:
            raise ParseError(f"missing {name}")
        if len(fields) > 1:
            raise ParseError(f"more than one {name}")
        return fields[0]

    def _address(self, name: str) -> Address:
        cached = self._cache.get(name)
        if cached is None:
            cached = Address.parse(self._single(name), name)
            self._cache[name] = cached
        return cached  # type: ignore[return-value]

    @property
    def from_(self) -> Address:
        return self._address("From")

    @property
    def to(self) -> Address:
        return self._address("To")

    @property
    def call_id(self) -> str:
        return self._single("Call-ID").strip()

    @property
    def cseq(self) -> CSeq:
        cached = self._cache.get("CSeq")
        if cached is None:
            cached = CSeq.parse(self._single("CSeq"))
            self._cache["CSeq"] = cached
        return cached  # type: ignore[return-value]

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("Max-Forwards")
        return None if value is None else parse_uint(value, "Max-Forwards", 255)

    @property
    def contacts(self) -> list[Address]:
        cached = self._cache.get("Contact")
        if cached is None:
            cached = [
                Address.parse(v, "Contact") for v in self.headers.values("Contact") if v != "*"
            ]
            self._cache["Contact"] = cached
        return cached  # type: ignore[return-value]

    def addresses(self, name: str) -> list[Address]:
        """Route, Record-Route, Path ... as a list of addresses."""
        return [Address.parse(v, name) for v in self.headers.values(name)]

    @property
    def content_type(self) -> MediaType | None:
        value = self.headers.get("Content-Type")
        return None if value is None else MediaType.parse(value)

    def tokens(self, name: str) -> tuple[str, ...]:
        """Require, Supported, Allow ... as a tuple of tokens."""
        out: list[str] = []
        for field in self.headers.fields(name):
            out.extend(parse_token_list(field, name))
        return tuple(out)

    # -- editing ----------------------------------------------------------------------

    def set_body(self, body: bytes, content_type: str | None = None) -> None:
        self.body = body
        if content_type is not None:
            self.headers.set("Content-Type", content_type)
        elif not body:
            self.headers.remove("Content-Type")
        self.headers.set("Content-Length", str(len(body)))
        # No parsed view is computed from Content-Type or Content-Length.
        self.invalidate("Content-Type", "Content-Length")

    # -- wire form --------------------------------------------------------------------

    def start_line(self) -> str:
        raise NotImplementedError

    def __bytes__(self) -> bytes:
        out = [self.start_line(), "\r\n"]
        body = self.body
        headers = self.headers
        positions = headers._lookup().get("content-length")
        length = headers._fields[positions[0]][2] if positions else None
        # RFC 3261 18.3 / 20.14: Content-Length always tells the truth on the way out.
        if length is None:
            headers.encode_into(out)
            out.append(f"Content-Length: {len(body)}\r\n")
        elif length.strip() != str(len(body)):
            fixed = headers.copy()
            fixed.set("Content-Length", str(len(body)))
            fixed.encode_into(out)
        else:
            headers.encode_into(out)
        out.append("\r\n")
        data = "".join(out).encode("utf-8", "surrogateescape")
        return data + body if body else data


class Request(Message):
    """A SIP request; ``uri`` is parsed, ``raw_uri`` is the text as received."""

    __slots__ = ("_uri", "method", "raw_uri", "version")

    def __init__(
        self,
        method: str,
        uri: Uri | str,
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.version = version
        if isinstance(uri, str):
            self.raw_uri = uri
            self._uri: Uri | None = None
        else:
            self.raw_uri = str(uri)
            self._uri = uri

    @property
    def uri(self) -> Uri:
        if self._uri is None:
            self._uri = parse_uri(self.raw_uri)
        return self._uri

    @uri.setter
    def uri(self, value: Uri) -> None:
        self._uri = value
        self.raw_uri = str(value)

    def start_line(self) -> str:
        return f"{self.method} {self.raw_uri} {self.version}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_uri}>"


class Response(Message):
    """A SIP response."""

    __slots__ = ("reason", "status", "version")

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason_phrase(status) if reason is None else reason
        self.version = version

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


#: RFC 3261 8.2.6.2: the header fields a response copies from its request.
_COPIED_TO_RESPONSE: Final = ("Via", "From", "To", "Call-ID", "CSeq")


class _RandomPool:
    """Bytes of ``secrets.token_bytes`` (the OS CSPRNG), read a block at a time.

    Every call takes a dozen random values (tags, branches, Call-IDs, references);
    one getrandom(2) per value was 2 % of a call's CPU. The bytes are the same
    kernel randomness, handed out once each; a child process after fork starts
    with an empty pool, so no two processes share values.
    """

    BLOCK: Final = 4096

    def __init__(self) -> None:
        self._block = b""
        self._at = 0
        # Tags are made on the event loop, but no two threads may get the same bytes.
        self._lock = threading.Lock()

    def take(self, count: int) -> bytes:
        with self._lock:
            at = self._at
            if at + count > len(self._block):
                self._block = secrets.token_bytes(max(self.BLOCK, count))
                at = 0
            self._at = at + count
            return self._block[at : at + count]

    def clear(self) -> None:
        self._block, self._at = b"", 0
        self._lock = threading.Lock()


_RANDOM = _RandomPool()
os.register_at_fork(after_in_child=_RANDOM.clear)


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as hex, like ``secrets.token_hex`` (same source)."""
    return _RANDOM.take(nbytes).hex()


def random_below(limit: int) -> int:
    """A uniform random int in ``[0, limit)``, like ``secrets.randbelow``."""
    bits = limit.bit_length()
    size = (bits + 7) // 8
    while True:
        value = int.from_bytes(_RANDOM.take(size), "big") >> (8 * size - bits)
        if value < limit:
            return value


def new_tag() -> str:
    """A To/From tag with at least 32 bits of randomness (RFC 3261 19.3)."""
    return _RANDOM.take(6).hex()


def new_branch() -> str:
    """An RFC 3261 branch: the magic cookie plus randomness (8.1.1.7)."""
    return MAGIC_COOKIE + _RANDOM.take(8).hex()


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str | None = None,
) -> Response:
    """A response to ``request`` (RFC 3261 8.2.6).

    Via, From, To, Call-ID and CSeq are copied field by field as received, so a
    response can be built even for a request whose other headers failed to parse.
    ``to_tag`` is added to a non-100 response whose To has none (8.2.6.2); the
    caller passes it so that every response of one transaction carries the same tag.
    """
    out = Headers()
    views = request._cache
    retagged = False
    for name in _COPIED_TO_RESPONSE:
        fields = request.headers.fields(name)
        for value in fields:
            if name == "To" and status != 100 and to_tag is not None:
                parsed = views.get("To") if len(fields) == 1 else None
                tagged = _add_to_tag(value, to_tag, parsed if isinstance(parsed, Address) else None)
                retagged = retagged or tagged != value
                value = tagged
            out.add(name, value)
    added: set[str] = set()
    for name, value in headers:
        out.add(name, value)
        added.add(HEADER_KEYS.get(name) or lookup_key(name))
    response = Response(status, reason, out)
    if views:
        # The views of the fields copied as they are hold for the response too: the
        # transport reads its Via, the B2BUA its To and CSeq, without parsing again.
        cache = response._cache
        for view in ("vias", "From", "To", "CSeq"):
            if (view == "To" and retagged) or _VIEW_SOURCES[view] in added:
                continue
            seen = views.get(view)
            if seen is not None:
                cache[view] = list(seen) if isinstance(seen, list) else seen
    if body or content_type:
        response.set_body(body, content_type)
    else:
        out.add("Content-Length", "0")
    return response


def _add_to_tag(to_value: str, tag: str, parsed: Address | None = None) -> str:
    """``to_value`` with ``tag`` unless it has one; ``parsed`` is its parse, if known."""
    try:
        address = parsed if parsed is not None else Address.parse(to_value, "To")
    except ParseError:
        return to_value
    if address.tag:
        return to_value
    return str(address.with_param("tag", tag))
