"""RTP/RTCP port pairs per media address, with a quarantine on release.

Pure: the caller passes the current time. A released pair is not handed out again
before ``quarantine`` seconds have passed, and free pairs are reused least recently
used first, so a late packet of an ended call does not reach the next one.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from sbc.media.config import IPAddress


class PortsExhausted(RuntimeError):
    """No free RTP/RTCP pair on an address (all in use or in quarantine)."""


@dataclass(frozen=True)
class PortPair:
    """An RTP port (even) and its RTCP port (RTP + 1) on one local address."""

    address: IPAddress
    rtp: int

    @property
    def rtcp(self) -> int:
        return self.rtp + 1


class PortAllocator:
    """Hands out even/odd port pairs from ``port_min..port_max`` per address."""

    def __init__(
        self,
        port_min: int,
        port_max: int,
        quarantine: float,
        rng: random.Random | None = None,
    ) -> None:
        first = port_min + port_min % 2
        self._ports = list(range(first, port_max, 2))  # RTP ports; RTCP = +1 <= port_max
        self._quarantine = quarantine
        self._rng = rng or random.Random()
        self._free: dict[IPAddress, deque[int]] = {}
        # (release time, port), in release order: times are monotonic.
        self._resting: dict[IPAddress, deque[tuple[float, int]]] = {}
        self._used: dict[IPAddress, set[int]] = {}

    def _pool(self, address: IPAddress) -> deque[int]:
        pool = self._free.get(address)
        if pool is None:
            ports = list(self._ports)
            # Random order: an attacker cannot guess the next call's port.
            self._rng.shuffle(ports)
            pool = self._free[address] = deque(ports)
            self._resting[address] = deque()
            self._used[address] = set()
        return pool

    def allocate(self, address: IPAddress, now: float) -> PortPair:
        """A free pair on ``address``; PortsExhausted if there is none."""
        pool = self._pool(address)
        resting = self._resting[address]
        while resting and resting[0][0] + self._quarantine <= now:
            pool.append(resting.popleft()[1])
        if not pool:
            raise PortsExhausted(
                f"no free RTP port pair on {address} "
                f"({len(self._used[address])} in use, {len(resting)} in quarantine)"
            )
        port = pool.popleft()
        self._used[address].add(port)
        return PortPair(address, port)

    def reserve(self, pair: PortPair) -> None:
        """Mark ``pair`` used (restoring state replicated from a peer node)."""
        pool = self._pool(pair.address)
        if pair.rtp in self._used[pair.address]:
            return
        try:
            pool.remove(pair.rtp)
        except ValueError:
            resting = self._resting[pair.address]
            kept = [item for item in resting if item[1] != pair.rtp]
            if len(kept) == len(resting) and pair.rtp not in self._ports:
                raise ValueError(f"port {pair.rtp} is outside the configured range") from None
            self._resting[pair.address] = deque(kept)
        self._used[pair.address].add(pair.rtp)

    def release(self, pair: PortPair, now: float) -> None:
        """Return ``pair``; it rests in quarantine before reuse."""
        used = self._used.get(pair.address)
        if used is None or pair.rtp not in used:
            raise ValueError(f"port pair {pair.address}:{pair.rtp} is not allocated")
        used.remove(pair.rtp)
        self._resting[pair.address].append((now, pair.rtp))

    def skip(self, pair: PortPair) -> None:
        """Give back a pair that could not be bound (busy on the host); no quarantine."""
        self._used[pair.address].discard(pair.rtp)
        self._free[pair.address].append(pair.rtp)

    def in_use(self, address: IPAddress) -> int:
        return len(self._used.get(address, ()))

    def in_quarantine(self, address: IPAddress) -> int:
        return len(self._resting.get(address, ()))

    @property
    def capacity(self) -> int:
        """Pairs per address."""
        return len(self._ports)
