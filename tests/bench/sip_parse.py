"""Parse + serialize throughput of our SIP parser next to sippy's, in one run.

Run by ``make bench``::

    .venv/bin/python tests/bench/sip_parse.py [--quick] [--json PATH]

Two messages are measured: an INVITE with SDP as it arrives at an SBC behind a
proxy (two Vias, Record-Route, Contact, Allow, Supported, User-Agent, ~250 bytes of
SDP) and the 200 OK that answers it. Each implementation does the same work per
message: bytes in, start line and the headers a proxy acts on (Via, From, To,
Call-ID, CSeq, Contact, Record-Route, Max-Forwards, Content-Length) parsed, the
SDP body kept as opaque bytes, and the message serialized back to bytes.

Timing is interleaved (ours, sippy, ours, sippy ...; who goes first alternates
from round to round) so that CPU frequency drift hits both sides alike, and the
reported figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sbc.sip.parser import parse_message

CALL_ID = b"a84b4c76e66710-4f2c-9a1e-3c5d7b9e1f02@198.51.100.23"

SDP_OFFER = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 198.51.100.23\r\n"
    b"s=-\r\n"
    b"c=IN IP4 198.51.100.23\r\n"
    b"t=0 0\r\n"
    b"m=audio 49170 RTP/AVP 0 8 9 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:9 G722/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
    b"a=ptime:20\r\n"
    b"a=sendrecv\r\n"
)

SDP_ANSWER = (
    b"v=0\r\n"
    b"o=bob 2808844564 2808844564 IN IP4 203.0.113.20\r\n"
    b"s=-\r\n"
    b"c=IN IP4 203.0.113.20\r\n"
    b"t=0 0\r\n"
    b"m=audio 31000 RTP/AVP 0 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
    b"a=ptime:20\r\n"
    b"a=maxptime:150\r\n"
    b"a=rtcp:31001 IN IP4 203.0.113.20\r\n"
    b"a=sendrecv\r\n"
)


def _message(start: bytes, headers: list[bytes], body: bytes) -> bytes:
    lines = [start, *headers, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


INVITE = _message(
    b"INVITE sip:bob@biloxi.example.com SIP/2.0",
    [
        b"Via: SIP/2.0/UDP proxy.atlanta.example.com:5060;branch=z9hG4bK2d4790.1",
        b"Via: SIP/2.0/UDP 198.51.100.23;branch=z9hG4bK74bf9;received=198.51.100.23;rport=5060",
        b"Record-Route: <sip:proxy.atlanta.example.com;lr>",
        b"Max-Forwards: 69",
        b'From: "Alice" <sip:alice@atlanta.example.com>;tag=9fxced76sl',
        b"To: <sip:bob@biloxi.example.com>",
        b"Call-ID: " + CALL_ID,
        b"CSeq: 314159 INVITE",
        b"Contact: <sip:alice@198.51.100.23:5060;transport=udp>",
        b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY",
        b"Supported: replaces, timer, 100rel",
        b"User-Agent: Acme SoftPhone 4.2.1",
        b"Content-Type: application/sdp",
    ],
    SDP_OFFER,
)

OK_200 = _message(
    b"SIP/2.0 200 OK",
    [
        b"Via: SIP/2.0/UDP proxy.atlanta.example.com:5060;branch=z9hG4bK2d4790.1",
        b"Via: SIP/2.0/UDP 198.51.100.23;branch=z9hG4bK74bf9;received=198.51.100.23;rport=5060",
        b"Record-Route: <sip:proxy.atlanta.example.com;lr>",
        b'From: "Alice" <sip:alice@atlanta.example.com>;tag=9fxced76sl',
        b"To: <sip:bob@biloxi.example.com>;tag=8321234356",
        b"Call-ID: " + CALL_ID,
        b"CSeq: 314159 INVITE",
        b"Contact: <sip:bob@203.0.113.20:5060;transport=udp>",
        b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE",
        b"Supported: replaces, timer",
        b"Server: Acme PBX 11.0",
        b"Content-Type: application/sdp",
    ],
    SDP_ANSWER,
)

MESSAGES: dict[str, bytes] = {"INVITE+SDP": INVITE, "200 OK+SDP": OK_200}

#: The headers both sides parse (ours validates exactly these while parsing).
_SIPPY_PARSED = ("via", "from", "to", "call-id", "cseq", "contact", "record-route", "route")
_SIPPY_PARSED_OPTIONAL = ("max-forwards",)

Codec = Callable[[bytes], bytes]


def ours(data: bytes) -> bytes:
    return bytes(parse_message(data))


def load_sippy() -> Codec:
    """sippy's parse + serialize, or exit 2 with a clear message if it is missing."""
    try:
        from sippy.SipRequest import SipRequest  # type: ignore[import-untyped]
        from sippy.SipResponse import SipResponse  # type: ignore[import-untyped]
    except ImportError as exc:
        sys.exit(
            f"x sippy is not importable ({exc}); the benchmark compares against it.\n"
            "  Install the bench extra: .venv/bin/pip install -e '.[bench]' "
            "(or pip install sippy==2.5.0)"
        )

    def sippy(data: bytes) -> bytes:
        # What sippy's SipTransactionManager.handleIncoming does: decode, build the
        # message (start line, Request-URI, header objects, body), then read the
        # headers the transaction layer needs. sippy parses header bodies lazily,
        # so getHFBodys() forces the same headers ours validates eagerly.
        text = data.decode()
        msg = SipResponse(text) if text.startswith("SIP/2.0 ") else SipRequest(text)
        for name in _SIPPY_PARSED:
            msg.getHFBodys(name)
        for name in _SIPPY_PARSED_OPTIONAL:
            msg.getHFBodys(name)
        wire: str = msg.localStr()
        return wire.encode()

    return sippy


def check_equivalent_work(codecs: dict[str, Codec]) -> None:
    """Both sides must produce a whole message: start line, Call-ID and the body."""
    for label, data in MESSAGES.items():
        start = data.split(b"\r\n", 1)[0]
        body = data.split(b"\r\n\r\n", 1)[1]
        for impl, codec in codecs.items():
            out = codec(data)
            problems = [
                what
                for what, ok in (
                    ("start line", out.startswith(start + b"\r\n")),
                    ("Call-ID", CALL_ID in out),
                    ("body", out.endswith(body)),
                    ("Via count", out.count(b"\r\nVia: ") == 2),
                )
                if not ok
            ]
            if problems:
                sys.exit(f"x {impl} output for {label} lacks {', '.join(problems)}:\n{out!r}")


def time_batch(codec: Codec, data: bytes, n: int) -> float:
    """Seconds for ``n`` parse+serialize calls."""
    started = time.perf_counter()
    for _ in range(n):
        out = codec(data)
    elapsed = time.perf_counter() - started
    # Cheap proof that the loop's last result was a real message.
    assert CALL_ID in out
    return elapsed


def calibrate(codec: Codec, data: bytes, batch_seconds: float) -> int:
    """Iterations that take about ``batch_seconds``."""
    n = 10
    while True:
        elapsed = time_batch(codec, data, n)
        if elapsed >= 0.02:
            return max(10, int(n * batch_seconds / elapsed))
        n *= 4


@dataclass(frozen=True)
class Result:
    message: str
    size: int
    ours_msgs_per_s: float
    sippy_msgs_per_s: float
    ratio: float
    ours_rounds: list[float]
    sippy_rounds: list[float]


def measure(
    label: str, data: bytes, codecs: dict[str, Codec], rounds: int, batch_seconds: float
) -> Result:
    counts = {impl: calibrate(codec, data, batch_seconds) for impl, codec in codecs.items()}
    rates: dict[str, list[float]] = {impl: [] for impl in codecs}
    order = list(codecs)
    for r in range(rounds):
        for impl in order if r % 2 == 0 else reversed(order):
            n = counts[impl]
            rates[impl].append(n / time_batch(codecs[impl], data, n))
    ours_rate = statistics.median(rates["ours"])
    sippy_rate = statistics.median(rates["sippy"])
    return Result(
        label,
        len(data),
        ours_rate,
        sippy_rate,
        ours_rate / sippy_rate,
        [round(x, 1) for x in rates["ours"]],
        [round(x, 1) for x in rates["sippy"]],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a ~5 s run instead of ~25 s")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    rounds, batch_seconds = (7, 0.15) if args.quick else (15, 0.2)

    codecs: dict[str, Codec] = {"ours": ours, "sippy": load_sippy()}
    check_equivalent_work(codecs)

    started = time.perf_counter()
    results = [
        measure(label, data, codecs, rounds, batch_seconds) for label, data in MESSAGES.items()
    ]
    wall = time.perf_counter() - started

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"- command: {command}")
    print(f"- python:  {python} on {platform.machine()} ({platform.system()})")
    print(f"- rounds:  {rounds} interleaved, median reported; wall {wall:.1f} s")
    print()
    print(f"{'message':<12} {'bytes':>5} {'ours msg/s':>12} {'sippy msg/s':>12} {'ours/sippy':>10}")
    for res in results:
        print(
            f"{res.message:<12} {res.size:>5} {res.ours_msgs_per_s:>12,.0f} "
            f"{res.sippy_msgs_per_s:>12,.0f} {res.ratio:>9.2f}x"
        )

    if args.json is not None:
        report = {
            "command": command,
            "python": python,
            "machine": platform.machine(),
            "rounds": rounds,
            "batch_seconds": batch_seconds,
            "wall_seconds": round(wall, 2),
            "results": [asdict(res) for res in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\n- wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
