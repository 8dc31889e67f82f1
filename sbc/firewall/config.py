"""The `firewall` configuration section: frozen dataclasses, loader-compatible.

These follow `sbc.config.schema` (the `Section` base and `spec()` metadata), so the
YAML loader can read them as soon as a `firewall: FirewallConfig` field is added to
the root `Config`. Durations are whole seconds; rates are per second.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Final

from sbc.config.schema import PORT_SPEC_EXPECT, IPNetwork, Issue, Section, key_path, spec

#: User-Agent substrings of well-known SIP scanners (matched case-insensitively).
#: sipvicious 0.2.x-0.3.x send "friendly-scanner"; newer releases send "sipvicious".
DEFAULT_SCANNER_USER_AGENTS: Final = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "sipscan",
    "sundayddr",
    "iwar",
    "sip auditor",
    "vaxsipuseragent",
    "pplsip",
    "smap",
    "sipbomber",
    "siparmyknife",
)

# Upper bounds. Each is checked at load time, so a value nftables would refuse (and
# with it the whole ruleset) or silently change, or one that makes a detector
# pointless, is a `file:line: key: reason` error of `sbc check-config` instead.

#: Highest packet rate of a meter, per second: more than one host takes in as SIP.
#: nftables charges a packet 10**9 / rate ns, which rounds to nothing above 10**9.
MAX_PACKET_RATE: Final = 1_000_000
#: Highest burst of a meter, in packets. nftables keeps a burst in 32 bits: 2**32
#: would become 0 without an error.
MAX_PACKET_BURST: Final = 1_000_000
#: Longest a source stays in a meter set while idle, in seconds: a day. nftables
#: 1.0.6 refuses set timeouts of 10**8 s and more, failing the whole apply.
MAX_METER_IDLE_TIMEOUT: Final = 86_400
#: Longest ban, and longest an offence is remembered, in seconds: a year. A ban is a
#: kernel element timeout (nftables refuses 10**8 s and more) and an expiry logged
#: as a date (datetime ends at year 9999).
MAX_BAN_SECONDS: Final = 365 * 86_400
#: Longest window of a detector, in seconds: a day.
MAX_DETECTOR_WINDOW: Final = 86_400
#: Highest threshold of a detector (requests, failures, messages per window).
MAX_DETECTOR_THRESHOLD: Final = 1_000_000
#: Most distinct users the sweep detector remembers per source (and sources per user
#: the auth detector remembers); a higher `sweep_users` could never be reached.
MAX_USERS_PER_SOURCE: Final = 1_024


@dataclass(frozen=True)
class SipPorts(Section):
    """The SIP ports metered in the kernel (normally derived from `sip.listen`)."""

    udp: tuple[int, ...] = field(default=(5060,), metadata=spec("UDP SIP ports."))
    tcp: tuple[int, ...] = field(default=(5060,), metadata=spec("TCP SIP ports."))
    tls: tuple[int, ...] = field(default=(5061,), metadata=spec("TLS SIP ports."))

    def check(self, path: str) -> Iterator[Issue]:
        for name in ("udp", "tcp", "tls"):
            for index, port in enumerate(getattr(self, name)):
                if not 1 <= port <= 65535:
                    yield key_path(path, f"{name}[{index}]"), f"expected {PORT_SPEC_EXPECT}"
        overlap = set(self.tcp) & set(self.tls)
        if overlap:
            yield (
                key_path(path, "tls"),
                f"port(s) {', '.join(map(str, sorted(overlap)))} also listed under tcp",
            )


@dataclass(frozen=True)
class PacketMeter(Section):
    """A per-source packet rate: `rate` per second sustained, `burst` packets at once."""

    rate: int = field(
        default=100,
        metadata=spec("Packets per second per source.", min=1, max=MAX_PACKET_RATE),
    )
    burst: int = field(
        default=200, metadata=spec("Packets allowed in a burst.", min=1, max=MAX_PACKET_BURST)
    )


@dataclass(frozen=True)
class StreamLimits(Section):
    """Per-source limits of a connection-oriented transport (TCP, TLS)."""

    packets: PacketMeter = field(
        default_factory=lambda: PacketMeter(rate=300, burst=600),
        metadata=spec("Packet rate per source."),
    )
    new_connections: PacketMeter = field(
        default_factory=lambda: PacketMeter(rate=5, burst=20),
        metadata=spec("New connections (SYN) per second per source."),
    )
    max_connections: int = field(
        default=64,
        metadata=spec("Concurrent connections per source (ct count).", min=1, max=65535),
    )


@dataclass(frozen=True)
class MediaPorts(Section):
    """The relay's RTP/RTCP port range: closed except the allocated pinholes."""

    enabled: bool = field(default=True, metadata=spec("Close the range outside pinholes."))
    first: int = field(
        default=20000, metadata=spec("First RTP port.", min=1, max=65535, expect=PORT_SPEC_EXPECT)
    )
    last: int = field(
        default=29999, metadata=spec("Last RTP port.", min=1, max=65535, expect=PORT_SPEC_EXPECT)
    )

    def check(self, path: str) -> Iterator[Issue]:
        if self.first > self.last:
            yield path, f"first ({self.first}) is above last ({self.last})"


@dataclass(frozen=True)
class BanPolicy(Section):
    """How long bans last; each repeat offence takes the next duration."""

    durations: tuple[int, ...] = field(
        default=(300, 3600, 86400, 604800),
        metadata=spec(
            "Ban seconds for the 1st, 2nd, ... offence (the last repeats).",
            min=1,
            max=MAX_BAN_SECONDS,
            min_items=1,
        ),
    )
    forget_after: int = field(
        default=30 * 86400,
        metadata=spec(
            "Seconds without offence after which a source starts over.",
            min=1,
            max=MAX_BAN_SECONDS,
        ),
    )

    def check(self, path: str) -> Iterator[Issue]:
        if list(self.durations) != sorted(self.durations):
            yield key_path(path, "durations"), "durations must not decrease"

    def duration(self, offence: int) -> int:
        """Seconds of a ban for the `offence`-th offence (1-based)."""
        return self.durations[min(max(offence, 1), len(self.durations)) - 1]


@dataclass(frozen=True)
class RatePeakDetector(Section):
    """Request-rate peaks per source (Kamailio's pike): too many requests in a window."""

    enabled: bool = field(default=True, metadata=spec("Run this detector."))
    window: float = field(
        default=2.0, metadata=spec("Window in seconds.", min=0.1, max=MAX_DETECTOR_WINDOW)
    )
    max_requests: int = field(
        default=60,
        metadata=spec("Requests allowed per window.", min=1, max=MAX_DETECTOR_THRESHOLD),
    )


@dataclass(frozen=True)
class AuthFailureDetector(Section):
    """Digest-authentication failures, per source and per user."""

    enabled: bool = field(default=True, metadata=spec("Run this detector."))
    window: float = field(
        default=60.0, metadata=spec("Window in seconds.", min=1, max=MAX_DETECTOR_WINDOW)
    )
    per_source: int = field(
        default=5,
        metadata=spec("Failures per source per window.", min=1, max=MAX_DETECTOR_THRESHOLD),
    )
    per_user: int = field(
        default=20,
        metadata=spec(
            "Failures per user per window; bans every source involved.",
            min=1,
            max=MAX_DETECTOR_THRESHOLD,
        ),
    )


@dataclass(frozen=True)
class ScannerDetector(Section):
    """Scanner fingerprints: User-Agents, and sweeps across many users."""

    enabled: bool = field(default=True, metadata=spec("Run this detector."))
    user_agents: tuple[str, ...] = field(
        default=DEFAULT_SCANNER_USER_AGENTS,
        metadata=spec("User-Agent substrings (case-insensitive) banned at first sight."),
    )
    sweep_window: float = field(
        default=60.0, metadata=spec("Sweep window in seconds.", min=1, max=MAX_DETECTOR_WINDOW)
    )
    sweep_users: int = field(
        default=10,
        metadata=spec(
            "Distinct users probed (OPTIONS/REGISTER/INVITE) per window.",
            min=2,
            max=MAX_USERS_PER_SOURCE,
        ),
    )


@dataclass(frozen=True)
class MalformedDetector(Section):
    """Messages that fail to parse, per source."""

    enabled: bool = field(default=True, metadata=spec("Run this detector."))
    window: float = field(
        default=60.0, metadata=spec("Window in seconds.", min=1, max=MAX_DETECTOR_WINDOW)
    )
    max_messages: int = field(
        default=10,
        metadata=spec("Malformed messages per window.", min=1, max=MAX_DETECTOR_THRESHOLD),
    )


@dataclass(frozen=True)
class Detectors(Section):
    rate: RatePeakDetector = field(default_factory=RatePeakDetector, metadata=spec("Rate peaks."))
    auth: AuthFailureDetector = field(
        default_factory=AuthFailureDetector, metadata=spec("Digest failures.")
    )
    scanner: ScannerDetector = field(
        default_factory=ScannerDetector, metadata=spec("Scanner fingerprints.")
    )
    malformed: MalformedDetector = field(
        default_factory=MalformedDetector, metadata=spec("Malformed messages.")
    )


@dataclass(frozen=True)
class FirewallConfig(Section):
    """The SBC's own nftables table (`inet sbc`) and the detectors feeding it."""

    enabled: bool = field(
        default=False,
        metadata=spec("Run the firewall in `sbc run` (needs CAP_NET_ADMIN and libnftables)."),
    )
    required: bool = field(
        default=False,
        metadata=spec("Refuse to start when the firewall cannot be installed."),
    )
    sip_ports: SipPorts = field(
        default_factory=SipPorts,
        metadata=spec("Metered SIP ports; left at the defaults, `sbc run` takes the listeners'."),
    )
    udp: PacketMeter = field(
        default_factory=PacketMeter, metadata=spec("UDP SIP packets per source.")
    )
    udp_total: PacketMeter = field(
        default_factory=lambda: PacketMeter(rate=2000, burst=4000),
        metadata=spec(
            "UDP SIP packets per second from all untrusted sources together: a flood "
            "from many spoofed sources, each under the per-source rate, is dropped in "
            "the kernel beyond it (trusted peers bypass it)."
        ),
    )
    tcp: StreamLimits = field(default_factory=StreamLimits, metadata=spec("TCP SIP limits."))
    tls: StreamLimits = field(default_factory=StreamLimits, metadata=spec("TLS SIP limits."))
    ipv6_prefix_length: int = field(
        default=64,
        metadata=spec(
            "IPv6 sources are metered and banned per prefix of this length.", min=32, max=128
        ),
    )
    meter_size: int = field(
        default=65536, metadata=spec("Sources tracked per meter set.", min=16, max=1 << 20)
    )
    meter_idle_timeout: int = field(
        default=60,
        metadata=spec(
            "Seconds an idle source stays in a meter set.", min=1, max=MAX_METER_IDLE_TIMEOUT
        ),
    )
    trusted: tuple[IPNetwork, ...] = field(
        default=(),
        metadata=spec("Trunks, the core, operators' networks: bypass meters, never banned."),
    )
    media_ports: MediaPorts = field(default_factory=MediaPorts, metadata=spec("RTP range."))
    bans: BanPolicy = field(default_factory=BanPolicy, metadata=spec("Ban durations."))
    detectors: Detectors = field(default_factory=Detectors, metadata=spec("Userspace detectors."))
    state_file: Path | None = field(
        default=None,
        metadata=spec(
            "Where the blacklist is persisted across restarts; "
            "null = state_dir/firewall-blacklist.json."
        ),
    )

    @property
    def trusted_v4(self) -> tuple[IPv4Network, ...]:
        return tuple(n for n in self.trusted if isinstance(n, IPv4Network))

    @property
    def trusted_v6(self) -> tuple[IPv6Network, ...]:
        return tuple(n for n in self.trusted if isinstance(n, IPv6Network))
