"""Port pairs with quarantine, driven by a fake clock."""

from __future__ import annotations

import random
from ipaddress import ip_address

import pytest

from sbc.media.ports import PortAllocator, PortPair, PortsExhausted

V4 = ip_address("198.51.100.1")
V6 = ip_address("2001:db8::1")


def allocator(quarantine: float = 10.0, low: int = 20000, high: int = 20009) -> PortAllocator:
    return PortAllocator(low, high, quarantine, rng=random.Random(1))


def test_pairs_are_even_rtp_with_rtcp_above_inside_the_range() -> None:
    ports = allocator(low=20001, high=20010)
    pairs = [ports.allocate(V4, 0.0) for _ in range(ports.capacity)]
    assert sorted(p.rtp for p in pairs) == [20002, 20004, 20006, 20008]
    assert all(p.rtcp == p.rtp + 1 <= 20010 for p in pairs)
    with pytest.raises(PortsExhausted, match=r"no free RTP port pair on 198.51.100.1 \(4 in use"):
        ports.allocate(V4, 0.0)


def test_addresses_have_their_own_pools() -> None:
    ports = allocator()
    for _ in range(ports.capacity):
        ports.allocate(V4, 0.0)
    assert ports.allocate(V6, 0.0).address == V6


def test_released_pair_rests_in_quarantine() -> None:
    ports = allocator(quarantine=10.0, high=20003)  # exactly two pairs
    first = ports.allocate(V4, 0.0)
    second = ports.allocate(V4, 0.0)
    ports.release(first, now=100.0)
    assert ports.in_quarantine(V4) == 1
    with pytest.raises(PortsExhausted, match="1 in use, 1 in quarantine"):
        ports.allocate(V4, 109.9)
    assert ports.allocate(V4, 110.0) == first
    ports.release(second, 110.0)
    ports.release(first, 111.0)
    # Least recently released first once both are out of quarantine.
    assert ports.allocate(V4, 200.0) == second


def test_a_released_pair_is_not_reused_while_others_are_free() -> None:
    ports = allocator(quarantine=0.0)
    pair = ports.allocate(V4, 0.0)
    ports.release(pair, 0.0)
    reused_at = next(i for i in range(10) if ports.allocate(V4, 1.0) == pair)
    assert reused_at == ports.capacity - 1


def test_release_of_unallocated_pair_is_an_error() -> None:
    ports = allocator()
    with pytest.raises(ValueError, match=r"port pair 198\.51\.100\.1:20000 is not allocated"):
        ports.release(PortPair(V4, 20000), 0.0)


def test_reserve_takes_a_replicated_pair_out_of_the_pool() -> None:
    ports = allocator(high=20003)
    ports.reserve(PortPair(V4, 20002))
    assert ports.allocate(V4, 0.0) == PortPair(V4, 20000)
    with pytest.raises(PortsExhausted):
        ports.allocate(V4, 0.0)
    with pytest.raises(ValueError, match="outside the configured range"):
        ports.reserve(PortPair(V4, 30000))


def test_skip_returns_a_busy_pair_without_quarantine() -> None:
    ports = allocator(high=20001)
    pair = ports.allocate(V4, 0.0)
    ports.skip(pair)
    assert ports.allocate(V4, 0.0) == pair
