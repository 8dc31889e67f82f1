"""Configuration of the media relay: one small frozen value.

The lead wires this into the YAML schema later; until then callers build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

IPAddress = IPv4Address | IPv6Address


class MediaConfigError(ValueError):
    """A MediaConfig that cannot work; the message names the field."""


@dataclass(frozen=True)
class RealmMediaAddress:
    """The addresses a realm's media is relayed on (one per family, either optional)."""

    realm: str
    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None

    def address(self, family: int) -> IPAddress | None:
        """The media address for IP version ``family`` (4 or 6), or None."""
        return self.ipv4 if family == 4 else self.ipv6


@dataclass(frozen=True)
class MediaConfig:
    """Knobs of the media relay.

    Ports come in RTP/RTCP pairs (even RTP port, RTCP on the next odd one) from
    ``port_min..port_max`` on each realm's media address. A released pair rests in
    quarantine for ``port_quarantine`` seconds so that late packets of an ended call
    never reach the next one.
    """

    realms: tuple[RealmMediaAddress, ...]
    port_min: int = 20000
    port_max: int = 29999
    port_quarantine: float = 10.0
    #: Seconds without any accepted packet before a MediaTimeout event.
    media_timeout: float = 30.0
    #: The same while a leg is on hold (sendonly / recvonly / inactive).
    hold_timeout: float = 3600.0
    #: How often kernel counters are read back (also the timeout resolution).
    poll_interval: float = 1.0
    #: Install stateless nftables rules once both sides are latched.
    kernel_path: bool = True
    #: Packets from a source other than the latched one are dropped (RTP bleed).
    strict_source: bool = True
    #: Re-latch when a new SSRC arrives from a new source (bleed-prone; off).
    relatch_on_new_ssrc: bool = False
    #: Re-latch to a new source once the latched one has been silent this many
    #: seconds (NAT rebinding mid-call); 0 = never. In the kernel path silence is
    #: seen through the counters, read every ``poll_interval``.
    relatch_after_silence: float = 0.0
    #: The SBC's state directory: recordings go to its ``recordings/`` folder. None:
    #: sessions cannot be recorded.
    state_dir: Path | None = None
    #: Seed of the port shuffle; None draws one from the OS.
    port_seed: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 1024 <= self.port_min < self.port_max <= 65535:
            raise MediaConfigError(
                f"port_min..port_max: expected 1024 <= min < max <= 65535, "
                f"got {self.port_min}..{self.port_max}"
            )
        if self.port_max - (self.port_min + self.port_min % 2) < 1:
            raise MediaConfigError("port_min..port_max: range holds no RTP/RTCP pair")
        names = [r.realm for r in self.realms]
        if len(set(names)) != len(names):
            raise MediaConfigError(f"realms: duplicate realm name in {names}")
        for name, value in (
            ("port_quarantine", self.port_quarantine),
            ("media_timeout", self.media_timeout),
            ("hold_timeout", self.hold_timeout),
            ("poll_interval", self.poll_interval),
            ("relatch_after_silence", self.relatch_after_silence),
        ):
            may_be_zero = name in ("port_quarantine", "relatch_after_silence")
            if value < 0 or (not may_be_zero and value == 0):
                raise MediaConfigError(f"{name}: expected a positive number, got {value}")

    @property
    def recording_dir(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "recordings"

    def realm(self, name: str) -> RealmMediaAddress:
        """The realm named ``name``; KeyError if unknown."""
        for realm in self.realms:
            if realm.realm == name:
                return realm
        raise KeyError(name)

    def addresses(self) -> tuple[IPAddress, ...]:
        """Every media address of every realm, without duplicates, in config order."""
        seen: dict[IPAddress, None] = {}
        for realm in self.realms:
            for address in (realm.ipv4, realm.ipv6):
                if address is not None:
                    seen.setdefault(address)
        return tuple(seen)


def parse_address(text: str) -> IPAddress:
    """An IPv4/IPv6 address from text (helper for callers building a config)."""
    return ip_address(text)
