"""Bans: what is banned, for how long and why, and the file that keeps them.

A ban targets a network: an IPv4 source is banned as its /32, an IPv6 source as its
prefix (a /64 by default), because one host on a /64 can use any of 2**64 addresses.
The kernel blacklist sets hold the network address; the rule masks the source.

`BlacklistStore` is the persistent half: a JSON file rewritten atomically under a lock,
holding the active bans (restored into the kernel on start) and the offence history
that makes bans escalate.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path
from typing import Any, Final

from sbc.files import directory_owner

IPAddress = IPv4Address | IPv6Address
BanTarget = IPv4Network | IPv6Network

STORE_VERSION: Final = 1
#: nftables element comments hold at most 128 bytes (NFT_USERDATA_MAXLEN is 256, the
#: comment TLV is capped at 128 by nft).
MAX_COMMENT_BYTES: Final = 127
#: Cap on the persisted offence history, oldest dropped first.
MAX_OFFENCE_HISTORY: Final = 100_000


class BanTargetError(ValueError):
    """An operator-given address or prefix that cannot be banned as written."""


def ban_target(source: IPAddress | str, ipv6_prefix_length: int = 64) -> BanTarget:
    """The network banned for `source`: its /32, or its IPv6 prefix.

    Accepts an address, or (from operators) a network no wider than a single
    source: `203.0.113.7/32` or `2001:db8:1:2::/64`.
    """
    if isinstance(source, str):
        text = source.strip()
        try:
            if "/" in text:
                network = ip_network(text, strict=False)
                if network.version == 4 and network.prefixlen != 32:
                    raise BanTargetError(f"{text}: IPv4 bans are per address (/32)")
                if network.version == 6 and network.prefixlen != ipv6_prefix_length:
                    raise BanTargetError(f"{text}: IPv6 bans are per /{ipv6_prefix_length} prefix")
                return network
            source = ip_address(text)
        except ValueError as exc:
            if isinstance(exc, BanTargetError):
                raise
            raise BanTargetError(f"{text!r} is not an IP address") from None
    if isinstance(source, IPv6Address) and source.ipv4_mapped is not None:
        # An IPv4 peer seen through a dual-stack socket: its /64 would be the whole
        # mapped space (every IPv4 source). The transport unmaps first; so does this.
        source = source.ipv4_mapped
    if isinstance(source, IPv4Address):
        return IPv4Network(source)
    return IPv6Network((source, ipv6_prefix_length), strict=False)


@dataclass(frozen=True)
class Ban:
    """One entry of the blacklist."""

    target: BanTarget
    reason: str
    created: float
    expires: float
    offence: int = 1

    @property
    def duration(self) -> float:
        return self.expires - self.created

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires - now)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "reason": self.reason,
            "created": self.created,
            "expires": self.expires,
            "offence": self.offence,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ban:
        return cls(
            target=ip_network(data["target"]),
            reason=str(data["reason"]),
            created=float(data["created"]),
            expires=float(data["expires"]),
            offence=int(data.get("offence", 1)),
        )


def kernel_comment(ban: Ban) -> str:
    """The element comment: the reason, cut to what nftables keeps, no quotes."""
    text = ban.reason.replace('"', "'").replace("\\", "/")
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return text.encode()[:MAX_COMMENT_BYTES].decode()


@dataclass(frozen=True)
class Offences:
    """How often a target was banned, and when last."""

    count: int
    last: float


@dataclass
class StoreState:
    bans: dict[BanTarget, Ban]
    offences: dict[BanTarget, Offences]

    def active(self, now: float) -> list[Ban]:
        return sorted((b for b in self.bans.values() if b.expires > now), key=lambda b: b.expires)

    def prune(self, now: float, forget_after: float) -> None:
        self.bans = {t: b for t, b in self.bans.items() if b.expires > now}
        self.offences = {
            t: o for t, o in self.offences.items() if now - o.last < forget_after or t in self.bans
        }
        if len(self.offences) > MAX_OFFENCE_HISTORY:
            keep = sorted(self.offences.items(), key=lambda item: item[1].last)
            self.offences = dict(keep[-MAX_OFFENCE_HISTORY:])

    def next_offence(self, target: BanTarget, now: float, forget_after: float) -> int:
        previous = self.offences.get(target)
        if previous is None or now - previous.last >= forget_after:
            return 1
        return previous.count + 1

    def record(self, ban: Ban) -> None:
        self.bans[ban.target] = ban
        self.offences[ban.target] = Offences(ban.offence, ban.created)


class BlacklistStore:
    """The blacklist's JSON file. Every change is a locked read-modify-write."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> StoreState:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return StoreState({}, {})
        if data.get("version") != STORE_VERSION:
            raise ValueError(f"{self.path}: unsupported blacklist version {data.get('version')!r}")
        bans = {b.target: b for b in map(Ban.from_json, data.get("bans", []))}
        offences = {
            ip_network(target): Offences(int(o["count"]), float(o["last"]))
            for target, o in data.get("offences", {}).items()
        }
        return StoreState(bans, offences)

    def write(self, state: StoreState) -> None:
        data = {
            "version": STORE_VERSION,
            "bans": [b.to_json() for b in sorted(state.bans.values(), key=lambda b: b.expires)],
            "offences": {
                str(t): {"count": o.count, "last": o.last} for t, o in state.offences.items()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blacklist-", dir=self.path.parent)
        try:
            # `sudo sbc ban add` replaces the file: it stays the service's (0600).
            owner = directory_owner(self.path)
            if owner is not None:
                os.fchown(fd, *owner)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def update(self) -> Iterator[StoreState]:
        """Lock the file, yield its state, and write it back if the block succeeds.

        The lock is on a sibling `.lock` file so that the atomic rename of the data
        file does not lose it; the CLI and the running SBC may both change bans.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            owner = directory_owner(lock_path)
            if owner is not None and os.fstat(lock.fileno()).st_uid == 0:
                os.fchown(lock.fileno(), *owner)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                yield state
                self.write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
