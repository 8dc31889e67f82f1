"""Recording: G.711 tables, IP/UDP + pcap and WAV round trips, the stereo mixer."""

from __future__ import annotations

import math
import warnings
from array import array
from pathlib import Path

import pytest

from sbc.media.recording import (
    ALAW_TO_LINEAR,
    MAX_TIMESTAMP_DRIFT,
    PT_PCMA,
    PT_PCMU,
    ULAW_TO_LINEAR,
    WAV_WINDOW,
    CallRecorder,
    PcapError,
    PcapRecord,
    StereoG711Mixer,
    UdpDatagram,
    WavAudio,
    g711_decode,
    g711_encode,
    parse_pcap,
    pcap_header,
    wav_header,
)
from sbc.media.rtp import RtpError, RtpHeader, rtp_payload
from sbc.media.session import Side
from sbc.media.values import Endpoint


def reference_tables() -> tuple[list[int], list[int]]:
    # audioop (deprecated since 3.11, removed in 3.13) is an independent reference here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    codes = bytes(range(256))
    ulaw = array("h", audioop.ulaw2lin(codes, 2)).tolist()
    alaw = array("h", audioop.alaw2lin(codes, 2)).tolist()
    return ulaw, alaw


def test_g711_tables_match_the_reference_decoder() -> None:
    ulaw, alaw = reference_tables()
    assert list(ULAW_TO_LINEAR) == ulaw
    assert list(ALAW_TO_LINEAR) == alaw
    # Spot values from G.711: mu-law 0x00 is -32124, A-law 0xD5 is +8.
    assert ULAW_TO_LINEAR[0x00] == -32124 and ULAW_TO_LINEAR[0xFF] == 0
    assert ALAW_TO_LINEAR[0xD5] == 8 and ALAW_TO_LINEAR[0x55] == -8


@pytest.mark.parametrize("pt", [PT_PCMU, PT_PCMA])
def test_g711_decode_is_the_table_and_encode_inverts_it(pt: int) -> None:
    table = ULAW_TO_LINEAR if pt == PT_PCMU else ALAW_TO_LINEAR
    codes = bytes(range(256))
    assert g711_decode(codes, pt).tolist() == list(table)
    decoded = g711_decode(codes, pt)
    assert g711_decode(g711_encode(decoded, pt), pt) == decoded
    tone = [round(8000 * math.sin(2 * math.pi * 440 * n / 8000)) for n in range(160)]
    error = [abs(a - b) for a, b in zip(g711_decode(g711_encode(tone, pt), pt), tone, strict=True)]
    assert max(error) <= 256  # G.711's coarsest step at this level is 256


def test_g711_decode_rejects_other_payload_types() -> None:
    with pytest.raises(KeyError):
        g711_decode(b"\0", 9)


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (Endpoint.of("198.51.100.10", 34000), Endpoint.of("198.51.100.1", 20000)),
        (Endpoint.of("2001:db8:1::10", 34000), Endpoint.of("2001:db8:1::1", 20000)),
    ],
)
def test_udp_datagram_round_trips(source: Endpoint, destination: Endpoint) -> None:
    datagram = UdpDatagram(source, destination, b"\x80\x00" + bytes(170))
    raw = bytes(datagram)
    assert UdpDatagram.parse(raw) == datagram
    assert bytes(UdpDatagram.parse(raw)) == raw
    if source.family == 4:
        assert raw[0] == 0x45 and len(raw) == 20 + 8 + 172
        # The IPv4 header checksum verifies: the one's-complement sum is 0xFFFF.
        words = sum(int.from_bytes(raw[i : i + 2], "big") for i in range(0, 20, 2))
        assert (words & 0xFFFF) + (words >> 16) == 0xFFFF
    else:
        assert raw[0] >> 4 == 6 and len(raw) == 40 + 8 + 172
        assert raw[46:48] != b"\0\0"  # mandatory over IPv6


def test_known_ipv6_udp_checksum() -> None:
    # Computed by hand over the pseudo-header: addresses, length 9, next header 17.
    datagram = UdpDatagram(Endpoint.of("2001:db8::1", 1), Endpoint.of("2001:db8::2", 2), b"A")
    raw = bytes(datagram)
    total = 0x2001 + 0x0DB8 + 1 + 0x2001 + 0x0DB8 + 2 + 9 + 17 + 1 + 2 + 9 + 0x4100
    total = (total & 0xFFFF) + (total >> 16)
    assert int.from_bytes(raw[46:48], "big") == ~total & 0xFFFF


def test_pcap_round_trips_and_rejects_garbage() -> None:
    records = [
        PcapRecord(
            1.7e9 + i * 0.02,
            bytes(
                UdpDatagram(
                    Endpoint.of("203.0.113.20", 5000), Endpoint.of("203.0.113.1", 20002), b"x"
                )
            ),
        )
        for i in range(3)
    ]
    data = pcap_header() + b"".join(bytes(r) for r in records)
    parsed = parse_pcap(data)
    assert [bytes(r) for r in parsed] == [bytes(r) for r in records]
    assert parsed[1].datagram.source == Endpoint.of("203.0.113.20", 5000)
    assert data[:4] == b"\xd4\xc3\xb2\xa1" and data[20:24] == (101).to_bytes(4, "little")
    with pytest.raises(PcapError, match="pcap magic 0x0, expected 0xa1b2c3d4"):
        parse_pcap(bytes(24))
    with pytest.raises(PcapError, match="truncated record at offset 40"):
        parse_pcap(data[: 24 + 16 + 5])


def test_wav_header_round_trips() -> None:
    frames = array("h", [1, -1, 2, -2]).tobytes()
    audio = WavAudio.parse(wav_header(2, 8000, len(frames)) + frames)
    assert audio.rate == 8000
    assert [c.tolist() for c in audio.channels] == [[1, 2], [-1, -2]]
    with pytest.raises(ValueError, match="not a canonical PCM WAV file"):
        WavAudio.parse(bytes(44))


def test_rtp_payload_skips_csrcs_extension_and_padding() -> None:
    header = bytes(RtpHeader(0, 1, 160, 0xA, padding=True, extension=True, csrc_count=1))
    packet = header + b"CSRC" + b"\xbe\xde\x00\x01" + b"EXT!" + b"pay" + b"\0\x02"
    assert rtp_payload(packet) == b"pay"  # the last two octets are padding
    with pytest.raises(RtpError, match="RTP packet too short: 3 bytes"):
        rtp_payload(b"\x80\0\0")


def _frame(
    pt: int, seq: int, ts: int, ssrc: int, samples: list[int]
) -> tuple[RtpHeader, array[int]]:
    return RtpHeader(pt, seq, ts, ssrc), array("h", samples)


def test_mixer_places_by_timestamp_leaves_gaps_silent_and_drops_late_packets() -> None:
    mixer = StereoG711Mixer()
    out = bytearray()
    # Left: timestamps from 1000, arriving at sample 0; packet 2 lost.
    out += mixer.add(0, 0, *_frame(0, 1, 1000, 1, [1] * 160))
    out += mixer.add(0, 320, *_frame(0, 3, 1320, 1, [3] * 160))
    # Right starts 80 samples later, its clock elsewhere (wrap-around).
    out += mixer.add(1, 80, *_frame(0, 1, 0xFFFFFF00, 2, [7] * 160))
    out += mixer.add(1, 240, *_frame(0, 2, 0xFFFFFFA0, 2, [8] * 160))
    # Much later: the first second is final; a packet for it is now too late.
    out += mixer.add(0, WAV_WINDOW + 500, *_frame(0, 4, 1000 + WAV_WINDOW + 500, 1, [4] * 160))
    # A right packet for sample 0..159 after those were written out: too late.
    late = mixer.add(1, WAV_WINDOW + 500, *_frame(0, 0, 0xFFFFFF00 - 160, 2, [9] * 160))
    assert late == b"" and mixer.late_packets == 1
    out += mixer.drain()
    frames = array("h", bytes(out))
    left, right = frames[0::2].tolist(), frames[1::2].tolist()
    assert left[:160] == [1] * 160
    assert left[160:320] == [0] * 160  # the lost packet is silence
    assert left[320:480] == [3] * 160
    assert right[:80] == [0] * 80 and right[80:240] == [7] * 160 and right[240:400] == [8] * 160
    assert left[WAV_WINDOW + 500 : WAV_WINDOW + 660] == [4] * 160


def test_mixer_reanchors_on_a_new_ssrc_and_on_a_timestamp_jump() -> None:
    mixer = StereoG711Mixer()
    out = bytearray(mixer.add(0, 0, *_frame(0, 1, 0, 1, [1] * 160)))
    out += mixer.add(0, 24000, *_frame(0, 2, 24000, 1, [2] * 160))
    # A new SSRC (another source behind a PBX) starts where it arrives.
    out += mixer.add(0, 24200, *_frame(0, 7, 777, 2, [3] * 160))
    # The same SSRC jumping far ahead (> MAX_TIMESTAMP_DRIFT) is re-anchored too.
    out += mixer.add(0, 24400, *_frame(0, 8, 777 + MAX_TIMESTAMP_DRIFT + 5000, 2, [4] * 160))
    out += mixer.drain()
    left = array("h", bytes(out))[0::2].tolist()
    assert len(left) == 24560 and mixer.late_packets == 0
    assert left[24000:24160] == [2] * 160
    assert left[24200:24360] == [3] * 160
    assert left[24400:24560] == [4] * 160
    assert left[160:24000] == [0] * (24000 - 160)


def test_call_recorder_writes_both_directions(tmp_path: Path) -> None:
    now = [1000.0]
    recorder = CallRecorder(tmp_path / "recordings", "0123abcd", clock=lambda: now[0])
    a_peer, a_local = Endpoint.of("198.51.100.10", 34000), Endpoint.of("198.51.100.1", 20000)
    b_peer, b_local = Endpoint.of("203.0.113.20", 5000), Endpoint.of("203.0.113.1", 20002)
    up = [round(6000 * math.sin(2 * math.pi * 400 * n / 8000)) for n in range(1600)]
    down = [round(6000 * math.sin(2 * math.pi * 1000 * n / 8000)) for n in range(1600)]
    up_codes, down_codes = g711_encode(up, PT_PCMU), g711_encode(down, PT_PCMA)
    for i in range(10):
        now[0] = 1000.0 + i * 0.02
        chunk = slice(160 * i, 160 * (i + 1))
        recorder.packet(
            0,
            Side.A,
            a_peer,
            a_local,
            bytes(RtpHeader(0, i, 160 * i, 0xA)) + up_codes[chunk],
            False,
        )
        recorder.packet(
            0,
            Side.B,
            b_peer,
            b_local,
            bytes(RtpHeader(8, i, 5 + 160 * i, 0xB)) + down_codes[chunk],
            False,
        )
    recorder.packet(
        0, Side.A, a_peer, Endpoint.of("198.51.100.1", 20001), b"\x80\xc8" + bytes(26), True
    )
    files = recorder.close()
    assert files.pcap == tmp_path / "recordings" / "0123abcd.pcap"
    assert files.packets == 21 and not files.truncated
    datagrams = [r.datagram for r in parse_pcap(files.pcap.read_bytes())]
    assert sum(d.source == a_peer and d.destination == a_local for d in datagrams) == 10
    assert sum(d.source == b_peer and d.destination == b_local for d in datagrams) == 10
    assert files.wav is not None
    audio = WavAudio.parse(files.wav.read_bytes())
    assert audio.rate == 8000
    left, right = (c.tolist() for c in audio.channels)
    assert left[:1600] == g711_decode(up_codes, PT_PCMU).tolist()
    assert right[:1600] == g711_decode(down_codes, PT_PCMA).tolist()
    # A second recording of the same session (an HA restore) never overwrites the first.
    again = CallRecorder(tmp_path / "recordings", "0123abcd").close()
    assert again.pcap.name == "0123abcd-1.pcap" and again.wav is None


def test_call_recorder_stops_at_the_size_cap(tmp_path: Path) -> None:
    recorder = CallRecorder(tmp_path, "cap", max_bytes=24 + 3 * (16 + 28 + 172))
    packet = bytes(RtpHeader(0, 0, 0, 1)) + bytes(160)
    for _ in range(10):
        recorder.packet(
            0,
            Side.A,
            Endpoint.of("198.51.100.10", 1),
            Endpoint.of("198.51.100.1", 2),
            packet,
            False,
        )
    files = recorder.close()
    assert files.packets == 3 and files.truncated
    assert len(parse_pcap(files.pcap.read_bytes())) == 3
