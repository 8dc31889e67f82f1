"""RTCP SR/RR parsing and the quality figures derived from them."""

from __future__ import annotations

import pytest

from sbc.media.rtcp import (
    ReceiverReport,
    ReportBlock,
    RtcpError,
    RtcpMonitor,
    RtcpPacket,
    SenderReport,
    parse_compound,
)
from sbc.media.rtp import RtpError, RtpHeader, is_rtcp, packet_ssrc, rtp_fits, rtp_payload

# An SR with one report block followed by an SDES CNAME, as a softphone sends it
# (header fields written out: V=2 RC=1 PT=200 length=12 words).
SR_SDES = bytes.fromhex(
    "81c8000c"  # V=2, RC=1, SR, 12 words
    "11223344"  # sender SSRC
    "e8a1b2c3"
    "80000000"  # NTP 0xe8a1b2c3.5
    "0001f400"  # RTP timestamp
    "00000064"
    "00003e80"  # 100 packets, 16000 octets
    "55667788"  # report block: source SSRC
    "40"
    "000005"  # fraction lost 64/256, cumulative 5
    "0000012c"  # highest sequence 300
    "00000050"  # jitter 80
    "b2c38000"  # LSR
    "00008000"  # DLSR 0.5 s
    "81ca0003"  # SDES, 1 chunk, 3 words
    "11223344"
    "0104616c"
    "69630000"  # CNAME "alic" + end
)


def test_sender_report_fields() -> None:
    sr, sdes = parse_compound(SR_SDES)
    assert isinstance(sr, SenderReport)
    assert (sr.ssrc, sr.ntp_seconds, sr.ntp_fraction) == (0x11223344, 0xE8A1B2C3, 0x80000000)
    assert (sr.packet_count, sr.octet_count, sr.rtp_timestamp) == (100, 16000, 128000)
    assert sr.ntp_middle == 0xB2C38000
    assert sr.reports == (ReportBlock(0x55667788, 64, 5, 300, 80, 0xB2C38000, 0x8000),)
    assert isinstance(sdes, RtcpPacket) and sdes.packet_type == 202


def test_compound_round_trips_byte_for_byte() -> None:
    assert b"".join(bytes(p) for p in parse_compound(SR_SDES)) == SR_SDES


def test_receiver_report_and_negative_cumulative_loss() -> None:
    block = ReportBlock(1, 0, -3, 65600, 12, 0, 0)
    rr = ReceiverReport(0xCAFE, (block,))
    data = bytes(rr)
    assert data[:4] == bytes.fromhex("81c90007")
    assert parse_compound(data) == (rr,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty RTCP packet"),
        (b"\x81\xc8\x00", "truncated RTCP header at byte 0"),
        (b"\x41\xc8\x00\x00", "RTCP version 1 at byte 0, expected 2"),
        (b"\x80\xc9\x00\x05\x00\x00\x00\x01", "RTCP length 5 overruns the datagram at byte 0"),
        (
            b"\x82\xc9\x00\x07" + bytes(28),
            "RTCP RR with 2 report blocks needs 56 bytes, has 32",
        ),
    ],
)
def test_malformed_rtcp_is_rejected_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(RtcpError, match=message):
        parse_compound(data)


def test_rtt_loss_and_jitter_through_the_relay() -> None:
    monitor = RtcpMonitor()
    sr = SenderReport(0xB, 0xE8A1B2C3, 0x80000000, 0, 10, 1600)
    # The relay forwards the callee's SR to the caller at t=10.0 ...
    monitor.sender_report_forwarded((sr,), now=10.0)
    # ... the caller answers with an RR naming it, having held it 0.5 s, at t=10.62.
    rr = ReceiverReport(0xA, (ReportBlock(0xB, 26, 7, 1000, 160, sr.ntp_middle, 0x8000),))
    quality = monitor.received((rr,), now=10.62)
    assert quality.rtt == pytest.approx(0.12)
    assert quality.fraction_lost == pytest.approx(26 / 256)
    assert quality.cumulative_lost == 7
    assert quality.jitter_seconds(8000) == pytest.approx(0.02)
    assert quality.reports == 1


def test_rr_for_an_unknown_sr_keeps_the_last_rtt() -> None:
    monitor = RtcpMonitor()
    rr = ReceiverReport(0xA, (ReportBlock(0xB, 0, 0, 1, 0, 0x1234, 0),))
    assert monitor.received((rr,), now=1.0).rtt is None


def test_rtp_header_and_rtcp_mux_demultiplexing() -> None:
    header = RtpHeader(payload_type=101, sequence=7, timestamp=160, ssrc=0xA, marker=True)
    data = bytes(header) + b"\x01\x00\x00\xa0"  # an RFC 4733 event payload
    assert RtpHeader.parse(data) == header
    assert not is_rtcp(data)  # PT 101 with marker: second octet 229
    assert is_rtcp(SR_SDES)
    assert packet_ssrc(data) == 0xA and packet_ssrc(SR_SDES) == 0x11223344
    assert packet_ssrc(b"\x00" * 12) is None
    with pytest.raises(RtpError, match="RTP packet too short: 3 bytes"):
        RtpHeader.parse(b"\x80\x00\x00")


@pytest.mark.parametrize(
    ("data", "payload"),
    [
        (bytes(RtpHeader(0, 1, 2, 3)) + b"ab", b"ab"),
        (b"\x81" + bytes(RtpHeader(0, 1, 2, 3))[1:] + b"\0\0\0\1" + b"ab", b"ab"),
        (b"\x90" + bytes(RtpHeader(0, 1, 2, 3))[1:] + b"\xbe\xde\0\1xxxx" + b"ab", b"ab"),
        (b"\xa0" + bytes(RtpHeader(0, 1, 2, 3))[1:] + b"ab\0\2", b"ab"),
        (b"\x81" + bytes(RtpHeader(0, 1, 2, 3))[1:] + b"\0\0\0", None),  # CSRC cut
        (b"\x90" + bytes(RtpHeader(0, 1, 2, 3))[1:] + b"\xbe\xde\0\2xxxx", None),
        (b"\xa0" + bytes(RtpHeader(0, 1, 2, 3))[1:] + b"ab\0\7", None),  # padding > size
        (b"\xa0" + bytes(RtpHeader(0, 1, 2, 3))[1:] + b"ab\1\0", None),  # padding count 0
    ],
)
def test_rtp_lengths_csrcs_extension_and_padding(data: bytes, payload: bytes | None) -> None:
    assert rtp_fits(data) is (payload is not None)
    if payload is None:
        with pytest.raises(RtpError):
            rtp_payload(data)
    else:
        assert rtp_payload(data) == payload
