"""The state of relay sessions: frozen, plain, serialisable values.

A `MediaSession` carries everything needed to rebuild a relay session on another
node (ports, latched sources, counters, quality): `to_dict()` gives plain JSON types,
`from_dict()` reads them back, and `MediaRelay.restore()` re-binds the ports and
re-installs the kernel rules from it.

Legs are named ``a`` and ``b``: media arriving from leg a's peer on a's local port
leaves from b's local port towards b's peer, and the reverse.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sbc.media.latching import Latch
from sbc.media.rtcp import RtcpQuality
from sbc.media.srtp import SdesCrypto, SrtpSuite
from sbc.media.values import Direction, Endpoint


class Side(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code
    A = "a"
    B = "b"

    @property
    def other(self) -> Side:
        return Side.B if self is Side.A else Side.A


@dataclass(frozen=True)
class LegOffer:
    """What the B2BUA knows of one side of a stream from its SDP."""

    realm: str
    #: IP version of the relay address used on this side (4 or 6).
    family: int = 4
    #: The peer's SDP connection address and port: a hint only (NAT).
    remote: Endpoint | None = None
    rtcp_mux: bool = False
    direction: Direction = Direction.SENDRECV
    #: RTP/SAVP with SDES on this side: the relay makes a key of its own in this suite
    #: (``LegState.local_crypto``, for the SDP sent to the peer). None: plain RTP.
    srtp: SrtpSuite | None = None
    #: The peer's a=crypto (its key), once its SDP is known.
    crypto: SdesCrypto | None = None
    #: The relay's own key for this leg as the B2BUA chose it, replacing the one
    #: made at allocation (of suite ``srtp``): a late offer's first SDP named only
    #: suites other than the one made ready, and no SDP sent to this leg's peer has
    #: carried the old key. None: the relay's key stands.
    local_crypto: SdesCrypto | None = None
    #: False for UDP media that is not RTP (proto ``udptl``, T.38 fax, RFC 3362; or
    #: ``UDP``): relayed as opaque datagrams on one port, latched on the source alone.
    rtp: bool = True
    #: The peer's media is SRTP the relay does not terminate (an SAVP proto, its
    #: a=crypto passed end to end): packets are checked only as far as they are in
    #: the clear, and SRTCP crosses unparsed (its SDES is ciphertext).
    encrypted: bool = False


@dataclass(frozen=True)
class StreamOffer:
    """One media stream (one m= line) between the two sides."""

    a: LegOffer
    b: LegOffer


@dataclass(frozen=True)
class LegCounters:
    """Packets received from one leg's peer."""

    #: RTP relayed in user space.
    packets: int = 0
    bytes: int = 0
    #: RTCP relayed in user space (always, RTCP is never put in the kernel path).
    rtcp_packets: int = 0
    rtcp_bytes: int = 0
    #: RTP relayed by the kernel fast path (read back from nftables counters).
    kernel_packets: int = 0
    kernel_bytes: int = 0
    #: Dropped: from a source other than the latched one (RTP bleed / injection).
    dropped_source: int = 0
    #: Dropped: nowhere to send yet, or not RTP/RTCP where it must be.
    dropped_other: int = 0
    #: Dropped: SRTP/SRTCP authentication or replay check failed.
    dropped_auth: int = 0

    @property
    def relayed_packets(self) -> int:
        return self.packets + self.rtcp_packets + self.kernel_packets

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LegCounters:
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LegState:
    """One side of a stream: the relay's ports there and what it learnt of the peer."""

    realm: str
    #: The relay's RTP port on the realm address; RTCP is on ``local.port + 1``.
    local: Endpoint
    remote_hint: Endpoint | None = None
    rtcp_mux: bool = False
    direction: Direction = Direction.SENDRECV
    rtp_latch: Latch = field(default_factory=Latch)
    rtcp_latch: Latch = field(default_factory=Latch)
    counters: LegCounters = field(default_factory=LegCounters)
    quality: RtcpQuality = field(default_factory=RtcpQuality)
    #: SRTP on this side: the relay's key (sent to the peer) and the peer's key.
    local_crypto: SdesCrypto | None = None
    remote_crypto: SdesCrypto | None = None
    #: RTP on this side; False: opaque datagrams (UDPTL), see ``LegOffer.rtp``.
    rtp: bool = True
    #: SRTP passed through, see ``LegOffer.encrypted``.
    encrypted: bool = False

    @property
    def srtp(self) -> bool:
        return self.local_crypto is not None

    @property
    def local_rtcp(self) -> Endpoint:
        return Endpoint(self.local.address, self.local.port + 1)

    @property
    def relay_ports(self) -> tuple[int, int]:
        """The relay's RTP and RTCP ports on this side: what a firewall must let in."""
        return self.local.port, self.local_rtcp.port

    @property
    def rtp_destination(self) -> Endpoint | None:
        """Where this leg's peer gets RTP: its latched source, else the SDP hint."""
        return self.rtp_latch.source or self.remote_hint

    @property
    def rtcp_destination(self) -> Endpoint | None:
        if self.rtcp_mux:
            return self.rtp_destination
        if self.rtcp_latch.source is not None:
            return self.rtcp_latch.source
        if self.remote_hint is not None:
            # RFC 3550 11: RTCP on the next port above RTP unless a=rtcp says otherwise.
            return Endpoint(self.remote_hint.address, self.remote_hint.port + 1)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "realm": self.realm,
            "local": self.local.to_dict(),
            "remote_hint": None if self.remote_hint is None else self.remote_hint.to_dict(),
            "rtcp_mux": self.rtcp_mux,
            "direction": self.direction.value,
            "rtp_latch": self.rtp_latch.to_dict(),
            "rtcp_latch": self.rtcp_latch.to_dict(),
            "counters": self.counters.to_dict(),
            "quality": self.quality.to_dict(),
            # Keys are state to replicate to the standby node; never log this dict.
            "local_crypto": None if self.local_crypto is None else self.local_crypto.to_dict(),
            "remote_crypto": None if self.remote_crypto is None else self.remote_crypto.to_dict(),
            "rtp": self.rtp,
            "encrypted": self.encrypted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LegState:
        hint = data.get("remote_hint")
        return cls(
            realm=data["realm"],
            local=Endpoint.from_dict(data["local"]),
            remote_hint=None if hint is None else Endpoint.from_dict(hint),
            rtcp_mux=bool(data.get("rtcp_mux", False)),
            direction=Direction(data.get("direction", "sendrecv")),
            rtp_latch=Latch.from_dict(data["rtp_latch"]),
            rtcp_latch=Latch.from_dict(data["rtcp_latch"]),
            counters=LegCounters.from_dict(data.get("counters", {})),
            quality=RtcpQuality.from_dict(data.get("quality", {})),
            local_crypto=_crypto(data.get("local_crypto")),
            remote_crypto=_crypto(data.get("remote_crypto")),
            # Records from before UDPTL support: every stream was RTP.
            rtp=bool(data.get("rtp", True)),
            encrypted=bool(data.get("encrypted", False)),
        )


def _crypto(data: dict[str, Any] | None) -> SdesCrypto | None:
    return None if data is None else SdesCrypto.from_dict(data)


@dataclass(frozen=True)
class MediaStream:
    index: int
    a: LegState
    b: LegState
    #: RTP of this stream is forwarded by kernel rules.
    kernel: bool = False

    def leg(self, side: Side) -> LegState:
        return self.a if side is Side.A else self.b

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "kernel": self.kernel,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MediaStream:
        return cls(
            index=int(data["index"]),
            a=LegState.from_dict(data["a"]),
            b=LegState.from_dict(data["b"]),
            kernel=bool(data.get("kernel", False)),
        )


@dataclass(frozen=True)
class MediaSession:
    """A relay session for one call: what `MediaControl` hands back."""

    session_id: str
    call_id: str
    streams: tuple[MediaStream, ...]
    #: Wall-clock creation time (seconds since the epoch).
    created: float
    #: Both directions are written to the state directory (userspace path only).
    recording: bool = False

    @property
    def on_hold(self) -> bool:
        return any(s.a.direction.on_hold or s.b.direction.on_hold for s in self.streams)

    def relay_ports(self) -> set[int]:
        """The relay's RTP and RTCP ports of every stream, both legs."""
        return relay_ports(leg for stream in self.streams for leg in (stream.a, stream.b))

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "call_id": self.call_id,
            "streams": [s.to_dict() for s in self.streams],
            "created": self.created,
            "recording": self.recording,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MediaSession:
        return cls(
            session_id=data["session_id"],
            call_id=data["call_id"],
            streams=tuple(MediaStream.from_dict(s) for s in data["streams"]),
            created=float(data["created"]),
            recording=bool(data.get("recording", False)),
        )


def relay_ports(legs: Iterable[LegState]) -> set[int]:
    """The relay's RTP and RTCP ports of these legs."""
    return {port for leg in legs for port in leg.relay_ports}
