"""RTCP sender and receiver reports (RFC 3550 6.4), and the quality they tell.

`parse_compound` reads a compound RTCP packet; SR and RR are decoded, other packet
types (SDES, BYE, APP, XR...) are kept as opaque `RtcpPacket`s so the packet can be
re-serialised byte for byte. `RtcpMonitor` turns the reports of one leg into loss,
jitter and round-trip time for CDRs and metrics.

Round-trip time through a relay: the relay records when it forwarded each sender
report towards a leg; when that leg's receiver report comes back naming the SR (LSR)
and how long it held it (DLSR), RTT = arrival - forwarded - DLSR (RFC 3550 6.4.1,
measured from the relay rather than from the SR's sender).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

PT_SR = 200
PT_RR = 201
#: Cap on report blocks read from one packet (the RC field holds at most 31).
MAX_REPORT_BLOCKS = 31
#: Cap on packets in one compound packet.
MAX_COMPOUND_PACKETS = 16
#: Sender reports remembered per leg for RTT matching.
MAX_PENDING_SR = 16

_HEADER = struct.Struct("!BBH")
_SENDER_INFO = struct.Struct("!IIIII")
_BLOCK = struct.Struct("!IB3sIIII")

N = TypeVar("N", int, float)


class RtcpError(ValueError):
    """A malformed RTCP packet; the message says what is wrong."""


@dataclass(frozen=True)
class ReportBlock:
    """One reception report block (RFC 3550 6.4.1)."""

    ssrc: int
    fraction_lost: int  # 8-bit fixed point: lost / 256
    cumulative_lost: int  # 24-bit signed
    highest_sequence: int
    jitter: int  # RTP timestamp units
    lsr: int  # middle 32 bits of the NTP timestamp of the last SR
    dlsr: int  # 1/65536 seconds

    @classmethod
    def parse(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, fraction, lost, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, offset)
        cumulative = int.from_bytes(lost, "big", signed=True)
        return cls(ssrc, fraction, cumulative, highest, jitter, lsr, dlsr)

    def __bytes__(self) -> bytes:
        lost = self.cumulative_lost.to_bytes(3, "big", signed=True)
        return _BLOCK.pack(
            self.ssrc,
            self.fraction_lost,
            lost,
            self.highest_sequence,
            self.jitter,
            self.lsr,
            self.dlsr,
        )


@dataclass(frozen=True)
class RtcpPacket:
    """An RTCP packet the relay does not decode (kept whole for re-serialising)."""

    packet_type: int
    data: bytes

    def __bytes__(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class SenderReport:
    ssrc: int
    ntp_seconds: int
    ntp_fraction: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()
    #: Profile-specific extension after the report blocks.
    extension: bytes = b""

    @property
    def ntp_middle(self) -> int:
        """The middle 32 bits of the NTP timestamp: what receivers echo as LSR."""
        return ((self.ntp_seconds & 0xFFFF) << 16) | (self.ntp_fraction >> 16)

    def __bytes__(self) -> bytes:
        body = _SENDER_INFO.pack(
            self.ntp_seconds,
            self.ntp_fraction,
            self.rtp_timestamp,
            self.packet_count,
            self.octet_count,
        )
        return _serialise(PT_SR, self.ssrc, body, self.reports, self.extension)


@dataclass(frozen=True)
class ReceiverReport:
    ssrc: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""

    def __bytes__(self) -> bytes:
        return _serialise(PT_RR, self.ssrc, b"", self.reports, self.extension)


Rtcp = SenderReport | ReceiverReport | RtcpPacket


def _serialise(
    packet_type: int,
    ssrc: int,
    sender_info: bytes,
    reports: tuple[ReportBlock, ...],
    extension: bytes,
) -> bytes:
    body = ssrc.to_bytes(4, "big") + sender_info + b"".join(bytes(r) for r in reports)
    body += extension
    if len(body) % 4:
        raise RtcpError("RTCP extension is not a multiple of 4 bytes")
    header = _HEADER.pack(0x80 | len(reports), packet_type, len(body) // 4)
    return header + body


def parse_compound(data: bytes) -> tuple[Rtcp, ...]:
    """Every packet of a compound RTCP packet (RFC 3550 6.1)."""
    packets: list[Rtcp] = []
    offset = 0
    while offset < len(data):
        if len(packets) == MAX_COMPOUND_PACKETS:
            raise RtcpError(f"more than {MAX_COMPOUND_PACKETS} packets in a compound packet")
        if len(data) - offset < 4:
            raise RtcpError(f"truncated RTCP header at byte {offset}")
        first, packet_type, words = _HEADER.unpack_from(data, offset)
        if first >> 6 != 2:
            raise RtcpError(f"RTCP version {first >> 6} at byte {offset}, expected 2")
        end = offset + 4 + 4 * words
        if end > len(data):
            raise RtcpError(f"RTCP length {words} overruns the datagram at byte {offset}")
        chunk = data[offset:end]
        if first & 0x20:
            # RFC 3550 6.4.1: padding only on the last packet; keep it opaque.
            packets.append(RtcpPacket(packet_type, chunk))
        elif packet_type in (PT_SR, PT_RR):
            packets.append(_parse_report(chunk, packet_type, first & 0x1F))
        else:
            packets.append(RtcpPacket(packet_type, chunk))
        offset = end
    if not packets:
        raise RtcpError("empty RTCP packet")
    return tuple(packets)


def _parse_report(chunk: bytes, packet_type: int, count: int) -> SenderReport | ReceiverReport:
    position = 8 + (_SENDER_INFO.size if packet_type == PT_SR else 0)
    needed = position + count * _BLOCK.size
    if len(chunk) < needed:
        raise RtcpError(
            f"RTCP {'SR' if packet_type == PT_SR else 'RR'} with {count} report blocks "
            f"needs {needed} bytes, has {len(chunk)}"
        )
    ssrc = int.from_bytes(chunk[4:8], "big")
    reports = tuple(ReportBlock.parse(chunk, position + i * _BLOCK.size) for i in range(count))
    extension = chunk[needed:]
    if packet_type == PT_SR:
        ntp_s, ntp_f, rtp_ts, pcount, ocount = _SENDER_INFO.unpack_from(chunk, 8)
        return SenderReport(ssrc, ntp_s, ntp_f, rtp_ts, pcount, ocount, reports, extension)
    return ReceiverReport(ssrc, reports, extension)


@dataclass(frozen=True)
class RtcpQuality:
    """What one leg's endpoint reports about the media it receives from the relay."""

    reports: int = 0
    #: Fraction of packets lost in the last report interval, 0..1.
    fraction_lost: float = 0.0
    cumulative_lost: int = 0
    #: Interarrival jitter in RTP timestamp units (divide by the clock rate).
    jitter: int = 0
    #: Round trip relay -> endpoint -> relay, seconds; None until measured.
    rtt: float | None = None

    def jitter_seconds(self, clock_rate: int) -> float:
        return self.jitter / clock_rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "reports": self.reports,
            "fraction_lost": self.fraction_lost,
            "cumulative_lost": self.cumulative_lost,
            "jitter": self.jitter,
            "rtt": self.rtt,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RtcpQuality:
        """From `to_dict` output, as JSON or a Redis hash (strings) gives it back.

        Quality is only what the endpoints said: a field that does not read as a
        number is left at its default rather than fail the restore of the call."""
        if not isinstance(data, Mapping):
            return cls()
        rtt = _number(float, data.get("rtt"))
        return cls(
            reports=_number(int, data.get("reports")) or 0,
            fraction_lost=_number(float, data.get("fraction_lost")) or 0.0,
            cumulative_lost=_number(int, data.get("cumulative_lost")) or 0,
            jitter=_number(int, data.get("jitter")) or 0,
            rtt=rtt,
        )


def _number(kind: Callable[[Any], N], value: Any) -> N | None:
    """``kind(value)`` for a finite number or its text; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        number = kind(value)
        return number if math.isfinite(number) else None
    except (ValueError, OverflowError):
        return None


@dataclass
class RtcpMonitor:
    """Quality of one leg, fed with the RTCP it sends and the SRs forwarded to it.

    Pure: ``now`` is passed in (any monotonic clock in seconds).
    """

    quality: RtcpQuality = field(default_factory=RtcpQuality)
    #: LSR value (NTP middle 32 bits) -> when the relay forwarded that SR to the leg.
    _forwarded: dict[int, float] = field(default_factory=dict)
    #: The sender SSRC of the last SR forwarded to the leg: a source it hears.
    _sender: int | None = None

    def sender_report_forwarded(self, packets: tuple[Rtcp, ...], now: float) -> None:
        """Note the SRs of a compound packet the relay just sent towards this leg."""
        for packet in packets:
            if isinstance(packet, SenderReport):
                if len(self._forwarded) >= MAX_PENDING_SR:
                    self._forwarded.pop(next(iter(self._forwarded)))
                self._forwarded[packet.ntp_middle] = now
                self._sender = packet.ssrc

    def received(
        self, packets: tuple[Rtcp, ...], now: float, media_ssrc: int | None = None
    ) -> RtcpQuality:
        """Account the reports in a compound packet the leg sent; the new quality.

        Only a report block about the media the relay forwards to the leg counts:
        the one whose SSRC is ``media_ssrc`` (the SSRC latched on the other side's
        RTP) or the sender of the last SR forwarded to the leg (which still names
        the source when the RTP goes through the kernel, unseen). A report whose
        blocks are all about other sources (RFC 3550 6.4.1: one block per source
        heard, in any order) leaves the quality as it was."""
        quality = self.quality
        sender = self._sender
        for packet in packets:
            if not isinstance(packet, SenderReport | ReceiverReport):
                continue
            for block in packet.reports:
                if block.ssrc == media_ssrc or block.ssrc == sender:
                    break
            else:
                continue
            rtt = quality.rtt
            sent = self._forwarded.get(block.lsr) if block.lsr else None
            if sent is not None:
                measured = now - sent - block.dlsr / 65536.0
                if measured >= 0:
                    rtt = measured
            quality = RtcpQuality(
                reports=quality.reports + 1,
                fraction_lost=block.fraction_lost / 256.0,
                cumulative_lost=block.cumulative_lost,
                jitter=block.jitter,
                rtt=rtt,
            )
        self.quality = quality
        return quality


PT_SDES = 202
SDES_CNAME = 1
#: Most chunks read from one SDES packet (the SC field holds at most 31).
MAX_SDES_CHUNKS = 31


def sdes_cname(ssrc: int) -> bytes:
    """The CNAME the relay gives a source: stable per SSRC, naming nobody's host."""
    return f"sbc-{ssrc:08x}".encode("ascii")


def _hidden_sdes(chunk: bytes) -> bytes:
    """An SDES packet with every chunk's items replaced by a neutral CNAME.

    SDES items (CNAME, NAME, EMAIL, PHONE, TOOL ...) typically carry user@host of
    the sender (RFC 3550 6.5.1); a translator may rewrite them, and a topology-hiding
    relay must. The SSRC of each chunk is kept, so receivers still bind sources.
    """
    first = chunk[0]
    count = first & 0x1F
    offset = 4
    body = bytearray()
    for _ in range(min(count, MAX_SDES_CHUNKS)):
        if offset + 4 > len(chunk):
            raise RtcpError("truncated SDES chunk")
        ssrc = int.from_bytes(chunk[offset : offset + 4], "big")
        offset += 4
        # Skip the items: type, length, value ... until a null item, then pad to 32 bits.
        while True:
            if offset >= len(chunk):
                raise RtcpError("SDES chunk without its end")
            if chunk[offset] == 0:
                offset += 1
                offset = (offset + 3) & ~3
                break
            if offset + 2 > len(chunk):
                raise RtcpError("truncated SDES item")
            offset += 2 + chunk[offset + 1]
        cname = sdes_cname(ssrc)
        item = ssrc.to_bytes(4, "big") + bytes((SDES_CNAME, len(cname))) + cname + b"\x00"
        item += b"\x00" * (-len(item) % 4)
        body += item
    header = _HEADER.pack(0x80 | min(count, MAX_SDES_CHUNKS), PT_SDES, len(body) // 4)
    return header + bytes(body)


def hide_sdes(data: bytes) -> bytes:
    """A compound RTCP packet with its SDES items neutralised (other packets as sent).

    Raises RtcpError on a malformed packet; the relay then drops it rather than
    forward what it cannot check.
    """
    out = bytearray()
    offset = 0
    packets = 0
    while offset < len(data):
        packets += 1
        if packets > MAX_COMPOUND_PACKETS:
            raise RtcpError(f"more than {MAX_COMPOUND_PACKETS} packets in a compound packet")
        if len(data) - offset < 4:
            raise RtcpError(f"truncated RTCP header at byte {offset}")
        first, packet_type, words = _HEADER.unpack_from(data, offset)
        end = offset + 4 + 4 * words
        if end > len(data) or first >> 6 != 2:
            raise RtcpError(f"bad RTCP packet at byte {offset}")
        chunk = data[offset:end]
        if packet_type == PT_SDES and not first & 0x20:
            out += _hidden_sdes(chunk)
        elif packet_type == PT_SDES:
            padding = chunk[-1]
            if padding > len(chunk) - 4:
                # RFC 3550 6.4.1: the count covers padding only, never the header.
                raise RtcpError(f"RTCP padding of {padding} bytes overruns the packet")
            out += _hidden_sdes(chunk[: len(chunk) - padding] if padding else chunk)
        else:
            out += chunk
        offset = end
    return bytes(out)
