"""Session values round-trip; config checks; the inactivity timer on a fake clock."""

from __future__ import annotations

import json
from ipaddress import ip_address

import pytest

from sbc.media.config import MediaConfig, MediaConfigError, RealmMediaAddress
from sbc.media.latching import Latch, LatchState
from sbc.media.rtcp import RtcpQuality
from sbc.media.session import LegCounters, LegState, MediaSession, MediaStream
from sbc.media.timeout import InactivityTimer
from sbc.media.values import Direction, Endpoint


def session() -> MediaSession:
    a = LegState(
        realm="outside",
        local=Endpoint.of("198.51.100.1", 20000),
        remote_hint=Endpoint.of("10.0.0.5", 4000),
        rtcp_mux=True,
        direction=Direction.SENDONLY,
        rtp_latch=Latch(LatchState.LATCHED, Endpoint.of("198.51.100.10", 34000), 0xA),
        counters=LegCounters(packets=5, bytes=860, kernel_packets=1000, dropped_source=50),
        quality=RtcpQuality(3, 0.25, 7, 80, 0.12),
    )
    b = LegState(realm="inside", local=Endpoint.of("2001:db8:2::1", 20002))
    return MediaSession("0123456789ab", "call-1", (MediaStream(0, a, b, kernel=True),), 1.7e9)


def test_session_round_trips_through_json() -> None:
    value = session()
    assert MediaSession.from_dict(json.loads(json.dumps(value.to_dict()))) == value


def test_destinations_prefer_the_latched_source_over_the_sdp_hint() -> None:
    a, b = session().streams[0].a, session().streams[0].b
    assert a.rtp_destination == Endpoint.of("198.51.100.10", 34000)
    assert a.rtcp_destination == a.rtp_destination  # rtcp-mux
    assert b.rtp_destination is None
    hinted = LegState(
        "inside", Endpoint.of("203.0.113.1", 20002), Endpoint.of("203.0.113.20", 5000)
    )
    assert hinted.rtcp_destination == Endpoint.of("203.0.113.20", 5001)
    assert hinted.local_rtcp == Endpoint.of("203.0.113.1", 20003)
    assert session().on_hold


def test_config_rejects_bad_ranges_and_duplicate_realms() -> None:
    realm = RealmMediaAddress("outside", ip_address("198.51.100.1"))  # type: ignore[arg-type]
    with pytest.raises(MediaConfigError, match=r"port_min..port_max: expected 1024 <= min"):
        MediaConfig((realm,), port_min=30000, port_max=20000)
    with pytest.raises(MediaConfigError, match="realms: duplicate realm name"):
        MediaConfig((realm, realm))
    with pytest.raises(MediaConfigError, match="media_timeout: expected a positive number"):
        MediaConfig((realm,), media_timeout=0)
    assert MediaConfig((realm,)).realm("outside") is realm


def test_timer_fires_once_per_silent_period() -> None:
    timer = InactivityTimer(timeout=30, hold_timeout=600, last_activity=0.0)
    assert timer.check(29.9, on_hold=lambda: False) is None
    assert timer.check(30.0, on_hold=lambda: False) == 30.0
    assert timer.check(45.0, on_hold=lambda: False) is None  # once
    timer.activity(50.0)
    assert timer.check(79.0, on_hold=lambda: False) is None
    assert timer.check(80.5, on_hold=lambda: False) == 30.5


def test_timer_waits_longer_on_hold() -> None:
    timer = InactivityTimer(timeout=30, hold_timeout=600, last_activity=0.0)
    assert timer.check(100.0, on_hold=lambda: True) is None
    assert timer.deadline(on_hold=True) == 600.0
    assert timer.check(600.0, on_hold=lambda: True) == 600.0


def test_timer_asks_for_hold_only_after_the_shorter_limit() -> None:
    asked: list[float] = []

    def on_hold() -> bool:
        asked.append(1)
        return True

    timer = InactivityTimer(timeout=30, hold_timeout=600, last_activity=0.0)
    assert timer.check(29.9, on_hold) is None
    assert asked == []
    assert timer.check(30.0, on_hold) is None  # on hold: 600 s
    assert asked == [1]
