"""Detectors and Guard: pure, driven by a fake clock (the `now` argument)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from sbc.firewall.config import (
    AuthFailureDetector,
    Detectors,
    MalformedDetector,
    RatePeakDetector,
    ScannerDetector,
)
from sbc.firewall.detectors import (
    AuthFailed,
    AuthFailures,
    BanReason,
    Guard,
    Malformed,
    MalformedMessage,
    RatePeak,
    RequestSeen,
    Scanner,
    WindowCounter,
)

A = ip_address("203.0.113.7")
B = ip_address("203.0.113.8")
TRUNK = ip_address("198.51.100.2")


def test_rate_peak_bans_once_per_window_after_max_requests() -> None:
    detector = RatePeak(RatePeakDetector(window=1.0, max_requests=3))
    out = [detector.observe(RequestSeen(A, "INVITE"), 0.1 * i) for i in range(6)]
    assert [len(o) for o in out] == [0, 0, 0, 1, 0, 0]
    decision = out[3][0]
    assert decision.target == ip_network("203.0.113.7/32")
    assert decision.reason is BanReason.RATE_PEAK
    assert decision.detail == "more than 3 requests in 1 s"


def test_rate_peak_window_resets() -> None:
    detector = RatePeak(RatePeakDetector(window=1.0, max_requests=3))
    for second in range(10):
        for _ in range(3):
            assert detector.observe(RequestSeen(A, "OPTIONS"), float(second)) == []


def test_rate_peak_ipv6_sources_in_one_prefix_share_a_window() -> None:
    detector = RatePeak(RatePeakDetector(window=10.0, max_requests=2))
    sources = [ip_address(f"2001:db8:1:2::{i}") for i in (1, 2, 3)]
    out = [detector.observe(RequestSeen(s, "INVITE"), 0.0) for s in sources]
    assert out[2][0].target == ip_network("2001:db8:1:2::/64")
    assert detector.observe(RequestSeen(ip_address("2001:db8:1:3::1"), "INVITE"), 0.0) == []


def test_auth_failures_per_source() -> None:
    detector = AuthFailures(AuthFailureDetector(window=60, per_source=3, per_user=100))
    out = [detector.observe(AuthFailed(A, f"u{i}"), float(i)) for i in range(4)]
    assert [len(o) for o in out] == [0, 0, 1, 0]
    assert out[2][0].reason is BanReason.AUTH_FAILURES
    assert out[2][0].detail == "3 digest failures in 60 s (last user 'u2')"


def test_auth_failures_per_user_bans_every_source_involved() -> None:
    detector = AuthFailures(AuthFailureDetector(window=60, per_source=100, per_user=3))
    sources = [ip_address(f"203.0.113.{i}") for i in (1, 2, 3, 4)]
    out = [detector.observe(AuthFailed(s, "alice"), 1.0) for s in sources]
    assert out[0] == out[1] == []
    assert {d.target for d in out[2]} == {ip_network(f"203.0.113.{i}/32") for i in (1, 2, 3)}
    assert {d.reason for d in out[2]} == {BanReason.AUTH_FAILURES_USER}
    # A source joining the attack after the threshold is banned on its first failure.
    assert [d.target for d in out[3]] == [ip_network("203.0.113.4/32")]


def test_auth_failures_window_expires() -> None:
    detector = AuthFailures(AuthFailureDetector(window=10, per_source=3, per_user=100))
    for t in (0.0, 11.0, 22.0, 33.0):
        assert detector.observe(AuthFailed(A, "bob"), t) == []
        assert detector.observe(AuthFailed(A, "bob"), t + 1) == []


def test_scanner_user_agents_case_insensitive() -> None:
    detector = Scanner(ScannerDetector())
    for agent in ("friendly-scanner", "SIPVicious 0.3.4", "sipcli/v1.8", "Mozilla sip-scan"):
        out = detector.observe(RequestSeen(A, "OPTIONS", agent), 0.0)
        assert [d.reason for d in out] == [BanReason.SCANNER_USER_AGENT], agent
    assert detector.observe(RequestSeen(A, "OPTIONS", "Linphone/5.2"), 0.0) == []
    assert detector.observe(RequestSeen(A, "OPTIONS", None), 0.0) == []


def test_scanner_sweep_of_distinct_users() -> None:
    detector = Scanner(ScannerDetector(sweep_window=60, sweep_users=5))
    # The same user again and again is not a sweep.
    for i in range(20):
        assert detector.observe(RequestSeen(A, "REGISTER", "x", "100"), float(i)) == []
    out = [detector.observe(RequestSeen(B, "REGISTER", "x", str(100 + i)), 1.0) for i in range(7)]
    assert [len(o) for o in out] == [0, 0, 0, 0, 1, 0, 0]
    assert out[4][0].detail == "5 distinct users probed in 60 s"
    # BYE, ACK and friends are not probes.
    assert all(
        detector.observe(RequestSeen(ip_address("203.0.113.9"), "BYE", "x", str(i)), 1.0) == []
        for i in range(10)
    )


def test_malformed() -> None:
    detector = Malformed(MalformedDetector(window=60, max_messages=2))
    out = [detector.observe(MalformedMessage(A, "garbage"), 0.0) for _ in range(4)]
    assert [len(o) for o in out] == [0, 0, 1, 0]
    assert out[2][0].reason is BanReason.MALFORMED


def test_guard_never_bans_trusted_and_does_not_track_them() -> None:
    guard = Guard(Detectors(), trusted=[ip_network("198.51.100.0/28")])
    for i in range(1000):
        assert guard.observe(RequestSeen(TRUNK, "OPTIONS", "friendly-scanner", str(i)), 0.0) == []
        assert guard.observe(AuthFailed(TRUNK, "alice"), 0.0) == []
    assert guard.trusted_events == 2000
    assert sum(guard.decisions.values()) == 0


def test_guard_does_not_ban_a_prefix_covering_a_trusted_address() -> None:
    guard = Guard(Detectors(), trusted=[ip_network("2001:db8:1:2::5/128")])
    neighbour = ip_address("2001:db8:1:2::6")
    assert guard.observe(RequestSeen(neighbour, "OPTIONS", "friendly-scanner"), 0.0) == []


def test_guard_holds_off_repeated_decisions() -> None:
    guard = Guard(Detectors())
    first = guard.observe(RequestSeen(A, "OPTIONS", "friendly-scanner"), 0.0)
    assert len(first) == 1
    assert guard.observe(RequestSeen(A, "OPTIONS", "friendly-scanner"), 1.0) == []
    assert len(guard.observe(RequestSeen(A, "OPTIONS", "friendly-scanner"), 10.0)) == 1
    assert guard.decisions[BanReason.SCANNER_USER_AGENT] == 2


def test_window_counter_is_bounded() -> None:
    counter: WindowCounter[int] = WindowCounter(window=10.0, limit=100)
    for key in range(10_000):
        counter.hit(key, 0.0)
    assert len(counter) == 100
