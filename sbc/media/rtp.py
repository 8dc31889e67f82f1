"""The few RTP header facts the relay needs (RFC 3550 5.1, RFC 5761 4)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
#: Fixed RTP header length (RFC 3550 5.1).
RTP_HEADER_SIZE = 12
#: Largest datagram the userspace relay reads (a jumbo-free UDP payload).
MAX_DATAGRAM = 2048

_HEADER = struct.Struct("!BBHII")


class RtpError(ValueError):
    """Not an RTP packet."""


@dataclass(frozen=True)
class RtpHeader:
    """The fixed part of an RTP header."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool = False
    padding: bool = False
    extension: bool = False
    csrc_count: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpHeader:
        if len(data) < RTP_HEADER_SIZE:
            raise RtpError(f"RTP packet too short: {len(data)} bytes")
        b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
        if b0 >> 6 != RTP_VERSION:
            raise RtpError(f"RTP version {b0 >> 6}, expected 2")
        return cls(
            payload_type=b1 & 0x7F,
            sequence=seq,
            timestamp=ts,
            ssrc=ssrc,
            marker=bool(b1 & 0x80),
            padding=bool(b0 & 0x20),
            extension=bool(b0 & 0x10),
            csrc_count=b0 & 0x0F,
        )

    def __bytes__(self) -> bytes:
        b0 = RTP_VERSION << 6 | self.padding << 5 | self.extension << 4 | (self.csrc_count & 0x0F)
        b1 = self.marker << 7 | (self.payload_type & 0x7F)
        return _HEADER.pack(b0, b1, self.sequence, self.timestamp, self.ssrc)


def rtp_payload(data: bytes) -> bytes:
    """The payload of an RTP packet: after CSRCs and any header extension, before
    padding (RFC 3550 5.1, 5.3.1)."""
    header = RtpHeader.parse(data)
    offset = RTP_HEADER_SIZE + 4 * header.csrc_count
    if header.extension:
        if len(data) < offset + 4:
            raise RtpError("RTP header extension truncated")
        offset += 4 + 4 * int.from_bytes(data[offset + 2 : offset + 4], "big")
    end = len(data)
    if header.padding:
        if data[-1] == 0:
            # The count includes itself (RFC 3550 5.1): zero is no padding at all.
            raise RtpError("RTP padding count of 0")
        end -= data[-1]
    if offset > end:
        raise RtpError(f"RTP header ({offset} bytes) longer than the packet ({end})")
    return data[offset:end]


def rtp_fits(data: bytes, padding: bool = True) -> bool:
    """Whether an RTP packet (version and length >= 12 already checked) holds its
    CSRCs, header extension and padding (RFC 3550 5.1, 5.3.1, A.1): what `rtp_payload`
    checks, without building a header (it runs for every relayed packet). Not the
    padding when ``padding`` is false: SRTP's is inside the ciphertext."""
    first = data[0]
    size = len(data)
    offset = RTP_HEADER_SIZE + 4 * (first & 0x0F)
    if first & 0x10:
        if size < offset + 4:
            return False
        offset += 4 + 4 * (data[offset + 2] << 8 | data[offset + 3])
    if first & 0x20 and padding:
        count = data[-1]
        return count != 0 and offset + count <= size
    return offset <= size


def is_rtcp(data: bytes) -> bool:
    """True for RTCP on a multiplexed port (RFC 5761 4: second octet 192..223)."""
    return len(data) >= 2 and data[0] >> 6 == RTP_VERSION and 192 <= data[1] <= 223


def packet_ssrc(data: bytes) -> int | None:
    """The SSRC of an RTP packet, or of the sender of an RTCP packet; None if neither."""
    if len(data) < 8 or data[0] >> 6 != RTP_VERSION:
        return None
    if is_rtcp(data):
        return int.from_bytes(data[4:8], "big")
    if len(data) < RTP_HEADER_SIZE:
        return None
    return int.from_bytes(data[8:12], "big")
