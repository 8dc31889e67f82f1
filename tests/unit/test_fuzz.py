"""Property-based fuzzing of the SIP parser and the stream framer.

Whatever arrives, ``parse_message`` either returns a message or raises ParseError;
a message it returns serializes to bytes it parses again to the same message; and
``StreamFramer`` cuts a byte stream the same way however the stream is chunked,
holding at most one message's worth of it.

``make test`` runs a bounded, derandomized pass (the same examples on every run, no
example database) so CI cannot flake. ``make fuzz`` sets SBC_FUZZ_SECONDS: the
module then explores with fresh random seeds, run after run, until that many
seconds are spent, shared equally by the fuzz tests of this module.
"""

from __future__ import annotations

import itertools
import os
import string
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbc.sip import limits
from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import FramingError, Keepalive, StreamFramer, StreamItem, parse_message
from tests.torture import load_verdicts

FUZZ_SECONDS = float(os.environ.get("SBC_FUZZ_SECONDS") or 0)
FUZZ_TESTS = 6  # the tests below that call fuzz(); they share the budget

if FUZZ_SECONDS:
    SETTINGS = settings(
        max_examples=2_000,
        deadline=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
else:
    SETTINGS = settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def fuzz(check: Callable[[], None]) -> None:
    """Run a @given check once, or, under SBC_FUZZ_SECONDS, until its share is spent."""
    check()
    if FUZZ_SECONDS:
        stop = time.monotonic() + FUZZ_SECONDS / FUZZ_TESTS
        while time.monotonic() < stop:
            check()


MESSAGES = Path(__file__).parent.parent / "vectors" / "messages"
SEEDS = [v.data for _, v in sorted(load_verdicts().items())] + [
    p.read_bytes() for p in sorted(MESSAGES.glob("*.sip"))
]

# -- properties ------------------------------------------------------------------------

outcomes: Counter[str] = Counter()


def parse_or_refuse(data: bytes) -> Request | Response | None:
    """parse_message(data), None for a ParseError; anything else fails the test."""
    try:
        message = parse_message(data)
    except ParseError as exc:
        assert exc.status in (400, 413, 414, 416, 420, 501, 505, 513), exc.status
        outcomes["refused"] += 1
        return None
    outcomes["parsed"] += 1
    return message


def assert_round_trips(message: Request | Response) -> None:
    """What we send is what we parsed: same start line, Call-ID, CSeq, Vias, body;
    and serializing the reparsed message changes nothing more."""
    wire = bytes(message)
    again = parse_message(wire)
    assert type(again) is type(message)
    assert again.start_line() == message.start_line()
    assert again.call_id == message.call_id
    assert again.cseq == message.cseq
    assert len(again.vias) == len(message.vias)
    assert again.vias == message.vias
    assert again.body == message.body
    assert bytes(again) == wire


def check_datagram(data: bytes) -> None:
    message = parse_or_refuse(data)
    if message is not None:
        assert_round_trips(message)


# -- random bytes ----------------------------------------------------------------------

START_LINES = [
    b"",
    b"INVITE sip:bob@example.com SIP/2.0\r\n",
    b"SIP/2.0 200 OK\r\n",
    b"OPTIONS sip:[2001:db8::1]:5060;transport=tcp SIP/2.0\r\n",
]


@given(st.sampled_from(START_LINES), st.binary(max_size=2048))
@SETTINGS
def check_random_bytes(start: bytes, data: bytes) -> None:
    check_datagram(start + data)


def test_random_bytes_only_raise_parse_error() -> None:
    fuzz(check_random_bytes)


# -- mutated torture vectors -----------------------------------------------------------

INTERESTING = [
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b" ", b"\t", b"\r\n ", b";", b",", b":",
    b"<", b">", b'"', b"\\", b"[", b"]", b"@", b"%", b"%00", b"=", b"?", b"&", b"\x00",
    b"\xff", b"\xc0\x80", b"\xc2\x85", b"\xe2\x80\xa8", b"\x1c", b"\x0b",
    "\u00b2".encode(), "\u0663".encode(), b"0", b"4294967296", b"99999999999", b"-1",
    b"::", b"[::1]", b"sip:", b"sips:", b"tel:", b"SIP/2.0", b"SIP/2.0/UDP ", b"z9hG4bK",
    b"Content-Length: 0\r\n", b"l: 5\r\n", b"Via: SIP/2.0/TCP h\r\n", b";branch=",
]  # fmt: skip
HUGE_SIZES = sorted(
    {
        n + d
        for n in (limits.MAX_LINE_LENGTH, limits.MAX_URI_LENGTH, limits.MAX_HEADER_SECTION)
        for d in (-12, -9, -1, 0, 1)
    }
)


@st.composite
def mutated_vectors(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 6]))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup", "huge"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "dup":
            lines = bytes(data).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines[i:i] = [lines[i]] * draw(st.integers(1, 80))
            data = bytearray(b"\n".join(lines))
        elif op == "huge":
            # A line or a value right at a size limit, at the start of some line.
            line_start = data.rfind(b"\n", 0, at) + 1
            name = draw(st.sampled_from([b"X-Huge: ", b"Subject: ", b"Via: SIP/2.0/UDP ", b" "]))
            fill = draw(st.sampled_from([b"a", b" ", b";p", b", <sip:h>"]))
            size = draw(st.sampled_from(HUGE_SIZES))
            data[line_start:line_start] = name + (fill * size)[:size] + b"\r\n"
    return bytes(data)


@given(mutated_vectors())
@SETTINGS
def check_mutated_vectors(data: bytes) -> None:
    check_datagram(data)


def test_mutated_torture_vectors_only_raise_parse_error() -> None:
    fuzz(check_mutated_vectors)


def test_a_blank_continuation_line_serializes_stably() -> None:
    check_datagram(
        b"OPTIONS sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP h.example.com;branch=z9hG4bK1\r\n"
        b"To: <sip:bob@example.com>\r\n \r\n"
        b"From: <sip:alice@example.com>;tag=1\r\n"
        b"Call-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )


# -- structured messages ---------------------------------------------------------------

TOKEN = string.ascii_letters + string.digits + "-.!%*_+`'~"
tokens = st.text(TOKEN, min_size=1, max_size=10)
words = st.text(string.ascii_letters + string.digits, min_size=1, max_size=10)


T = TypeVar("T")


def mostly(good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``good`` nine times in ten: enough bad input to probe every check, enough good
    input to get past the first one."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 9 else good)


def maybe(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return mostly(st.just(""), strategy)


hosts = mostly(
    st.one_of(
        st.sampled_from(
            [
                "example.com", "a.b.example.", "host_1", "198.51.100.23", "[::1]",
                "[2001:db8::1]", "[2001:db8:::192.0.2.1]", "[::ffff:192.0.2.128]",
            ]
        ),
        words,
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    ),
    st.sampled_from(
        ["256.1.1.1", "[2001:db8::g]", "2001:db8::1", "[fe80::1%eth0]", "-bad-", "a..b", ""]
    )
    | tokens,
)  # fmt: skip
ports = maybe(
    mostly(st.integers(1, 65_535).map(lambda p: f":{p}"), st.sampled_from([":", ":x", ":70000"]))
)
quoted = mostly(
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12).map(
        lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ),
    st.sampled_from(['"', '"\\"', '"a\\', '"\\\x00"']),
)
param_values = mostly(words | hosts | quoted, st.sampled_from(["", "a b", "<x>", '"']))
params = st.lists(
    st.tuples(mostly(tokens, st.sampled_from(["", " ", "a b"])), st.none() | param_values),
    max_size=4,
).map(lambda ps: "".join(f";{n}" if v is None else f";{n}={v}" for n, v in ps))
uri_params = st.lists(st.tuples(words, st.none() | words), max_size=3).map(
    lambda ps: "".join(f";{n}" if v is None else f";{n}={v}" for n, v in ps)
)
USER = string.ascii_letters + string.digits + "-_.!~*'+%"


@st.composite
def uris(draw: st.DrawFn) -> str:
    scheme = draw(mostly(st.sampled_from(["sip", "sips", "SIP"]), st.sampled_from(["1x", ""])))
    if draw(st.integers(0, 9)) == 0:
        other = ["tel:+1-201-555-0123", "tel:911;phone-context=example.com", "urn:x", "tel:abc"]
        return draw(st.sampled_from(other))
    user = draw(maybe(st.text(USER, min_size=1, max_size=8).map(lambda u: u + "@")))
    headers = draw(maybe(st.sampled_from(["?subject=x", "?a=b&c", "?"])))
    bad = draw(maybe(st.sampled_from(["@", " ", "<", ";;"])))
    return f"{scheme}:{user}{draw(hosts)}{draw(ports)}{draw(uri_params)}{headers}{bad}"


@st.composite
def addresses(draw: st.DrawFn) -> str:
    display = draw(st.none() | quoted | words | st.just("Alice  Smith"))
    uri = draw(uris())
    header_params = draw(params) + draw(st.sampled_from(["", ";tag=1928301774", ";tag"]))
    if display is None and draw(st.booleans()):
        return uri + header_params
    name = "" if display is None else display + draw(st.sampled_from([" ", "", "\t"]))
    return f"{name}<{uri}>{header_params}"


@st.composite
def vias(draw: st.DrawFn) -> str:
    sp = draw(maybe(st.sampled_from([" ", "\t", "  "])))
    transport = draw(mostly(st.sampled_from(["UDP", "tcp", "TLS", "SCTP", "WS"]), tokens))
    port = draw(ports)
    colon = draw(st.sampled_from([":", f"{sp}:{sp}"]))
    sent_by = draw(hosts) + port.replace(":", colon)
    branch = draw(st.sampled_from([";branch=z9hG4bK776asdhds", ";branch=1", ""]))
    return f"SIP{sp}/{sp}2.0{sp}/{sp}{transport} {sent_by}{branch}{draw(params)}"


METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "MESSAGE", "FOO.BAR"]
#: Headers the parser leaves as text; any value goes.
FREE_HEADERS = ["Subject", "s", "Supported", "k", "Allow", "Accept", "Expires", "X-Custom"]
#: Headers the parser validates (and the single-valued ones it counts).
CHECKED_HEADERS = [
    "Via", "v", "Contact", "m", "Route", "Record-Route", "From", "f", "To", "t", "Call-ID",
    "i", "CSeq", "Max-Forwards", "Content-Length", "l",
]  # fmt: skip
free_values = st.one_of(
    st.lists(tokens, max_size=4).map(", ".join),
    st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=40),
    quoted,
    st.sampled_from(["", "*", "70", "1 INVITE", "abc"]),
)
checked_values = st.one_of(
    addresses(),
    vias(),
    st.lists(addresses(), min_size=2, max_size=4).map(", ".join),
    st.sampled_from(["", "*", "70", "256", "1 INVITE", "4294967296 INVITE", "abc"]),
)
extra_headers = mostly(
    st.tuples(st.sampled_from(FREE_HEADERS) | tokens, free_values),
    st.tuples(st.sampled_from(CHECKED_HEADERS) | st.text(max_size=5), checked_values),
)
COLONS = [": ", ":", " : ", ":\t"]


@st.composite
def structured_messages(draw: st.DrawFn) -> bytes:
    method = draw(mostly(st.sampled_from(METHODS), tokens))
    if draw(st.integers(0, 3)) == 0:
        code = draw(mostly(st.integers(100, 699), st.integers(0, 999)).map(str))
        start = f"SIP/2.0 {code} {draw(st.sampled_from(['OK', '', 'Ringing', 'ção']))}"
    else:
        version = draw(mostly(st.just("SIP/2.0"), st.sampled_from(["SIP/3.0", "sip/2.0"])))
        start = f"{method} {draw(uris())} {version}"
    fields = [("Via", draw(vias())) for _ in range(draw(st.integers(1, 3)))]
    fields += [
        ("From", draw(addresses())),
        ("To", draw(addresses())),
        ("Call-ID", draw(mostly(words, st.sampled_from(["x y", ""])))),
        ("CSeq", f"{draw(st.integers(0, 2**32))} {draw(mostly(st.just(method), tokens))}"),
        ("Max-Forwards", draw(mostly(st.just("70"), st.sampled_from(["0", "256", "-1"])))),
    ]
    dropped = draw(maybe(st.sampled_from(["Via", "From", "To", "Call-ID", "CSeq"])))
    fields = [f for f in fields if f[0] != dropped]
    fields += draw(st.lists(extra_headers, max_size=5))
    fields = draw(st.permutations(fields))
    body = draw(st.binary(max_size=300))
    length = draw(
        mostly(
            st.just(str(len(body))),
            st.sampled_from(["", "-1", " 1 ", "99999999999", "\u0663", "X"])
            | st.integers(0, limits.MAX_BODY_SIZE + 1).map(str),
        )
    )
    if length != "X":
        fields.append((draw(st.sampled_from(["Content-Length", "l", "CONTENT-LENGTH"])), length))
    fold = draw(st.booleans())
    eol = draw(mostly(st.just("\r\n"), st.just("\n")))
    lines = [start]
    for name, value in fields:
        if fold:
            value = value.replace(", ", f",{eol} ")
        lines.append(name + draw(st.sampled_from(COLONS)) + value)
    head = eol.join(lines) + eol + eol
    return head.encode("utf-8", "surrogateescape") + body


@given(structured_messages())
@SETTINGS
def check_structured_messages(data: bytes) -> None:
    check_datagram(data)


def test_structured_messages_only_raise_parse_error_and_round_trip() -> None:
    outcomes.clear()
    fuzz(check_structured_messages)
    # The generator must reach past the parser's front door, or this proves little.
    assert outcomes["parsed"] >= outcomes.total() // 20, outcomes


# -- the stream framer -----------------------------------------------------------------


def item_key(item: StreamItem) -> tuple[object, ...]:
    """What a transport would act on: the type, and the bytes or the error."""
    if isinstance(item, Request | Response):
        return (type(item).__name__, bytes(item))
    if isinstance(item, FramingError):
        return ("FramingError", item.error.status, str(item.error))
    if isinstance(item, ParseError):
        return ("ParseError", item.status, str(item), item.close)
    assert isinstance(item, Keepalive)
    return ("Keepalive",)


def frame(stream: bytes, cuts: list[int]) -> list[tuple[object, ...]]:
    """Feed ``stream`` cut at ``cuts``; checks the framer's promises as it goes."""
    framer = StreamFramer()
    keys: list[tuple[object, ...]] = []
    edges = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(edges):
        chunk = stream[start:end]
        was_broken = framer.broken
        for item in framer.feed(chunk):
            assert not was_broken, "the framer spoke after a FramingError"
            assert framer.buffered <= limits.MAX_MESSAGE_SIZE + len(chunk)
            keys.append(item_key(item))
        assert framer.buffered <= limits.MAX_MESSAGE_SIZE + len(chunk)
        if framer.broken:
            assert framer.buffered == 0
    if keys and keys[-1][0] == "FramingError":
        assert framer.broken and list(framer.feed(SEEDS[0])) == []
    assert [k[0] for k in keys].count("FramingError") <= 1
    return keys


def with_length(data: bytes) -> bytes:
    """A seed message made stream-ready: a true Content-Length (RFC 3261 18.3)."""
    message = parse_or_refuse(data)
    return data if message is None else bytes(message)


#: The seed messages that parse, serialized: each frames as exactly one message.
STREAM_SEEDS = [with_length(s) for s in SEEDS if parse_or_refuse(s) is not None]
STREAM_PIECES = [with_length(s) for s in SEEDS] + [
    b"\r\n\r\n",  # RFC 5626 ping
    b"\r\n",  # RFC 5626 pong, or an empty line before a start line (RFC 3261 7.5)
    b"GARBAGE\r\nl: 3\r\n\r\nabc",  # framed, refused
    b"INVITE sip:a SIP/2.0\r\nl: 0\r\n\r\n",  # framed, refused
]


@st.composite
def streams_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int], list[int]]:
    pieces = draw(st.lists(st.sampled_from(STREAM_PIECES), min_size=1, max_size=8))
    pieces.append(draw(st.sampled_from([b""] * 3 + [b"\r\n", b"INVITE sip:", b"X"])))
    stream = b"".join(pieces)
    cuts = st.lists(st.integers(0, len(stream)), max_size=40)
    return stream, draw(cuts), draw(cuts)


@given(streams_and_cuts())
@SETTINGS
def check_framer_chunking(case: tuple[bytes, list[int], list[int]]) -> None:
    stream, cuts_a, cuts_b = case
    whole = frame(stream, [])
    assert frame(stream, cuts_a) == whole
    assert frame(stream, cuts_b) == whole
    assert frame(stream, list(range(len(stream)))) == whole


def test_framer_items_do_not_depend_on_chunking() -> None:
    fuzz(check_framer_chunking)


def test_a_stray_lf_before_a_ping_does_not_depend_on_chunking() -> None:
    stream = b"\n\r\n\r\n"
    assert frame(stream, [1]) == frame(stream, [])


@given(
    st.lists(st.sampled_from(STREAM_PIECES) | st.binary(max_size=200), max_size=6),
    st.lists(st.integers(0, 4_000), max_size=20),
)
@SETTINGS
def check_framer_on_noise(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    # Only the framer's promises are checked here (never raises, bounded buffer,
    # silence after FramingError): see test_limits for the known cases where
    # stray CR/LF make the items depend on chunking.
    frame(stream, [c for c in cuts if c <= len(stream)])


def test_framer_on_noise_never_raises() -> None:
    fuzz(check_framer_on_noise)


@given(
    st.sampled_from(STREAM_SEEDS),
    st.integers(1, 64 * 1024).flatmap(
        # Each feed rescans up to a header section, so small chunks only for small sizes.
        lambda size: st.tuples(st.just(size), st.integers(max(1, size // 1000), 4096))
    ),
)
@SETTINGS
def check_framer_on_oversized_input(seed: bytes, size_and_chunk: tuple[int, int]) -> None:
    size, chunk = size_and_chunk
    # A seed message followed by a run that never ends a header section or body.
    framer = StreamFramer()
    stream = seed + b"X-Long: " + b"a" * size
    for i in range(0, len(stream), chunk):
        piece = stream[i : i + chunk]
        for item in framer.feed(piece):
            item_key(item)
        assert framer.buffered <= limits.MAX_MESSAGE_SIZE + len(piece)
    assert framer.broken == (size + 8 > limits.MAX_HEADER_SECTION)


def test_framer_buffer_stays_bounded() -> None:
    fuzz(check_framer_on_oversized_input)
