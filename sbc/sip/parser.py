"""Bytes to messages: the datagram parser and the stream framer (RFC 3261 7, 18.3).

``parse_message`` takes one datagram (or one framed stream message) and returns a
Request or Response whose start line and core header fields (Via, From, To,
Call-ID, CSeq, Max-Forwards, Content-Length) have been validated, or raises
ParseError carrying the status to answer. ``StreamFramer`` cuts a TCP/TLS byte
stream into messages by Content-Length, answering CRLF keepalives on the way.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from sbc.sip.errors import ParseError
from sbc.sip.headers import Address, CSeq, Via, parse_uint, split_list
from sbc.sip.limits import (
    MAX_BODY_SIZE,
    MAX_BODY_SIZE_STATUS,
    MAX_HEADER_SECTION,
    MAX_HEADER_SECTION_STATUS,
    MAX_HEADERS,
    MAX_HEADERS_STATUS,
    MAX_KEEPALIVE_RUN,
    MAX_LINE_LENGTH,
    MAX_LINE_LENGTH_STATUS,
    MAX_LIST_VALUES,
    MAX_LIST_VALUES_STATUS,
    MAX_MESSAGE_SIZE,
    MAX_MESSAGE_SIZE_STATUS,
    MAX_URI_LENGTH,
    MAX_URI_LENGTH_STATUS,
    MAX_VIA,
    MAX_VIA_STATUS,
)
from sbc.sip.message import (
    HEADER_KEYS,
    KNOWN_METHODS,
    SIP_VERSION,
    Headers,
    Message,
    Request,
    Response,
    lookup_key,
)
from sbc.sip.uri import SipUri

_TOKEN: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_VERSION: Final = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE)
_STATUS: Final = re.compile(r"[1-6][0-9][0-9]")
_FOLD: Final = ("", " ", "\t")


def _find_header_end(data: bytes) -> tuple[int, int]:
    """(end of header section, start of body), or (-1, -1) if there is no blank line.

    Bare LF line endings are tolerated (RFC 3261 7.5 is CRLF, but RFC 5118's own
    vectors use LF): whichever blank line comes first ends the header section.
    """
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    if crlf != -1 and (lf == -1 or crlf < lf):
        return crlf, crlf + 4
    if lf != -1:
        return lf, lf + 2
    return -1, -1


def parse_message(data: bytes, *, stream: bool = False) -> Request | Response:
    """Parse one SIP message.

    With ``stream=False`` the input is a whole datagram: a missing blank line ends
    the headers at the end of the data, a missing Content-Length means the body is
    the rest of the datagram, and octets beyond Content-Length are ignored
    (RFC 3261 18.3). With ``stream=True`` the input is what StreamFramer cut out.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise ParseError(
            f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}", MAX_MESSAGE_SIZE_STATUS
        )
    head_end, body_start = _find_header_end(data)
    if head_end == -1:
        head_end = body_start = len(data)
    if head_end > MAX_HEADER_SECTION:
        raise ParseError(
            f"header section of {head_end} bytes exceeds {MAX_HEADER_SECTION}",
            MAX_HEADER_SECTION_STATUS,
        )
    text = data[:head_end].decode("utf-8", "surrogateescape")
    start, _, header_text = text.partition("\n")
    start = start.removesuffix("\r")
    is_response = start.startswith("SIP/")
    message: Request | Response | None = None
    try:
        message = _parse_start_line(start, is_response)
        message.headers = Headers._from_parsed(_parse_header_lines(header_text))
        _validate(message, data, body_start, stream)
    except ParseError as exc:
        exc.is_response = is_response
        if not is_response:
            # Enough to build a response from the raw Via/From/To/Call-ID/CSeq, even
            # when the start line itself was the problem (505, a bad Request-URI).
            partial = exc.partial if isinstance(exc.partial, Request) else message
            if isinstance(partial, Request) and not len(partial.headers):
                with contextlib.suppress(ParseError):
                    partial.headers = Headers._from_parsed(_parse_header_lines(header_text))
            exc.partial = partial
        raise
    return message


def _parse_start_line(line: str, is_response: bool) -> Request | Response:
    if len(line) > MAX_LINE_LENGTH:
        raise ParseError("start line too long", MAX_LINE_LENGTH_STATUS)
    if is_response:
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if version != SIP_VERSION:
            raise ParseError(f"unsupported version {version!r}", 505)
        if not _STATUS.fullmatch(code):
            raise ParseError(f"bad status code {code!r}")
        return Response(int(code), reason)
    parts = line.split(" ")
    # RFC 3261 7.1: exactly single SPs; RFC 4475 3.1.2.9/3.1.2.10 allow rejecting
    # extra or trailing ones, which keeps them from ever being forwarded.
    if len(parts) != 3 or not all(parts):
        error = ParseError(f"malformed request line: {line!r}")
        if _TOKEN.fullmatch(parts[0]):
            # Still a request: answerable from its header fields.
            error.partial = Request(parts[0], "")
        raise error
    method, uri, version = parts
    if not _TOKEN.fullmatch(method):
        raise ParseError(f"bad method: {method!r}")
    request = Request(method, uri)
    try:
        if version != SIP_VERSION:
            if _VERSION.fullmatch(version):
                raise ParseError(f"unsupported version {version!r}", 505)
            raise ParseError(f"malformed request line: {line!r}")
        if len(uri) > MAX_URI_LENGTH:
            raise ParseError("Request-URI too long", MAX_URI_LENGTH_STATUS)
        parsed = request.uri  # validates; ParseError(400) for <sip:...>, sip:2001:db8::1 ...
        if isinstance(parsed, SipUri) and parsed.headers:
            # RFC 3261 19.1.1 table: headers are not allowed in a Request-URI, and
            # RFC 4475 3.1.2.11: they must never be turned into header fields.
            raise ParseError("headers in the Request-URI are not allowed")
    except ParseError as exc:
        exc.partial = request
        raise
    return request


#: A header field line: name, optional whitespace, colon, the rest.
_FIELD: Final = re.compile(r"([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*:(.*)", re.DOTALL)


_FIELD_LINES: Final = re.compile(r"(?m)^([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*:(.*)$")


def _parse_header_lines(text: str) -> list[tuple[str, str, str]]:
    """The header fields, unfolded, as (name as written, lookup key, value)."""
    # The usual message in two regex passes: no folded lines, no line too long,
    # not too many fields, every line a field. Anything else (and every error
    # message) comes from the line-by-line parser.
    if "\n " not in text and "\n\t" not in text and text[:1] not in (" ", "\t", ""):
        found = _FIELD_LINES.findall(text)
        if (
            len(found) <= MAX_HEADERS
            and len(found) == text.count("\n") + 1
            and (len(text) <= MAX_LINE_LENGTH or max(map(len, text.split("\n"))) <= MAX_LINE_LENGTH)
        ):
            keys = HEADER_KEYS
            return [
                (name, keys.get(name) or lookup_key(name), value.strip(" \t\r"))
                for name, value in found
            ]
    return _parse_header_lines_slowly(text.split("\n"))


def _parse_header_lines_slowly(lines: list[str]) -> list[tuple[str, str, str]]:
    fields: list[tuple[str, str, str]] = []
    append = fields.append
    match = _FIELD.fullmatch
    name = value = ""
    pending = False
    for line in lines:
        if len(line) > MAX_LINE_LENGTH and len(line.rstrip("\r")) > MAX_LINE_LENGTH:
            raise ParseError("header line too long", MAX_LINE_LENGTH_STATUS)
        first = line[:1]
        if first in _FOLD:
            if not first:
                continue
            # RFC 3261 7.3.1: a line starting with whitespace continues the field.
            if not pending:
                raise ParseError("continuation line before any header")
            more = line.strip(" \t\r")
            if more:
                value = f"{value} {more}" if value else more
            # The unfolded field goes out as one line: it must fit in one.
            if len(name) + 2 + len(value) > MAX_LINE_LENGTH:
                raise ParseError("header line too long", MAX_LINE_LENGTH_STATUS)
            continue
        if pending:
            append((name, lookup_key(name), value))
        m = match(line)
        if m is None:
            if line == "\r":
                pending = False
                continue
            raise ParseError(f"malformed header line: {line[:64]!r}")
        name = m.group(1)
        value = m.group(2).strip(" \t\r")
        pending = True
        if len(fields) >= MAX_HEADERS:
            raise ParseError(f"more than {MAX_HEADERS} header fields", MAX_HEADERS_STATUS)
    if pending:
        append((name, lookup_key(name), value))
    return fields


def _values(fields: list[str], key: str) -> list[str]:
    """The values of a list header's fields, split at commas (RFC 3261 7.3.1)."""
    if len(fields) == 1 and "," not in fields[0]:
        return fields
    out: list[str] = []
    for field in fields:
        out.extend(split_list(field))
    return out


def _validate(message: Message, data: bytes, body_start: int, stream: bool) -> None:
    headers = message.headers
    cache = message._cache
    is_request = isinstance(message, Request)
    # One pass over the fields by lookup key; the checks below read only this.
    by_key: dict[str, list[str]] = {}
    for _, key, value in headers._fields:
        got = by_key.get(key)
        if got is None:
            by_key[key] = [value]
        else:
            got.append(value)
    empty: list[str] = []

    def single(key: str, name: str, required: bool) -> str | None:
        found = by_key.get(key)
        if found is None:
            if required:
                raise ParseError(f"missing {name} header")
            return None
        if len(found) > 1:
            # RFC 4475 3.3.8: several values in a single-value field -> 400.
            raise ParseError(f"more than one {name} header")
        return found[0]

    vias = [Via.parse(v) for v in _values(by_key.get("via", empty), "via")]
    if not vias:
        raise ParseError("missing Via header")
    if len(vias) > MAX_VIA:
        raise ParseError(f"more than {MAX_VIA} Via values", MAX_VIA_STATUS)
    cache["vias"] = vias

    for key, name in (("from", "From"), ("to", "To")):
        address = single(key, name, True)
        assert address is not None
        cache[name] = Address.parse(address, name)

    # Headers that carry addresses the core acts on are validated up front, so a
    # bad Contact (RFC 4475 3.1.2.13) is refused before anything relies on it.
    for key, name in (("contact", "Contact"), ("route", "Route"), ("record-route", "Record-Route")):
        found = by_key.get(key)
        if found is None:
            continue
        values = _values(found, key)
        if len(values) > MAX_LIST_VALUES:
            raise ParseError(f"too many {name} values", MAX_LIST_VALUES_STATUS)
        parsed = [Address.parse(v, name) for v in values if v != "*" or key != "contact"]
        if key == "contact":
            cache["Contact"] = parsed

    call_id = single("call-id", "Call-ID", True)
    if not call_id or any(ch in call_id for ch in " \t"):
        raise ParseError(f"bad Call-ID: {call_id!r}")

    cseq_text = single("cseq", "CSeq", True)
    assert cseq_text is not None
    cseq = CSeq.parse(cseq_text)
    cache["CSeq"] = cseq
    if is_request:
        method = message.method  # type: ignore[attr-defined]
        if cseq.method != method:
            # RFC 4475 3.1.2.18: an unknown method with a mismatched CSeq is best
            # answered 501; a known one 400 (3.1.2.17).
            status = 400 if method in KNOWN_METHODS else 501
            raise ParseError(
                f"CSeq method {cseq.method!r} does not match request method {method!r}",
                status,
            )
        max_forwards = single("max-forwards", "Max-Forwards", False)
        if max_forwards is not None:
            parse_uint(max_forwards, "Max-Forwards", 255)

    length_text = single("content-length", "Content-Length", False)
    available = len(data) - body_start
    if length_text is None:
        if stream:
            raise ParseError("missing Content-Length on a stream transport", close=True)
        length = available
    else:
        length_text = length_text.strip()
        if not length_text.isdigit() or not length_text.isascii() or len(length_text) > 10:
            raise ParseError(f"bad Content-Length: {length_text!r}", close=True)
        length = int(length_text)
    if length > MAX_BODY_SIZE:
        raise ParseError(
            f"body of {length} bytes exceeds {MAX_BODY_SIZE}", MAX_BODY_SIZE_STATUS, close=True
        )
    if length > available:
        raise ParseError(
            f"Content-Length {length} exceeds the {available} body bytes received", close=True
        )
    message.body = data[body_start : body_start + length]


@dataclass(frozen=True, slots=True)
class Keepalive:
    """RFC 5626 3.5.1: a double-CRLF ping; the transport answers with one CRLF."""


@dataclass(frozen=True, slots=True)
class FramingError:
    """The stream can no longer be framed; answer if possible, then close."""

    error: ParseError


StreamItem = Request | Response | Keepalive | FramingError | ParseError


class StreamFramer:
    """Cuts a TCP/TLS byte stream into SIP messages (RFC 3261 18.3).

    ``feed(data)`` yields, in order: messages; ParseError for a message that was
    framed correctly but is invalid (answer it, keep the connection); Keepalive for
    each CRLFCRLF ping; and FramingError when the stream is beyond repair (bad or
    missing Content-Length, oversized header section or body), after which the
    framer yields nothing more and the connection should be closed. The buffer
    never holds more than one message's worth of bytes (MAX_MESSAGE_SIZE).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False
        self._empty_run = 0

    @property
    def broken(self) -> bool:
        return self._broken

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[StreamItem]:
        if self._broken:
            return
        self._buffer += data
        while self._buffer and not self._broken:
            item = self._next()
            if item is None:
                break
            yield item

    def _skip_empty_lines(self) -> StreamItem | None:
        """Consume CR/LF before a start line; a CRLFCRLF among them is a ping.

        The outcome does not depend on how the bytes were split into reads: only
        the tail that may still become a ping is kept, and the run's length is
        counted across reads.
        """
        buf = self._buffer
        # Only the head of the buffer: a read full of pings would be scanned whole for
        # each of them (quadratic: 64 KB of pings held the loop 1.5 s).
        head = bytes(buf[: MAX_KEEPALIVE_RUN + 4])
        run = len(head) - len(head.lstrip(b"\r\n"))
        ping = head.find(b"\r\n\r\n", 0, run)
        if ping != -1:
            del buf[: ping + 4]
            self._empty_run = 0
            return Keepalive()
        keep = 0
        if run == len(buf):
            keep = next(
                k for k in (3, 2, 1, 0) if b"\r\n\r\n".startswith(bytes(buf[run - k : run]))
            )
        self._empty_run += run - keep
        if self._empty_run > MAX_KEEPALIVE_RUN:
            return self._fail(ParseError("endless run of empty lines"))
        del buf[: run - keep]
        return None

    def _fail(self, error: ParseError) -> FramingError:
        self._broken = True
        self._buffer.clear()
        error.close = True
        return FramingError(error)

    def _next(self) -> StreamItem | None:
        buf = self._buffer
        # RFC 5626 3.5.1: CRLFCRLF is a ping, a lone CRLF is a pong; RFC 3261 7.5
        # also says to ignore empty lines before a start line.
        if buf[:1] in (b"\r", b"\n"):
            item = self._skip_empty_lines()
            if item is not None or buf[:1] in (b"", b"\r", b"\n"):
                return item
        self._empty_run = 0
        head_end, body_start = _find_header_end(bytes(buf[: MAX_HEADER_SECTION + 4]))
        if head_end == -1:
            if len(buf) > MAX_HEADER_SECTION:
                return self._fail(ParseError("header section too large", MAX_HEADER_SECTION_STATUS))
            return None
        head = bytes(buf[:head_end])
        length = _content_length_of(head)
        if isinstance(length, int) and length > MAX_BODY_SIZE:
            length = ParseError(
                f"body of {length} bytes exceeds {MAX_BODY_SIZE}", MAX_BODY_SIZE_STATUS
            )
        if isinstance(length, ParseError):
            return self._fail(_with_partial(length, head))
        end = body_start + length
        if end > MAX_MESSAGE_SIZE:
            error = ParseError(
                f"message of {end} bytes exceeds {MAX_MESSAGE_SIZE}", MAX_MESSAGE_SIZE_STATUS
            )
            return self._fail(_with_partial(error, head))
        if len(buf) < end:
            return None
        frame = bytes(buf[:end])
        del buf[:end]
        try:
            return parse_message(frame, stream=True)
        except ParseError as exc:
            return exc


def _with_partial(error: ParseError, head: bytes) -> ParseError:
    """Attach what the header section says, so a request can still be answered
    (RFC 3261 18.3: a bad Content-Length on a stream gets a 400, then close)."""
    error.is_response = head.startswith(b"SIP/")
    try:
        error.partial = parse_message(head)
    except ParseError as exc:
        error.partial = exc.partial
    if error.is_response:
        error.partial = None
    return error


# The value is captured whole and stripped in Python: a lazy match followed by
# optional whitespace backtracks quadratically on a value full of spaces.
_CONTENT_LENGTH_LINE: Final = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:([^\r\n]*)")


def _content_length_of(head: bytes) -> int | ParseError:
    """Content-Length from a raw header section, just enough to frame the stream."""
    values = _CONTENT_LENGTH_LINE.findall(head)
    if not values:
        return ParseError("missing Content-Length on a stream transport")
    if len(values) > 1:
        return ParseError("more than one Content-Length header")
    text = values[0].strip(b" \t")
    if not text.isdigit() or len(text) > 10:
        return ParseError(f"bad Content-Length: {text.decode('ascii', 'replace')!r}")
    return int(text)
