"""Small shared value types of the media relay."""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass
from typing import Any

from sbc.media.config import IPAddress


@functools.lru_cache(maxsize=4096)
def ip_address(text: str) -> IPAddress:
    """``ipaddress.ip_address``, remembered: SDP and peers repeat a few addresses
    (parsing one was 1.4 % of a call's CPU). ValueError as ip_address raises it."""
    return ipaddress.ip_address(text)


@dataclass(frozen=True, order=True)
class Endpoint:
    """A UDP transport address."""

    address: IPAddress
    port: int

    @property
    def family(self) -> int:
        return self.address.version

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @classmethod
    def of(cls, address: str | IPAddress, port: int) -> Endpoint:
        return cls(ip_address(address) if isinstance(address, str) else address, port)

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple[Any, ...]) -> Endpoint:
        """From an asyncio/socket address tuple (IPv6 scope and flow info ignored)."""
        return cls(ip_address(sockaddr[0]), int(sockaddr[1]))

    def sockaddr(self) -> tuple[str, int]:
        return (str(self.address), self.port)

    def to_dict(self) -> dict[str, Any]:
        return {"address": str(self.address), "port": self.port}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Endpoint:
        return cls(ip_address(data["address"]), int(data["port"]))


class Direction(enum.Enum):
    """SDP direction attribute of a leg's media (RFC 3264 5.1)."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"

    @property
    def on_hold(self) -> bool:
        return self is not Direction.SENDRECV
