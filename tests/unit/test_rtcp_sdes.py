"""SDES CNAMEs are rewritten by the relay: they name the sender's user@host."""

from __future__ import annotations

import struct

import pytest

from sbc.media.rtcp import (
    PT_SDES,
    ReceiverReport,
    RtcpError,
    RtcpPacket,
    hide_sdes,
    parse_compound,
    sdes_cname,
)


def receiver_report(ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def sdes(*chunks: tuple[int, list[tuple[int, bytes]]], padding: int = 0) -> bytes:
    body = b""
    for ssrc, items in chunks:
        chunk = ssrc.to_bytes(4, "big")
        for kind, value in items:
            chunk += bytes((kind, len(value))) + value
        chunk += b"\x00"
        chunk += b"\x00" * (-len(chunk) % 4)
        body += chunk
    body += b"\x00" * (padding - 1) + bytes((padding,)) if padding else b""
    first = 0x80 | len(chunks) | (0x20 if padding else 0)
    return struct.pack("!BBH", first, PT_SDES, len(body) // 4) + body


def test_cname_and_other_items_are_replaced_and_the_packet_stays_valid() -> None:
    leaky = receiver_report(0x1234) + sdes(
        (0x1234, [(1, b"alice@10.0.0.7"), (2, b"Alice Secret"), (6, b"baresip 1.0")]),
        (0x5678, [(1, b"bob@pbx.inside.example")]),
    )
    clean = hide_sdes(leaky)
    for secret in (b"10.0.0.7", b"alice", b"Alice", b"baresip", b"pbx.inside"):
        assert secret not in clean
    assert sdes_cname(0x1234) in clean and sdes_cname(0x5678) in clean
    assert clean.startswith(receiver_report(0x1234))  # other packets untouched
    report, cleaned = parse_compound(clean)
    assert isinstance(report, ReceiverReport) and report.ssrc == 0x1234
    assert isinstance(cleaned, RtcpPacket) and cleaned.packet_type == PT_SDES


def test_padding_and_reports_only() -> None:
    rr = receiver_report(7)
    assert hide_sdes(rr) == rr
    padded = rr + sdes((7, [(1, b"x@192.0.2.1")]), padding=4)
    clean = hide_sdes(padded)
    assert b"192.0.2.1" not in clean
    parse_compound(clean)


@pytest.mark.parametrize(
    "bad",
    [
        sdes((1, [(1, b"abc")]))[:-4],  # truncated
        struct.pack("!BBHI", 0x81, PT_SDES, 1, 1),  # chunk without its end
        b"\x80\xca\x00",  # truncated header
    ],
)
def test_malformed_sdes_is_refused(bad: bytes) -> None:
    with pytest.raises(RtcpError):
        hide_sdes(bad)


@pytest.mark.parametrize("padding", [5, 8, 255])
def test_padding_longer_than_the_sdes_body_is_refused(padding: int) -> None:
    # A padded SDES whose count reaches into (or past) its header parses as an opaque
    # packet: hiding it must refuse it, not fail on an empty slice.
    bad = struct.pack("!BBHI", 0xA0 | 1, PT_SDES, 1, padding)
    parse_compound(bad)
    with pytest.raises(RtcpError, match="padding"):
        hide_sdes(bad)
