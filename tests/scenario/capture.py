"""A small packet capture for scenario tests: an ``AF_PACKET`` raw socket (root).

    with Capture("lo", hosts=["127.0.0.2", "127.0.0.3"]) as capture:
        ...                                   # run the flows
    result = capture.result                   # every IP packet to or from those hosts
    for packet in result.delivered_to("127.0.0.2"):
        packet.payload                        # UDP data / TCP segment data

The frames are parsed here (Ethernet II, IPv4, IPv6 with its extension headers,
UDP, TCP), so a test can tell who sent a packet to whom without tshark or scapy.
Capture is bounded in time and bytes; ``stop`` fences the kernel queue with a
datagram of its own, so every packet sent before ``stop`` was called is read
(no sleeping and hoping), and the socket's drop counter is reported.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from types import TracebackType
from typing import Final

#: <linux/if_ether.h>: every protocol; the Ethernet II types parsed here.
ETH_P_ALL: Final = 0x0003
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
ETHERNET_HEADER: Final = 14

#: <linux/if_packet.h>: a frame this host sent (on lo every packet is seen twice:
#: leaving as PACKET_OUTGOING, arriving as PACKET_HOST).
PACKET_OUTGOING: Final = 4
SOL_PACKET: Final = 263
#: <asm-generic/socket.h>: SO_RCVBUF beyond net.core.rmem_max (CAP_NET_ADMIN).
SO_RCVBUFFORCE: Final = 33
PACKET_STATISTICS: Final = 6

#: RFC 8200 4: extension headers skipped to reach the upper layer (fragment: 44).
IPV6_EXTENSION_HEADERS: Final = frozenset({0, 43, 60, 44})
IPV6_FRAGMENT: Final = 44
#: Bound on the IPv6 extension-header chain walked per packet.
MAX_IPV6_EXTENSIONS: Final = 8

#: Default bounds of one capture.
MAX_SECONDS: Final = 60.0
MAX_BYTES: Final = 64 * 1024 * 1024
RECEIVE_BUFFER: Final = 16 * 1024 * 1024
SNAPLEN: Final = 65535 + ETHERNET_HEADER + 4

Address = IPv4Address | IPv6Address
StreamKey = tuple[Address, int, Address, int]


class FrameError(ValueError):
    """A frame too short or inconsistent to parse; the message says which layer."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One IP packet as captured: who sent it to whom, and what it carried."""

    time: float
    src: Address
    dst: Address
    #: The IP protocol number of the upper layer (RFC 791 / RFC 8200 next header).
    protocol: int
    sport: int | None
    dport: int | None
    #: UDP datagram data or TCP segment data; for other protocols (ICMP...) or
    #: non-first fragments, everything after the IP header(s).
    payload: bytes
    #: The whole frame, link-layer header included: a leak check looks at every byte.
    frame: bytes

    @property
    def transport(self) -> str:
        return {socket.IPPROTO_UDP: "udp", socket.IPPROTO_TCP: "tcp"}.get(
            self.protocol, f"proto{self.protocol}"
        )

    @property
    def stream(self) -> StreamKey | None:
        """(src, sport, dst, dport) of a TCP segment: which direction of which
        connection it belongs to; None for anything else."""
        if self.protocol != socket.IPPROTO_TCP or self.sport is None or self.dport is None:
            return None
        return (self.src, self.sport, self.dst, self.dport)

    def __str__(self) -> str:
        return (
            f"{self.transport} {_endpoint(self.src, self.sport)} -> "
            f"{_endpoint(self.dst, self.dport)} ({len(self.payload)} bytes)"
        )


def _endpoint(address: Address, port: int | None) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return host if port is None else f"{host}:{port}"


def _transport(protocol: int, data: bytes) -> tuple[int | None, int | None, bytes]:
    """(source port, destination port, payload) of a UDP (RFC 768) or TCP (RFC 9293
    3.1) header at the start of ``data``; other protocols pass through whole."""
    if protocol == socket.IPPROTO_UDP:
        if len(data) < 8:
            raise FrameError(f"truncated UDP header ({len(data)} bytes)")
        sport, dport, length = struct.unpack_from("!HHH", data)
        if length < 8 or length > len(data):
            raise FrameError(f"UDP length {length} outside 8..{len(data)}")
        return sport, dport, data[8:length]
    if protocol == socket.IPPROTO_TCP:
        if len(data) < 20:
            raise FrameError(f"truncated TCP header ({len(data)} bytes)")
        sport, dport = struct.unpack_from("!HH", data)
        offset = (data[12] >> 4) * 4
        if offset < 20 or offset > len(data):
            raise FrameError(f"TCP data offset {offset} outside 20..{len(data)}")
        return sport, dport, data[offset:]
    return None, None, data


def _ipv4(packet: bytes) -> tuple[Address, Address, int, bytes, bool]:
    """RFC 791 3.1: (src, dst, protocol, payload, first fragment)."""
    if len(packet) < 20:
        raise FrameError(f"truncated IPv4 header ({len(packet)} bytes)")
    if packet[0] >> 4 != 4:
        raise FrameError(f"IP version {packet[0] >> 4} in an IPv4 frame")
    header = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if header < 20 or total < header or total > len(packet):
        raise FrameError(f"IPv4 lengths inconsistent (header {header}, total {total})")
    fragment_offset = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
    src = IPv4Address(packet[12:16])
    dst = IPv4Address(packet[16:20])
    # Ethernet pads short frames: the IP total length says where the packet ends.
    return src, dst, packet[9], packet[header:total], fragment_offset == 0


def _ipv6(packet: bytes) -> tuple[Address, Address, int, bytes, bool]:
    """RFC 8200 3 and 4: (src, dst, upper-layer protocol, payload, first fragment)."""
    if len(packet) < 40:
        raise FrameError(f"truncated IPv6 header ({len(packet)} bytes)")
    if packet[0] >> 4 != 6:
        raise FrameError(f"IP version {packet[0] >> 4} in an IPv6 frame")
    length = struct.unpack_from("!H", packet, 4)[0]
    if 40 + length > len(packet):
        raise FrameError(f"IPv6 payload length {length} beyond the frame")
    src = IPv6Address(packet[8:24])
    dst = IPv6Address(packet[24:40])
    following = packet[6]
    data = packet[40 : 40 + length]
    first = True
    for _ in range(MAX_IPV6_EXTENSIONS):
        if following not in IPV6_EXTENSION_HEADERS:
            return src, dst, following, data, first
        if len(data) < 8:
            raise FrameError(f"truncated IPv6 extension header {following}")
        if following == IPV6_FRAGMENT:
            size = 8
            first = struct.unpack_from("!H", data, 2)[0] >> 3 == 0
        else:
            size = (data[1] + 1) * 8
        if size > len(data):
            raise FrameError(f"IPv6 extension header {following} beyond the packet")
        following, data = data[0], data[size:]
    raise FrameError(f"more than {MAX_IPV6_EXTENSIONS} IPv6 extension headers")


def parse_frame(frame: bytes, captured_at: float = 0.0) -> Packet | None:
    """The IP packet in an Ethernet II frame (lo's header is Ethernet with zero
    addresses); None for frames that carry no IP (ARP, LLDP...)."""
    if len(frame) < ETHERNET_HEADER:
        raise FrameError(f"truncated Ethernet header ({len(frame)} bytes)")
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    start = ETHERNET_HEADER
    if ethertype == ETH_P_8021Q:  # IEEE 802.1Q: one VLAN tag before the real type
        if len(frame) < ETHERNET_HEADER + 4:
            raise FrameError("truncated 802.1Q tag")
        ethertype = struct.unpack_from("!H", frame, 16)[0]
        start += 4
    if ethertype == ETH_P_IP:
        src, dst, protocol, data, first = _ipv4(frame[start:])
    elif ethertype == ETH_P_IPV6:
        src, dst, protocol, data, first = _ipv6(frame[start:])
    else:
        return None
    if first:
        sport, dport, payload = _transport(protocol, data)
    else:
        sport, dport, payload = None, None, data
    return Packet(captured_at, src, dst, protocol, sport, dport, payload, frame)


@dataclass(frozen=True)
class CaptureResult:
    """What one capture saw, and how far it can be trusted."""

    packets: tuple[Packet, ...]
    #: Frames the kernel dropped for this socket (its buffer was full): a packet
    #: nobody looked at could have carried anything.
    drops: int
    #: The byte or time bound was hit before ``stop``: later packets are missing.
    truncated: bool
    #: Frames involving the hosts that could not be parsed (kept out of ``packets``).
    malformed: tuple[bytes, ...] = field(default=())

    @property
    def complete(self) -> bool:
        return self.drops == 0 and not self.truncated and not self.malformed

    def save(self, path: str | bytes) -> int:
        """Write the packets as a pcap file (for Wireshark when a test fails)."""
        return write_pcap(path, ((p.time, p.frame) for p in self.packets))

    def tcp_streams(self) -> dict[StreamKey, bytes]:
        """Each TCP direction's data in arrival order, keyed by (src, sport, dst,
        dport): a leak split over two segments is whole here. Loopback neither loses
        nor reorders segments, so arrival order is stream order."""
        streams: dict[StreamKey, bytes] = {}
        for p in self.packets:
            if p.stream is not None and p.payload:
                streams[p.stream] = streams.get(p.stream, b"") + p.payload
        return streams

    def delivered_to(self, host: str | Address) -> tuple[Packet, ...]:
        """Packets whose destination is ``host``: everything that host received."""
        address = ip_address(host) if isinstance(host, str) else host
        return tuple(p for p in self.packets if p.dst == address)

    def sent_by(self, host: str | Address) -> tuple[Packet, ...]:
        address = ip_address(host) if isinstance(host, str) else host
        return tuple(p for p in self.packets if p.src == address)


class Capture:
    """Capture every IP packet on ``interface`` to or from one of ``hosts``.

    A thread reads an ``AF_PACKET``/``SOCK_RAW`` socket from ``start`` until
    ``stop``, ``max_seconds`` or ``max_bytes`` (of kept frames). On loopback only
    arriving frames are kept, so each packet is counted once. ``fence`` is an
    address on ``interface`` the capture may bind a UDP port on to mark its end.
    """

    def __init__(
        self,
        interface: str,
        hosts: Iterable[str],
        *,
        max_seconds: float = MAX_SECONDS,
        max_bytes: int = MAX_BYTES,
        fence: str = "127.0.0.1",
    ) -> None:
        self.interface = interface
        self.hosts = frozenset(ip_address(h) for h in hosts)
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.fence = fence
        self._token = b"capture-fence-" + secrets.token_hex(8).encode()
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._fenced = threading.Event()
        self._packets: list[Packet] = []
        self._malformed: list[bytes] = []
        self._bytes = 0
        self._truncated = False
        self._result: CaptureResult | None = None

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def result(self) -> CaptureResult:
        if self._result is None:
            raise RuntimeError("capture still running: call stop() first")
        return self._result

    def start(self) -> Capture:
        """Open and bind the socket (frames queue from here on), then start reading."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            try:  # root may go beyond net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((self.interface, 0))
            sock.settimeout(0.05)
            # The counters count from socket creation; reading them resets them, so
            # frames of other interfaces queued before bind are not counted later.
            sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self._thread = threading.Thread(target=self._read, name="capture", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> CaptureResult:
        """Fence, wait for the reader to pass the fence, and return what it saw."""
        if self._result is not None:
            return self._result
        if self._thread is None or self._socket is None:
            raise RuntimeError("capture not started")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as marker:
            marker.bind((self.fence, 0))
            marker.sendto(self._token, marker.getsockname())
        deadline = time.monotonic() + timeout
        while not self._fenced.is_set() and self._thread.is_alive() and time.monotonic() < deadline:
            self._fenced.wait(0.05)
        self._stopping.set()
        self._thread.join(timeout)
        stats = self._socket.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        self._socket.close()
        _, drops = struct.unpack("II", stats)
        self._result = CaptureResult(
            tuple(self._packets),
            drops,
            self._truncated or not self._fenced.is_set(),
            tuple(self._malformed),
        )
        return self._result

    def _read(self) -> None:
        assert self._socket is not None
        deadline = time.monotonic() + self.max_seconds
        while not self._stopping.is_set() and time.monotonic() < deadline:
            try:
                frame, address = self._socket.recvfrom(SNAPLEN)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[2] == PACKET_OUTGOING and self.interface == "lo":
                continue
            if self._token in frame:
                self._fenced.set()
                return
            self._keep(frame)
        self._truncated = True

    def _keep(self, frame: bytes) -> None:
        try:
            packet = parse_frame(frame, time.monotonic())
        except FrameError:
            if any(host.packed in frame for host in self.hosts):
                self._malformed.append(frame)
            return
        if packet is None or (packet.src not in self.hosts and packet.dst not in self.hosts):
            return
        if self._bytes + len(frame) > self.max_bytes:
            self._truncated = True
            self._stopping.set()
            return
        self._bytes += len(frame)
        self._packets.append(packet)


# -- writing frames (SIPp's play_pcap_audio replays a pcap; a failed test keeps one) -----

#: libpcap's classic file format: magic, version 2.4, LINKTYPE_ETHERNET.
PCAP_MAGIC: Final = 0xA1B2C3D4
LINKTYPE_ETHERNET: Final = 1


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An Ethernet II frame carrying one IPv4 UDP datagram (UDP checksum 0: none,
    RFC 768), as ``parse_frame`` reads it back."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
        IPv4Address(src).packed, IPv4Address(dst).packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return bytes(12) + struct.pack("!H", ETH_P_IP) + header + udp


def write_pcap(path: str | bytes, frames: Iterable[tuple[float, bytes]]) -> int:
    """Write ``(time, frame)`` pairs as a classic pcap file; the number written."""
    count = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        for stamp, frame in frames:
            seconds = int(stamp)
            micros = round((stamp - seconds) * 1_000_000)
            out.write(struct.pack("<IIII", seconds, micros, len(frame), len(frame)))
            out.write(frame)
            count += 1
    return count
