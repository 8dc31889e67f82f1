"""Call recording: both directions of a call to a pcap file, and a WAV for G.711.

A session allocated with ``record=True`` stays in the userspace path (the kernel
path would hide its packets) and every packet the relay accepts from either peer is
written, after SRTP is removed, to ``<state_dir>/recordings/<session>.pcap``: one
IP/UDP datagram per packet, source the peer and destination the relay's port, as a
capture on the relay's interfaces would show it (LINKTYPE_RAW, so IPv4 and IPv6 mix).

RTP in PCMU or PCMA (static payload types 0 and 8, RFC 3551 6) of the first stream
that carries it also goes to ``<session>.wav``: 8 kHz, 16-bit, stereo, side a in the
left channel and side b in the right. Samples are placed by RTP timestamp, anchored
to the arrival time of each direction's first packet, so loss leaves silence rather
than shortening the file; packets arriving more than `WAV_WINDOW` late are dropped.

The formats are written here with `struct` (libpcap's file format; RIFF/WAVE PCM) and
the G.711 tables are built from ITU-T G.711's segment rules: no dependency.
"""

from __future__ import annotations

import logging
import struct
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import BinaryIO

from sbc.media.rtp import RtpError, RtpHeader, rtp_payload
from sbc.media.session import Side
from sbc.media.values import Endpoint

logger = logging.getLogger(__name__)

# -- G.711 ---------------------------------------------------------------------------

PT_PCMU = 0
PT_PCMA = 8
WAV_RATE = 8000


def _ulaw_decode(code: int) -> int:
    # G.711 mu-law: bits are inverted on the wire; 3-bit segment, 4-bit step, bias 0x84.
    code = ~code & 0xFF
    magnitude = (((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)
    return 0x84 - magnitude if code & 0x80 else magnitude - 0x84


def _alaw_decode(code: int) -> int:
    # G.711 A-law: even bits inverted (0x55); a set sign bit means positive.
    code ^= 0x55
    segment, step = (code >> 4) & 0x07, code & 0x0F
    magnitude = (step << 4) + 8 if segment == 0 else ((step << 4) + 0x108) << (segment - 1)
    return magnitude if code & 0x80 else -magnitude


#: Linear 16-bit value of every code, indexed by the octet.
ULAW_TO_LINEAR: tuple[int, ...] = tuple(_ulaw_decode(c) for c in range(256))
ALAW_TO_LINEAR: tuple[int, ...] = tuple(_alaw_decode(c) for c in range(256))


def _byte_tables(table: tuple[int, ...]) -> tuple[bytes, bytes]:
    """Two `bytes.translate` tables: the low and the high octet of each sample."""
    raw = [value & 0xFFFF for value in table]
    return bytes(v & 0xFF for v in raw), bytes(v >> 8 for v in raw)


_DECODE = {PT_PCMU: _byte_tables(ULAW_TO_LINEAR), PT_PCMA: _byte_tables(ALAW_TO_LINEAR)}


def g711_decode(payload: bytes, payload_type: int) -> array[int]:
    """16-bit samples of a PCMU (0) or PCMA (8) payload; KeyError for other types."""
    low, high = _DECODE[payload_type]
    raw = bytearray(2 * len(payload))
    # Two C-level translations instead of a Python loop per sample.
    raw[0::2] = payload.translate(low)
    raw[1::2] = payload.translate(high)
    samples = array("h")
    samples.frombytes(bytes(raw))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _encoder(table: tuple[int, ...]) -> Callable[[int], int]:
    points = sorted((value, code) for code, value in enumerate(table))
    values = [value for value, _ in points]

    def encode(sample: int) -> int:
        i = bisect_left(values, sample)
        if i == len(values) or (i > 0 and sample - values[i - 1] <= values[i] - sample):
            i -= 1
        return points[i][1]

    return encode


_ENCODE = {PT_PCMU: _encoder(ULAW_TO_LINEAR), PT_PCMA: _encoder(ALAW_TO_LINEAR)}


def g711_encode(samples: list[int] | array[int], payload_type: int) -> bytes:
    """PCMU/PCMA of 16-bit samples (nearest code; for tests and tone generators)."""
    encode = _ENCODE[payload_type]
    return bytes(encode(s) for s in samples)


# -- IP/UDP datagrams and pcap -----------------------------------------------------------

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
PCAP_VERSION = (2, 4)
#: LINKTYPE_RAW: each record is an IPv4 or IPv6 packet (version nibble tells which).
LINKTYPE_RAW = 101
PCAP_SNAPLEN = 65535
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
IPPROTO_UDP = 17


class PcapError(ValueError):
    """Not a pcap file (or record) this module writes."""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(array("H", data)) if sys.byteorder == "big" else sum(_swapped(data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _swapped(data: bytes) -> array[int]:
    words = array("H", data)
    words.byteswap()
    return words


@dataclass(frozen=True)
class UdpDatagram:
    """One UDP datagram inside an IPv4 or IPv6 header (what a LINKTYPE_RAW record holds)."""

    source: Endpoint
    destination: Endpoint
    payload: bytes

    def __bytes__(self) -> bytes:
        src, dst = self.source, self.destination
        if src.family != dst.family:
            raise ValueError(f"datagram {src} -> {dst}: mixed address families")
        length = _UDP.size + len(self.payload)
        if src.family == 4:
            # RFC 768: a zero checksum means "none" over IPv4.
            udp = _UDP.pack(src.port, dst.port, length, 0) + self.payload
            header = _IPV4.pack(
                0x45, 0, 20 + length, 0, 0x4000, 64, IPPROTO_UDP, 0,
                src.address.packed, dst.address.packed,
            )  # fmt: skip
            checksum = _checksum(header)
            return header[:10] + checksum.to_bytes(2, "big") + header[12:] + udp
        # RFC 8200 8.1: the UDP checksum is mandatory over IPv6 (pseudo-header included).
        pseudo = (
            src.address.packed
            + dst.address.packed
            + struct.pack("!I3xB", length, IPPROTO_UDP)
            + _UDP.pack(src.port, dst.port, length, 0)
            + self.payload
        )
        udp = _UDP.pack(src.port, dst.port, length, _checksum(pseudo) or 0xFFFF) + self.payload
        return (
            _IPV6.pack(6 << 28, length, IPPROTO_UDP, 64, src.address.packed, dst.address.packed)
            + udp
        )

    @classmethod
    def parse(cls, data: bytes) -> UdpDatagram:
        if not data:
            raise PcapError("empty packet")
        version = data[0] >> 4
        if version == 4:
            if len(data) < 28:
                raise PcapError(f"IPv4 packet too short: {len(data)} bytes")
            fields = _IPV4.unpack_from(data)
            header_len = (fields[0] & 0x0F) * 4
            if fields[6] != IPPROTO_UDP:
                raise PcapError(f"IP protocol {fields[6]}, expected UDP")
            src: IPv4Address | IPv6Address = IPv4Address(fields[8])
            dst: IPv4Address | IPv6Address = IPv4Address(fields[9])
            body = data[header_len : fields[2]]
        elif version == 6:
            if len(data) < 48:
                raise PcapError(f"IPv6 packet too short: {len(data)} bytes")
            _, length, next_header, _, raw_src, raw_dst = _IPV6.unpack_from(data)
            if next_header != IPPROTO_UDP:
                raise PcapError(f"IPv6 next header {next_header}, expected UDP")
            src, dst = ip_address(raw_src), ip_address(raw_dst)
            body = data[40 : 40 + length]
        else:
            raise PcapError(f"IP version {version}")
        sport, dport, length, _ = _UDP.unpack_from(body)
        return cls(Endpoint(src, sport), Endpoint(dst, dport), bytes(body[8:length]))


@dataclass(frozen=True)
class PcapRecord:
    """One pcap record: a capture time and a raw IP packet."""

    time: float
    packet: bytes

    def __bytes__(self) -> bytes:
        micros = round(self.time * 1_000_000)
        seconds, micros = divmod(micros, 1_000_000)
        size = len(self.packet)
        return _PCAP_RECORD.pack(seconds, micros, size, size) + self.packet

    @property
    def datagram(self) -> UdpDatagram:
        return UdpDatagram.parse(self.packet)


def pcap_header() -> bytes:
    return _PCAP_HEADER.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, PCAP_SNAPLEN, LINKTYPE_RAW)


def parse_pcap(data: bytes) -> list[PcapRecord]:
    """The records of a pcap file as written by `CallRecorder` (little-endian, raw IP)."""
    if len(data) < _PCAP_HEADER.size:
        raise PcapError("pcap file too short")
    magic, _, _, _, _, _, linktype = _PCAP_HEADER.unpack_from(data)
    if magic != PCAP_MAGIC:
        raise PcapError(f"pcap magic {magic:#x}, expected {PCAP_MAGIC:#x}")
    if linktype != LINKTYPE_RAW:
        raise PcapError(f"pcap link type {linktype}, expected {LINKTYPE_RAW}")
    records, offset = [], _PCAP_HEADER.size
    while offset < len(data):
        if offset + _PCAP_RECORD.size > len(data):
            raise PcapError(f"truncated record header at offset {offset}")
        seconds, micros, captured, _ = _PCAP_RECORD.unpack_from(data, offset)
        offset += _PCAP_RECORD.size
        if offset + captured > len(data):
            raise PcapError(f"truncated record at offset {offset}")
        records.append(PcapRecord(seconds + micros / 1_000_000, data[offset : offset + captured]))
        offset += captured
    return records


# -- WAV -----------------------------------------------------------------------------

_RIFF = struct.Struct("<4sI4s4sIHHIIHH4sI")
WAV_HEADER_SIZE = _RIFF.size


def wav_header(channels: int, rate: int, data_bytes: int) -> bytes:
    """A canonical 44-byte RIFF/WAVE header for 16-bit PCM."""
    block = 2 * channels
    return _RIFF.pack(
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels,
        rate, rate * block, block, 16, b"data", data_bytes,
    )  # fmt: skip


@dataclass(frozen=True)
class WavAudio:
    """A parsed 16-bit PCM WAV: its rate and one sample array per channel."""

    rate: int
    channels: tuple[array[int], ...]

    @classmethod
    def parse(cls, data: bytes) -> WavAudio:
        if len(data) < WAV_HEADER_SIZE:
            raise ValueError("WAV file too short")
        riff, _, wave, fmt, _, encoding, channels, rate, _, _, bits, tag, size = _RIFF.unpack_from(
            data
        )
        if (riff, wave, fmt, tag) != (b"RIFF", b"WAVE", b"fmt ", b"data") or encoding != 1:
            raise ValueError("not a canonical PCM WAV file")
        if bits != 16:
            raise ValueError(f"{bits}-bit samples, expected 16")
        samples = array("h")
        samples.frombytes(data[WAV_HEADER_SIZE : WAV_HEADER_SIZE + size])
        if sys.byteorder == "big":
            samples.byteswap()
        return cls(rate, tuple(samples[i::channels] for i in range(channels)))


#: Samples kept in memory behind the arrival clock, so reordered and jittered packets
#: still land in place (1 s); older packets are too late and dropped.
WAV_WINDOW = WAV_RATE
#: A timestamp further than this from the arrival clock re-anchors the direction
#: (a new SSRC, a sender's clock jump) instead of leaving a huge gap (2 s).
MAX_TIMESTAMP_DRIFT = 2 * WAV_RATE


@dataclass
class _Track:
    """Where one direction's RTP timestamps land on the recording's sample clock."""

    ssrc: int
    timestamp: int
    position: int

    def place(self, timestamp: int) -> int:
        delta = (timestamp - self.timestamp) & 0xFFFFFFFF
        if delta >= 1 << 31:
            delta -= 1 << 32
        return self.position + delta


class StereoG711Mixer:
    """Places decoded G.711 of two directions on one sample clock; pure.

    Positions are sample indexes since the recording started (the caller passes the
    arrival position of each packet). `add` returns interleaved 16-bit stereo frames
    that are final (older than the arrival clock minus `WAV_WINDOW`); `drain` the rest.
    """

    def __init__(self) -> None:
        self._start = 0  # first sample not yet handed out
        self._channels = (array("h"), array("h"))
        self._tracks: dict[int, _Track] = {}
        self.late_packets = 0

    def add(self, channel: int, arrival: int, header: RtpHeader, samples: array[int]) -> bytes:
        track = self._tracks.get(channel)
        if track is None or track.ssrc != header.ssrc:
            track = self._tracks[channel] = _Track(header.ssrc, header.timestamp, arrival)
        position = track.place(header.timestamp)
        if abs(position - arrival) > MAX_TIMESTAMP_DRIFT:
            track = self._tracks[channel] = _Track(header.ssrc, header.timestamp, arrival)
            position = arrival
        offset = position - self._start
        if offset < 0:
            self.late_packets += 1
        else:
            buffer = self._channels[channel]
            end = offset + len(samples)
            if len(buffer) < end:
                buffer.frombytes(bytes(2 * (end - len(buffer))))
            buffer[offset:end] = samples
        return self._take(arrival - WAV_WINDOW)

    def drain(self) -> bytes:
        return self._take(self._start + max(len(c) for c in self._channels))

    def _take(self, until: int) -> bytes:
        count = until - self._start
        if count <= 0:
            return b""
        frames = array("h", [0]) * (2 * count)
        for index, buffer in enumerate(self._channels):
            have = min(count, len(buffer))
            frames[index : 2 * have : 2] = buffer[:have]
            del buffer[:have]
        self._start = until
        if sys.byteorder == "big":
            frames.byteswap()
        return frames.tobytes()


# -- per-session recorder (file I/O) --------------------------------------------------

#: A recording stops growing at this size (pcap and WAV each): WAV sizes are 32-bit
#: and a runaway call must not fill the state directory.
MAX_RECORDING_BYTES = 2**31 - 1
#: Write buffer: packets reach the disk in chunks, not one write() per packet.
WRITE_BUFFER = 256 * 1024


@dataclass(frozen=True)
class RecordingFiles:
    """What a finished recording left in the state directory."""

    pcap: Path
    wav: Path | None
    packets: int
    truncated: bool


def _create(directory: Path, stem: str, suffix: str) -> tuple[Path, BinaryIO]:
    """A new file that never overwrites an older recording (restores reuse the id)."""
    for attempt in range(1000):
        path = directory / (f"{stem}{suffix}" if attempt == 0 else f"{stem}-{attempt}{suffix}")
        try:
            return path, open(path, "xb", buffering=WRITE_BUFFER)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free recording file name for {stem}{suffix} in {directory}")


class CallRecorder:
    """Writes one session's packets to ``<stem>.pcap`` and its G.711 to ``<stem>.wav``."""

    def __init__(
        self,
        directory: Path,
        stem: str,
        *,
        clock: Callable[[], float] = time.time,
        max_bytes: int = MAX_RECORDING_BYTES,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._directory, self._stem, self._clock = directory, stem, clock
        self._max_bytes = max_bytes
        self.pcap_path, self._pcap = _create(directory, stem, ".pcap")
        self._pcap.write(pcap_header())
        self._pcap_bytes = len(pcap_header())
        self.wav_path: Path | None = None
        self._wav: BinaryIO | None = None
        self._wav_bytes = 0
        self._wav_stream: int | None = None
        self._mixer = StereoG711Mixer()
        self._started = clock()
        self.packets = 0
        self.truncated = False

    def packet(
        self,
        stream: int,
        side: Side,
        source: Endpoint,
        destination: Endpoint,
        data: bytes,
        rtcp: bool,
    ) -> None:
        """One packet accepted from ``side``'s peer (plain RTP/RTCP, SRTP removed)."""
        now = self._clock()
        if source.family == destination.family:
            record = bytes(PcapRecord(now, bytes(UdpDatagram(source, destination, data))))
            if self._room(self._pcap_bytes, len(record)):
                self._pcap.write(record)
                self._pcap_bytes += len(record)
                self.packets += 1
        if rtcp:
            return
        try:
            header = RtpHeader.parse(data)
            if header.payload_type not in (PT_PCMU, PT_PCMA):
                return
            payload = rtp_payload(data)
        except RtpError:
            return
        if self._wav_stream is None:
            self._wav_stream = stream
            self.wav_path, self._wav = _create(self._directory, self._stem, ".wav")
            self._wav.write(wav_header(2, WAV_RATE, 0))
        if stream != self._wav_stream:
            return
        arrival = round((now - self._started) * WAV_RATE)
        channel = 0 if side is Side.A else 1
        self._write_wav(
            self._mixer.add(channel, arrival, header, g711_decode(payload, header.payload_type))
        )

    def _room(self, used: int, more: int) -> bool:
        if used + more <= self._max_bytes:
            return True
        if not self.truncated:
            self.truncated = True
            logger.warning("x recording %s reached %d bytes: truncated", self._stem, used)
        return False

    def _write_wav(self, frames: bytes) -> None:
        if frames and self._wav is not None:
            room = max(0, self._max_bytes - WAV_HEADER_SIZE - self._wav_bytes)
            if len(frames) > room:
                self._room(self._wav_bytes, len(frames))
                frames = frames[: room - room % 4]
            self._wav.write(frames)
            self._wav_bytes += len(frames)

    def close(self) -> RecordingFiles:
        """Flush the WAV's last second, fix its header, close both files."""
        self._pcap.close()
        if self._wav is not None:
            self._write_wav(self._mixer.drain())
            self._wav.seek(0)
            self._wav.write(wav_header(2, WAV_RATE, self._wav_bytes))
            self._wav.close()
            self._wav = None
        if self._mixer.late_packets:
            logger.info(
                "- recording %s: %d packets too late for the WAV",
                self._stem,
                self._mixer.late_packets,
            )
        return RecordingFiles(self.pcap_path, self.wav_path, self.packets, self.truncated)
