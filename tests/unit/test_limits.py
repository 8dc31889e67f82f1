"""Every hard limit in sbc.sip.limits: just under passes, just over is refused with the
status named next to the limit, on a datagram and on a stream; and a hostile stream
cannot make the framer hold more than one message's worth of memory."""

from __future__ import annotations

import contextlib
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest

from sbc.sip import limits
from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import FramingError, Keepalive, StreamFramer, StreamItem, parse_message

CALL_ID = "a84b4c76e66710@client.example.com"


def request(
    *,
    uri: str = "sip:bob@example.com",
    vias: int = 1,
    headers: Iterable[str] = (),
    body: bytes = b"",
    to: str = "<sip:bob@example.com>",
) -> bytes:
    """A valid MESSAGE request; the knobs each push on one limit."""
    via_lines = [f"Via: SIP/2.0/TCP proxy{i}.example.com;branch=z9hG4bK{i}x" for i in range(vias)]
    lines = [
        f"MESSAGE {uri} SIP/2.0",
        *via_lines,
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=1928301774",
        f"To: {to}",
        f"Call-ID: {CALL_ID}",
        "CSeq: 1 MESSAGE",
        *headers,
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def padding(extra: int) -> list[str]:
    """Header lines that together add exactly ``extra`` bytes (CRLFs included)."""
    assert extra >= 16
    lines = []
    while extra:
        size = min(extra, 8000)
        if 0 < extra - size < 16:
            size -= 16
        lines.append("X-Pad: " + "y" * (size - len("X-Pad: \r\n")))
        extra -= size
    return lines


def with_header_section(size: int, body: bytes = b"") -> bytes:
    """A request whose header section (start line to the last header, without the
    blank line) is exactly ``size`` bytes: what parse_message compares with
    MAX_HEADER_SECTION."""
    base = request(body=body)
    extra = size - (len(base) - len(body) - 4)
    data = request(headers=padding(extra), body=body)
    assert data.index(b"\r\n\r\n") == size
    return data


def with_total_size(size: int) -> bytes:
    """A request of exactly ``size`` bytes carrying the largest body allowed."""
    body = b"b" * limits.MAX_BODY_SIZE
    data = with_header_section(size - 4 - len(body), body)
    assert len(data) == size
    return data


def with_header_line(length: int) -> bytes:
    """A request with one header line of ``length`` characters (CRLF excluded)."""
    return request(headers=["Subject: " + "s" * (length - len("Subject: "))])


def with_folded_value(length: int) -> bytes:
    """A header field of ``length`` characters (``Subject: `` included) once its
    continuation lines are joined (RFC 3261 7.3.1), though every physical line is
    short: it goes out unfolded, so it must fit in one line."""
    length -= len("Subject: ")
    joined = (("w" * 99 + " ") * (length // 100 + 1))[: length - 1] + "w"
    return request(headers=["Subject: " + joined.replace(" ", "\r\n ")])


def with_uri(length: int) -> bytes:
    host = "@example.com"
    return request(uri="sip:" + "u" * (length - 4 - len(host)) + host)


def with_header_count(count: int) -> bytes:
    fixed = request().count(b"\r\n") - 2  # header lines in the base request
    return request(headers=[f"X-H{i}: v" for i in range(count - fixed)])


def with_uri_params(count: int) -> bytes:
    return request(uri="sip:bob@example.com" + "".join(f";p{i}" for i in range(count)))


def with_header_params(count: int) -> bytes:
    return request(to="<sip:bob@example.com>" + "".join(f";p{i}=v" for i in range(count)))


def with_list_values(name: str) -> Callable[[int], bytes]:
    def build(count: int) -> bytes:
        values = ", ".join(f"<sip:hop{i}.example.com;lr>" for i in range(count))
        return request(headers=[f"{name}: {values}"])

    return build


@dataclass(frozen=True)
class Limit:
    name: str  # the constant in sbc.sip.limits
    build: Callable[[int], bytes]  # a message with `value` of whatever is limited
    status: int  # the status the RFC calls for; must equal the *_STATUS constant
    status_name: str
    # On a stream, whether exceeding the limit breaks framing (FramingError, close)
    # or only refuses one correctly framed message (ParseError, connection kept).
    breaks_stream: bool

    @property
    def value(self) -> int:
        return int(getattr(limits, self.name))

    def __str__(self) -> str:
        return self.name


LIMITS = [
    Limit("MAX_MESSAGE_SIZE", with_total_size, 513, "MAX_MESSAGE_SIZE_STATUS", True),
    Limit("MAX_HEADER_SECTION", with_header_section, 513, "MAX_HEADER_SECTION_STATUS", True),
    Limit("MAX_LINE_LENGTH", with_header_line, 400, "MAX_LINE_LENGTH_STATUS", False),
    Limit("MAX_LINE_LENGTH", with_folded_value, 400, "MAX_LINE_LENGTH_STATUS", False),
    Limit("MAX_HEADERS", with_header_count, 400, "MAX_HEADERS_STATUS", False),
    Limit("MAX_VIA", lambda n: request(vias=n), 400, "MAX_VIA_STATUS", False),
    Limit("MAX_BODY_SIZE", lambda n: request(body=b"b" * n), 413, "MAX_BODY_SIZE_STATUS", True),
    Limit("MAX_URI_LENGTH", with_uri, 414, "MAX_URI_LENGTH_STATUS", False),
    Limit("MAX_PARAMS", with_uri_params, 400, "MAX_PARAMS_STATUS", False),
    Limit("MAX_PARAMS", with_header_params, 400, "MAX_PARAMS_STATUS", False),
    Limit("MAX_LIST_VALUES", with_list_values("Contact"), 400, "MAX_LIST_VALUES_STATUS", False),
    Limit("MAX_LIST_VALUES", with_list_values("Route"), 400, "MAX_LIST_VALUES_STATUS", False),
    Limit(
        "MAX_LIST_VALUES", with_list_values("Record-Route"), 400, "MAX_LIST_VALUES_STATUS", False
    ),
]
LIMIT_IDS = [f"{lim.name}-{lim.build.__name__}" for lim in LIMITS]


def frame(data: bytes, chunk: int | None = None) -> list[StreamItem]:
    """Everything a fresh framer yields for ``data`` fed whole or in ``chunk`` pieces."""
    framer = StreamFramer()
    if chunk is None:
        return list(framer.feed(data))
    items: list[StreamItem] = []
    for i in range(0, len(data), chunk):
        items += framer.feed(data[i : i + chunk])
    return items


def wire(items: list[StreamItem]) -> list[bytes]:
    """The framed messages as bytes; anything else in ``items`` fails the test."""
    assert all(isinstance(i, Request | Response) for i in items), items
    return [bytes(i) for i in items if isinstance(i, Request | Response)]


def test_every_limit_is_exercised() -> None:
    names = {n for n in vars(limits) if n.startswith("MAX_") and not n.endswith("_STATUS")}
    assert names - {"MAX_KEEPALIVE_RUN"} == {lim.name for lim in LIMITS}
    for lim in LIMITS:
        assert getattr(limits, lim.status_name) == lim.status


@pytest.mark.parametrize("limit", LIMITS, ids=LIMIT_IDS)
def test_datagram_just_under_the_limit_parses(limit: Limit) -> None:
    message = parse_message(limit.build(limit.value))
    assert isinstance(message, Request)
    assert message.call_id == CALL_ID


@pytest.mark.parametrize("limit", LIMITS, ids=LIMIT_IDS)
def test_datagram_just_over_the_limit_is_refused_with_its_status(limit: Limit) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(limit.build(limit.value + 1))
    assert info.value.status == getattr(limits, limit.status_name)
    assert not info.value.is_response


@pytest.mark.parametrize("limit", LIMITS, ids=LIMIT_IDS)
def test_stream_just_under_the_limit_frames_whole_and_in_pieces(limit: Limit) -> None:
    data = limit.build(limit.value)
    expected = bytes(parse_message(data))  # folded lines come out unfolded
    for chunk in (None, 1000):
        items = frame(data + data, chunk)
        assert [type(i) for i in items] == [Request, Request]
        assert wire(items) == [expected, expected]


@pytest.mark.parametrize("limit", LIMITS, ids=LIMIT_IDS)
def test_stream_just_over_the_limit(limit: Limit) -> None:
    over = limit.build(limit.value + 1)
    good = request()
    framer = StreamFramer()
    items = list(framer.feed(over + good))
    status = getattr(limits, limit.status_name)
    if limit.breaks_stream:
        # The framing can no longer be trusted: one FramingError, then silence.
        assert len(items) == 1 and isinstance(items[0], FramingError)
        assert items[0].error.status == status and items[0].error.close
        assert framer.broken and framer.buffered == 0
        assert list(framer.feed(good)) == []
    else:
        # Framed correctly but refused: answer it, keep the connection.
        assert len(items) == 2 and isinstance(items[0], ParseError)
        assert items[0].status == status and not items[0].close
        assert isinstance(items[1], Request) and bytes(items[1]) == good
        assert not framer.broken


def test_start_line_longer_than_a_line_is_refused() -> None:
    reason = "R" * (limits.MAX_LINE_LENGTH - len("SIP/2.0 200 "))
    head = "\r\n".join(
        [
            "Via: SIP/2.0/UDP h.example.com;branch=z9hG4bK1",
            "From: <sip:a@example.com>;tag=1",
            "To: <sip:b@example.com>;tag=2",
            f"Call-ID: {CALL_ID}",
            "CSeq: 1 MESSAGE",
            "Content-Length: 0",
        ]
    )
    ok = f"SIP/2.0 200 {reason}\r\n{head}\r\n\r\n".encode()
    assert isinstance(parse_message(ok), Response)
    with pytest.raises(ParseError) as info:
        parse_message(f"SIP/2.0 200 {reason}X\r\n{head}\r\n\r\n".encode())
    assert info.value.status == limits.MAX_LINE_LENGTH_STATUS
    assert info.value.is_response  # dropped, never answered


def test_via_values_count_across_comma_lists() -> None:
    via = "SIP/2.0/UDP h.example.com;branch=z9hG4bK1"
    at_limit = request(vias=0, headers=[f"Via: {via}, {via}"] * (limits.MAX_VIA // 2))
    assert len(parse_message(at_limit).vias) == limits.MAX_VIA
    over = request(vias=1, headers=[f"Via: {via}, {via}"] * (limits.MAX_VIA // 2))
    with pytest.raises(ParseError) as info:
        parse_message(over)
    assert info.value.status == limits.MAX_VIA_STATUS


def test_a_folded_value_at_the_limit_survives_serialization() -> None:
    message = parse_message(with_folded_value(limits.MAX_LINE_LENGTH))
    assert parse_message(bytes(message)).headers.get("Subject") == message.headers.get("Subject")


def test_keepalive_run_at_the_limit_is_skipped() -> None:
    data = request()
    items = frame(b"\n" * limits.MAX_KEEPALIVE_RUN + data)
    assert wire(items) == [data]


def test_keepalive_run_over_the_limit_breaks_the_stream() -> None:
    framer = StreamFramer()
    items = list(framer.feed(b"\n" * (limits.MAX_KEEPALIVE_RUN + 1) + request()))
    assert len(items) == 1 and isinstance(items[0], FramingError)
    assert items[0].error.status == 400 and str(items[0].error) == "endless run of empty lines"
    assert framer.broken


def test_double_crlf_pings_are_not_a_run() -> None:
    # RFC 5626 3.5.1: each CRLFCRLF is a ping to answer, however many there are.
    items = frame(b"\r\n\r\n" * limits.MAX_KEEPALIVE_RUN + request(), chunk=333)
    assert items[:-1] == [Keepalive()] * limits.MAX_KEEPALIVE_RUN
    assert isinstance(items[-1], Request)


def test_keepalive_run_limit_does_not_depend_on_chunking() -> None:
    run = b"\n" * (limits.MAX_KEEPALIVE_RUN + 1)
    assert [type(i) for i in frame(run, chunk=1)] == [type(i) for i in frame(run)]


# -- CPU: a line at the size limits must cost linear time ---------------------------


def _seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _parse_quietly(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_message(data)


def test_a_via_full_of_spaces_parses_in_linear_time() -> None:
    spaces = " " * (limits.MAX_LINE_LENGTH - 100)
    data = request(vias=0, headers=[f"Via: SIP/2.0/UDP a{spaces}:5060;branch=z9hG4bK1"])
    # A linear parser needs about a millisecond for this; quadratic needs ~0.5 s.
    assert _seconds(lambda: _parse_quietly(data)) < 0.1


def test_a_content_length_full_of_spaces_frames_in_linear_time() -> None:
    data = b"OPTIONS sip:a SIP/2.0\r\nl: 1" + b" " * (limits.MAX_LINE_LENGTH - 100) + b"x\r\n\r\n"
    assert _seconds(lambda: list(StreamFramer().feed(data))) < 0.1


# -- memory: hostile streams -----------------------------------------------------------

STREAM_BYTES = 50 * 1024 * 1024
CHUNK = 4096
PEAK_ALLOWANCE = 2 * 1024 * 1024


@dataclass
class FeedReport:
    counts: dict[type, int]
    first: list[StreamItem]
    peak: int
    max_buffered: int
    broken: bool


def feed_hostile(prefix: bytes, chunks: Iterable[bytes]) -> FeedReport:
    """Feed ``prefix`` then ``chunks`` under tracemalloc; items are counted, not kept."""
    framer = StreamFramer()
    counts: dict[type, int] = {}
    first: list[StreamItem] = []
    max_buffered = 0
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for chunk in (prefix, *chunks) if prefix else chunks:
            for item in framer.feed(chunk):
                counts[type(item)] = counts.get(type(item), 0) + 1
                if len(first) < 3:
                    first.append(item)
            max_buffered = max(max_buffered, framer.buffered)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    return FeedReport(counts, first, peak, max_buffered, framer.broken)


def repeat(chunk: bytes, total: int) -> Iterable[bytes]:
    """The same chunk object ``total // len(chunk)`` times: 50 MB without holding it."""
    return (chunk for _ in range(total // len(chunk)))


def test_endless_header_line_breaks_the_stream_with_bounded_memory() -> None:
    report = feed_hostile(b"INVITE sip:a@b SIP/2.0\r\nX: ", repeat(b"x" * CHUNK, STREAM_BYTES))
    assert report.peak < PEAK_ALLOWANCE
    assert report.max_buffered <= limits.MAX_HEADER_SECTION + CHUNK
    assert report.counts == {FramingError: 1} and report.broken
    (failure,) = report.first
    assert isinstance(failure, FramingError)
    error = failure.error
    assert error.status == limits.MAX_HEADER_SECTION_STATUS


def test_endless_empty_lines_break_the_stream_with_bounded_memory() -> None:
    report = feed_hostile(b"", repeat(b"\n" * CHUNK, STREAM_BYTES))
    assert report.peak < PEAK_ALLOWANCE
    assert report.counts == {FramingError: 1} and report.broken
    (failure,) = report.first
    assert isinstance(failure, FramingError)
    assert str(failure.error) == "endless run of empty lines"


def test_endless_crlf_pings_are_answered_with_bounded_memory() -> None:
    # CRLFCRLF is a legal ping (RFC 5626 3.5.1): the framer keeps answering, one
    # Keepalive per 4 bytes, and keeps nothing. 1 MB: each ping is an item to count.
    total = 1024 * 1024
    report = feed_hostile(b"", repeat(b"\r\n" * (CHUNK // 2), total))
    assert report.peak < PEAK_ALLOWANCE
    assert report.max_buffered <= 4
    assert report.counts == {Keepalive: total // 4} and not report.broken


def test_trickled_30000_byte_bodies_keep_one_message_in_memory() -> None:
    body = b"b" * 30_000
    message = request(body=body)
    # The first message arrives 16 bytes at a time, the rest in 4 KB reads.
    trickle = [message[i : i + 16] for i in range(0, len(message), 16)]
    stream = message * (1024 * 1024 // len(message) + 1)
    bulk = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    rounds = STREAM_BYTES // len(stream)
    report = feed_hostile(b"", (*trickle, *(c for _ in range(rounds) for c in bulk)))
    assert report.peak < PEAK_ALLOWANCE
    assert report.max_buffered <= limits.MAX_MESSAGE_SIZE + CHUNK
    assert not report.broken
    assert report.counts == {Request: 1 + rounds * (len(stream) // len(message))}
    assert wire(report.first[:1]) == [message]


def test_many_small_garbage_messages_are_refused_one_by_one() -> None:
    # Framed correctly (Content-Length present), refused by the parser: the framer
    # recovers after each one, as its docstring promises.
    garbage = b"GARBAGE\r\nX: " + b"g" * 400 + b"\r\nl: 2\r\n\r\n??"
    stream = garbage * CHUNK  # a whole number of both messages and chunks
    pieces = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    # 4 x 1.7 MB, ~10,000 messages: each one is a parse, so not the full 50 MB.
    rounds = 4
    report = feed_hostile(b"", (p for _ in range(rounds) for p in pieces))
    assert report.peak < PEAK_ALLOWANCE
    assert report.max_buffered <= len(garbage) + CHUNK
    assert not report.broken and set(report.counts) == {ParseError}
    assert report.counts[ParseError] == rounds * CHUNK
    assert all(isinstance(i, ParseError) and i.status == 400 for i in report.first)
